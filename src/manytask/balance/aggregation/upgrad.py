r"""UPGrad: average the projections of every task gradient onto the dual cone of all of them.

Quinton and Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv:2406.16232 (2024),
Section 3 (Equation 3 defines :math:`\pi_J`) and Proposition 1:

.. math::

    d = \frac1T \sum_{i=1}^T \pi_J(g_i), \qquad
    \pi_J(x) = \arg\min_{y:\; J y \ge 0} \|y - x\|^2 ,

where :math:`\{y : Jy \ge 0\}` is the dual cone of the task gradients (the directions that
conflict with none of them). By Proposition 1, :math:`\pi_J(J^\top u) = J^\top v` with
:math:`v = \arg\min_{v \ge u} v^\top G v`, so with :math:`G = JJ^\top`

.. math::

    w = \frac1T \sum_{i=1}^T v_i, \qquad v_i = \arg\min_{v \ge e_i} v^\top G v, \qquad
    d = J^\top w .

The ``T`` small quadratic programs are solved by
:func:`~manytask.balance.solvers.qp.dual_cone_weights` (float64) to the KKT accuracy of the
float64 Gramian, all ``T`` in one batch: on a CPU by block principal pivoting (exact solves on
guessed supports, kept only with a KKT certificate), otherwise (and for the problems it cannot
certify) by an interior-point method without host synchronisation.

Properties (those the paper proves for UPGrad): ``Jd ≥ 0`` (non-conflicting),
``A(cJ) = cA(J)`` (homogeneous) and independent of the task order.

Defaults: the uniform preference ``1/T`` of the paper's definition (torchjd's default
``pref_vector``); 25 interior-point iterations (20 already reach the float64 floor on random
problems with up to 40 tasks, ``tests/test_solvers_qp.py``).

Deviations: none in the rule. torchjd 0.18 solves each projection with quadprog after dividing
``G`` by its trace and adding ``1e-4·I`` (to keep quadprog's factorisation positive definite);
manytask adds only ``T`` machine epsilons of the Gramian's dtype against rounding, so its
weights are the exact projection's to that precision, and differ from torchjd's default by up to
~1e-4 relative (``tests/test_method_upgrad.py``).

Shared parameters receive ``d``; task-specific parameters their own task's gradient. Exact under
``torch.distributed`` (``J`` is averaged over ranks before ``G`` is formed).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import GramianWeighting
from manytask.balance.solvers.qp import dual_cone_weights
from manytask.errors import ConfigError


class DualConeWeighting(GramianWeighting):
    """Weights that project anchor combinations of the gradients onto their dual cone and add
    the projections up: ``w = Σ_k v_k`` with ``v_k = argmin_{v ≥ u_k} vᵀGv`` for the columns
    ``u_k`` of :meth:`anchors` (UPGrad: one anchor per task; DualProj: the mean).

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
            name = type(self).__name__.lower()
            raise ConfigError(f"{name}: iterations must be ≥ 1, got {iterations}")
        self.iterations = iterations

    @abc.abstractmethod
    def anchors(self, tasks: int, device: torch.device) -> Tensor:
        """The ``(T, K)`` anchors, float64."""

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        anchors = self.anchors(gramian.shape[0], gramian.device)
        projections = dual_cone_weights(gramian, anchors, self.iterations)  # column k: v_k
        return projections.sum(dim=1).to(gramian.dtype)


@registry.register(
    "balancer",
    "upgrad",
    "mean of the gradients projected onto their dual cone (Quinton & Rey, arXiv 2024, "
    "arXiv:2406.16232)",
)
class UPGrad(DualConeWeighting):
    """UPGrad weights from the Gramian: the anchors are the columns of ``I/T``.

    Args:
        tasks: task names.
        iterations: interior-point iterations of the projection solver.
    """

    def anchors(self, tasks: int, device: torch.device) -> Tensor:
        return torch.eye(tasks, dtype=torch.float64, device=device) / tasks
