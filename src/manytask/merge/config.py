"""The merge config: a YAML file a person can read and diff, validated with errors naming the key.

::

    name: vit-ties                      # output: runs/<name>/ unless output.dir is set
    base: checkpoints/vit-base          # a checkpoint path, or null for rules without a base
    models:                             # paths, or {name, path}
      - checkpoints/vit-cars
      - {name: dtd, path: checkpoints/vit-dtd/model.safetensors}
    rule: ties                          # a registered merge rule (manytask list merge_rules)
    params: {density: 0.2, scale: 1.0}  # the rule's parameters, checked against its signature
    seed: 0                             # randomised rules (DARE …) draw from (seed, tensor name)
    output: {dir: null, dtype: auto, max_shard_size: 5GB}
    allow_pickle_conversion: false      # read .bin/.pt/.pth with torch.load(weights_only=True)
    non_float: must_match               # or from_base: integer/bool tensors copied from the base

A fitted rule (``fisher``, ``regmean``, ``adamerging_task``, ``adamerging_layer``) also needs
the code that builds each task's model and reads its data, named as ``module:function``::

    fitted:
      factory: mytasks.models:task_model  # task_model(i) -> task i's nn.Module (head loaded)
      data: mytasks.data:unlabeled        # unlabeled() -> one iterable of input batches per model
      cache: runs/stats                   # optional: statistics kept for the next merge

The YAML reading, ``--set`` overrides and error formatting are those of
:mod:`manytask.config`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from manytask.errors import ConfigError
from manytask.merge.io import default_model_name
from manytask.validation import StrictModel, apply_overrides, format_validation_error, read_yaml

#: the default shard limit of transformers' ``PreTrainedModel.save_pretrained`` ("5GB")
DEFAULT_MAX_SHARD_SIZE = "5GB"

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(value: int | str, key: str = "max_shard_size") -> int:
    """Bytes from an integer or a string such as ``"2GB"`` (10⁹ bytes, as Hugging Face counts)
    or ``"1.5GiB"`` (2³⁰ bytes)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a size such as '2GB' or a number of bytes, got {value}")
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = match.group(2).upper() if match else ""
        if match is None or unit not in _UNITS:
            raise ConfigError(
                f"{key} must be a size such as '2GB', '500MB', '1GiB' or a number of bytes, "
                f"got {value!r}"
            )
        size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise ConfigError(f"{key} must be at least 1 byte, got {value!r}")
    return size


class ModelEntry(StrictModel):
    """One task model: a name (used in the report) and a checkpoint path."""

    name: str = Field(min_length=1)
    path: Path


class OutputConfig(StrictModel):
    """Where and how the merged checkpoint is written."""

    dir: Path | None = Field(default=None, description="default: runs/<name>")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE  # checked by parse_merge_config


class FittedConfig(StrictModel):
    """What a fitted rule reads besides the checkpoints: importable ``module:function`` names."""

    factory: str = Field(min_length=1, description="module:function; function(i) -> nn.Module")
    data: str = Field(min_length=1, description="module:function; function() -> batches per model")
    cache: Path | None = Field(default=None, description="folder for the rule's statistics")


class MergeConfig(StrictModel):
    """One merge: base, task models, rule and parameters, seed and output."""

    name: str = "merge"
    base: Path | None = None
    models: list[ModelEntry] = Field(min_length=1)
    rule: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    seed: int = Field(default=0, ge=0, lt=2**32)
    output: OutputConfig = OutputConfig()
    allow_pickle_conversion: bool = False
    non_float: Literal["must_match", "from_base"] = "must_match"
    fitted: FittedConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _name_models(cls, data: Any) -> Any:
        """A bare path in ``models`` is named after its file or folder."""
        if isinstance(data, dict) and isinstance(data.get("models"), list):
            models = [
                {"name": default_model_name(str(m)), "path": m} if isinstance(m, str) else m
                for m in data["models"]
            ]
            data = {**data, "models": models}
        return data

    @model_validator(mode="after")
    def _unique_names(self) -> MergeConfig:
        seen: set[str] = set()
        for entry in self.models:
            if entry.name in seen:
                raise ValueError(
                    f"two models are named '{entry.name}'; give each a distinct name with "
                    "{name: ..., path: ...}"
                )
            seen.add(entry.name)
        return self

    @property
    def output_dir(self) -> Path:
        return self.output.dir if self.output.dir is not None else Path("runs") / self.name

    def merge_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`manytask.merge.merge` / :func:`manytask.merge.plan`
        (all but ``overwrite``)."""
        return {
            "base": self.base,
            "models": {entry.name: entry.path for entry in self.models},
            "rule": self.rule,
            "params": dict(self.params),
            "seed": self.seed,
            "output": self.output_dir,
            "dtype": self.output.dtype,
            "max_shard_size": parse_size(self.output.max_shard_size, "output.max_shard_size"),
            "allow_pickle_conversion": self.allow_pickle_conversion,
            "non_float": self.non_float,
            "name": self.name,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe data (paths as strings)."""
        return self.model_dump(mode="json")


def parse_merge_config(data: dict[str, Any], where: str = "merge config") -> MergeConfig:
    try:
        config = MergeConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where, MergeConfig)) from None
    parse_size(config.output.max_shard_size, f"output.max_shard_size in {where}")
    return config


def load_merge_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> MergeConfig:
    """Load a YAML merge config, apply ``--set`` overrides and validate it."""
    path = Path(path)
    data = apply_overrides(read_yaml(path), overrides)
    return parse_merge_config(data, where=f"'{path}'")
