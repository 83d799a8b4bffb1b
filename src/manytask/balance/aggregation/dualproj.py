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

The quadratic program is solved by the interior-point method of
:func:`~manytask.balance.solvers.qp.dual_cone_weights` (float64, fixed iteration count, no host
synchronisation).

Properties: non-conflicting (``Jd ≥ 0``), homogeneous and independent of the task order.

Defaults: the uniform preference ``1/T`` (torchjd's default ``pref_vector``); 25 interior-point
iterations (see :mod:`manytask.balance.solvers.qp`).

Deviations: none in the rule. torchjd 0.18 divides ``G`` by its trace and adds ``1e-4·I`` before
calling quadprog; manytask solves the unregularised problem (differences up to ~1e-4 relative,
``tests/test_method_dualproj.py``).

Shared parameters receive ``d``; task-specific parameters their own task's gradient. Exact under
``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import GramianWeighting
from manytask.balance.solvers.qp import dual_cone_weights
from manytask.errors import ConfigError


@registry.register(
    "balancer",
    "dualproj",
    "mean gradient projected onto the dual cone of the gradients (Quinton & Rey, arXiv 2024, "
    "arXiv:2406.16232)",
)
class DualProj(GramianWeighting):
    """DualProj weights from the Gramian.

    Args:
        tasks: task names.
        iterations: interior-point iterations of the projection solver.
    """

    permutation_invariant = True
    non_conflicting = True
    homogeneous = True

    def __init__(self, tasks: Sequence[str], iterations: int = 25) -> None:
        super().__init__(tasks)
        if iterations < 1:
            raise ConfigError(f"dualproj: iterations must be ≥ 1, got {iterations}")
        self.iterations = iterations

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        t = gramian.shape[0]
        anchor = torch.full((t,), 1.0 / t, dtype=torch.float64, device=gramian.device)
        return dual_cone_weights(gramian, anchor, self.iterations).to(gramian.dtype)
