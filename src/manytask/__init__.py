"""manytask: multi-task learning for PyTorch.

Train one model on many tasks, balance the tasks, and measure the result::

    import manytask as mt

    data = mt.data.mmoe_synthetic(correlation=0.5)
    model = mt.nn.SharedBottom(mt.nn.MLPEncoder(data.input_shape, [64]), data.tasks)
    balancer = mt.balance.get("dwa", tasks=data.tasks.names)

The subpackages (``balance``, ``data``, ``evaluate``, ``nn``, ``train``) and the training
config are imported on first use, so that a part of manytask (``manytask merge``, say) does
not load the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from manytask.errors import ConfigError, DataError, ManytaskError, UnknownNameError
from manytask.task import Task, TaskSet

if TYPE_CHECKING:
    from manytask import balance, data, evaluate, nn, train
    from manytask.config import Config, load_config

__version__ = "0.1.0"

_SUBPACKAGES = ("balance", "data", "evaluate", "nn", "train")
_FROM_CONFIG = ("Config", "load_config")


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"manytask.{name}")  # binds it here too
    if name in _FROM_CONFIG:
        return getattr(importlib.import_module("manytask.config"), name)
    raise AttributeError(f"module 'manytask' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBPACKAGES, *_FROM_CONFIG})


__all__ = [
    "Config",
    "ConfigError",
    "DataError",
    "ManytaskError",
    "Task",
    "TaskSet",
    "UnknownNameError",
    "__version__",
    "balance",
    "data",
    "evaluate",
    "load_config",
    "nn",
    "train",
]
