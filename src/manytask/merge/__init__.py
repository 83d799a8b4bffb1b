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
(:mod:`manytask.merge.methods`, :mod:`manytask.merge.fitted`) are imported, which this package
does.
"""

from __future__ import annotations

import importlib

from manytask.merge.config import MergeConfig, load_merge_config, parse_merge_config, parse_size
from manytask.merge.engine import (
    MergePlan,
    MergeResult,
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


def _register_rules() -> None:
    """Import the rule packages so that their rules register; a package that does not exist
    (yet) is skipped, an error inside one is not hidden."""
    for package in ("manytask.merge.methods", "manytask.merge.fitted"):
        try:
            importlib.import_module(package)
        except ModuleNotFoundError as exc:
            if exc.name != package:
                raise


_register_rules()
