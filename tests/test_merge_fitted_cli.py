"""`manytask merge` with a fitted rule: the config names the factory and the data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from manytask import registry
from manytask.cli import main
from manytask.merge.io import open_checkpoint

from .merge_fitted_models import CLI_SETUP, Net

MODULE = "tests.merge_fitted_models"


def write_config(tmp_path: Path, rule: str, **extra: object) -> Path:
    """A config for ``rule`` over the two task checkpoints; a base only for AdaMerging, the one
    rule here that merges task vectors (the others refuse a base they would not use)."""
    save_file(CLI_SETUP.base, str(tmp_path / "base.safetensors"))
    for i, state in enumerate(CLI_SETUP.models):
        save_file(state, str(tmp_path / f"task{i}.safetensors"))
    config = {
        "name": "fitted",
        "base": str(tmp_path / "base.safetensors") if rule.startswith("adamerging") else None,
        "models": [str(tmp_path / f"task{i}.safetensors") for i in range(len(CLI_SETUP.models))],
        "rule": rule,
        "output": {"dir": str(tmp_path / "out")},
        "fitted": {"factory": f"{MODULE}:cli_factory", "data": f"{MODULE}:cli_data"},
        **extra,
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("rule", "params"),
    [("regmean", {}), ("fisher", {"num_examples": 8}), ("adamerging_task", {"steps": 3})],
)
def test_a_fitted_rule_from_the_cli_writes_what_the_python_api_returns(tmp_path, rule, params):
    path = write_config(tmp_path, rule, params=params, seed=3)
    assert main(["merge", str(path), "--quiet"]) == 0
    built = registry.call_with_params("merge_rule", rule, params)
    base = CLI_SETUP.base if rule.startswith("adamerging") else None
    expected = built.fit(CLI_SETUP.factory, CLI_SETUP.models, CLI_SETUP.data, base=base, seed=3)
    with open_checkpoint(tmp_path / "out") as merged:
        assert sorted(merged) == sorted(expected)
        for name, tensor in expected.items():
            torch.testing.assert_close(merged.get(name), tensor, rtol=1e-6, atol=1e-7)
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out == ["merge_config.yaml", "model.safetensors", "summary.json"]


def test_the_dry_run_checks_the_imports_and_writes_nothing(tmp_path, capsys):
    path = write_config(tmp_path, "regmean")
    assert main(["merge", str(path), "--dry-run"]) == 0
    assert "fitted merge: rule 'regmean' over 2 task model(s)" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fitted": None}, "rule 'regmean' is fitted: .* needs fitted.factory and fitted.data"),
        ({"fitted": {"factory": "nope", "data": f"{MODULE}:cli_data"}}, "as 'module:function'"),
        (
            {"fitted": {"factory": "no_such_module:f", "data": f"{MODULE}:cli_data"}},
            "fitted.factory: cannot import module 'no_such_module'",
        ),
        (
            {"fitted": {"factory": f"{MODULE}:absent", "data": f"{MODULE}:cli_data"}},
            f"fitted.factory: '{MODULE}' has no attribute 'absent'",
        ),
        (
            {"fitted": {"factory": f"{MODULE}:cli_factory", "data": f"{MODULE}:CLI_SETUP"}},
            "is a Setup, not a function",
        ),
        (
            {
                "fitted": {
                    "factory": f"{MODULE}:cli_factory",
                    "data": f"{MODULE}:cli_data_for_one_model",
                }
            },
            r"must return one iterable of batches per task model \(2\), got 1",
        ),
        ({"rule": "surgery"}, "rule 'surgery' returns a module"),
        ({"rule": "ties"}, "has a 'fitted' section but rule 'ties' is data-free"),
    ],
)
def test_bad_fitted_configs_end_with_an_error_naming_the_problem(tmp_path, capsys, change, message):
    path = write_config(tmp_path, "regmean")
    config = yaml.safe_load(path.read_text())
    config.update(change)
    if config["fitted"] is None:
        del config["fitted"]
    path.write_text(yaml.safe_dump(config))
    assert main(["merge", str(path), "--quiet"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_the_statistics_cache_of_the_config_is_filled_then_reused(tmp_path):
    path = write_config(tmp_path, "regmean")
    config = yaml.safe_load(path.read_text())
    config["fitted"]["cache"] = str(tmp_path / "stats")
    path.write_text(yaml.safe_dump(config))
    calls = Net.calls
    assert main(["merge", str(path), "--quiet"]) == 0
    assert Net.calls > calls  # the first merge ran the task models on their data
    cached = sorted(p.name for p in (tmp_path / "stats").rglob("*") if p.is_file())
    assert cached  # the Gram matrices were stored
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    calls = Net.calls
    assert main(["merge", str(path), "--quiet", "--overwrite"]) == 0
    assert Net.calls == calls  # the second one read them from the cache
    assert sorted(p.name for p in (tmp_path / "stats").rglob("*") if p.is_file()) == cached
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == first
