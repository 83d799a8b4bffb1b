"""Merging task-specific models into one, streamed tensor by tensor.

::

    import manytask.merge as mm

    result = mm.merge(
        base="ckpt/base", models=["ckpt/cars", "ckpt/dtd"], rule="ties",
        params={"density": 0.2}, output="runs/vit-ties",
    )
    print(mm.plan(base="ckpt/base", models=["ckpt/cars"], rule="task_arithmetic").to_text())
    merged = mm.merge_state_dicts(base_sd, [sd_a, sd_b], "task_arithmetic")

Rules register themselves under the registry kind ``merge_rule`` when their packages
(:mod:`manytask.merge.methods`, :mod:`manytask.merge.fitted`) are imported; a registry look-up
imports them when it needs to, and this package imports neither, so that a data-free merge does
not load the fitted rules.
"""

from __future__ import annotations

import importlib
from typing import Any

from manytask.merge.config import MergeConfig, load_merge_config, parse_merge_config, parse_size
from manytask.merge.engine import (
    MergePlan,
    MergeResult,
    is_fitted,
    merge,
    merge_state_dicts,
    plan,
    resolve_rule,
    tensor_seed,
)
from manytask.merge.io import (
    AdaptedModelSource,
    LoraAdapterSource,
    SafetensorsSource,
    ShardedSource,
    ShardWriter,
    StateDictSource,
    TensorInfo,
    TensorSource,
    convert_pickle_checkpoint,
    open_checkpoint,
    staged_directory,
    write_checkpoint,
)
from manytask.merge.report import MergeReport, TensorStats
from manytask.merge.rule import Merged, MergeRule

__all__ = [
    "AdaptedModelSource",
    "LoraAdapterSource",
    "MergeConfig",
    "MergePlan",
    "MergeReport",
    "MergeResult",
    "MergeRule",
    "Merged",
    "SafetensorsSource",
    "ShardWriter",
    "ShardedSource",
    "StateDictSource",
    "TensorInfo",
    "TensorSource",
    "TensorStats",
    "convert_pickle_checkpoint",
    "is_fitted",
    "load_merge_config",
    "merge",
    "merge_state_dicts",
    "open_checkpoint",
    "parse_merge_config",
    "parse_size",
    "plan",
    "resolve_rule",
    "staged_directory",
    "tensor_seed",
    "write_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name in ("methods", "fitted"):  # the rule packages, imported on first use
        return importlib.import_module(f"manytask.merge.{name}")
    raise AttributeError(f"module 'manytask.merge' has no attribute '{name}'")
