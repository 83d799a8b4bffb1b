"""From a validated :class:`~manytask.config.Config` to a ready :class:`Trainer`."""

from __future__ import annotations

import dataclasses
import inspect
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from manytask import balance, distributed, registry
from manytask.config import ComponentConfig, Config, SchedulerConfig, TaskConfig
from manytask.data.bundle import DatasetBundle
from manytask.errors import ConfigError, UnknownNameError
from manytask.nn.base import MultiTaskModel
from manytask.task import TaskSet
from manytask.train.affinity import AffinityMonitor
from manytask.train.loggers import build_sinks
from manytask.train.rundir import RunDirectory
from manytask.train.trainer import EarlyStopping, Trainer
from manytask.validation import validate_params


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (a GPU when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"train.device '{name}' is not a device; use cpu, cuda, cuda:N or auto"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use cpu or auto")
    return device


def load_dataset(spec: ComponentConfig) -> DatasetBundle:
    bundle: DatasetBundle = registry.call_with_params("dataset", spec.name, spec.params)
    return bundle


def select_tasks(available: TaskSet, overrides: dict[str, TaskConfig] | None) -> TaskSet:
    """The tasks to train: all of the dataset's, or those listed in ``tasks:`` with overrides."""
    if overrides is None:
        return available
    unknown = [name for name in overrides if name not in available]
    if unknown:
        raise ConfigError(
            f"unknown task(s) {', '.join(unknown)} in 'tasks'; this dataset's tasks are: "
            f"{', '.join(available.names)}"
        )
    chosen = []
    for name, override in overrides.items():
        changes = {k: v for k, v in override.model_dump().items() if v is not None}
        if "metrics" in changes:
            changes["metrics"] = tuple(changes["metrics"])
        chosen.append(
            dataclasses.replace(available[name], **changes) if changes else available[name]
        )
    return TaskSet(chosen)


def _torch_class(module: Any, base: type, name: str, kind: str) -> Any:
    classes = {
        cls_name.lower(): cls
        for cls_name, cls in vars(module).items()
        if inspect.isclass(cls)
        and issubclass(cls, base)
        and cls is not base
        and not cls_name.startswith("_")
    }
    if name.lower() not in classes:
        raise UnknownNameError(kind, name, classes)
    return classes[name.lower()]


def build_optimizer(
    spec: ComponentConfig, parameters: list[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    """Any ``torch.optim`` optimizer by (case-insensitive) class name, e.g. ``adam``, ``sgd``."""
    cls = _torch_class(torch.optim, torch.optim.Optimizer, spec.name, "optimizer")
    params = validate_params(
        cls, spec.params, where=f"optimizer '{spec.name}'", reserved={"params": None}
    )
    optimizer: torch.optim.Optimizer = cls(parameters, **params)
    return optimizer


def build_scheduler(
    spec: SchedulerConfig, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler:
    """Any ``torch.optim.lr_scheduler`` class by name, e.g. ``steplr``, ``cosineannealinglr``."""
    base = torch.optim.lr_scheduler.LRScheduler
    cls = _torch_class(torch.optim.lr_scheduler, base, spec.name, "scheduler")
    params = {k: v for k, v in spec.params.items()}
    checked = validate_params(
        cls, params, where=f"scheduler '{spec.name}'", reserved={"optimizer": None}
    )
    scheduler: torch.optim.lr_scheduler.LRScheduler = cls(optimizer, **checked)
    return scheduler


@dataclass
class Experiment:
    """Everything a config builds, ready to train."""

    config: Config
    bundle: DatasetBundle
    tasks: TaskSet
    model: MultiTaskModel
    balancer: balance.Balancer
    trainer: Trainer
    monitor: AffinityMonitor | None = None  # config.monitor: task affinity during training


def build_experiment(
    config: Config,
    run_dir: RunDirectory | None = None,
    bundle: DatasetBundle | None = None,
    progress: bool | None = None,
) -> Experiment:
    """Build data, tasks, model, balancer, optimizer, scheduler and trainer from ``config``.

    The global RNGs are seeded with ``config.seed`` before the model is initialised.
    """
    if config.train.num_threads is not None:
        torch.set_num_threads(config.train.num_threads)
    device = resolve_device(config.train.device)
    bundle = bundle if bundle is not None else load_dataset(config.data)
    tasks = select_tasks(bundle.tasks, config.tasks)
    seed_everything(config.seed)
    model: MultiTaskModel = registry.call_with_params(
        "architecture",
        config.model.name,
        config.model.params,
        tasks=tasks,
        input_shape=bundle.input_shape,
        columns=bundle.columns,
    )
    balancer = balance.get(config.balancer.name, tasks.names, **config.balancer.params)
    optimizer = build_optimizer(config.optimizer, [*model.parameters(), *balancer.parameters()])
    scheduler = build_scheduler(config.scheduler, optimizer) if config.scheduler else None
    train = config.train
    monitor = AffinityMonitor.from_config(config.monitor) if config.monitor else None
    trainer = Trainer(
        model,
        tasks,
        balancer,
        optimizer,
        bundle.train,
        bundle.val,
        bundle.test,
        scheduler=scheduler,
        scheduler_interval=config.scheduler.interval if config.scheduler else "epoch",
        epochs=train.epochs,
        batch_size=train.batch_size,
        eval_batch_size=train.eval_batch_size,
        device=device,
        seed=config.seed,
        run_dir=run_dir,
        checkpoint_every=train.checkpoint_every,
        keep_checkpoints=train.keep_checkpoints,
        selection=train.selection,
        early_stopping=(
            EarlyStopping(train.early_stopping.patience, train.early_stopping.min_delta)
            if train.early_stopping
            else None
        ),
        grad_clip=train.grad_clip,
        amp=train.amp,
        log_every=train.log_every,
        progress=train.progress if progress is None else progress,
        callbacks=[monitor] if monitor is not None else [],
    )
    return Experiment(config, bundle, tasks, model, balancer, trainer, monitor)


def run_training(
    config: Config,
    overwrite: bool = False,
    resume: bool = False,
    bundle: DatasetBundle | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train one config in its run directory and return the summary."""
    distributed.init_from_env()
    experiment = build_experiment(config, None, bundle, progress)  # bad input fails here, first
    path = config.run.dir / config.run_name
    # TensorBoard / MLflow (run.loggers), rank 0 only; a missing package fails here, before the
    # run directory is touched
    sinks = build_sinks(config, path) if distributed.rank() == 0 else []
    if distributed.rank() == 0:
        run_dir = RunDirectory.create(path, overwrite=overwrite, resume=resume)
        if not resume:
            run_dir.write_config(config.to_dict())
    distributed.barrier()
    if distributed.rank() != 0:
        run_dir = RunDirectory(path)  # read-only on other ranks (to resume); rank 0 writes
    experiment.trainer.run_dir = run_dir
    experiment.trainer.sinks = sinks
    experiment.trainer.display.print(f"data {config.data.name}: {experiment.bundle.describe()}")
    summary = experiment.trainer.fit(resume=resume)
    summary.update(
        {
            "name": config.run_name,
            "seed": config.seed,
            "balancer": config.balancer.name,
            "architecture": config.model.name,
            "tasks": experiment.tasks.names,
            "dataset": {"name": config.data.name, **experiment.bundle.info},
        }
    )
    if experiment.monitor is not None:
        summary["affinity"] = experiment.monitor.finish(experiment.trainer)
    if distributed.rank() == 0:
        run_dir.write_summary(summary)
    return summary
