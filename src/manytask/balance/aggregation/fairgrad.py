r"""FairGrad: α-fair allocation of the update among the tasks.

Ban and Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024, arXiv:2402.15638,
Equation 4 and Algorithm 1: the update :math:`d = J^\top w` maximises the α-fair
utility :math:`\sum_i (g_i^\top d)^{1-\alpha}/(1-\alpha)` over a ball, which gives

.. math::

    G w = w^{-1/\alpha} \quad (w > 0, \text{ element-wise}), \qquad d = J^\top w ,

so every task improves to first order, :math:`g_i^\top d = w_i^{-1/\alpha} > 0`. ``alpha = 1``
is proportional fairness, i.e. Nash-MTL's :math:`Gw = 1/w`; ``alpha → ∞`` tends to max–min
fairness (:math:`Gw = \mathbf 1`); ``alpha → 0`` to plain summation. The authors' code clips the
shared parameters' gradient to norm ``max_norm``; manytask applies that clipping through the
weights, :math:`w \leftarrow w\,\min(1, \text{max\_norm}/\sqrt{w^\top G w})`.

Solver: the authors call SciPy's ``least_squares`` on :math:`Gw - w^{-1/\alpha}` from ``1/T``
with bounds :math:`w \ge 0`; manytask minimises the strictly convex potential whose stationary
point is the solution by Newton's method
(:func:`~manytask.balance.solvers.nash.power_balance`, float64, 40 steps, no host
synchronisation), which reaches float64 residuals.

Defaults: ``alpha = 1.0`` and ``max_norm = 1.0``, the defaults of the authors' ``FairGrad``
class (github.com/OptMN-Lab/fairgrad, ``methods/weight_methods.py``); the paper tunes ``alpha``
per benchmark. ``max_norm = 0`` disables the clipping.

Deviations:

- the authors' code multiplies the direction by ``T`` ("to match the sum loss") before
  clipping; manytask follows the paper's :math:`d = J^\top w` (identical after clipping whenever
  both norms exceed ``max_norm``, e.g. always for ``alpha = 1``, where :math:`\|d\| = \sqrt T`);
- where no positive solution exists (a zero gradient, or zero in the convex hull of the
  gradients) manytask solves the slightly regularised system of
  :mod:`manytask.balance.solvers.nash` and gives zero weight to tasks with a zero gradient;
- between weight updates (``update_every > 1``) the reused weights are applied without the
  clipping; in feature mode the clipping applies to the representation's direction.

Properties: independent of the task order; not homogeneous (the weights scale like
:math:`c^{-2\alpha/(1+\alpha)}` under :math:`J \to cJ`); ``g_iᵀd > 0`` holds only where the
solution exists, so the class does not claim ``non_conflicting``.

Shared parameters receive ``d``; task-specific parameters their own task's gradient. Exact under
``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from manytask import registry
from manytask.balance.aggregation.nash_mtl import clip_weights
from manytask.balance.base import GramianWeighting
from manytask.balance.solvers.nash import power_balance
from manytask.errors import ConfigError


@registry.register(
    "balancer",
    "fairgrad",
    "alpha-fair allocation of the update, Gw = w^(-1/alpha) (Ban & Ji, ICML 2024, "
    "arXiv:2402.15638)",
)
class FairGrad(GramianWeighting):
    """FairGrad weights from the Gramian.

    Args:
        tasks: task names.
        alpha: the fairness parameter ``α > 0`` (1: proportional fairness, as Nash-MTL).
        max_norm: largest norm of the direction (clipping as the authors' code; 0 disables).
        iterations: Newton steps of the solver.
    """

    permutation_invariant = True
    non_conflicting = False
    homogeneous = False

    def __init__(
        self,
        tasks: Sequence[str],
        alpha: float = 1.0,
        max_norm: float = 1.0,
        iterations: int = 40,
    ) -> None:
        super().__init__(tasks)
        if not alpha > 0:
            raise ConfigError(f"fairgrad: alpha must be > 0, got {alpha}")
        if not max_norm >= 0:
            raise ConfigError(f"fairgrad: max_norm must be ≥ 0 (0 disables), got {max_norm}")
        if iterations < 1:
            raise ConfigError(f"fairgrad: iterations must be ≥ 1, got {iterations}")
        self.alpha = float(alpha)
        self.max_norm = float(max_norm)
        self.iterations = iterations

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        w = power_balance(gramian, 1.0 / self.alpha, self.iterations)
        return clip_weights(w, gramian, self.max_norm).to(gramian.dtype)
