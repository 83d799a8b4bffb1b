r"""Coordinate-wise trimmed mean of the task gradients.

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018, arXiv:1803.01498: their coordinate-wise :math:`\beta`-trimmed
mean, with the tasks in the role of the workers. For every coordinate
:math:`p`, sort the :math:`T` values :math:`g_{1p}, \dots, g_{Tp}`, drop the :math:`k` largest
and the :math:`k` smallest, and average the rest:

.. math::

    d_p = \frac{1}{T - 2k} \sum_{r = k + 1}^{T - k} g_{(r)p}

where :math:`g_{(r)p}` is the :math:`r`-th smallest value. The paper trims a fraction
:math:`\beta` of the workers; manytask takes the count :math:`k` (``trim_number``, torchjd's
``TrimmedMean`` parameter). :math:`k = 0` is the plain mean and, for odd :math:`T`,
:math:`k = (T-1)/2` the coordinate-wise median.

The direction is a mean, on the scale of one task gradient (the paper's estimator), not the
sum that equal weighting gives. Default: ``trim_number`` None trims one value from each end
when there are at least three tasks, and none with two (the paper gives no default; one is the
smallest trim that does anything). An explicit value must satisfy ``2k + 1 ≤ T``.

Exact under ``torch.distributed`` in parameter mode (``J`` is averaged over ranks first).
Shared parameters receive ``d``; task-specific parameters their own task's gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from manytask import registry
from manytask.balance.base import JacobianAggregator
from manytask.errors import ConfigError


def trimmed_mean(jacobian: Tensor, trim: int) -> Tensor:
    """The coordinate-wise mean of the rows of ``jacobian`` without the ``trim`` largest and
    ``trim`` smallest values of each column."""
    t = jacobian.shape[0]
    total = jacobian.sum(dim=0)
    # the sums of the extremes do not depend on how ties are broken; the default trim of one
    # takes two column reductions (20× faster than ``topk`` across the rows)
    if trim == 1:
        total = total - jacobian.amax(dim=0) - jacobian.amin(dim=0)
    elif trim > 1:
        total = total - jacobian.topk(trim, dim=0).values.sum(dim=0)
        total = total + (-jacobian).topk(trim, dim=0).values.sum(dim=0)
    return total / (t - 2 * trim)


@registry.register(
    "balancer",
    "trimmed_mean",
    "coordinate-wise trimmed mean of the task gradients (Yin et al., ICML 2018, arXiv:1803.01498)",
)
class TrimmedMean(JacobianAggregator):
    """Coordinate-wise trimmed mean.

    Args:
        tasks: task names.
        trim_number: values dropped from each end of every coordinate (None: 1 when there are
            at least three tasks, else 0).
    """

    permutation_invariant = True
    homogeneous = True

    def __init__(self, tasks: Sequence[str], trim_number: int | None = None) -> None:
        super().__init__(tasks)
        t = self.num_tasks
        if trim_number is None:
            trim_number = 1 if t >= 3 else 0
        if trim_number < 0 or 2 * trim_number + 1 > t:
            raise ConfigError(
                f"trimmed_mean: trim_number must be in [0, {(t - 1) // 2}] for {t} tasks "
                f"(2 * trim_number + 1 ≤ number of tasks), got {trim_number}"
            )
        self.trim_number = trim_number

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        return trimmed_mean(jacobian, self.trim_number)
