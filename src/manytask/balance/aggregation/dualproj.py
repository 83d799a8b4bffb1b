r"""DualProj: project the mean gradient onto the dual cone of the task gradients.

Named and analysed as an aggregator by Quinton and Rey, "Jacobian Descent for Multi-Objective
Optimization", arXiv:2406.16232 (2024), Section 3; the projection itself is Equation 11 of GEM
(Lopez-Paz and Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017,
arXiv:1706.08840):

.. math::

    d = \pi_J\Big(\frac1T \sum_i g_i\Big), \qquad
    \pi_J(x) = \arg\min_{y:\; J y \ge 0} \|y - x\|^2 ,

and, by Proposition 1 of Quinton and Rey, with :math:`G = JJ^\top`,

.. math::

    w = \arg\min_{v \ge \mathbf 1 / T} v^\top G v, \qquad d = J^\top w .

The quadratic program is solved by
:func:`~manytask.balance.solvers.qp.dual_cone_weights` (float64; block principal pivoting with
a KKT certificate on a CPU, the interior-point method otherwise; see
:class:`~manytask.balance.aggregation.upgrad.DualConeWeighting`, shared with UPGrad).

Properties: non-conflicting (``Jd ≥ 0``), homogeneous and independent of the task order.

Defaults: the uniform preference ``1/T`` (torchjd's default ``pref_vector``); 25 interior-point
iterations (see :mod:`manytask.balance.solvers.qp`).

Deviations: none in the rule. torchjd 0.18 divides ``G`` by its trace and adds ``1e-4·I`` before
calling quadprog; manytask adds only ``T`` machine epsilons of the Gramian's dtype against
rounding (differences up to ~1e-4 relative,
``tests/test_method_dualproj.py``).

Shared parameters receive ``d``; task-specific parameters their own task's gradient. Exact under
``torch.distributed``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.aggregation.upgrad import DualConeWeighting


@registry.register(
    "balancer",
    "dualproj",
    "mean gradient projected onto the dual cone of the gradients (Quinton & Rey, arXiv 2024, "
    "arXiv:2406.16232)",
)
class DualProj(DualConeWeighting):
    """DualProj weights from the Gramian: the one anchor is ``1/T``.

    Args:
        tasks: task names.
        iterations: interior-point iterations of the projection solver.
    """

    def anchors(self, tasks: int, device: torch.device) -> Tensor:
        return torch.full((tasks, 1), 1.0 / tasks, dtype=torch.float64, device=device)
