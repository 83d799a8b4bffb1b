"""Timing shared by the speed benchmarks: variants timed in turn, medians compared as ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed_together(
    steps: dict[str, Callable[[], None]], warmup: int, repeats: int
) -> dict[str, float]:
    """Median ms per step of each variant, timed in turn (A B C A B C …) so that drifts of a
    shared machine hit every variant alike and cancel in their ratios."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}
