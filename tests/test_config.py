"""Bad input ends with one short message naming the problem and the valid choices."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from manytask import registry
from manytask.config import load_config, parse_config
from manytask.errors import ConfigError
from manytask.validation import apply_overrides

BASE = {
    "name": "cfg",
    "data": {"name": "mmoe_synthetic", "n_train": 64, "n_val": 32, "n_test": 32},
    "model": {"name": "shared_bottom", "encoder": {"name": "mlp", "hidden": [8]}},
    "train": {"epochs": 1, "batch_size": 32, "progress": False},
}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "manytask.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def assert_short_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    assert len(result.stderr.splitlines()) <= 3
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_cli_unknown_config_key(tmp_path):
    data = {**BASE, "train": {**BASE["train"], "epoch": 3}}
    result = run_cli("train", str(write(tmp_path, data)), cwd=tmp_path)
    assert_short_error(result, "unknown key 'train.epoch'", "epochs", "batch_size")


def test_cli_unknown_method_name(tmp_path):
    result = run_cli("compare", str(write(tmp_path, BASE)), "--methods", "ew,zzz", cwd=tmp_path)
    assert_short_error(
        result, "unknown balancer 'zzz'", "Valid choices: ", "dwa, ew,", "trimmed_mean, upgrad, uw"
    )


def test_cli_value_of_the_wrong_type(tmp_path):
    result = run_cli("train", str(write(tmp_path, BASE)), "--set", "train.epochs=ten", cwd=tmp_path)
    assert_short_error(result, "'train.epochs'", "expected an integer", "'ten'")


def test_cli_missing_data_path(tmp_path):
    data = {**BASE, "data": {"name": "multi_fashion", "root": str(tmp_path / "missing")}}
    result = run_cli("train", str(write(tmp_path, data)), cwd=tmp_path)
    assert_short_error(result, "Fashion-MNIST not found", "missing", "data.root")


def test_cli_unknown_component_parameter_lists_valid_ones(tmp_path):
    result = run_cli(
        "train", str(write(tmp_path, BASE)), "--set", "balancer.temperature=2", cwd=tmp_path
    )
    assert_short_error(result, "unknown key 'temperature' in balancer 'ew'")
    data = {**BASE, "model": {"name": "shared_bottom", "encoder": {"name": "mlp", "width": 3}}}
    result = run_cli("train", str(write(tmp_path, data)), cwd=tmp_path)
    assert_short_error(result, "unknown key 'width' in encoder 'mlp'", "hidden")


def test_unknown_dataset_optimizer_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    result = run_cli(
        "train", str(write(tmp_path, {**BASE, "optimizer": {"name": "adamm"}})), cwd=tmp_path
    )
    assert_short_error(result, "unknown optimizer 'adamm'", "Did you mean 'adam'")


def test_overrides_parse_yaml_values_and_reach_nested_keys():
    data = apply_overrides(
        {"train": {"epochs": 1}}, ["train.epochs=3", "model.encoder.hidden=[4, 2]"]
    )
    assert data["train"]["epochs"] == 3
    assert data["model"]["encoder"]["hidden"] == [4, 2]
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.epochs"])


def test_unknown_task_override_lists_tasks():
    config = parse_config({**BASE, "tasks": {"y3": {}}})
    from manytask.train.build import build_experiment

    with pytest.raises(ConfigError, match="unknown task\\(s\\) y3.*y1, y2"):
        build_experiment(config)


def test_nested_task_override_key_is_checked():
    with pytest.raises(ConfigError, match="unknown key 'tasks.y1.metric'.*metrics"):
        parse_config({**BASE, "tasks": {"y1": {"metric": ["mae"]}}})


def test_task_overrides_select_and_change_tasks():
    from manytask.train.build import build_experiment

    config = parse_config({**BASE, "tasks": {"y2": {"metrics": ["r2", "mae"], "weight": 0.5}}})
    experiment = build_experiment(config)
    assert experiment.tasks.names == ["y2"]
    task = experiment.tasks["y2"]
    assert task.primary_metric == "r2" and task.weight == 0.5
    assert list(experiment.model.heads) == ["y2"]


def test_registry_look_ups_import_the_modules_that_register_each_kind():
    """A fresh process that imports only the registry still finds every kind's components;
    `import manytask` alone loads none of its subpackages."""
    code = (
        "import sys\nimport manytask\n"
        "assert 'manytask.balance' not in sys.modules and 'manytask.nn' not in sys.modules\n"
        "from manytask import registry\n"
        "from manytask.task import Task\n"
        "task = Task('y', 'cross_entropy', output_dim=3)\n"
        "assert task.metrics[0] == 'accuracy' and task.higher_is_better('accuracy')\n"
        "print(*(len(registry.names(kind)) for kind in registry.KINDS))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    counts = dict(zip(registry.KINDS, map(int, done.stdout.split()), strict=True))
    assert counts == {kind: len(registry.names(kind)) for kind in registry.KINDS}
    assert min(counts.values()) > 0


def test_the_package_imports_its_parts_on_first_use():
    import manytask

    assert manytask.balance.get is not None and manytask.Config is manytask.config.Config
    assert {"balance", "nn", "Config", "load_config"} <= set(dir(manytask))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = manytask.nope  # type: ignore[attr-defined]
