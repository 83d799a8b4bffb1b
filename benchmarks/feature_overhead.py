"""Feature (representation) mode's step time over equal weighting's, in several processes.

Each gradient method in feature mode is timed as a pair with equal weighting on the model and
data of ``balance_speed.py`` (its ``Bench``; ``--model mlp`` or ``cnn``), the two in a new
random order each round (``timing.timed_together``), with nothing else between them: a peer's
step there (``balance_speed.py`` times five variants together) leaves the caches cold for the
next step's Python and numpy code, which no training loop of either does. The pair's ratio
moves by up to ±0.15 between processes on a shared machine while it holds within one, so the
whole set of pairs runs in ``--processes`` fresh processes one after the other and each cell
reports the median of their ratios, with the lowest and the highest.

    python benchmarks/feature_overhead.py                  # MLP, k = 2, 10, 40, 5 processes
    python benchmarks/feature_overhead.py --model cnn --out benchmarks/results/feature_overhead_cnn.json

Writes ``benchmarks/results/feature_overhead.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import manytask as mt
from balance_speed import (  # this script's folder
    ALIASES,
    FLOOR,
    ROOT,
    build,
    manytask_step,
    write_results,
)
from manytask import registry
from timing import timed_together  # this script's folder


def feature_methods() -> list[str]:
    """The registered gradient methods (feature mode applies to them) but aliases, then the
    floor."""
    return [
        name
        for name in registry.names("balancer")
        if name not in ALIASES
        and not issubclass(registry.get("balancer", name), mt.balance.LossWeighting)
    ] + [FLOOR]


def one_process(sizes: list[int], model: str, warmup: int, rounds: int) -> list[dict[str, Any]]:
    """Every pair (equal weighting, a method in feature mode) in this process."""
    cells = []
    for k in sizes:
        for name in feature_methods():
            ew, _ = build(lambda: manytask_step("ew", k, "parameters", model))  # noqa: B023
            features, error = build(lambda: manytask_step(name, k, "features", model))  # noqa: B023
            if ew is None or features is None:  # a method that refuses feature mode
                cells.append({"method": name, "tasks": k, "error": error})
                continue
            timed = timed_together({"ew": ew, "features": features}, warmup, rounds, shuffle=0)
            cells.append({"method": name, "tasks": k, **timed})
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="2,10,40")
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "feature_overhead.json"
    )
    args = parser.parse_args()
    sizes = [int(k) for k in args.tasks.split(",")]
    if args.child:
        print(json.dumps(one_process(sizes, args.model, args.warmup, args.rounds)))
        return
    runs = []
    for index in range(args.processes):
        command = [sys.executable, __file__, "--child", "--tasks", args.tasks, "--model"]
        command += [args.model, "--warmup", str(args.warmup), "--rounds", str(args.rounds)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"process {index + 1} failed:\n{done.stderr[-2000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"process {index + 1} of {args.processes} done", flush=True)
    rows = summarise(runs)
    write_results(args.out, args.model, {"rows": rows, "runs": runs})
    print(markdown(rows, sizes))


def summarise(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per cell: the ratios of every process, their median, lowest and highest."""
    rows = []
    for cells in zip(*runs, strict=True):
        first = cells[0]
        row: dict[str, Any] = {"method": first["method"], "tasks": first["tasks"]}
        if "error" in first:
            row["error"] = first["error"]
        else:
            ratios = [cell["features"] / cell["ew"] for cell in cells]
            row.update(
                ratios=ratios,
                median=statistics.median(ratios),
                lowest=min(ratios),
                highest=max(ratios),
                ew_ms=statistics.median(cell["ew"] for cell in cells),
            )
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], sizes: list[int]) -> str:
    header = " | ".join(f"k = {k}" for k in sizes)
    lines = [f"| method | {header} |", "|---|" + "---:|" * len(sizes)]
    by_cell = {(row["method"], row["tasks"]): row for row in rows}
    for name in dict.fromkeys(row["method"] for row in rows):
        cells = []
        for k in sizes:
            row = by_cell[(name, k)]
            cells.append(
                "refused"
                if "error" in row
                else f"{row['median']:.2f} ({row['lowest']:.2f}–{row['highest']:.2f})"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
