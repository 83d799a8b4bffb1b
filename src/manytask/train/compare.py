"""``compare``: single-task baselines and several balancers on the same data and seeds.

Layout of ``runs/<name>-compare/``::

    config.yaml                   the base config
    single-task/<task>/seed-<s>/  one run directory per baseline model
    <method>/seed-<s>/            one run directory per method and seed
    <model>/<method>/seed-<s>/    … per architecture too, when several are compared
    leaderboard.json              the leaderboard (also printed)
    leaderboard.md                … as Markdown; ◆ marks the methods on the Pareto front
    pareto.json                   Pareto front and hypervolume of the test primary metrics
    report.html                   the HTML report (leaderboard, Pareto plot, curves, weights,
    plots/                        affinity); its figures as PNG files

Every run sees the same splits (the dataset is built once) and, for a given seed, the same
initialisation of the shared encoder and the same batch order. With ``models`` (architecture
names) every method runs on every architecture, each at its default hyper-parameters (the
configured ``model`` keeps its own); the single-task baselines are always the configured model,
so one Δm scale ranks every (architecture, method) pair. With ``resume``, finished runs
are kept, interrupted runs continue from their last checkpoint, and missing runs start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from manytask import atomic, balance, registry
from manytask.config import ComponentConfig, Config, TaskConfig
from manytask.errors import ConfigError, RunExistsError
from manytask.evaluate.leaderboard import BASELINE, Leaderboard, build_leaderboard
from manytask.evaluate.method_front import compare_front
from manytask.evaluate.report import ReportUnavailableError, write_report
from manytask.train.build import load_dataset, run_training, select_tasks
from manytask.train.rundir import RunDirectory

Announce = Callable[[str], None]


def compare_dir(config: Config) -> Path:
    return config.run.dir / f"{config.run_name}-compare"


def run_in_place(
    config: Config, path: Path, resume: bool, announce: Announce, **kwargs: Any
) -> dict[str, Any]:
    """Train ``config`` in the run directory ``path`` and return its summary; with ``resume``,
    keep a finished run, continue an interrupted one, or start one that left no checkpoint."""
    done = RunDirectory(path).read_summary()
    if resume and done is not None and done.get("status") == "completed":
        announce(f"{path}: finished earlier, kept")
        return done
    can_resume = resume and RunDirectory(path).latest_step() is not None
    announce(f"{path}: {'resuming' if can_resume else 'training'}")
    run_config = config.model_copy(
        update={"run": config.run.model_copy(update={"dir": path.parent, "name": path.name})}
    )
    # under --resume, a run that left no checkpoint has nothing worth keeping: start it afresh
    return run_training(
        run_config, overwrite=resume and not can_resume, resume=can_resume, **kwargs
    )


def compare(
    config: Config,
    methods: Sequence[str],
    seeds: int | Sequence[int] = 1,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool | None = None,
    announce: Announce = print,
    models: Sequence[str] = (),
) -> Leaderboard:
    """Train the single-task baselines and each method (on each of ``models``, when given) for
    each seed; return the leaderboard."""
    if not methods:
        raise ConfigError("compare needs at least one method (e.g. --methods ew,uw,dwa,rlw)")
    for method in methods:
        registry.get("balancer", method)  # unknown names fail before any data is read
    for model in models:
        registry.get("architecture", model)
    if len(set(models)) != len(models):
        raise ConfigError(f"--models lists an architecture twice: {', '.join(models)}")
    specs = [config.model if m == config.model.name else ComponentConfig(name=m) for m in models]
    seed_list = [config.seed + i for i in range(seeds)] if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ConfigError("compare needs at least one seed")
    root = compare_dir(config)
    if root.exists() and any(root.iterdir()) and not (overwrite or resume):
        raise RunExistsError(
            f"compare directory '{root}' already exists; pass --overwrite to replace it or "
            "--resume to finish it"
        )
    if overwrite and root.exists():
        RunDirectory.create(root, overwrite=True)
    root.mkdir(parents=True, exist_ok=True)
    RunDirectory(root).write_config(config.to_dict())

    bundle = load_dataset(config.data)
    tasks = select_tasks(bundle.tasks, config.tasks)
    for method in methods:  # a method that cannot be built fails now, not after hours of runs
        spec = _balancer_spec(config, method)
        balance.get(spec.name, tasks.names, **spec.params)
    for model_spec in specs:  # so does an architecture that cannot read this data
        registry.call_with_params(
            "architecture",
            model_spec.name,
            model_spec.params,
            tasks=tasks,
            input_shape=bundle.input_shape,
            columns=bundle.columns,
        )
    overrides = config.tasks or {name: TaskConfig() for name in tasks.names}
    kwargs = {"bundle": bundle, "progress": progress}

    baselines: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name in tasks.names}
    baseline_seconds: list[float] = []
    for seed in seed_list:
        seconds = 0.0
        for name in tasks.names:
            single = config.model_copy(
                update={
                    "seed": seed,
                    "tasks": {name: overrides[name]},
                    "balancer": ComponentConfig(name="ew"),
                }
            )
            path = root / BASELINE / name / f"seed-{seed}"
            summary = run_in_place(single, path, resume, announce, **kwargs)
            baselines[name].append(summary["test"])
            seconds += summary["seconds_per_epoch"]
        baseline_seconds.append(seconds)

    results: dict[str, list[tuple[dict[str, dict[str, float]], float]]] = {}
    for model_spec in specs or [config.model]:
        for method in methods:
            label = f"{model_spec.name} · {method}" if specs else method
            folder = root / model_spec.name / method if specs else root / method
            results[label] = []
            for seed in seed_list:
                run = config.model_copy(
                    update={
                        "seed": seed,
                        "balancer": _balancer_spec(config, method),
                        "model": model_spec,
                    }
                )
                summary = run_in_place(run, folder / f"seed-{seed}", resume, announce, **kwargs)
                results[label].append((summary["test"], summary["seconds_per_epoch"]))

    board = build_leaderboard(tasks, baselines, baseline_seconds, results, seed_list)
    front = compare_front(tasks, baselines, results, seed_list)
    board = board.with_front(front.members)
    atomic.write_json(root / "pareto.json", front.to_dict())
    atomic.write_json(root / "leaderboard.json", board.to_dict())
    atomic.write_text(root / "leaderboard.md", board.to_markdown())
    _write_report(root, announce)
    return board


def _write_report(root: Path, announce: Announce) -> None:
    """``report.html``; without matplotlib the comparison still succeeds, and says so."""
    try:
        path = write_report([root])
    except ReportUnavailableError as exc:
        announce(f"no report.html: {exc}")
        return
    announce(f"report: {path}")


def _balancer_spec(config: Config, method: str) -> ComponentConfig:
    """The configured balancer's parameters apply only when it is the method being run."""
    return config.balancer if method == config.balancer.name else ComponentConfig(name=method)
