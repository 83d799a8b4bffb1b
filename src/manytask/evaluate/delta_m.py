r"""Δm: the mean relative change of every task metric against single-task baselines.

.. math::

    \Delta_m = \frac{100}{K} \sum_{t=1}^{T} \sum_{j \in \mathcal{M}_t}
               (-1)^{\ell_{t,j}} \, \frac{M_{m,t,j} - M_{b,t,j}}{M_{b,t,j}}

where :math:`K` is the number of (task, metric) pairs, :math:`M_{m,t,j}` the metric :math:`j` of
task :math:`t` for the multi-task model, :math:`M_{b,t,j}` the same metric of the single-task
baseline, and :math:`\ell_{t,j} = 1` when lower is better. Positive Δm means better than the
baselines on average (Maninis et al., CVPR 2019, "Attentive Single-Tasking of Multiple Tasks";
Vandenhende et al., TPAMI 2021). Averaging over every metric of every task follows Navon et al.,
ICML 2022, "Multi-Task Learning as a Bargaining Game", whose tables (and those that follow
them: FAMO, FairGrad, …) report the opposite sign, :math:`-\Delta_m`, lower being better.

manytask divides by :math:`|M_{b,t,j}|`, which equals the papers' formula for the usual
positive metrics and keeps the sign meaningful for a metric that can be negative (R²).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from manytask.errors import ConfigError
from manytask.task import TaskSet

Results = Mapping[str, Mapping[str, float]]  # task -> metric -> value


def delta_m(results: Results, baselines: Results, tasks: TaskSet) -> float:
    """Δm in percent of ``results`` against ``baselines`` over every metric of every task."""
    terms: list[float] = []
    for name, task in tasks.items():
        for metric in task.metrics:
            try:
                value, base = results[name][metric], baselines[name][metric]
            except KeyError:
                raise ConfigError(
                    f"Δm needs metric '{metric}' of task '{name}' in both the results "
                    "and the single-task baselines"
                ) from None
            if base == 0 or not math.isfinite(base) or not math.isfinite(value):
                raise ConfigError(
                    f"Δm is undefined for task '{name}', metric '{metric}': "
                    f"baseline {base}, value {value} (both must be finite, the baseline non-zero)"
                )
            sign = 1.0 if task.higher_is_better(metric) else -1.0
            terms.append(sign * (value - base) / abs(base))
    return 100.0 * sum(terms) / len(terms)
