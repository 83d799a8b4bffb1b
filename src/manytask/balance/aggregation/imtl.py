r"""IMTL: impartial multi-task learning — equal projections (IMTL-G), learned loss scales (IMTL).

Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, "Towards Impartial Multi-task Learning",
ICLR 2021 (openreview.net/forum?id=IMPnRXEWpvr; no arXiv version).

**IMTL-G** (``imtl_g``, Section 3): the direction :math:`d = \sum_i \alpha_i g_i` with
:math:`\sum_i \alpha_i = 1` whose projections on every unit gradient :math:`u_i = g_i/\|g_i\|`
are equal. The paper's closed form, with :math:`D = [g_1 - g_i]_{i \ge 2}` and
:math:`U = [u_1 - u_i]_{i \ge 2}`, is :math:`\alpha_{2:T} = g_1 U^\top (D U^\top)^{-1}`,
:math:`\alpha_1 = 1 - \sum_{i\ge2}\alpha_i`. Equal projections mean :math:`(G\alpha)_i = \lambda
\|g_i\|`, so, with :math:`n_i = \sqrt{G_{ii}}`,

.. math::

    \alpha = \frac{v}{\mathbf 1^\top v}, \qquad v = N^{-1} C^{+} \mathbf 1 ,

with :math:`N = \operatorname{diag}(n)` and :math:`C = N^{-1} G N^{-1}` the cosine matrix:
:math:`v = G^{-1} n` when the gradients are linearly independent (the paper's assumption), so
these are the paper's weights, and defined otherwise through the pseudo-inverse of ``C`` (as
ConFIG's weights are; torchjd's ``IMTLG`` and Quinton and Rey, arXiv:2406.16232, generalise
with :math:`G^+ n` instead, which differs only for dependent gradients). The pseudo-inverse comes
from the Jacobi eigen-decomposition of :mod:`manytask.balance.solvers.eigh` (no host
synchronisation); eigenvalues of ``C`` at or below ``T·ε·λ_max`` count as zero, with ``ε`` the
machine epsilon of the Gramian's dtype (the rounding its entries carry:
:func:`~manytask.balance.solvers.precision.relative_rounding`; the paper inverts with no
tolerance). Taken on the cosines, that tolerance treats every task alike: on ``G`` itself it
counted a gradient more than about 1,500× shorter than the largest as zero, and the directions
went wrong (:mod:`manytask.balance.solvers.cosines`). Tied to the dtype, it keeps two float64
gradients at an angle ``π − 1e-5`` distinct, where the exact weights are ``αᵢ ∝ 1/‖gᵢ‖`` and
``d`` the (short) bisector of the unit gradients; float32's tolerance (``2.4e-7`` at two tasks)
took them for opposite and returned no step, which stopped IMTL-G where it met the Pareto front
of ``benchmarks/toy_pareto.py``. Where :math:`|\mathbf 1^\top v|` is at most
:math:`10^{-8}` in units of the inverse root mean squared gradient norm (e.g. every gradient
zero, or two opposite gradients, where it vanishes exactly) the weights are zero, as torchjd
does below ``1e-12``; the direction would otherwise be rounding noise divided by a vanishing
number.

**IMTL** (``imtl``, Section 3, the hybrid of IMTL-L and IMTL-G of the paper's experiments):
each loss is scaled, :math:`\tilde L_i = e^{s_i} L_i - s_i`, with a learnable :math:`s_i`
(initialised to 0); the shared part follows IMTL-G on the scaled gradients
:math:`e^{s_i} g_i`, i.e. task weights :math:`w_i = e^{s_i}\tilde\alpha_i` with
:math:`\tilde\alpha = \text{IMTL-G}(SGS)` and :math:`S = \operatorname{diag}(e^{s})`; the
scales descend their own scaled losses, :math:`\partial\tilde L_i/\partial s_i =
e^{s_i}L_i - 1` (at the optimum :math:`e^{s_i} = 1/L_i`). The scales are ``nn.Parameter``\ s
(``log_scale``) that the optimizer must receive (``balancer.parameters()``); the engine hands
:meth:`weights` detached loss values, so :meth:`IMTL.weights` writes that gradient into
``log_scale.grad`` itself (accumulating, as ``backward`` would), which is exact because it
depends on the loss values only.

Defaults: no parameter besides the scales' initial value 0 (the paper; LibMTL's
``loss_scale`` starts at 0 too).

Deviations:

- IMTL: the paper (and LibMTL) give the task-specific parameters the gradient of the *scaled*
  loss, :math:`e^{s_i}\nabla L_i`; a ``GramianWeighting`` cannot change what the heads receive
  (the engine collects their plain :math:`\nabla L_i` during the per-task backward passes), so
  here they receive :math:`\nabla L_i`. An optimizer with per-parameter normalisation (Adam)
  hardly sees the difference; SGD sees the heads' learning rate multiplied by :math:`1/e^{s_i}`.
  Exactness would need the base class to let a method transform the losses before the
  per-task backward passes;
- IMTL: between weight updates (``update_every > 1``) the scales receive no gradient;
- the paper computes IMTL-G on the shared representation's gradients for speed; that is
  manytask's ``mode="features"`` (parameter mode is the default).

Properties: IMTL-G is homogeneous and independent of the task order; IMTL is homogeneous for
given scales, and depends on which task holds which scale. Neither is non-conflicting: the
common projection :math:`1/(\mathbf 1^\top v)` is negative for some (rare) configurations of
linearly independent gradients, and then ``d`` conflicts with every task.

Shared parameters receive ``d``; task-specific parameters their own task's gradient. Exact under
``torch.distributed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from manytask import registry
from manytask.balance.base import GramianWeighting
from manytask.balance.solvers.backend import namespace, working
from manytask.balance.solvers.cosines import (
    pair_inverse_ones,
    two_tasks_in_closed_form,
    unit_cosines,
)
from manytask.balance.solvers.eigh import psd_pseudo_inverse
from manytask.balance.solvers.precision import relative_rounding


def imtl_g_weights(gramian: Tensor, rounding: float | None = None) -> Tensor:
    """IMTL-G's ``α = v / 1ᵀv`` with ``v = N⁻¹C⁺1`` (``= G⁻¹n`` for independent gradients;
    float64), or zeros where ``1ᵀv`` vanishes.

    ``rounding`` is the relative rounding of the Gramian's entries, the rank tolerance of
    ``C⁺``; by default that of its dtype (:func:`relative_rounding`).
    """
    if rounding is None:
        rounding = relative_rounding(gramian)
    # in numpy on a CPU, where a dozen operations on T × T numbers cost less than torch's
    return torch.as_tensor(_imtl_g_weights(working(gramian), rounding))


def _imtl_g_weights(g: Any, rounding: float) -> Any:
    """:func:`imtl_g_weights` of a float64 Gramian, numpy array or tensor: two tasks on a CPU
    in closed form (:func:`_imtl_g_pair`), the rule through ``C⁺`` otherwise."""
    return two_tasks_in_closed_form(g, rounding, _imtl_g_pair, _imtl_g)


def _imtl_g_pair(g: list[list[float]], rounding: float) -> list[float] | None:
    r"""IMTL-G's weights for two tasks in closed form, in Python floats (None for a
    non-finite Gramian): :math:`v` from :func:`pair_inverse_ones`, then :func:`_imtl_g`'s last
    steps. For two live gradients that are not opposite, :math:`v = (1/n_1, 1/n_2)/(1 + c)`, so
    :math:`\alpha = (n_2, n_1)/(n_1 + n_2)`: the weights of the bisector of the unit gradients.
    """
    pair = pair_inverse_ones(g, rounding)
    if pair is None:
        return None
    (v1, v2), _ = pair
    total = v1 + v2
    scale = 0.5 * (g[0][0] + g[1][1])
    if not abs(total * math.sqrt(scale if scale > 0 else 1.0)) > 1e-8:  # as in _imtl_g
        return [0.0, 0.0]
    return [v1 / total, v2 / total]


def _imtl_g(g: Any, rounding: float) -> Any:
    """:func:`imtl_g_weights` on a float64 Gramian, numpy array or tensor."""
    xp = namespace(g)
    t = g.shape[0]
    cosines, inverse_norms = unit_cosines(g)
    v = inverse_norms * (psd_pseudo_inverse(cosines, rtol=rounding) @ xp.ones_like(g[0]))
    scale = g.diagonal().sum() / t
    total = v.sum()
    # 1ᵀv vanishes exactly for, e.g., two opposite gradients, where rounding leaves ~1e-17
    # (in units of the root mean squared norm) and v/1ᵀv would be noise: treat ≤ 1e-8 as 0
    defined = xp.abs(total * xp.sqrt(xp.where(scale > 0, scale, xp.ones_like(scale)))) > 1e-8
    return xp.where(defined, v / xp.where(defined, total, xp.ones_like(total)), 0.0)


@registry.register(
    "balancer",
    "imtl_g",
    "IMTL-G: equal projections on every unit gradient (Liu et al., ICLR 2021, "
    "openreview IMPnRXEWpvr)",
)
class IMTLG(GramianWeighting):
    """IMTL-G weights from the Gramian.

    Args:
        tasks: task names.
    """

    permutation_invariant = True
    non_conflicting = False
    homogeneous = True

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return imtl_g_weights(gramian).to(gramian.dtype)


@registry.register(
    "balancer",
    "imtl",
    "IMTL: learned loss scales plus IMTL-G on the scaled gradients (Liu et al., ICLR 2021, "
    "openreview IMPnRXEWpvr)",
)
class IMTL(GramianWeighting):
    """The hybrid IMTL (IMTL-L scales + IMTL-G) as a Gramian weighting.

    Args:
        tasks: task names.

    The learnable log-scales ``log_scale`` must be given to the optimizer.
    """

    permutation_invariant = False
    non_conflicting = False
    homogeneous = True

    log_scale: nn.Parameter

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.log_scale = nn.Parameter(torch.zeros(self.num_tasks))

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        s = self.log_scale.detach()
        g = working(gramian)  # numpy on a CPU, as in imtl_g_weights
        scales = namespace(g).exp(working(s.to(gramian.device)))
        scaled = g * scales[:, None] * scales[None, :]
        weights = torch.as_tensor(scales * _imtl_g_weights(scaled, relative_rounding(gramian)))
        # ∂(e^s L − s)/∂s, accumulated like a backward pass would
        grad = torch.exp(s) * losses.to(device=s.device, dtype=s.dtype) - 1.0
        if self.log_scale.grad is None:
            self.log_scale.grad = grad
        else:
            self.log_scale.grad = self.log_scale.grad + grad
        return weights.to(gramian.dtype)
