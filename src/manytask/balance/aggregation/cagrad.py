r"""CAGrad: the best worst-case improvement within a ball around the average gradient.

Liu, Liu, Jin, Stone and Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
NeurIPS 2021, arXiv:2110.14048, Section 3 and Algorithm 1. With :math:`g_0 = \frac1T\sum_i
g_i` the average gradient, the update solves

.. math::

    \max_{d} \min_i \; g_i^\top d \quad \text{s.t.} \quad \|d - g_0\| \le c\,\|g_0\| ,

whose dual is a problem over the simplex, solved with the Gramian alone:

.. math::

    w^\star = \arg\min_{w \in \Delta_T} \; g_w^\top g_0 + c\,\|g_0\|\,\|g_w\|, \qquad
    d = \frac{g_0 + \lambda\, g_{w^\star}}{\rho}, \qquad
    \lambda = \frac{c\,\|g_0\|}{\|g_{w^\star}\|},

(:math:`g_w = \sum_i w_i g_i`, :math:`g_w^\top g_0 = w^\top G\mathbf 1/T`), i.e. task weights
:math:`(\mathbf 1/T + \lambda w^\star)/\rho`. The divisor :math:`\rho` is the ``rescale`` option
of the authors' code: ``0`` → 1, ``1`` → :math:`1 + c^2`, ``2`` → :math:`1 + c`.

Defaults: ``c = 0.5`` and ``rescale = 1``, the defaults of the authors' ``cagrad`` function
and command line (github.com/Cranial-XIX/CAGrad, ``nyuv2/utils.py``,
``nyuv2/model_segnet_mt.py``) and of LibMTL (``calpha=0.5, rescale=1``); the paper's NYU-v2 and
Cityscapes runs use ``c = 0.4`` (the repository's ``run.sh``).

Solver: the authors call SciPy's SLSQP from the uniform point; manytask follows the central path
of a self-concordant barrier for the same problem (:mod:`manytask.balance.solvers.cagrad`,
float64, no host synchronisation; two tasks in closed form), on the Gramian divided by its
mean diagonal. On random problems its directions are at least as good as those of torchjd's
cvxpy/Clarabel solution and LibMTL's SLSQP one (their worst-case improvement ``min_i g_iᵀd`` is
never lower) and agree with them to about ``5e-5`` of the largest gradient norm, the accuracy
of those solvers (``tests/test_method_cagrad.py``, ``tests/test_solvers_qp.py``).

Deviations:

- the authors' NYU-v2 script multiplies the final direction by ``T`` "to match the sum loss"
  (its learning rate is tuned for that scale); manytask follows the paper's ``d`` built on the
  *average* gradient, as LibMTL does — multiply the learning rate by ``T`` to reproduce that
  script;
- the authors divide by :math:`\|g_{w^\star}\| + 10^{-8}` in raw units, which guards against
  a vanishing :math:`\|g_{w^\star}\|` (the convex hull of the gradients contains zero) but
  shortens the step of every problem a little; manytask divides by
  :math:`\|g_{w^\star}\|` exactly and takes :math:`\lambda = 0` where it is at most ``1e-8`` in
  units of the root-mean-square gradient norm (rounding noise there), which keeps the rule
  homogeneous. (Adding the ``1e-8`` in those units instead, as manytask did before, shortened
  the step by a relative 1e-4 when the gradient norms spanned four orders of magnitude.)

Properties: homogeneous (``A(cJ) = cA(J)``) and independent of the task order; not
non-conflicting (``c < 1`` trades the worst task's improvement for closeness to ``g₀``).

Shared parameters receive ``d``; task-specific parameters their own task's gradient. Exact under
``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import GramianWeighting
from manytask.balance.solvers.backend import namespace, working
from manytask.balance.solvers.cagrad import cagrad_dual
from manytask.errors import ConfigError


@registry.register(
    "balancer",
    "cagrad",
    "conflict-averse: best worst-task gain near the mean gradient (Liu et al., NeurIPS 2021, "
    "arXiv:2110.14048)",
)
class CAGrad(GramianWeighting):
    """CAGrad weights from the Gramian.

    Args:
        tasks: task names.
        c: radius of the ball around the average gradient, relative to its norm (``c ≥ 0``;
            ``c = 0`` is plain averaging).
        rescale: divide the direction by ``1`` (0), ``1 + c²`` (1) or ``1 + c`` (2).
    """

    permutation_invariant = True
    non_conflicting = False
    homogeneous = True

    def __init__(self, tasks: Sequence[str], c: float = 0.5, rescale: int = 1) -> None:
        super().__init__(tasks)
        if not c >= 0.0:
            raise ConfigError(f"cagrad: c must be ≥ 0, got {c}")
        if rescale not in (0, 1, 2):
            raise ConfigError(f"cagrad: rescale must be 0, 1 or 2, got {rescale}")
        self.c = float(c)
        self.rescale = rescale

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        # in numpy on a CPU, where a few dozen operations on T × T numbers cost less
        weights = _cagrad(working(gramian), self.c, self.rescale)
        return torch.as_tensor(weights).to(gramian.dtype)


def _cagrad(g: Any, c: float, rescale: int) -> Any:
    """CAGrad's weights ``1/T + (r/‖g_w‖) w`` on a float64 Gramian (numpy array or tensor),
    divided as ``rescale`` says."""
    xp = namespace(g)
    t = g.shape[0]
    scale = g.diagonal().sum() / t
    g = g / xp.where(scale > 0, scale, xp.ones_like(scale))
    radius = c * xp.sqrt(g.sum().clip(min=0.0)) / t  # c‖g₀‖
    w = cagrad_dual(g, radius)
    norm = xp.sqrt((w @ g @ w).clip(min=0.0))  # ‖g_w‖
    live = norm > 1e-8  # below, ‖g_w‖ is rounding noise (module docstring)
    weights = 1.0 / t + xp.where(live, radius / xp.where(live, norm, 1.0), 0.0) * w
    return weights / {0: 1.0, 1: 1.0 + c**2, 2: 1.0 + c}[rescale]
