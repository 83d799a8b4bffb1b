"""The synthetic experiment of the MMoE paper: shared-bottom, one-gate MoE and MMoE across task
correlations, repeated runs.

Ma, Zhao, Yi, Chen, Hong and Chi, "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts", KDD 2018, §4 (Figure 4: the three models at correlations 0.5,
0.9 and 1.0; §4.4: repeated runs with random data and initialisation). The paper's findings:

1. MMoE's advantage over shared-bottom grows as the task correlation falls;
2. MMoE varies less across runs than shared-bottom and one-gate MoE (trainability).

Each run draws a fresh data set (``manytask.data.mmoe_synthetic``, seed = run index) and a
fresh initialisation, trains each model with Adam for ``--epochs`` epochs and keeps the epoch
of lowest mean validation MAE; the figure reported is the test MSE averaged over the two tasks.
The three models have about the same number of parameters (printed), as in the paper.

    python benchmarks/mmoe_correlation.py                      # 3 correlations × 3 models × 10 runs
    python benchmarks/mmoe_correlation.py --runs 30 --correlations 0.5,0.7,0.9,1.0

Writes ``benchmarks/results/mmoe_correlation.json`` and ``docs/images/mmoe_correlation.png``
and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import manytask  # noqa: F401 - registers the architectures and datasets
from manytask.config import parse_config
from manytask.train.build import run_training

ROOT = Path(__file__).resolve().parents[1]

# the paper's set-up, scaled to a CPU: 8 experts of one 16-unit layer for the MoE models,
# one 8-unit tower layer per task; the shared-bottom width is chosen to match their size
MODELS: dict[str, dict[str, Any]] = {
    "shared_bottom": {
        "name": "shared_bottom",
        "encoder": {"name": "mlp", "hidden": [113]},
        "head_hidden": [8],
    },
    "moe": {"name": "moe", "num_experts": 8, "expert_hidden": [16], "tower_hidden": [8]},
    "mmoe": {"name": "mmoe", "num_experts": 8, "expert_hidden": [16], "tower_hidden": [8]},
}


def run_one(model: str, correlation: float, run: int, epochs: int, root: Path) -> dict[str, Any]:
    data = {
        "name": "mmoe_correlation",
        "seed": run,
        "data": {"name": "mmoe_synthetic", "correlation": correlation, "seed": run},
        "model": MODELS[model],
        "balancer": {"name": "ew"},
        "optimizer": {"name": "adam", "lr": 1e-3},
        "train": {
            "epochs": epochs,
            "batch_size": 128,
            "selection": "mean_primary",
            "num_threads": 1,
            "progress": False,
            "checkpoint_every": 0,
        },
        "run": {"dir": str(root), "name": f"{model}-p{correlation}-run{run}"},
    }
    summary = run_training(parse_config(data), overwrite=True, progress=False)
    test = summary["test"]
    mse = statistics.fmean(test[task]["rmse"] ** 2 for task in test)
    return {
        "model": model,
        "correlation": correlation,
        "run": run,
        "test_mse": mse,
        "parameters": summary["num_parameters"],
        "label_correlation": summary["dataset"]["label_correlation"],
        "seconds_per_epoch": summary["seconds_per_epoch"],
    }


def table(rows: list[dict[str, Any]], models: list[str], correlations: list[float]) -> str:
    """Mean ± std of each model's test MSE; then, paired by run (same data, same seed), the
    mean ± standard error of shared-bottom's MSE minus MMoE's and how often MMoE is lower."""
    paired = "shared_bottom" in models and "mmoe" in models
    lines = [
        "| correlation (measured) | "
        + " | ".join(f"{m} test MSE" for m in models)
        + (" | shared-bottom − MMoE, paired | MMoE lower |" if paired else " |"),
        "|---|" + "---:|" * (len(models) + (2 if paired else 0)),
    ]
    for p in correlations:
        at = [r for r in rows if r["correlation"] == p]
        measured = statistics.fmean(r["label_correlation"] for r in at if r["model"] == models[0])
        cells = []
        for m in models:
            values = [r["test_mse"] for r in at if r["model"] == m]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.4f} ± {spread:.4f}")
        if paired:
            by_run = {(r["model"], r["run"]): r["test_mse"] for r in at}
            runs = sorted({r["run"] for r in at})
            gaps = [by_run[("shared_bottom", k)] - by_run[("mmoe", k)] for k in runs]
            error = statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else 0.0
            cells.append(f"{statistics.fmean(gaps):+.4f} ± {error:.4f}")
            cells.append(f"{sum(g > 0 for g in gaps)}/{len(gaps)}")
        lines.append(f"| {p} ({measured:.2f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    rows: list[dict[str, Any]], models: list[str], correlations: list[float], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(correlations), figsize=(4 * len(correlations), 3.6))
    axes = [axes] if len(correlations) == 1 else list(axes)
    for ax, p in zip(axes, correlations, strict=True):
        values = [
            [r["test_mse"] for r in rows if r["model"] == m and r["correlation"] == p]
            for m in models
        ]
        ax.boxplot(values)
        ax.set_xticks(range(1, len(models) + 1), models)
        for i, v in enumerate(values, start=1):
            ax.plot([i] * len(v), v, "k.", alpha=0.4, markersize=4)
        ax.set_title(f"correlation {p}")
        ax.set_ylabel("test MSE (mean of 2 tasks)")
    fig.suptitle("MMoE synthetic experiment: final test loss over repeated runs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--correlations", default="0.5,0.9,1.0")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "mmoe_correlation")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "mmoe_correlation.json"
    )
    parser.add_argument(
        "--plot", type=Path, default=ROOT / "docs" / "images" / "mmoe_correlation.png"
    )
    parser.add_argument(
        "--table-only", action="store_true", help="print the table of the results in --out"
    )
    args = parser.parse_args()
    correlations = [float(p) for p in args.correlations.split(",")]
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    if args.table_only:  # re-read a finished run's rows
        saved = json.loads(args.out.read_text())
        print(table(saved["rows"], models, correlations))
        return
    torch.set_num_threads(1)
    rows = []
    started = time.perf_counter()
    for p in correlations:
        for run in range(args.runs):
            for m in models:
                rows.append(run_one(m, p, run, args.epochs, args.workdir))
                print(json.dumps(rows[-1]), flush=True)
    sizes = {m: next(r["parameters"] for r in rows if r["model"] == m) for m in models}
    meta = {
        "runs": args.runs,
        "epochs": args.epochs,
        "models": {m: {**MODELS[m], "parameters": sizes[m]} for m in models},
        "seconds": time.perf_counter() - started,
        "command": " ".join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, models, correlations, args.plot)
    print(f"parameters: {sizes}")
    print(table(rows, models, correlations))


if __name__ == "__main__":
    main()
