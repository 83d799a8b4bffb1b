"""Loss-weighting methods: each maps the task losses of a step to weights."""

from manytask.balance.weighting.dwa import DynamicWeightAverage
from manytask.balance.weighting.ew import EqualWeighting
from manytask.balance.weighting.rlw import RandomLossWeighting
from manytask.balance.weighting.uw import UncertaintyWeighting

__all__ = ["DynamicWeightAverage", "EqualWeighting", "RandomLossWeighting", "UncertaintyWeighting"]
