"""Task balancing: loss weighting and gradient aggregation behind one ``backward()``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from manytask import registry
from manytask.balance.base import Balancer, BalanceStep, LossWeighting, Need
from manytask.balance.weighting import (
    DynamicWeightAverage,
    EqualWeighting,
    RandomLossWeighting,
    UncertaintyWeighting,
)


def get(name: str, tasks: Sequence[str], **params: Any) -> Balancer:
    """Build the balancer registered as ``name`` for ``tasks`` (``manytask list`` shows names).

    Unknown names and parameters raise errors that list the valid choices.
    """
    balancer: Balancer = registry.call_with_params("balancer", name, params, tasks=list(tasks))
    return balancer


__all__ = [
    "BalanceStep",
    "Balancer",
    "DynamicWeightAverage",
    "EqualWeighting",
    "LossWeighting",
    "Need",
    "RandomLossWeighting",
    "UncertaintyWeighting",
    "get",
]
