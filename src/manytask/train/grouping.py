"""``group``: measure task affinity, propose groups for a budget of models, optionally train them.

Layout of ``runs/<name>-group/``::

    config.yaml                       the base config
    all-tasks/seed-<s>/               every task in one model, with the affinity monitor on
    affinity.json                     the affinity matrices (mean over seeds, and per seed)
    groups.json, groups.md            the proposed groups (manytask.evaluate.grouping)
    groups/<t1+t2+…>/seed-<s>/        with --train: one run per proposed group and seed
    comparison.json, comparison.md    with --train: each task's test primary metric trained with
                                      every task vs in the group that serves it

The all-tasks model is the configured one (model, balancer, optimizer), trained with the config's
``monitor`` section or, without one, a lookahead and cosine measurement every
:data:`DEFAULT_AFFINITY_EVERY` steps. The groups maximise the lookahead affinity (the cosine
when the lookahead was switched off). Each group trains the configured model on its tasks only;
a group holding every task reuses the all-tasks runs (the monitor leaves training unchanged).
With ``resume``, finished runs are kept and interrupted ones continue (as in ``compare``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manytask import atomic
from manytask.config import Config, MonitorConfig, TaskConfig
from manytask.errors import ConfigError, RunExistsError
from manytask.evaluate.delta_m import delta_m
from manytask.evaluate.grouping import Grouping, choose_groups, evaluate_groups, format_score
from manytask.evaluate.leaderboard import Stat
from manytask.task import TaskSet
from manytask.train.affinity import mean_affinity
from manytask.train.build import load_dataset, select_tasks
from manytask.train.compare import Announce, run_in_place
from manytask.train.rundir import RunDirectory

#: measurement interval (steps) when the config has no ``monitor`` section: a measurement costs
#: about K backward and K + 1 forward passes on one batch, so ~K/10 of a step's work per step
DEFAULT_AFFINITY_EVERY = 10
ALL_TASKS = "all-tasks"

Table = tuple[str, list[str], list[list[str]]]  # title, header, rows


def group_dir(config: Config) -> Path:
    return config.run.dir / f"{config.run_name}-group"


@dataclass(frozen=True)
class TaskComparison:
    """One task's test primary metric trained with every task vs in its serving group."""

    task: str
    metric: str
    higher_is_better: bool
    group: tuple[str, ...]
    together: Stat
    grouped: Stat

    @property
    def change_percent(self) -> float:
        """Relative change of the seed means, signed so that positive is better."""
        sign = 1.0 if self.higher_is_better else -1.0
        return 100.0 * sign * (self.grouped.mean - self.together.mean) / abs(self.together.mean)


@dataclass(frozen=True)
class Comparison:
    rows: list[TaskComparison]
    delta_m: Stat  # Δm% of the grouped models against the all-tasks model, every metric
    models_trained: int
    seeds: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "seeds": self.seeds,
            "models_trained": self.models_trained,
            "delta_m_vs_all_tasks": self.delta_m.to_dict(),
            "tasks": {
                r.task: {
                    "metric": r.metric,
                    "higher_is_better": r.higher_is_better,
                    "group": list(r.group),
                    "all_tasks": r.together.to_dict(),
                    "grouped": r.grouped.to_dict(),
                    "change_percent": r.change_percent,
                }
                for r in self.rows
            },
        }

    def table(self) -> Table:
        header = ["task", "metric", "all tasks", "in its group", "group", "change % ↑"]
        rows = [
            [
                r.task,
                f"{r.metric} {'↑' if r.higher_is_better else '↓'}",
                r.together.format(),
                r.grouped.format(),
                " + ".join(r.group),
                f"{r.change_percent:+.2f}",
            ]
            for r in self.rows
        ]
        seeds = ", ".join(str(s) for s in self.seeds)
        title = (
            f"test primary metric, all tasks in one model vs grouped (seeds {seeds}); "
            f"Δm% of the grouped models: {self.delta_m.format(2, signed=True)}"
        )
        return title, header, rows


@dataclass(frozen=True)
class GroupResult:
    root: Path
    affinity: dict[str, Any]  # as written to affinity.json
    grouping: Grouping
    all_together: Grouping  # every task in one model, scored by the same objective
    comparison: Comparison | None

    def affinity_table(self) -> Table:
        tasks, matrix = self.affinity["tasks"], self.affinity["matrix"]
        source = self.affinity["source"]
        header = ["from ↓ onto →", *tasks]
        rows = [[t, *map(format_score, row)] for t, row in zip(tasks, matrix, strict=True)]
        title = (
            f"{source} affinity Z[i→j], mean of {self.affinity['measurements']} measurements"
            if source == "lookahead"
            else f"gradient cosine, mean of {self.affinity['measurements']} measurements"
        )
        return title, header, rows

    def groups_table(self) -> Table:
        g = self.grouping
        rows = []
        for group in g.groups:
            served = [t for t in g.tasks if g.serving[t] == group]
            rows.append(
                [
                    " + ".join(group),
                    ", ".join(served),
                    ", ".join(format_score(g.task_scores[t]) for t in served),
                ]
            )
        title = (
            f"{len(g.groups)} group(s) for at most {g.models} model(s): score "
            f"{format_score(g.score)} (all tasks in one model: "
            f"{format_score(self.all_together.score)})"
        )
        return title, ["group", "serves", "affinity onto each"], rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def group(
    config: Config,
    models: int,
    *,
    train: bool = False,
    seeds: int = 1,
    overlap: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool | None = None,
    announce: Announce = print,
) -> GroupResult:
    """Train every task together with the affinity monitor, choose at most ``models`` groups,
    and with ``train`` train each group and compare (see the module docstring)."""
    if isinstance(models, bool) or not isinstance(models, int) or models < 1:
        raise ConfigError(f"--models must be an integer ≥ 1, got {models!r}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be ≥ 1, got {seeds}")
    root = group_dir(config)
    if root.exists() and any(root.iterdir()) and not (overwrite or resume):
        raise RunExistsError(
            f"group directory '{root}' already exists; pass --overwrite to replace it or "
            "--resume to finish it"
        )
    bundle = load_dataset(config.data)
    tasks = select_tasks(bundle.tasks, config.tasks)
    if len(tasks) < 2:
        raise ConfigError(f"grouping needs at least two tasks; the config has {tasks.names}")
    if overwrite and root.exists():
        RunDirectory.create(root, overwrite=True)
    root.mkdir(parents=True, exist_ok=True)
    RunDirectory(root).write_config(config.to_dict())
    kwargs: dict[str, Any] = {"bundle": bundle, "progress": progress}
    seed_list = [config.seed + i for i in range(seeds)]
    monitor = config.monitor or MonitorConfig(affinity_every=DEFAULT_AFFINITY_EVERY)

    together: dict[int, dict[str, Any]] = {}
    for seed in seed_list:
        run = config.model_copy(update={"seed": seed, "monitor": monitor})
        together[seed] = run_in_place(
            run, root / ALL_TASKS / f"seed-{seed}", resume, announce, **kwargs
        )

    affinity = _affinity(tasks, [together[s]["affinity"] for s in seed_list], seed_list)
    atomic.write_json(root / "affinity.json", affinity)
    grouping = choose_groups(affinity["matrix"], tasks.names, models, overlap=overlap)
    all_together = evaluate_groups(affinity["matrix"], tasks.names, [tasks.names])
    atomic.write_json(
        root / "groups.json",
        {
            **grouping.to_dict(),
            "affinity": affinity["source"],
            "all_tasks_score": all_together.score,
        },
    )
    result = GroupResult(root, affinity, grouping, all_together, None)
    atomic.write_text(root / "groups.md", _groups_markdown(result))
    if not train:
        return result

    overrides = config.tasks or {name: TaskConfig() for name in tasks.names}
    runs: dict[tuple[str, ...], dict[int, dict[str, Any]]] = {}
    trained = 0
    for members in grouping.groups:
        if set(members) == set(tasks.names):
            runs[members] = together
            continue
        runs[members] = {}
        for seed in seed_list:
            run = config.model_copy(
                update={
                    "seed": seed,
                    "tasks": {t: overrides[t] for t in members},
                    "monitor": None,
                }
            )
            path = root / "groups" / "+".join(members) / f"seed-{seed}"
            runs[members][seed] = run_in_place(run, path, resume, announce, **kwargs)
            trained += 1
    comparison = _compare(tasks, grouping, together, runs, seed_list, trained)
    atomic.write_json(root / "comparison.json", comparison.to_dict())
    title, header, rows = comparison.table()
    atomic.write_text(root / "comparison.md", f"{title}\n\n{markdown_table(header, rows)}")
    return GroupResult(root, affinity, grouping, all_together, comparison)


def _affinity(
    tasks: TaskSet, summaries: Sequence[dict[str, Any]], seeds: Sequence[int]
) -> dict[str, Any]:
    source = "lookahead" if any(s.get("lookahead") is not None for s in summaries) else "cosine"
    keys = ("lookahead", "cosine", "conflict")
    measured = [k for k in keys if any(s.get(k) is not None for s in summaries)]
    means = {k: mean_affinity(summaries, k) if k in measured else None for k in keys}
    return {
        "tasks": tasks.names,
        "source": source,
        "matrix": means[source],
        **means,
        "measurements": sum(int(s.get("measurements", 0)) for s in summaries),
        "seeds": list(seeds),
        "per_seed": {str(seed): s for seed, s in zip(seeds, summaries, strict=True)},
    }


def _compare(
    tasks: TaskSet,
    grouping: Grouping,
    together: dict[int, dict[str, Any]],
    runs: dict[tuple[str, ...], dict[int, dict[str, Any]]],
    seeds: list[int],
    trained: int,
) -> Comparison:
    rows = []
    for name, task in tasks.items():
        metric = task.primary_metric
        serving = grouping.serving[name]
        rows.append(
            TaskComparison(
                task=name,
                metric=metric,
                higher_is_better=task.higher_is_better(metric),
                group=serving,
                together=Stat.of([together[s]["test"][name][metric] for s in seeds]),
                grouped=Stat.of([runs[serving][s]["test"][name][metric] for s in seeds]),
            )
        )
    deltas = []
    for seed in seeds:
        grouped = {name: runs[grouping.serving[name]][seed]["test"][name] for name in tasks.names}
        deltas.append(delta_m(grouped, together[seed]["test"], tasks))
    return Comparison(rows, Stat.of(deltas), trained, seeds)


def _groups_markdown(result: GroupResult) -> str:
    title, header, rows = result.affinity_table()
    tasks = result.affinity["tasks"]
    parts = [f"## Affinity\n\n{title}:\n\n{markdown_table(header, rows)}"]
    for key, caption, digits in (
        ("cosine", "Mean cosine of the per-task gradients of the shared parameters", "+.3f"),
        ("conflict", "Fraction of measurements with conflicting gradients (cosine < 0)", ".2f"),
    ):
        matrix = result.affinity.get(key)
        if matrix is not None and not (key == "cosine" and result.affinity["source"] == key):
            cells = [
                [t, *(f"{v:{digits}}" for v in row)] for t, row in zip(tasks, matrix, strict=True)
            ]
            parts.append(f"{caption}:\n\n" + markdown_table(["task", *tasks], cells))
    parts.append(f"## Groups\n\n{result.grouping.to_markdown()}")
    together = format_score(result.all_together.score)
    parts.append(f"All tasks in one model would score {together}.\n")
    return "\n".join(parts)
