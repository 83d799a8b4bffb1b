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
(:func:`validate_params`), with the same kind of error.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from manytask.errors import ConfigError


class StrictModel(BaseModel):
    """A config section that refuses unknown keys and checks assignments."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


def _describe_type(error: Mapping[str, Any]) -> str:
    kind = str(error.get("type", ""))
    words = {
        "int_parsing": "an integer",
        "int_type": "an integer",
        "int_from_float": "an integer",
        "float_parsing": "a number",
        "float_type": "a number",
        "bool_parsing": "true or false",
        "bool_type": "true or false",
        "string_type": "a string",
        "list_type": "a list",
        "dict_type": "a mapping",
        "model_type": "a mapping",
        "model_attributes_type": "a mapping",
        "literal_error": "one of the allowed values",
    }
    return words.get(kind, "")


def _fields_at(model: type[BaseModel], loc: Sequence[str | int]) -> list[str] | None:
    """The valid keys of the (nested) model that ``loc`` points into."""
    current: Any = model
    for part in loc:
        if not (inspect.isclass(current) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [
            a for a in (annotation, *args) if inspect.isclass(a) and issubclass(a, BaseModel)
        ]
        if not candidates:
            # a dict of models (tasks: {name: TaskConfig}) skips one level of the path
            nested = [a for a in args if getattr(a, "__args__", None)]
            candidates = [
                b
                for a in nested
                for b in a.__args__
                if inspect.isclass(b) and issubclass(b, BaseModel)
            ]
            if candidates:
                current = candidates[0]
                continue
            return None
        current = candidates[0]
    if inspect.isclass(current) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return None


def format_validation_error(
    exc: ValidationError, where: str, model: type[BaseModel] | None = None
) -> str:
    """One readable line per problem: the key, what is wrong, and what would be right."""
    lines = []
    for error in exc.errors():
        loc = [part for part in error["loc"]]
        key = ".".join(str(p) for p in loc) or "(top level)"
        if error["type"] == "extra_forbidden":
            valid = _fields_at(model, loc[:-1]) if model is not None else None
            # tasks.<name>.<key> paths carry a free-form task name
            if valid is None and model is not None and len(loc) >= 2:
                valid = _fields_at(model, [loc[0], *loc[2:-1]])
            choices = f"; valid keys here: {', '.join(valid)}" if valid else ""
            close = difflib.get_close_matches(str(loc[-1]), valid or [], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            lines.append(f"unknown key '{key}' in {where}{hint}{choices}")
        elif error["type"] == "missing":
            lines.append(f"missing required key '{key}' in {where}")
        else:
            expected = _describe_type(error)
            got = error.get("input")
            detail = f"expected {expected}" if expected else str(error["msg"]).lower()
            if error["type"] == "literal_error":
                detail = str(error["msg"]).replace("Input should be", "expected")
            lines.append(f"bad value for '{key}' in {where}: {detail}, got {got!r}")
    return "\n".join(lines)


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping at the top of a YAML file; a missing file or another shape is a ConfigError."""
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides; values are parsed as YAML (``3``, ``true``, ``[1,2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        dotted, raw = item.split("=", 1)
        keys = [k for k in dotted.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: '{key}' holds a value, not a section")
            node = child
        node[keys[-1]] = value
    return data


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


def validate_params(
    obj: Callable[..., Any],
    params: Mapping[str, Any],
    where: str,
    reserved: Mapping[str, Any] = {},
) -> dict[str, Any]:
    """Check user parameters against the signature of ``obj`` (a class or function).

    Parameters supplied by manytask itself (``reserved``) and ``*args``/``**kwargs`` are not
    user-settable. Returns the parameters converted to the annotated types.
    """
    target = obj.__init__ if inspect.isclass(obj) else obj
    signature = inspect.signature(target)
    try:
        hints = inspect.get_annotations(getattr(target, "__func__", target), eval_str=True)
    except (NameError, TypeError):
        hints = {}
    fields: dict[str, Any] = {}
    for pname, param in signature.parameters.items():
        if pname in ("self", *reserved) or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.kind is param.POSITIONAL_ONLY:
            continue
        annotation = hints.get(pname, Any)
        default = ... if param.default is param.empty else param.default
        fields[pname] = (annotation, default)
    model = create_model(
        f"Params_{where}",
        __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
        **fields,
    )
    try:
        validated = model.model_validate(dict(params))
    except ValidationError as exc:
        message = format_validation_error(exc, where, model)
        raise ConfigError(message) from None
    return {k: getattr(validated, k) for k in params}
