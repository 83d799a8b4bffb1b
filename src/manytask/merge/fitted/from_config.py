"""Fitted rules from a merge config: import the factory and the data, read the checkpoints whole,
fit, and write the merged checkpoint as ``manytask merge`` writes a data-free one.

The config names the code as ``module:function`` (``fitted.factory``, ``fitted.data``); the
module must be importable from where the command runs (the working directory is searched first,
as ``python -m`` does). A fitted rule works on whole models, so the checkpoints are read into
memory, not streamed. Representation Surgery returns a module (the merged model with a
correction before every head), not a checkpoint; it stays in the Python API.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from manytask import atomic, registry
from manytask.errors import ConfigError
from manytask.merge.config import MergeConfig, parse_size
from manytask.merge.fitted.base import FittedRule
from manytask.merge.fitted.surgery import RepresentationSurgery
from manytask.merge.io import ShardWriter, check_output_free, open_checkpoint, staged_directory


def resolve_callable(spec: str, key: str) -> Callable[..., Any]:
    """The function that ``module:function`` (``function`` may be dotted) names."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ConfigError(f"{key} must name a function as 'module:function', got {spec!r}")
    added = "" not in sys.path  # the working directory, as `python -m` searches it
    if added:
        sys.path.insert(0, "")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import module '{module_name}': {exc}") from None
    finally:
        if added:
            sys.path.remove("")
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{key}: '{module_name}' has no attribute '{attribute}'")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{key}: '{spec}' is a {type(target).__name__}, not a function")
    result: Callable[..., Any] = target
    return result


def read_whole(path: Path, label: str, allow_pickle_conversion: bool) -> dict[str, Tensor]:
    """Every tensor of a checkpoint, in memory."""
    with open_checkpoint(path, label, allow_pickle_conversion) as source:
        return {name: source.get(name) for name in source}  # each read is its own tensor


@dataclass(frozen=True)
class FittedMergeResult:
    output: Path
    summary: dict[str, Any]
    files: list[Path]


def build_fitted(config: MergeConfig) -> tuple[FittedRule, Callable[..., Any], Callable[..., Any]]:
    """The rule and the imported factory and data functions; every error before any reading."""
    if config.fitted is None:
        raise ConfigError(
            f"rule '{config.rule}' is fitted: it reads each task's data through the task models, "
            "so the config needs fitted.factory and fitted.data ('module:function'; see "
            "docs/merge-fitted.md)"
        )
    rule = registry.call_with_params("merge_rule", config.rule, dict(config.params))
    if isinstance(rule, RepresentationSurgery):
        raise ConfigError(
            "rule 'surgery' returns a module (the merged model with a correction before each "
            "head), not a checkpoint; use manytask.merge.fitted.RepresentationSurgery from Python"
        )
    assert isinstance(rule, FittedRule)
    factory = resolve_callable(config.fitted.factory, "fitted.factory")
    data = resolve_callable(config.fitted.data, "fitted.data")
    return rule, factory, data


def fitted_merge(
    config: MergeConfig, overwrite: bool = False, config_dict: Mapping[str, Any] | None = None
) -> FittedMergeResult:
    """Run the config's fitted rule and write its output folder (checkpoint, config, summary)."""
    started = time.perf_counter()
    rule, factory, data_function = build_fitted(config)
    assert config.fitted is not None
    output = config.output_dir
    check_output_free(output, overwrite)
    if config.output.dtype != "auto":
        raise ConfigError(
            "output.dtype must be 'auto' for a fitted rule: it returns tensors in the task "
            "models' dtype"
        )
    limit = parse_size(config.output.max_shard_size, "output.max_shard_size")
    models = [
        read_whole(e.path, f"model '{e.name}'", config.allow_pickle_conversion)
        for e in config.models
    ]
    base = (
        read_whole(config.base, "base", config.allow_pickle_conversion)
        if config.base is not None
        else None
    )
    data = data_function()
    if not hasattr(data, "__len__") or len(data) != len(models):
        count = len(data) if hasattr(data, "__len__") else "no sized sequence"
        raise ConfigError(
            f"fitted.data '{config.fitted.data}' must return one iterable of batches per task "
            f"model ({len(models)}), got {count}"
        )
    merged = rule.fit(factory, models, data, base=base, cache=config.fitted.cache, seed=config.seed)
    assert isinstance(merged, Mapping)
    with staged_directory(output, overwrite) as stage:
        writer = ShardWriter(stage, limit)
        for name, tensor in merged.items():
            writer.add(name, tensor.detach().cpu())
        files = writer.close()
        resolved = dict(config_dict) if config_dict is not None else config.to_dict()
        atomic.write_text(stage / "merge_config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        summary = {
            "name": config.name,
            "rule": config.rule,
            "params": dict(config.params),
            "seed": config.seed,
            "base": None if config.base is None else str(config.base),
            "models": [{"name": e.name, "path": str(e.path)} for e in config.models],
            "fitted": config.fitted.model_dump(mode="json"),
            "tensors": len(merged),
            "parameters": sum(t.numel() for t in merged.values()),
            "files": [str(f.relative_to(stage)) for f in files],
            "rule_summary": rule.summary(),
            "seconds": time.perf_counter() - started,
        }
        atomic.write_json(stage / "summary.json", summary)
        relative = [f.relative_to(stage) for f in files]
    return FittedMergeResult(output, summary, [output / f for f in relative])
