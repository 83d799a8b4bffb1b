import json
import subprocess
import sys
from pathlib import Path

import yaml

from manytask.cli import main

CONFIG = {
    "name": "cmp",
    "seed": 1,
    "data": {"name": "mmoe_synthetic", "n_train": 256, "n_val": 64, "n_test": 64, "input_dim": 8},
    "model": {"name": "shared_bottom", "encoder": {"name": "mlp", "hidden": [16]}},
    "balancer": {"name": "dwa", "temperature": 3.0},
    "optimizer": {"name": "adam", "lr": 0.01},
    "train": {"epochs": 2, "batch_size": 64, "checkpoint_every": 0},
}


def test_compare_trains_baselines_and_methods_and_writes_the_leaderboard(tmp_path: Path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "run": {"dir": str(tmp_path / "runs")}}))
    code = main(["compare", str(path), "--methods", "ew,dwa", "--seeds", "2", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "single-task" in out and "Δm%" in out
    root = tmp_path / "runs" / "cmp-compare"
    board = json.loads((root / "leaderboard.json").read_text())
    assert board["rows"][0]["method"] == "single-task"
    assert {row["method"] for row in board["rows"]} == {"single-task", "ew", "dwa"}
    assert board["seeds"] == [1, 2]
    for row in board["rows"]:
        assert row["delta_m"]["n"] == 2 and row["seconds_per_epoch"]["mean"] > 0
    # each model has its own run directory; baselines train one task each
    stl = json.loads((root / "single-task" / "y1" / "seed-2" / "summary.json").read_text())
    assert stl["tasks"] == ["y1"] and stl["balancer"] == "ew"
    dwa = yaml.safe_load((root / "dwa" / "seed-1" / "config.yaml").read_text())
    assert dwa["balancer"] == {"name": "dwa", "temperature": 3.0}

    # Δm of a method, recomputed by hand from the run summaries
    def test_of(*parts):
        return json.loads((root.joinpath(*parts) / "summary.json").read_text())["test"]

    base = {
        t: {
            m: sum(test_of("single-task", t, f"seed-{s}")[t][m] for s in (1, 2)) / 2
            for m in ("mae", "rmse", "r2")
        }
        for t in ("y1", "y2")
    }
    deltas = []
    for s in (1, 2):
        res = test_of("ew", f"seed-{s}")
        terms = [
            (-1 if m != "r2" else 1) * (res[t][m] - base[t][m]) / abs(base[t][m])
            for t in ("y1", "y2")
            for m in ("mae", "rmse", "r2")
        ]
        deltas.append(100 * sum(terms) / len(terms))
    ew_row = next(row for row in board["rows"] if row["method"] == "ew")
    assert abs(ew_row["delta_m"]["mean"] - sum(deltas) / 2) < 1e-9
    md = (root / "leaderboard.md").read_text()
    assert md.startswith("| method |") and "mean ± sample std over seeds 1, 2" in md

    # a second compare refuses to overwrite; --resume keeps finished runs
    assert main(["compare", str(path), "--methods", "ew,dwa", "--seeds", "2", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    before = (root / "ew" / "seed-1" / "summary.json").stat().st_mtime_ns
    assert (
        main(["compare", str(path), "--methods", "ew,dwa", "--seeds", "2", "--resume", "--quiet"])
        == 0
    )
    assert (root / "ew" / "seed-1" / "summary.json").stat().st_mtime_ns == before


def test_list_shows_every_registered_kind():
    result = subprocess.run(
        [sys.executable, "-m", "manytask.cli", "list"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    for name in (
        "ew",
        "uw",
        "dwa",
        "rlw",
        "shared_bottom",
        "cnn",
        "mlp",
        "multi_fashion",
        "mmoe_synthetic",
        "auroc",
    ):
        assert name in result.stdout


def test_compare_refuses_a_method_it_cannot_build_before_training(tmp_path: Path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "run": {"dir": str(tmp_path / "runs")}}))
    code = main(["compare", str(path), "--methods", "ew,constant", "--seeds", "1", "--quiet"])
    assert code == 2
    assert "weights" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "cmp-compare" / "single-task").exists()  # nothing trained


def test_compare_runs_every_method_on_every_listed_architecture(tmp_path: Path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "run": {"dir": str(tmp_path / "runs")}}))
    args = ["compare", str(path), "--methods", "ew,dwa", "--seeds", "1", "--quiet"]
    assert main([*args, "--models", "shared_bottom,mmoe"]) == 0
    root = tmp_path / "runs" / "cmp-compare"
    board = json.loads((root / "leaderboard.json").read_text())
    assert {row["method"] for row in board["rows"]} == {
        "single-task",
        "shared_bottom · ew",
        "shared_bottom · dwa",
        "mmoe · ew",
        "mmoe · dwa",
    }
    # the configured model keeps its parameters; the others run at their defaults
    kept = yaml.safe_load((root / "shared_bottom" / "ew" / "seed-1" / "config.yaml").read_text())
    assert kept["model"]["encoder"] == {"name": "mlp", "hidden": [16]}
    other = yaml.safe_load((root / "mmoe" / "dwa" / "seed-1" / "config.yaml").read_text())
    assert other["model"] == {"name": "mmoe"} and other["balancer"]["temperature"] == 3.0
    # baselines are the configured architecture, trained once
    stl = yaml.safe_load((root / "single-task" / "y1" / "seed-1" / "config.yaml").read_text())
    assert stl["model"]["name"] == "shared_bottom"


def test_compare_refuses_an_architecture_that_cannot_read_the_data(tmp_path: Path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "run": {"dir": str(tmp_path / "runs")}}))
    args = ["compare", str(path), "--methods", "ew", "--seeds", "1", "--quiet"]
    assert main([*args, "--models", "mmoe,mtan"]) == 2  # MTAN needs images
    assert "mtan" in capsys.readouterr().err.lower()
    assert not (tmp_path / "runs" / "cmp-compare" / "single-task").exists()
    assert main([*args, "--models", "mmoe,nope"]) == 2
    assert "unknown architecture 'nope'" in capsys.readouterr().err
