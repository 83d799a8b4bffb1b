"""Timing shared by the speed benchmarks: variants timed in turn, medians compared as ratios."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable


def timed_together(
    steps: dict[str, Callable[[], None]], warmup: int, repeats: int, shuffle: int | None = None
) -> dict[str, float]:
    """Median ms per step of each variant, timed in turn (A B C A B C …) so that drifts of a
    shared machine hit every variant alike and cancel in their ratios.

    With ``shuffle`` (a seed), each round runs the variants in a new random order: a variant
    then follows every other equally often, instead of always the same one, whose traces in
    the caches (its code, its data) otherwise favour or burden the variant after it.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    draw = random.Random(shuffle)
    for _ in range(repeats):
        if shuffle is not None:
            draw.shuffle(order)
        for name in order:
            started = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - started)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}
