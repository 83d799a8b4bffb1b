r"""ConFIG: the direction with equal positive projections on every unit gradient.

Liu, Chu and Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
Networks", ICLR 2025, arXiv:2408.11104, Equation 2. With the unit gradients
:math:`u_i = g_i/\|g_i\|` stacked in :math:`U`,

.. math::

    g_v = U^{+}\mathbf 1, \qquad \hat g_v = g_v / \|g_v\|, \qquad
    d = \Big(\sum_i g_i^\top \hat g_v\Big)\, \hat g_v ,

so that :math:`u_i^\top g_v = 1` for every task when the gradients are linearly independent.
Through the Gramian: with :math:`n_i = \|g_i\|` and the cosine matrix :math:`C = UU^\top =
N^{-1}GN^{-1}`, :math:`U^+ = U^\top C^+`, hence :math:`g_v = J^\top\beta` with
:math:`\beta = N^{-1}C^{+}\mathbf 1` and

.. math::

    w = \frac{\mathbf 1^\top G\beta}{\beta^\top G\beta}\,\beta, \qquad d = J^\top w .

A zero gradient has a zero unit vector (as the authors' ``nan_to_num``) and gets weight zero.
Where :math:`g_v` vanishes (:math:`\|g_v\|^2 = \mathbf 1^\top C^+\mathbf 1 \le 10^{-12}`, a
scale-free quantity; e.g. two opposite gradients) the weights are zero, as the authors'
normalisation of a zero vector gives; below that its direction would be rounding noise.

Defaults: equal preferences (the authors' ``EqualWeight``) and the projection length (their
``ProjectionLength``), the defaults of ``ConFIG_update`` (github.com/tum-pbs/ConFIG,
``conflictfree/grad_operator.py``); the authors' closed form for two tasks gives the same
direction. The pseudo-inverse comes from the Jacobi eigen-decomposition of
:mod:`manytask.balance.solvers.eigh` (no host synchronisation); eigenvalues of ``C`` at or
below ``T·ε·λ_max`` count as zero, ``ε`` the machine epsilon of the Gramian's dtype (the
authors use ``torch.linalg.lstsq`` on ``U``, whose cut-off is at the precision of the
gradients' dtype too; the two agree wherever ``U`` is not nearly rank-deficient).

Deviations: the momentum variant (M-ConFIG) and the other weight and length models of the
authors' package are not provided.

Properties: homogeneous and independent of the task order. ``Jd > 0`` holds when the gradients
are linearly independent; with more tasks than dimensions :math:`U^+\mathbf 1` is a
least-squares solution that can conflict, so the class does not claim ``non_conflicting``.

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
from manytask.balance.solvers.cosines import (
    pair_inverse_ones,
    two_tasks_in_closed_form,
    unit_cosines,
)
from manytask.balance.solvers.eigh import psd_pseudo_inverse
from manytask.balance.solvers.precision import relative_rounding


def config_weights(gramian: Tensor) -> Tensor:
    """ConFIG's weights on the raw gradients (float64): :func:`_config` in numpy on a CPU,
    where its dozen operations on ``T × T`` numbers cost a fraction of torch's."""
    rounding = relative_rounding(gramian)  # two tasks in closed form (_config_pair)
    return torch.as_tensor(
        two_tasks_in_closed_form(working(gramian), rounding, _config_pair, _config)
    )


def _config_pair(g: list[list[float]], rounding: float) -> list[float] | None:
    r"""ConFIG's weights for two tasks in closed form, in Python floats (None for a non-finite
    Gramian): :math:`\beta` and :math:`\|g_v\|^2 = \mathbf 1^\top C^+\mathbf 1` from
    :func:`pair_inverse_ones`, then :func:`_config`'s last steps. For two live gradients that
    are not opposite, :math:`w = \tfrac12(n_1 + n_2)\,(1/n_1, 1/n_2)`:
    :math:`d = \tfrac12(n_1 + n_2)(u_1 + u_2)`, the authors' two-task form.
    """
    pair = pair_inverse_ones(g, rounding)
    if pair is None:
        return None
    (b1, b2), squared = pair
    if not squared > 1e-12:  # as in _config
        return [0.0, 0.0]
    length = (g[0][0] + g[1][0]) * b1 + (g[0][1] + g[1][1]) * b2  # 1ᵀGβ
    return [b1 * length / squared, b2 * length / squared]


def _config(g: Any, rounding: float) -> Any:
    """ConFIG's weights from a float64 Gramian (numpy array or tensor); ``rounding`` is the
    rank tolerance of the cosines' pseudo-inverse."""
    xp = namespace(g)
    cosines, inverse_norms = unit_cosines(g)
    ones = xp.ones_like(g[0])
    inverse = psd_pseudo_inverse(cosines, rtol=rounding)
    unit_weights = inverse @ ones  # g_v = Uᵀ(C⁺1)
    squared = unit_weights @ cosines @ unit_weights  # ‖g_v‖² = 1ᵀC⁺1, free of the scale of J
    beta = inverse_norms * unit_weights  # g_v = Jᵀβ
    length = ones @ g @ beta  # Σᵢ gᵢᵀ g_v
    # g_v = 0 exactly when 1 is orthogonal to the range of C (e.g. two opposite gradients);
    # rounding then leaves ‖g_v‖² near 1e-32 rather than 0, and its direction is noise
    defined = squared > 1e-12
    return xp.where(defined, beta * (length / xp.where(defined, squared, 1.0)), 0.0)


@registry.register(
    "balancer",
    "config",
    "conflict-free direction with equal projections on unit gradients (Liu et al., ICLR 2025, "
    "arXiv:2408.11104)",
)
class ConFIG(GramianWeighting):
    """ConFIG weights from the Gramian.

    Args:
        tasks: task names.
    """

    permutation_invariant = True
    non_conflicting = False
    homogeneous = True

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return config_weights(gramian).to(gramian.dtype)
