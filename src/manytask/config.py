"""Typed configuration: YAML in, validated models out, errors that name the key.

A config file describes one experiment::

    name: multi_fashion
    seed: 0
    data: {name: multi_fashion, n_train: 50000}
    model: {name: shared_bottom, encoder: {name: cnn}}
    balancer: {name: ew}
    optimizer: {name: adam, lr: 0.001}
    train: {epochs: 10, batch_size: 256}

Sections whose keys depend on the chosen component (``data``, ``model``, ``balancer``,
``optimizer``, ``scheduler``) carry the component's ``name`` plus its parameters; those
parameters are checked against the component's signature when it is built
(:func:`manytask.validation.validate_params`), with the same kind of error. The checking
itself (strict sections, YAML files, ``--set`` overrides, errors that name the key) lives in
:mod:`manytask.validation`, which the merge config shares.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from manytask.errors import ConfigError
from manytask.validation import StrictModel, apply_overrides, format_validation_error, read_yaml


class ComponentConfig(BaseModel):
    """A registered component chosen by ``name``, with its parameters as the other keys."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SchedulerConfig(ComponentConfig):
    """A ``torch.optim.lr_scheduler`` class by name, stepped per epoch or per step."""

    interval: Literal["epoch", "step"] = "epoch"


class EarlyStoppingConfig(StrictModel):
    """Stop when the selection score has not improved for ``patience`` evaluations."""

    patience: int = Field(ge=1)
    min_delta: float = Field(default=0.0, ge=0.0)


class TaskConfig(StrictModel):
    """Overrides of one task's defaults (the dataset defines the tasks)."""

    metrics: list[str] | None = None
    weight: float | None = None
    loss: str | None = None


class TrainConfig(StrictModel):
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=256, ge=1)
    eval_batch_size: int = Field(default=1024, ge=1)
    device: str = "cpu"
    num_threads: int | None = Field(default=None, ge=1)
    checkpoint_every: int = Field(default=500, ge=0, description="steps; 0 = epoch ends only")
    keep_checkpoints: int = Field(default=2, ge=1)
    selection: str = Field(
        default="mean_primary",
        description="'mean_primary', 'loss' or 'TASK/METRIC' on the validation split",
    )
    early_stopping: EarlyStoppingConfig | None = None
    grad_clip: float | None = Field(default=None, gt=0)
    amp: Literal["none", "bf16", "fp16"] = "none"
    log_every: int = Field(default=20, ge=1)
    progress: bool = True


class MonitorConfig(StrictModel):
    """Task-affinity monitoring during training (:mod:`manytask.train.affinity`)."""

    affinity_every: int = Field(ge=1, description="steps between affinity measurements")
    lookahead: bool = Field(default=True, description="TAG lookahead affinity Z[i][j]")
    cosine: bool = Field(default=True, description="per-task gradient cosines and conflicts")
    lookahead_lr: float | None = Field(
        default=None, gt=0, description="lookahead SGD step; None: the optimizer's current lr"
    )

    @model_validator(mode="after")
    def _measures_something(self) -> MonitorConfig:
        if not (self.lookahead or self.cosine):
            raise ValueError("monitor needs lookahead or cosine (or both) set to true")
        return self


class RunConfig(StrictModel):
    dir: Path = Path("runs")
    name: str | None = None
    loggers: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="sinks beside metrics.jsonl (manytask.train.loggers; extra 'loggers')",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None, description="None: a file store in the run directory, <run>/mlruns"
    )


class Config(StrictModel):
    """One experiment: data, model, tasks, balancer, optimizer, training and run directory."""

    name: str = "experiment"
    seed: int = Field(default=0, ge=0)
    data: ComponentConfig
    model: ComponentConfig = ComponentConfig(name="shared_bottom")
    tasks: dict[str, TaskConfig] | None = None
    balancer: ComponentConfig = ComponentConfig(name="ew")
    optimizer: ComponentConfig = ComponentConfig(name="adam", lr=1e-3)
    scheduler: SchedulerConfig | None = None
    train: TrainConfig = TrainConfig()
    monitor: MonitorConfig | None = None
    run: RunConfig = RunConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_component_names(cls, data: Any) -> Any:
        """``--set balancer.temperature=2`` on a config without a balancer section keeps the
        default component's name instead of failing for a missing ``name``."""
        if isinstance(data, dict):
            for key in ("model", "balancer", "optimizer"):
                section = data.get(key)
                if isinstance(section, dict) and "name" not in section:
                    default = cls.model_fields[key].default
                    data = {**data, key: {**default.model_dump(), **section}}
        return data

    @property
    def run_name(self) -> str:
        return self.run.name or self.name

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe data (paths as strings)."""
        return self.model_dump(mode="json", exclude_none=False)


def parse_config(data: Mapping[str, Any], where: str = "config") -> Config:
    try:
        return Config.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where, Config)) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config, apply ``--set`` overrides and validate it."""
    path = Path(path)
    data = apply_overrides(read_yaml(path), overrides)
    return parse_config(data, where=f"'{path}'")
