"""The HTML report: read from files only, self-contained, every figure also a PNG file."""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from manytask.cli import main
from manytask.errors import ConfigError, ManytaskError
from manytask.evaluate.report import write_report
from manytask.evaluate.report.reading import Affinity, read_sources

from .tiny_compare import write_config

PNG = b"\x89PNG\r\n\x1a\n"
TASKS = ["y1", "y2"]


def write_run(
    path: Path,
    test: dict[str, float],
    *,
    balancer: str = "ew",
    seed: int = 1,
    tasks: list[str] = TASKS,
    epochs: int = 3,
    summary_affinity: dict | None = None,
    affinity_lines: list[dict] | None = None,
) -> Path:
    """A finished train run directory as the Trainer writes it (metrics.jsonl, summary.json)."""
    path.mkdir(parents=True)
    lines = []
    for epoch in range(1, epochs + 1):
        lines.append(
            {
                "epoch": epoch,
                "step": 4 * epoch,
                "train_loss": {t: 2.0 / epoch + i for i, t in enumerate(tasks)},
                "weights": {t: 1.0 + 0.1 * epoch * i for i, t in enumerate(tasks)},
                "lr": [0.01],
                "seconds": 0.1,
                "val": {
                    t: {"mae": 1.5 / epoch + i, "loss": 2.0 / epoch} for i, t in enumerate(tasks)
                },
                "score": -1.0,
            }
        )
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = {
        "status": "completed",
        "best_epoch": epochs,
        "seconds_per_epoch": 0.1,
        "primary_metrics": {t: "mae" for t in tasks},
        "test": {t: {"mae": test[t], "loss": 1.0} for t in tasks},
        "name": path.name,
        "seed": seed,
        "balancer": balancer,
        "architecture": "shared_bottom",
        "tasks": tasks,
    }
    if summary_affinity is not None:
        summary["affinity"] = summary_affinity
    (path / "summary.json").write_text(json.dumps(summary))
    if affinity_lines is not None:
        (path / "affinity.jsonl").write_text("".join(json.dumps(r) + "\n" for r in affinity_lines))
    return path


def stat(mean: float) -> dict[str, float]:
    return {"mean": mean, "std": 0.0, "n": 1}


def write_compare(root: Path) -> Path:
    """A compare directory: baselines, ew (affinity in summary.json), uw (affinity.jsonl)."""
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump({"name": "demo"}))
    write_run(root / "single-task" / "y1" / "seed-1", {"y1": 1.0}, tasks=["y1"])
    write_run(root / "single-task" / "y2" / "seed-1", {"y2": 1.0}, tasks=["y2"])
    write_run(
        root / "ew" / "seed-1",
        {"y1": 1.2, "y2": 1.5},
        summary_affinity={
            "tasks": TASKS,
            "lookahead": [[0.2, 0.05], [-0.1, 0.3]],
            "cosine": [[1.0, -0.2], [-0.2, 1.0]],
            "conflict": [[0.0, 0.75], [0.75, 0.0]],
            "measurements": 4,
        },
    )
    write_run(
        root / "uw" / "seed-1",
        {"y1": 1.1, "y2": 1.9},
        balancer="uw",
        affinity_lines=[
            {
                "step": 1,
                "epoch": 1,
                "tasks": TASKS,
                "lookahead": None,
                "cosine": [[1, 0.5], [0.5, 1]],
            },
        ],
    )
    write_run(root / "stale" / "seed-1", {"y1": 9.0, "y2": 9.0})  # not on the leaderboard
    board = {
        "tasks": TASKS,
        "primary_metrics": {"y1": "mae", "y2": "mae"},
        "seeds": [1],
        "rows": [
            {
                "method": m,
                "primary": {"y1": stat(a), "y2": stat(b)},
                "delta_m": stat(d),
                "seconds_per_epoch": stat(0.1),
                "pareto_front": m == "ew",  # as written by compare; uw is left off here
            }
            for m, a, b, d in [
                ("single-task", 1.0, 1.0, 0.0),
                ("ew", 1.2, 1.5, -35.0),
                ("uw", 1.1, 1.9, -50.0),
            ]
        ],
    }
    (root / "leaderboard.json").write_text(json.dumps(board))
    return root


def images(page: str) -> list[bytes]:
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert all(s.startswith("data:image/png;base64,") for s in sources), sources
    return [base64.b64decode(s.split(",", 1)[1]) for s in sources]


def assert_self_contained(page: str) -> None:
    assert "<script" not in page.lower()
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]*", "", page)  # base64 may hold "//"
    assert not re.search(r"https?:|ftp:|//[a-z]", text)
    assert all(s.startswith("data:") for s in re.findall(r'(?:src|href)="([^"]*)"', page))
    assert "<link" not in page and "@import" not in page and "url(" not in page


def test_compare_report_embeds_every_figure_and_saves_it_as_png(tmp_path: Path):
    root = write_compare(tmp_path / "demo-compare")
    path = write_report([root])
    assert path == root / "report.html"
    page = path.read_text(encoding="utf-8")
    assert_self_contained(page)
    embedded = images(page)
    files = sorted((root / "plots").glob("*.png"))
    assert [f.name for f in files] == [
        "affinity.png",
        "learning-curves.png",
        "pareto.png",
        "weights.png",
    ]
    assert sorted(embedded) == sorted(f.read_bytes() for f in files)
    assert all(png.startswith(PNG) for png in embedded)
    # the leaderboard is an HTML table with the front marked, and the stale folder is ignored
    assert "<table>" in page and "<td>single-task</td>" in page
    assert "stale" not in page
    # leaderboard rows are marked as leaderboard.json says (ew only); the front table is
    # computed from the runs (no pareto.json), where uw and ew trade y1 against y2
    assert page.count('<tr class="front"><td>ew</td>') == 2
    assert page.count('<tr class="front"><td>uw</td>') == 1
    assert "No affinity" not in page


def test_runs_of_several_directories_are_compared_and_absent_data_is_a_note(tmp_path: Path):
    a = write_run(tmp_path / "a" / "seed-1", {"y1": 1.0, "y2": 2.0})
    b = write_run(tmp_path / "b" / "seed-1", {"y1": 2.0, "y2": 1.0}, balancer="uw")
    with pytest.raises(ConfigError, match="needs --output PATH"):
        write_report([a, b])
    out = write_report([a, b], tmp_path / "out" / "both.html")
    page = out.read_text(encoding="utf-8")
    assert_self_contained(page)
    # equal plain names ("seed-1") become their paths below the common folder
    assert "<td>a/seed-1</td>" in page and "<td>b/seed-1</td>" in page
    assert "No affinity was measured in these runs" in page
    names = sorted(p.name for p in (tmp_path / "out" / "plots").glob("*.png"))
    assert names == ["learning-curves.png", "pareto.png", "weights.png"]
    assert len(images(page)) == 3


def test_a_single_run_has_no_pareto_plot_but_still_a_page(tmp_path: Path):
    run = write_run(tmp_path / "run", {"y1": 1.0, "y2": 2.0}, epochs=1)
    page = write_report([run]).read_text(encoding="utf-8")
    assert "A Pareto plot needs two or more finished runs" in page
    assert len(images(page)) == 2  # learning curves and weights


def test_affinity_lines_are_averaged_with_conflict_as_the_share_of_negative_cosines():
    lines = [
        {"step": 1, "epoch": 1, "tasks": TASKS, "lookahead": [[0, 0.2], [0.4, 0]], "cosine": None},
        {"step": 2, "epoch": 1, "tasks": TASKS, "lookahead": [[0, 0.4], [0.0, 0]],
         "cosine": [[1, -0.5], [-0.5, 1]]},
        {"step": 3, "epoch": 2, "tasks": TASKS, "lookahead": None, "cosine": [[1, 0.3], [0.3, 1]]},
    ]  # fmt: skip
    got = Affinity.from_lines(lines, "affinity.jsonl")
    assert got is not None and got.measurements == 3
    np.testing.assert_allclose(got.lookahead, [[0, 0.3], [0.2, 0]])
    np.testing.assert_allclose(got.cosine, [[1, -0.1], [-0.1, 1]])
    np.testing.assert_allclose(got.conflict, [[0, 0.5], [0.5, 0]])
    pooled = Affinity.pooled([got, Affinity(TASKS, None, np.eye(2), None, 1)])
    assert pooled is not None and pooled.measurements == 4
    np.testing.assert_allclose(pooled.cosine, [[1, -0.075], [-0.075, 1]])  # weights 3 and 1
    np.testing.assert_allclose(pooled.lookahead, [[0, 0.3], [0.2, 0]])  # only the first has it


def test_bad_affinity_and_bad_directories_are_explained(tmp_path: Path):
    with pytest.raises(ManytaskError, match=r"must be 2×2"):
        Affinity.from_lines([{"tasks": TASKS, "lookahead": [[1, 2, 3]], "cosine": None}], "f")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManytaskError, match="neither a train run directory"):
        read_sources([tmp_path / "empty"])
    with pytest.raises(ManytaskError, match="is not a directory"):
        read_sources([tmp_path / "missing"])
    run = write_run(tmp_path / "r", {"y1": 1.0, "y2": 1.0})
    with pytest.raises(ConfigError, match="ending in .html"):
        write_report([run], tmp_path / "report.txt")
    # a last line cut short by a killed run is skipped; a bad line before it is an error
    line = json.dumps({"step": 1, "epoch": 1, "tasks": TASKS, "lookahead": None, "cosine": None})
    (run / "affinity.jsonl").write_text(line + "\n" + line[:20])
    (sources,) = read_sources([run])
    assert sources.runs[0].affinity is not None and sources.runs[0].affinity.measurements == 1
    (run / "affinity.jsonl").write_text(line[:20] + "\n" + line + "\n")
    with pytest.raises(ManytaskError, match="affinity.jsonl', line 1 is not valid JSON"):
        read_sources([run])


def test_cli_report_writes_the_page_and_fails_cleanly(tmp_path: Path, capsys):
    root = write_compare(tmp_path / "demo-compare")
    out = tmp_path / "page.html"
    assert main(["report", str(root), "--output", str(out)]) == 0
    assert "report written to" in capsys.readouterr().out and out.exists()
    assert (tmp_path / "plots" / "pareto.png").exists()
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_compare_writes_pareto_json_the_marked_leaderboard_and_the_report(tmp_path: Path):
    path = write_config(tmp_path / "c.yaml", tmp_path / "runs")
    assert main(["compare", str(path), "--methods", "ew,uw", "--seeds", "1", "--quiet"]) == 0
    root = tmp_path / "runs" / "tiny-compare"
    pareto = json.loads((root / "pareto.json").read_text())
    assert [o["task"] for o in pareto["objectives"]] == ["y1", "y2"]
    assert {m["method"] for m in pareto["methods"]} == {"ew", "uw"} and pareto["front"]
    board = json.loads((root / "leaderboard.json").read_text())
    marked = {r["method"] for r in board["rows"] if r.get("pareto_front")}
    assert marked == set(pareto["front"])
    assert "| Pareto |" in (root / "leaderboard.md").read_text()
    page = (root / "report.html").read_text(encoding="utf-8")
    assert_self_contained(page)
    assert len(images(page)) == len(list((root / "plots").glob("*.png"))) == 3


def test_without_matplotlib_the_report_says_how_to_install_it_and_compare_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from manytask.evaluate.report import ReportUnavailableError
    from manytask.train.compare import _write_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    root = write_compare(tmp_path / "demo-compare")
    with pytest.raises(ReportUnavailableError, match=r"pip install 'manytask\[plots\]'"):
        write_report([root])
    said: list[str] = []
    _write_report(root, said.append)
    assert said and said[0].startswith("no report.html: the report needs matplotlib")
    assert not (root / "report.html").exists()
