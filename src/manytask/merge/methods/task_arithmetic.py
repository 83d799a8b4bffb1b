r"""Task arithmetic: add the scaled sum of the task vectors to the base.

Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi and Farhadi, "Editing Models with
Task Arithmetic", arXiv:2212.04089, Section 2 (task addition):

.. math::

    \theta = \theta_0 + \lambda \sum_t w_t \tau_t, \qquad \tau_t = \theta_t - \theta_0 .

Defaults: :math:`w_t = 1` (plain addition, as in the paper). The paper chooses
:math:`\lambda` for each experiment on held-out validation data, from a grid on [0, 1]; with no
data we use :math:`\lambda = 0.3` (our choice: a middling value of that grid, small enough that
the sum of several task vectors does not overshoot). Negative weights subtract a task (the
paper's task negation).
"""

from __future__ import annotations

from manytask.merge.methods.combine import SparseTaskVectorRule
from manytask.registry import register


@register(
    "merge_rule",
    "task_arithmetic",
    "base + λ · sum of task vectors (Ilharco et al., 2023, arXiv:2212.04089)",
)
class TaskArithmetic(SparseTaskVectorRule):
    """Task arithmetic.

    Args:
        scale: λ, the coefficient on the summed task vectors, ≥ 0.
        weights: one weight per task model (negative subtracts that task); default all 1.
    """

    rule_name = "task_arithmetic"

    def __init__(self, scale: float = 0.3, weights: list[float] | None = None) -> None:
        super().__init__(scale, weights)

    def entrywise(self) -> bool:
        return True
