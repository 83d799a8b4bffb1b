"""Task balancing: loss weighting and gradient aggregation behind one ``backward()``.

Every module of :mod:`manytask.balance.weighting` and :mod:`manytask.balance.aggregation`
registers its methods on import; :func:`get` builds one by name.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Sequence
from typing import Any

from manytask import registry
from manytask.balance.base import (
    Balancer,
    BalanceStep,
    GramianWeighting,
    JacobianAggregator,
    LossWeighting,
    Need,
)
from manytask.errors import ConfigError
from manytask.validation import validate_params

for _package in ("manytask.balance.weighting", "manytask.balance.aggregation"):
    for _module in pkgutil.iter_modules(importlib.import_module(_package).__path__):
        importlib.import_module(f"{_package}.{_module.name}")

#: options every method takes through :meth:`Balancer.configure` rather than its constructor
COMMON_OPTIONS = ("loss_transform", "mode", "update_every")


def get(name: str, tasks: Sequence[str], **params: Any) -> Balancer:
    """Build the balancer registered as ``name`` for ``tasks`` (``manytask list`` shows names).

    ``params`` are the method's own parameters plus the common options ``loss_transform``
    (``"none"``/``"log"``), ``mode`` (``"parameters"``/``"features"``, gradient-based methods)
    and ``update_every`` (Gramian-based methods). Unknown names and parameters raise errors that
    list the valid choices.
    """
    options = {key: params.pop(key) for key in COMMON_OPTIONS if key in params}
    balancer: Balancer = registry.call_with_params("balancer", name, params, tasks=list(tasks))
    if options:
        accepted = inspect.signature(balancer.configure).parameters
        refused = [key for key in options if key not in accepted]
        if refused:
            raise ConfigError(
                f"balancer '{name}' does not take {', '.join(refused)}: 'mode' applies to "
                "gradient-based methods and 'update_every' to Gramian-based ones; "
                f"'{name}' takes {', '.join(accepted)}"
            )
        checked = validate_params(balancer.configure, options, where=f"balancer '{name}'")
        balancer.configure(**checked)
    return balancer


__all__ = [
    "BalanceStep",
    "Balancer",
    "GramianWeighting",
    "JacobianAggregator",
    "LossWeighting",
    "Need",
    "get",
]
