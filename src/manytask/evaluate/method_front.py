r"""The Pareto front of compared methods and its hypervolume (``pareto.json`` of ``compare``).

Objectives: each task's test primary metric, with its direction. A method is one point, the
mean of its seeds; each seed is also a point of its own. The front is computed over the methods'
means (and, separately, over every (method, seed) point); the single-task baselines are shown
beside it but are not candidates, since they are not one model.

Hypervolume (:mod:`manytask.evaluate.pareto`) needs a reference point and a common scale:

- Each objective is rescaled by the runs of this comparison (every seed of every method and of
  the single-task baselines): :math:`z_k = (v_k - w_k) / (b_k - w_k)` with :math:`w_k` the
  worst and :math:`b_k` the best value, sign-flipped where lower is better, so 0 is the worst run
  and 1 the best in every objective, and a metric in large units (an MAE of 30) weighs no more
  than one in small units (an accuracy of 0.9). An objective on which every run ties has
  :math:`z_k = 1`.
- The reference is :math:`z_k = -0.1` in every objective: the worst value seen, pushed a tenth
  of the objective's range further, so that a front point that is the worst in one objective
  still adds volume (the nadir itself would give it none). In metric units it is
  :math:`w_k - 0.1 (b_k - w_k)` for higher-is-better metrics and :math:`w_k + 0.1 (b_k - w_k)`
  for lower-is-better ones; ``pareto.json`` records both. The 10 % margin is manytask's choice.

Hypervolumes therefore lie in :math:`[0, 1.1^K]` and compare methods *within* one comparison;
they change when runs are added, because the scale and the reference do.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from manytask import registry
from manytask.errors import ConfigError
from manytask.evaluate import metrics as _metrics  # noqa: F401 - registers the built-in metrics
from manytask.evaluate.delta_m import Results
from manytask.evaluate.leaderboard import BASELINE
from manytask.evaluate.pareto import Direction, hypervolume, pareto_front
from manytask.task import TaskSet

MARGIN = 0.1  # the reference lies this fraction of each objective's range beyond the worst run


@dataclass(frozen=True)
class Objective:
    """One axis of the front: a task's metric and its direction."""

    task: str
    metric: str
    direction: Direction

    def to_dict(self) -> dict[str, str]:
        return {"task": self.task, "metric": self.metric, "direction": self.direction}


def objectives_for(primary_metrics: Mapping[str, str]) -> list[Objective]:
    """Objectives from ``{task: primary metric}``, directions read from the metric registry."""
    out = []
    for task, metric in primary_metrics.items():
        higher = bool(registry.get("metric", metric).higher_is_better)
        out.append(Objective(task, metric, "higher" if higher else "lower"))
    return out


@dataclass(frozen=True)
class MethodFront:
    """Points, front membership and hypervolumes of a set of methods; see the module doc."""

    objectives: list[Objective]
    methods: list[str]
    seeds: dict[str, list[int]]  # method -> seeds, in the order of ``points``
    points: dict[str, list[list[float]]]  # method -> one row of objective values per seed
    baseline: list[list[float]]  # the single-task results, one row per seed (may be empty)
    worst: list[float]
    best: list[float]

    @property
    def directions(self) -> list[Direction]:
        return [o.direction for o in self.objectives]

    def mean(self, method: str) -> list[float]:
        return [statistics.fmean(column) for column in zip(*self.points[method], strict=True)]

    @property
    def members(self) -> list[str]:
        """Methods on the front of the seed means, in the order given."""
        mask = pareto_front([self.mean(m) for m in self.methods], self.directions)
        return [m for m, on in zip(self.methods, mask, strict=True) if on]

    def scaled(self, values: Sequence[float]) -> list[float]:
        """``z``: 0 at the worst run, 1 at the best, per objective."""
        return [
            1.0 if best == worst else (value - worst) / (best - worst)
            for value, worst, best in zip(values, self.worst, self.best, strict=True)
        ]

    @property
    def reference(self) -> list[float]:
        """The reference point in metric units (``z = -MARGIN``)."""
        return [w - MARGIN * (b - w) for w, b in zip(self.worst, self.best, strict=True)]

    def _hv(self, rows: Sequence[Sequence[float]]) -> float:
        k = len(self.objectives)
        scaled = [self.scaled(row) for row in rows]
        return hypervolume(np.array(scaled).reshape(len(rows), k), [-MARGIN] * k, ["higher"] * k)

    def hypervolume(self) -> float:
        """Hypervolume of the methods' seed means (scaled objectives)."""
        return self._hv([self.mean(m) for m in self.methods])

    def method_hypervolume(self, method: str) -> float:
        """Volume dominated by one method's seed mean alone."""
        return self._hv([self.mean(method)])

    def to_dict(self) -> dict[str, Any]:
        members = set(self.members)
        seed_rows = [
            (m, s, p)
            for m in self.methods
            for s, p in zip(self.seeds[m], self.points[m], strict=True)
        ]
        seed_mask = pareto_front(
            np.array([p for _, _, p in seed_rows]).reshape(len(seed_rows), len(self.objectives)),
            self.directions,
        )
        tasks = [o.task for o in self.objectives]

        def named(values: Sequence[float]) -> dict[str, float]:
            return dict(zip(tasks, values, strict=True))

        out: dict[str, Any] = {
            "objectives": [o.to_dict() for o in self.objectives],
            "reference": named(self.reference),
            "reference_rule": (
                f"worst value per objective over every run (methods and {BASELINE} baselines, "
                f"every seed), moved {MARGIN:g} of the objective's range further; hypervolumes "
                "use objectives rescaled to 0 (worst run) … 1 (best run)"
            ),
            "scale": {
                t: {"worst": w, "best": b}
                for t, w, b in zip(tasks, self.worst, self.best, strict=True)
            },
            "hypervolume": self.hypervolume(),
            "front": [m for m in self.methods if m in members],
            "methods": [
                {
                    "method": m,
                    "mean": named(self.mean(m)),
                    "on_front": m in members,
                    "hypervolume": self.method_hypervolume(m),
                }
                for m in self.methods
            ],
            "seeds": [
                {"method": m, "seed": s, "point": named(p), "on_front": bool(on)}
                for (m, s, p), on in zip(seed_rows, seed_mask, strict=True)
            ],
            "baseline": None,
        }
        if self.baseline:
            mean = [statistics.fmean(column) for column in zip(*self.baseline, strict=True)]
            out["baseline"] = {"method": BASELINE, "mean": named(mean)}
        return out


def method_front(
    objectives: Sequence[Objective],
    methods: Mapping[str, Sequence[tuple[int, Results]]],
    baseline: Sequence[Results] = (),
) -> MethodFront:
    """The front of ``methods`` (``{method: [(seed, test results), …]}``), with the single-task
    ``baseline`` results (one per seed) included in the scale and the reference."""
    if not objectives:
        raise ConfigError("a Pareto front needs at least one objective (task)")
    if not methods or any(not runs for runs in methods.values()):
        raise ConfigError("a Pareto front needs at least one run of every method")

    def row(results: Results, where: str) -> list[float]:
        values = []
        for o in objectives:
            try:
                value = float(results[o.task][o.metric])
            except KeyError:
                raise ConfigError(
                    f"{where} has no test '{o.metric}' for task '{o.task}'; every run needs the "
                    "primary metric of every task"
                ) from None
            if not math.isfinite(value):
                raise ConfigError(f"{where}: test '{o.metric}' of task '{o.task}' is {value}")
            values.append(value)
        return values

    points = {
        m: [row(r, f"method '{m}', seed {s}") for s, r in runs] for m, runs in methods.items()
    }
    base = [row(r, f"{BASELINE} baseline {i}") for i, r in enumerate(baseline)]
    every = np.array([p for rows in points.values() for p in rows] + base)
    signs = np.array([1.0 if o.direction == "higher" else -1.0 for o in objectives])
    oriented = every * signs  # higher is better everywhere
    worst = (oriented.min(axis=0) * signs).tolist()
    best = (oriented.max(axis=0) * signs).tolist()
    return MethodFront(
        objectives=list(objectives),
        methods=list(methods),
        seeds={m: [s for s, _ in runs] for m, runs in methods.items()},
        points=points,
        baseline=base,
        worst=worst,
        best=best,
    )


def compare_front(
    tasks: TaskSet,
    baselines: Mapping[str, Sequence[Results]],
    methods: Mapping[str, Sequence[tuple[Results, float]]],
    seeds: Sequence[int],
) -> MethodFront:
    """The front of a ``compare`` run; arguments as :func:`~manytask.evaluate.build_leaderboard`."""
    objectives = objectives_for({name: task.primary_metric for name, task in tasks.items()})
    runs = {
        m: [(s, r) for s, (r, _) in zip(seeds, results, strict=True)]
        for m, results in methods.items()
    }
    stl = [{name: baselines[name][i][name] for name in tasks} for i in range(len(seeds))]
    return method_front(objectives, runs, stl)
