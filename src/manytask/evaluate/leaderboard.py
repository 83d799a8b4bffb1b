"""Leaderboards: per-task primary metrics, Δm% and speed of several methods over seeds.

Each method has one test result per seed. Δm% of a run is computed against the single-task
baselines averaged over seeds (:mod:`manytask.evaluate.delta_m`), then averaged over seeds;
``±`` is the sample standard deviation across seeds (omitted with one seed). With
:meth:`Leaderboard.with_front`, a "Pareto" column marks the methods on the Pareto front of the
seed-mean primary metrics (:mod:`manytask.evaluate.method_front`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from manytask.evaluate.delta_m import Results, delta_m
from manytask.task import TaskSet

BASELINE = "single-task"
FRONT_MARK = "◆"


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over seeds."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        values = list(values)
        mean = statistics.fmean(values) if values else math.nan
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(mean, std, len(values))

    def format(self, digits: int = 4, signed: bool = False) -> str:
        sign = "+" if signed else ""
        mean = self.mean if round(self.mean, digits) != 0 else 0.0  # no "-0.00"
        text = f"{mean:{sign}.{digits}f}"
        return f"{text} ± {self.std:.{digits}f}" if self.n > 1 else text

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


@dataclass(frozen=True)
class Row:
    method: str
    primary: dict[str, Stat]  # task -> primary metric over seeds
    delta_m: Stat
    seconds_per_epoch: Stat


@dataclass(frozen=True)
class Leaderboard:
    """Rows sorted by Δm% (best first), the single-task row first."""

    tasks: list[str]
    primary_metrics: dict[str, str]
    rows: list[Row]
    seeds: list[int]
    front: frozenset[str] | None = None  # methods on the Pareto front; None: not computed

    def with_front(self, members: Iterable[str]) -> Leaderboard:
        """This leaderboard with the Pareto front members marked."""
        return dataclasses.replace(self, front=frozenset(members))

    def to_dict(self) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        for row in self.rows:
            entry: dict[str, Any] = {
                "method": row.method,
                "primary": {t: s.to_dict() for t, s in row.primary.items()},
                "delta_m": row.delta_m.to_dict(),
                "seconds_per_epoch": row.seconds_per_epoch.to_dict(),
            }
            if self.front is not None:
                entry["pareto_front"] = row.method in self.front
            rows.append(entry)
        return {
            "tasks": self.tasks,
            "primary_metrics": self.primary_metrics,
            "seeds": self.seeds,
            "rows": rows,
        }

    def header(self) -> list[str]:
        metrics = [f"{t} {self.primary_metrics[t]}" for t in self.tasks]
        pareto = [] if self.front is None else ["Pareto"]
        return ["method", *metrics, "Δm% ↑", "s/epoch", *pareto]

    def cells(self) -> list[list[str]]:
        return [
            [
                row.method,
                *(row.primary[t].format() for t in self.tasks),
                row.delta_m.format(2, signed=True),
                row.seconds_per_epoch.format(1),
                *([] if self.front is None else [FRONT_MARK if row.method in self.front else ""]),
            ]
            for row in self.rows
        ]

    def to_markdown(self) -> str:
        header = self.header()
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
        ]
        lines += ["| " + " | ".join(cells) + " |" for cells in self.cells()]
        seeds = ", ".join(str(s) for s in self.seeds)
        note = (
            f"\nTest-split metrics, mean ± sample std over seeds {seeds}. Δm% against the "
            f"single-task baselines (mean over seeds); s/epoch is training time only "
            f"({BASELINE}: the sum over its one-task models).\n"
        )
        if self.front is not None:
            note += (
                f"{FRONT_MARK}: on the Pareto front of the methods' test primary metrics "
                f"(mean over seeds; {BASELINE} is not a candidate); see pareto.json.\n"
            )
        return "\n".join(lines) + "\n" + note


def build_leaderboard(
    tasks: TaskSet,
    baselines: Mapping[str, Sequence[Results]],
    baseline_seconds: Sequence[float],
    methods: Mapping[str, Sequence[tuple[Results, float]]],
    seeds: Sequence[int],
) -> Leaderboard:
    """Leaderboard from test results.

    Args:
        tasks: the tasks (their metrics and directions).
        baselines: per task, the single-task model's results of each seed.
        baseline_seconds: per seed, the summed s/epoch of the single-task models.
        methods: per method, ``(results, seconds_per_epoch)`` of each seed.
        seeds: the seeds, for the record.
    """
    mean_baseline: dict[str, dict[str, float]] = {}
    for name, task in tasks.items():
        runs = baselines[name]
        mean_baseline[name] = {m: statistics.fmean(r[name][m] for r in runs) for m in task.metrics}

    def row(method: str, runs: Sequence[Results], seconds: Sequence[float]) -> Row:
        return Row(
            method=method,
            primary={
                name: Stat.of([r[name][task.primary_metric] for r in runs])
                for name, task in tasks.items()
            },
            delta_m=Stat.of([delta_m(r, mean_baseline, tasks) for r in runs]),
            seconds_per_epoch=Stat.of(seconds),
        )

    n_seeds = len(seeds)
    stl_runs: list[Results] = [
        {name: baselines[name][i][name] for name in tasks} for i in range(n_seeds)
    ]
    rows = [
        row(method, [r for r, _ in runs], [s for _, s in runs]) for method, runs in methods.items()
    ]
    rows.sort(key=lambda r: -r.delta_m.mean)
    return Leaderboard(
        tasks=tasks.names,
        primary_metrics={name: task.primary_metric for name, task in tasks.items()},
        rows=[row(BASELINE, stl_runs, baseline_seconds), *rows],
        seeds=list(seeds),
    )
