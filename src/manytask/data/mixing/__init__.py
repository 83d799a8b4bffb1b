"""Mixing task datasets: task samplers, their mixing rates, and mixed-task batches.

Importing this package registers the samplers (``manytask list samplers``).
"""

from manytask.data.mixing.mixture import TaskMixture, global_offsets
from manytask.data.mixing.rates import (
    annealed_exponent,
    proportional_rates,
    size_power_rates,
    temperature_rates,
    uniform_rates,
)
from manytask.data.mixing.samplers import (
    AnnealedSampler,
    ProportionalSampler,
    RoundRobinSampler,
    TaskSampler,
    TemperatureSampler,
    UniformSampler,
    build_sampler,
)

__all__ = [
    "AnnealedSampler",
    "ProportionalSampler",
    "RoundRobinSampler",
    "TaskMixture",
    "TaskSampler",
    "TemperatureSampler",
    "UniformSampler",
    "annealed_exponent",
    "build_sampler",
    "global_offsets",
    "proportional_rates",
    "size_power_rates",
    "temperature_rates",
    "uniform_rates",
]
