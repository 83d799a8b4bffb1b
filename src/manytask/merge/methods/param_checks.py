"""Checks of merge-rule parameters: each failure is a :class:`ConfigError` that names the rule,
the parameter, the bad value and the valid range."""

from __future__ import annotations

import math
from collections.abc import Sequence

from manytask.errors import ConfigError


def check_range(
    rule: str,
    name: str,
    value: float,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float when it lies in the interval, else raise a ConfigError."""
    number = float(value)
    above = number > low if low_open else number >= low
    below = number < high if high_open else number <= high
    if not (math.isfinite(number) and above and below):
        left = "(" if low_open else "["
        right = ")" if high_open or math.isinf(high) else "]"
        upper = "inf" if math.isinf(high) else f"{high:g}"
        raise ConfigError(f"{rule}: {name} must be in {left}{low:g}, {upper}{right}, got {value!r}")
    return number


def check_fraction(rule: str, name: str, value: float) -> float:
    """A fraction of entries kept: in (0, 1]."""
    return check_range(rule, name, value, 0.0, 1.0, low_open=True)


def check_numbers(
    rule: str, name: str, values: Sequence[float], *, positive: bool = False
) -> tuple[float, ...]:
    """A list of finite numbers (strictly positive with ``positive``), as a tuple of floats."""
    numbers = tuple(float(v) for v in values)
    if not numbers:
        raise ConfigError(f"{rule}: {name} must list at least one number, got []")
    bad = [v for v in numbers if not math.isfinite(v) or (positive and v <= 0)]
    if bad:
        kind = "positive finite numbers" if positive else "finite numbers"
        raise ConfigError(f"{rule}: {name} must hold {kind}, got {list(values)!r}")
    return numbers


def check_count(rule: str, name: str, values: Sequence[float], count: int) -> None:
    """A per-model list must have one entry per task model."""
    if len(values) != count:
        raise ConfigError(
            f"{rule}: {name} needs one value per task model ({count}), got {len(values)}"
        )
