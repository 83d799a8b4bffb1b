"""``manytask merge``: config, dry run, run folder, overwrite, overrides and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor

from manytask import registry
from manytask.cli import main
from manytask.errors import ConfigError
from manytask.merge import MergeRule, load_merge_config, open_checkpoint
from manytask.registry import Entry

ROOT = Path(__file__).resolve().parents[1]


class Shifted(MergeRule):
    """θ₀ + scale · Σ (θ_t − θ₀) + offset (a rule made for these tests)."""

    def __init__(self, scale: float = 1.0, offset: float = 0.0) -> None:
        self.scale, self.offset = scale, offset

    def merge_tensor(
        self, name: str, base: Tensor | None, models: Sequence[Tensor], generator: torch.Generator
    ) -> Tensor:
        assert base is not None
        return base + self.scale * sum(m - base for m in models) + self.offset


@pytest.fixture
def test_rule(monkeypatch):
    """Register ``Shifted`` as merge rule 'shifted' for one test only."""
    table = registry._REGISTRY["merge_rule"]
    monkeypatch.setitem(table, "shifted", Entry("merge_rule", "shifted", Shifted, "test rule"))


@pytest.fixture
def setup(tmp_path: Path, test_rule) -> Path:
    """A base and two task models, and a config merging them into tmp_path/out."""
    base = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5]), "n": torch.tensor([3])}
    a = {**base, "w": torch.tensor([2.0, 2.0])}
    b = {**base, "b": torch.tensor([1.5])}
    for name, sd in (("base", base), ("a", a), ("b", b)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    config = {
        "name": "m",
        "base": str(tmp_path / "base.safetensors"),
        "models": [
            str(tmp_path / "a.safetensors"),
            {"name": "bee", "path": str(tmp_path / "b.safetensors")},
        ],
        "rule": "shifted",
        "params": {"scale": 1.0},
        "output": {"dir": str(tmp_path / "out")},
    }  # fmt: skip
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_dry_run_prints_the_plan_and_memory_estimate_and_writes_nothing(setup, capsys):
    before = sorted(p.name for p in setup.parent.iterdir())
    assert main(["merge", str(setup), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "merge plan: rule 'shifted' over 2 task model(s)" in out
    assert "tensors: 3 (2 merged, 1 copied)" in out
    # 3 inputs × the largest tensor (w: 2 elements) × 4 B + no read buffer (float32 tensors are
    # read in place) + the largest output tensor (w or n: 8 B) = 32 B
    expected = "3 inputs × 2 × 4 B (float32) + read buffer 0 B + largest output tensor 8 B = 32 B"
    assert f"peak memory estimate: {expected}" in out
    assert sorted(p.name for p in setup.parent.iterdir()) == before


def test_merge_writes_the_run_folder_and_refuses_to_overwrite_it(setup, capsys):
    out = setup.parent / "out"
    assert main(["merge", str(setup), "--quiet"]) == 0
    assert "merged 2 tensors" in capsys.readouterr().out
    with open_checkpoint(out) as merged:
        assert torch.equal(merged.get("w"), torch.tensor([2.0, 2.0]))
        assert torch.equal(merged.get("b"), torch.tensor([1.5]))
        assert torch.equal(merged.get("n"), torch.tensor([3]))
    config = yaml.safe_load((out / "merge_config.yaml").read_text())
    assert config["models"][0] == {"name": "a", "path": str(setup.parent / "a.safetensors")}
    assert config["output"]["max_shard_size"] == "5GB"
    report = json.loads((out / "report.json").read_text())
    assert report["models"] == ["a", "bee"]

    assert main(["merge", str(setup), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"error: output '{out}' already exists; pass --overwrite" in err
    assert main(["merge", str(setup), "--quiet", "--overwrite", "--set", "params.offset=1"]) == 0
    with open_checkpoint(out) as merged:
        assert torch.equal(merged.get("w"), torch.tensor([3.0, 3.0]))
    assert yaml.safe_load((out / "merge_config.yaml").read_text())["params"]["offset"] == 1


def test_bad_config_keys_rule_parameters_and_inputs_end_with_one_line(setup, capsys):
    assert main(["merge", str(setup), "--set", "rules=ties"]) == 2
    assert "unknown key 'rules'" in capsys.readouterr().err
    assert main(["merge", str(setup), "--set", "params.scael=2"]) == 2
    assert "unknown key 'scael' in merge_rule 'shifted'" in capsys.readouterr().err
    assert main(["merge", str(setup), "--set", "output.max_shard_size=huge"]) == 2
    err = capsys.readouterr().err
    assert "error: output.max_shard_size in '" in err and "must be a size such as '2GB'" in err
    assert main(["merge", str(setup), "--set", "rule=shiftd", "--dry-run"]) == 2
    assert "unknown merge_rule 'shiftd'. Did you mean 'shifted'?" in capsys.readouterr().err
    save_file({"w": torch.ones(3)}, str(setup.parent / "bad.safetensors"))
    assert main(["merge", str(setup), "--set", f"models=[{setup.parent / 'bad.safetensors'}]"]) == 2
    err = capsys.readouterr().err
    assert "of base '" in err and "is missing from model 'bad'" in err and "(and 1 more)" in err
    assert not (setup.parent / "out").exists()


def test_pickle_models_are_refused_until_the_weights_only_conversion_is_asked_for(setup, capsys):
    pickled = setup.parent / "a.pt"
    torch.save(
        {"w": torch.tensor([2.0, 2.0]), "b": torch.tensor([0.5]), "n": torch.tensor([3])}, pickled
    )
    models = f"--set=models=[{pickled}]"
    assert main(["merge", str(setup), models, "--quiet"]) == 2
    assert "a.pt' is a pickle checkpoint" in capsys.readouterr().err
    assert (
        main(["merge", str(setup), models, "--set", "allow_pickle_conversion=true", "--quiet"]) == 0
    )


def test_list_shows_merge_rules(test_rule, capsys):
    assert main(["list", "merge_rules"]) == 0
    out = capsys.readouterr().out
    assert "merge_rules" in out and "shifted" in out


def test_example_config_is_valid_and_names_its_models():
    config = load_merge_config(ROOT / "configs" / "merge_example.yaml")
    assert [m.name for m in config.models] == ["vit-cars", "vit-dtd", "svhn"]
    assert config.output_dir == Path("runs/vit-ties")
    assert config.merge_kwargs()["max_shard_size"] == 5 * 10**9


def test_duplicate_model_names_are_a_config_error(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"rule": "x", "models": ["a/m.safetensors", "b/m.safetensors"]}))
    with pytest.raises(ConfigError, match="two models are named 'm'"):
        load_merge_config(path)


def test_task_arithmetic_end_to_end_from_the_command_line(tmp_path, capsys):
    if "task_arithmetic" not in registry.names("merge_rule"):
        pytest.skip("manytask.merge.methods has no task_arithmetic yet")
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(3, 4, generator=g)}
    models = [{"w": base["w"] + torch.randn(3, 4, generator=g)} for _ in range(2)]
    for name, sd in (("base", base), ("t1", models[0]), ("t2", models[1])):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    config = {
        "base": str(tmp_path / "base.safetensors"),
        "models": [str(tmp_path / "t1.safetensors"), str(tmp_path / "t2.safetensors")],
        "rule": "task_arithmetic",
        "params": {"scale": 0.5},
        "output": {"dir": str(tmp_path / "out"), "dtype": "bfloat16"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "c.yaml"), "--quiet"]) == 0
    expected = base["w"] + 0.5 * ((models[0]["w"] - base["w"]) + (models[1]["w"] - base["w"]))
    with open_checkpoint(tmp_path / "out") as merged:
        w = merged.get("w")
        assert w.dtype == torch.bfloat16 and torch.equal(w, expected.to(torch.bfloat16))


def test_a_quiet_merge_loads_neither_the_training_stack_nor_the_progress_bar(tmp_path):
    """`manytask merge` imports the merge package alone (the package imports its parts on
    first use): the training stack, the balancers, rich's progress bar and the safetensors
    library (the merge reads and writes the format with its own code) stay unloaded."""
    base = {"w": torch.zeros(4)}
    for name, sd in (("base", base), ("t1", {"w": torch.ones(4)})):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    config = {
        "base": str(tmp_path / "base.safetensors"),
        "models": [str(tmp_path / "t1.safetensors")],
        "rule": "task_arithmetic",
        "output": {"dir": str(tmp_path / "out")},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    code = (
        "import sys\nfrom manytask.cli import main\n"
        f"assert main(['merge', {str(tmp_path / 'c.yaml')!r}, '--quiet']) == 0\n"
        "print(' '.join(sorted(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    assert "manytask.merge.methods.task_arithmetic" in loaded
    training = ("train", "balance", "nn", "data", "adapters", "evaluate", "config")
    for absent in (*(f"manytask.{part}" for part in training), "rich.progress", "safetensors"):
        assert absent not in loaded, absent
    with open_checkpoint(tmp_path / "out") as merged:
        assert torch.equal(merged.get("w"), torch.full((4,), 0.3))
