"""``manytask group``: affinity from one all-tasks run, proposed groups, trained and compared."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from manytask.cli import main
from manytask.config import parse_config
from manytask.evaluate.grouping import choose_groups
from manytask.train.grouping import group

TASKS = ["y", "twin", "wave"]


def _write_config(tmp_path: Path) -> Path:
    """Three regression tasks in a CSV: ``y``, a noisy copy ``twin``, and an unrelated ``wave``."""
    rng = np.random.default_rng(0)
    n = 240
    x = rng.normal(size=(n, 4))
    y = x @ np.array([1.0, -2.0, 0.5, 1.5])
    lines = ["x0,x1,x2,x3,y,twin,wave"]
    twin = y + rng.normal(scale=0.1, size=n)
    wave = np.sin(3 * x[:, 3]) * x[:, 0]
    for row in zip(*x.T, y, twin, wave, strict=True):
        lines.append(",".join(f"{v:.5f}" for v in row))
    csv = tmp_path / "three.csv"
    csv.write_text("\n".join(lines) + "\n")
    config = {
        "name": "three",
        "seed": 0,
        "data": {"name": "tabular", "path": str(csv), "targets": dict.fromkeys(TASKS, "mse")},
        "model": {"name": "shared_bottom", "encoder": {"name": "mlp", "hidden": [16]}},
        "optimizer": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 2, "batch_size": 32, "checkpoint_every": 0},
        "monitor": {"affinity_every": 2},
        "run": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "three.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_group_measures_proposes_trains_and_compares(tmp_path, capsys):
    path = _write_config(tmp_path)
    assert main(["group", str(path), "--models", "2", "--train", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "lookahead affinity" in out and "group(s) for at most 2 model(s)" in out
    root = tmp_path / "runs" / "three-group"

    all_tasks = json.loads((root / "all-tasks" / "seed-0" / "summary.json").read_text())
    affinity = json.loads((root / "affinity.json").read_text())
    assert affinity["tasks"] == ["y", "twin", "wave"] and affinity["source"] == "lookahead"
    assert affinity["matrix"] == all_tasks["affinity"]["lookahead"]  # one seed: its own matrix
    # 168 training rows (70%) at 32 per batch: 6 steps per epoch, a measurement every 2 steps
    assert affinity["measurements"] == all_tasks["affinity"]["measurements"] == 6

    groups = json.loads((root / "groups.json").read_text())
    again = choose_groups(affinity["matrix"], affinity["tasks"], 2)
    assert groups["groups"] == [list(g) for g in again.groups]
    assert groups["score"] == pytest.approx(again.score)
    assert (root / "groups.md").read_text().startswith("## Affinity")

    comparison = json.loads((root / "comparison.json").read_text())
    for task, row in comparison["tasks"].items():
        serving = row["group"]
        assert serving == groups["serving"][task]
        run = (
            root / "all-tasks" / "seed-0"
            if set(serving) == {"y", "twin", "wave"}
            else root / "groups" / "+".join(serving) / "seed-0"
        )
        grouped = json.loads((run / "summary.json").read_text())
        assert grouped["tasks"] == serving
        assert row["grouped"]["mean"] == grouped["test"][task]["mae"]
        assert row["all_tasks"]["mean"] == all_tasks["test"][task]["mae"]
        sign = -1  # mae: lower is better
        expected = 100 * sign * (row["grouped"]["mean"] - row["all_tasks"]["mean"])
        assert row["change_percent"] == pytest.approx(expected / row["all_tasks"]["mean"])
    assert "in its group" in (root / "comparison.md").read_text()

    # an existing directory is not replaced silently; --resume keeps the finished runs
    assert main(["group", str(path), "--models", "2", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    summary = root / "all-tasks" / "seed-0" / "summary.json"
    before = summary.stat().st_mtime_ns
    assert main(["group", str(path), "--models", "2", "--train", "--resume", "--quiet"]) == 0
    assert summary.stat().st_mtime_ns == before


def test_one_model_is_the_all_tasks_model_and_nothing_else_is_trained(tmp_path):
    config = parse_config(yaml.safe_load(_write_config(tmp_path).read_text()))
    config = config.model_copy(update={"monitor": None})  # the default interval applies
    result = group(config, 1, train=True, progress=False, announce=lambda _: None)
    assert result.grouping.groups == (("y", "twin", "wave"),)
    assert result.comparison is not None and result.comparison.models_trained == 0
    assert all(row.change_percent == 0 for row in result.comparison.rows)
    assert result.affinity["measurements"] == 1  # 12 steps, the default is every 10
    assert not (result.root / "groups").exists()


def test_group_refuses_bad_budgets(tmp_path, capsys):
    path = _write_config(tmp_path)
    assert main(["group", str(path), "--models", "0", "--quiet"]) == 2
    assert "--models must be an integer ≥ 1" in capsys.readouterr().err
