r"""Nash-MTL: the Nash bargaining solution among the tasks.

Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik and Fetaya, "Multi-Task Learning as a
Bargaining Game", ICML 2022, arXiv:2202.01017, Section 3 and Algorithm 1: the update
:math:`d = \sum_i \alpha_i g_i` maximises :math:`\sum_i \log(g_i^\top d)` over a ball, which
gives

.. math::

    G\alpha = 1/\alpha \quad (\alpha > 0, \text{ element-wise}), \qquad d = J^\top \alpha ,

so every task improves to first order, :math:`g_i^\top d = 1/\alpha_i > 0`, and
:math:`\|d\|^2 = \alpha^\top G\alpha = T`. The authors' code then clips the norm of the shared
parameters' gradient to ``max_norm`` (``torch.nn.utils.clip_grad_norm_``); manytask applies the
same clipping to ``d`` through the weights, :math:`\alpha \leftarrow \alpha \min(1,
\text{max\_norm}/\sqrt{\alpha^\top G\alpha})`.

Solver: :func:`~manytask.balance.solvers.nash.power_balance` minimises the strictly convex
:math:`\tfrac12\alpha^\top G\alpha - \sum_i\log\alpha_i`, whose stationary point is the solution,
by Newton's method with a batched line search (float64, 40 steps, no host synchronisation). The
authors solve a sequence of up to ``optim_niter = 20`` convex programs with cvxpy/ECOS (a
concave–convex procedure); on random Gramians with 2–10 tasks both give the same weights to
about ``1e-5`` relative (``tests/test_solvers_nash.py``), manytask's residual being smaller.

Defaults: ``max_norm = 1.0`` and updating the weights every step, the defaults of the authors'
``NashMTL`` class (github.com/AvivNavon/nash-mtl, ``methods/weight_methods.py``); their
``update_weights_every`` is manytask's common option ``update_every``. ``max_norm = 0`` disables
the clipping.

Deviations:

- the authors warm-start their iterative solver from the previous step's weights (so their
  weights depend on the history when it stops early); manytask solves each step to convergence
  from scratch and is stateless;
- when no positive solution exists (a zero gradient, or zero in the convex hull of the
  gradients — outside the paper's assumption of linearly independent gradients) the authors'
  solver fails and keeps its previous weights; manytask solves the slightly regularised system
  of :mod:`manytask.balance.solvers.nash` and gives zero weight to tasks with a zero gradient;
- the authors stop their iterations once ``‖Gα − 1/α‖ < 1e-3`` on the Gramian normalised to
  unit Frobenius norm, which leaves the weights inexact where the gradients are nearly
  opposite (on a Pareto front): there their direction has a small component along the front,
  while the exact solution (manytask's, to 5e-6 at an angle of π − 1e-5) points across
  it. On the toy problem's front the authors' solver drifts along it at about 1% of equal
  weighting's rate and manytask's does not move (``benchmarks/toy_front.py``);
- between weight updates (``update_every > 1``) the reused weights are applied without the norm
  clipping (the authors clip every step);
- in feature mode the clipping applies to the direction of the shared representation.

Properties: independent of the task order; not homogeneous (the direction has norm ``√T`` —
one after clipping — whatever the scale of the gradients); ``g_iᵀd > 0`` holds only where the
solution exists, so the class does not claim ``non_conflicting``.

Shared parameters receive ``d``; task-specific parameters their own task's gradient. Exact under
``torch.distributed`` (``J`` is averaged over ranks first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import GramianWeighting
from manytask.balance.solvers.nash import power_balance
from manytask.errors import ConfigError


def clip_weights(weights: Tensor, gramian: Tensor, max_norm: float) -> Tensor:
    """Scale ``w`` so that ``‖Jᵀw‖ = sqrt(wᵀGw) ≤ max_norm`` (``max_norm = 0``: unchanged)."""
    if max_norm == 0:
        return weights
    if weights.device.type == "cpu":  # the norm in numpy and a float: one torch operation
        w = weights.detach().numpy()
        length = math.sqrt(max(float(w @ gramian.detach().numpy().astype(w.dtype) @ w), 0.0))
        return weights * (max_norm / max(length, max_norm))
    norm = torch.sqrt((weights @ gramian.to(weights.dtype) @ weights).clamp_min(0.0))
    return weights * (max_norm / norm.clamp_min(max_norm))


@registry.register(
    "balancer",
    "nash_mtl",
    "Nash bargaining solution of the tasks, Gα = 1/α (Navon et al., ICML 2022, arXiv:2202.01017)",
)
class NashMTL(GramianWeighting):
    """Nash-MTL weights from the Gramian.

    Args:
        tasks: task names.
        max_norm: largest norm of the direction (clipping as the authors' code; 0 disables).
        iterations: Newton steps of the solver.
    """

    permutation_invariant = True
    non_conflicting = False
    homogeneous = False

    def __init__(self, tasks: Sequence[str], max_norm: float = 1.0, iterations: int = 40) -> None:
        super().__init__(tasks)
        if not max_norm >= 0:
            raise ConfigError(f"nash_mtl: max_norm must be ≥ 0 (0 disables), got {max_norm}")
        if iterations < 1:
            raise ConfigError(f"nash_mtl: iterations must be ≥ 1, got {iterations}")
        self.max_norm = float(max_norm)
        self.iterations = iterations

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        alpha = power_balance(gramian, 1.0, self.iterations)
        return clip_weights(alpha, gramian, self.max_norm).to(gramian.dtype)
