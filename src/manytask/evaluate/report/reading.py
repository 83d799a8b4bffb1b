"""Read train run directories and compare directories from their files alone.

A *train run directory* holds ``summary.json`` and/or ``metrics.jsonl`` (and maybe
``affinity.jsonl``); a *compare directory* holds ``leaderboard.json`` and one train run
directory per model and seed (see :mod:`manytask.train.compare`). Nothing here imports the
training code, and nothing is unpickled: only JSON and YAML are read.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml

from manytask.errors import ConfigError, DataError
from manytask.evaluate.leaderboard import BASELINE

Matrix = npt.NDArray[np.float64]
AFFINITY_KINDS = ("lookahead", "cosine", "conflict")


@dataclass(frozen=True)
class Affinity:
    """Mean inter-task affinity matrices of one run (or several), any of them absent.

    ``lookahead[i, j]`` is TAG's :math:`Z_{i \\to j}`, ``cosine[i, j]`` the cosine of the two
    tasks' shared-parameter gradients, ``conflict[i, j]`` the fraction of measurements where
    that cosine was negative.
    """

    tasks: list[str]
    lookahead: Matrix | None
    cosine: Matrix | None
    conflict: Matrix | None
    measurements: int

    def matrix(self, kind: str) -> Matrix | None:
        value: Matrix | None = getattr(self, kind)
        return value

    @classmethod
    def from_summary(cls, data: dict[str, Any], where: str) -> Affinity:
        tasks = [str(t) for t in data.get("tasks", [])]
        return cls(
            tasks=tasks,
            lookahead=_matrix(data.get("lookahead"), len(tasks), where),
            cosine=_matrix(data.get("cosine"), len(tasks), where),
            conflict=_matrix(data.get("conflict"), len(tasks), where),
            measurements=int(data.get("measurements", 0)),
        )

    @classmethod
    def from_lines(cls, records: Sequence[dict[str, Any]], where: str) -> Affinity | None:
        """Means over the ``affinity.jsonl`` measurements; ``None`` when there are none."""
        if not records:
            return None
        tasks = [str(t) for t in records[0].get("tasks", [])]
        stacks: dict[str, list[Matrix]] = {"lookahead": [], "cosine": []}
        for i, record in enumerate(records):
            if [str(t) for t in record.get("tasks", [])] != tasks:
                raise DataError(f"{where}: line {i + 1} lists other tasks than line 1")
            for kind, stack in stacks.items():
                value = _matrix(record.get(kind), len(tasks), f"{where}, line {i + 1}")
                if value is not None:
                    stack.append(value)

        def mean(stack: list[Matrix]) -> Matrix | None:
            return _nanmean(np.stack(stack)) if stack else None

        cosines = stacks["cosine"]
        conflict = mean([(c < 0).astype(np.float64) for c in cosines]) if cosines else None
        return cls(tasks, mean(stacks["lookahead"]), mean(cosines), conflict, len(records))

    @classmethod
    def pooled(cls, parts: Sequence[Affinity]) -> Affinity | None:
        """Several runs' means merged, each weighted by its number of measurements."""
        parts = [p for p in parts if p.measurements > 0]
        if not parts or any(p.tasks != parts[0].tasks for p in parts):
            return None  # nothing measured, or runs of different tasks: nothing to pool
        weights = np.array([p.measurements for p in parts], dtype=np.float64)

        def pool(kind: str) -> Matrix | None:
            pairs = [(p.matrix(kind), w) for p, w in zip(parts, weights, strict=True)]
            present = [(m, w) for m, w in pairs if m is not None]
            if not present:
                return None
            total = float(sum(w for _, w in present))
            pooled: Matrix = np.sum([m * w for m, w in present], axis=0) / total
            return pooled

        return cls(
            parts[0].tasks,
            pool("lookahead"),
            pool("cosine"),
            pool("conflict"),
            int(weights.sum()),
        )


def _nanmean(stack: Matrix) -> Matrix:
    counts = np.isfinite(stack).sum(axis=0)
    sums = np.where(np.isfinite(stack), stack, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean: Matrix = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return mean


def _matrix(value: Any, n: int, where: str) -> Matrix | None:
    if value is None:
        return None
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: an affinity matrix must hold numbers, got {value!r}") from None
    if array.shape != (n, n):
        raise DataError(
            f"{where}: an affinity matrix must be {n}×{n} (one row and column per task), "
            f"got shape {array.shape}"
        )
    return array


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"'{path}' is not valid JSON: {exc}") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One record per line; a last line cut short (a run killed while appending) is skipped."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                break
            raise DataError(f"'{path}', line {i + 1} is not valid JSON: {exc}") from None
    return records


@dataclass(frozen=True)
class Run:
    """One train run directory: its summary, per-epoch metrics and affinity, as written."""

    path: Path
    label: str  # the method (or "model · method") in a comparison, else a name for the run
    seed: int | None
    summary: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    affinity: Affinity | None
    baseline_task: str | None = None  # the task of a single-task baseline

    @property
    def tasks(self) -> list[str]:
        if self.summary and self.summary.get("tasks"):
            return [str(t) for t in self.summary["tasks"]]
        names: list[str] = []
        for record in self.metrics:
            names += [t for t in record.get("train_loss", {}) if t not in names]
        return names

    def primary_metric(self, task: str) -> str | None:
        """The task's primary metric: from the summary, else the first one validated."""
        if self.summary and task in self.summary.get("primary_metrics", {}):
            return str(self.summary["primary_metrics"][task])
        for record in self.metrics:
            names = [m for m in record.get("val", {}).get(task, {}) if m != "loss"]
            if names:
                return str(names[0])
        return None

    def test(self, task: str, metric: str) -> float | None:
        value = ((self.summary or {}).get("test") or {}).get(task, {}).get(metric)
        return None if value is None or not math.isfinite(float(value)) else float(value)


def read_run(path: Path, label: str | None = None, seed: int | None = None) -> Run:
    """Read one train run directory."""
    summary_path = path / "summary.json"
    summary = _read_json(summary_path) if summary_path.exists() else None
    metrics = _read_jsonl(path / "metrics.jsonl")
    if summary is None and not metrics:
        raise DataError(
            f"'{path}' is not a train run directory: it has neither summary.json nor metrics.jsonl"
        )
    affinity = None
    if summary and summary.get("affinity"):
        affinity = Affinity.from_summary(summary["affinity"], f"{summary_path} (affinity)")
    else:
        affinity = Affinity.from_lines(
            _read_jsonl(path / "affinity.jsonl"), str(path / "affinity.jsonl")
        )
    if label is None:
        label = str((summary or {}).get("name") or path.name)
    if seed is None and summary and isinstance(summary.get("seed"), int):
        seed = int(summary["seed"])
    return Run(path, label, seed, summary, metrics, affinity)


@dataclass(frozen=True)
class CompareDir:
    """A ``compare`` directory: its leaderboard, Pareto record and every run it trained."""

    path: Path
    name: str
    leaderboard: dict[str, Any]
    pareto: dict[str, Any] | None
    runs: list[Run]

    @property
    def methods(self) -> list[str]:
        return [str(r["method"]) for r in self.leaderboard["rows"] if r["method"] != BASELINE]


@dataclass(frozen=True)
class RunGroup:
    """Train run directories reported together (compared with each other)."""

    runs: list[Run] = field(default_factory=list)


def read_compare(path: Path) -> CompareDir:
    """Read a compare directory: the runs of the methods and seeds its leaderboard lists."""
    board = _read_json(path / "leaderboard.json")
    if not isinstance(board, dict) or "rows" not in board:
        raise DataError(
            f"'{path / 'leaderboard.json'}' has no 'rows'; is it a manytask leaderboard?"
        )
    pareto_path = path / "pareto.json"
    pareto = _read_json(pareto_path) if pareto_path.exists() else None
    labels = {str(r["method"]) for r in board["rows"]}
    seeds = {int(s) for s in board.get("seeds", [])}
    runs: list[Run] = []
    for summary_path in sorted(path.glob("**/summary.json")):
        folder = summary_path.parent
        parts = folder.relative_to(path).parts
        if len(parts) < 2 or not parts[-1].startswith("seed-"):
            continue
        try:
            seed = int(parts[-1].removeprefix("seed-"))
        except ValueError:
            continue
        if seed not in seeds:
            continue
        if parts[0] == BASELINE and len(parts) == 3:
            run = read_run(folder, BASELINE, seed)
            runs.append(dataclasses.replace(run, baseline_task=parts[1]))
            continue
        label = " · ".join(parts[:-1])
        if label in labels:
            runs.append(read_run(folder, label, seed))
    order = {label: i for i, label in enumerate(str(r["method"]) for r in board["rows"])}
    runs.sort(key=lambda r: (order.get(r.label, len(order)), r.baseline_task or "", r.seed or 0))
    config_path = path / "config.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    name = str((config or {}).get("name") or path.name)
    return CompareDir(path, name, board, pareto, runs)


def read_sources(paths: Sequence[str | Path]) -> list[CompareDir | RunGroup]:
    """Compare directories in the order given, then every train run directory as one group."""
    if not paths:
        raise ConfigError("report needs at least one run or compare directory")
    compares: list[CompareDir | RunGroup] = []
    group: list[Run] = []
    for entry in paths:
        path = Path(entry)
        if not path.is_dir():
            raise DataError(f"'{path}' is not a directory; give a train run or compare directory")
        if (path / "leaderboard.json").exists():
            compares.append(read_compare(path))
            continue
        if not (path / "summary.json").exists() and not (path / "metrics.jsonl").exists():
            raise DataError(
                f"'{path}' is neither a train run directory (summary.json or metrics.jsonl) "
                "nor a compare directory (leaderboard.json)"
            )
        group.append(read_run(path))
    if group:
        group = _distinct_labels(group)
        compares.append(RunGroup(group))
    return compares


def _distinct_labels(runs: list[Run]) -> list[Run]:
    """Name each run by its path below the runs' common folder when plain names clash."""
    labels = [r.label for r in runs]
    if len(set(labels)) == len(labels):
        return runs
    paths = [r.path.resolve() for r in runs]
    common = Path(*_common_parts(paths)) if len(paths) > 1 else paths[0].parent
    out = []
    for run, path in zip(runs, paths, strict=True):
        relative = path.relative_to(common) if path != common else Path(path.name)
        out.append(dataclasses.replace(run, label=relative.as_posix()))
    return out


def _common_parts(paths: Sequence[Path]) -> tuple[str, ...]:
    parts = [p.parts for p in paths]
    common: list[str] = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    return tuple(common)
