"""The cosine matrix of a Gramian: the scale-free form in which IMTL-G and ConFIG invert it.

Rounding perturbs entry ``(i, j)`` of a float32 Gramian at the scale of ``‖gᵢ‖‖gⱼ‖``, so a
rank tolerance relative to the largest eigenvalue of ``G`` itself would count a gradient 1,000×
shorter than the others as zero; on the cosines ``Cᵢⱼ = Gᵢⱼ / (‖gᵢ‖‖gⱼ‖)`` the same tolerance
acts alike on every task, however unequal the norms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from manytask.balance.solvers.backend import namespace


def unit_cosines(gramian: Any) -> tuple[Any, Any]:
    """``(C, 1/n)``: the cosines of the gradients and their inverse norms, for a float64 Gramian
    (a numpy array on a CPU, or a tensor).

    A gradient whose norm is below ``1e-12`` times the largest counts as zero: its inverse norm
    and its row and column of ``C`` are zero.
    """
    xp = namespace(gramian)
    norms = xp.sqrt(gramian.diagonal().clip(min=0.0))
    live = norms > 1e-12 * norms.max().clip(min=0.0)
    inverse_norms = xp.where(live, 1.0 / xp.where(live, norms, xp.ones_like(norms)), 0.0)
    return gramian * inverse_norms[:, None] * inverse_norms[None, :], inverse_norms


def pair_inverse_ones(g: list[list[float]], rounding: float) -> tuple[list[float], float] | None:
    r"""For two tasks, in Python floats: :math:`\beta = N^{-1}C^{+}\mathbf 1` and
    :math:`\mathbf 1^\top C^{+}\mathbf 1`, as :func:`unit_cosines` and
    :func:`~manytask.balance.solvers.eigh.psd_pseudo_inverse` (rank tolerance ``rounding``)
    give them; None for a non-finite Gramian.

    With the cosine :math:`c` of two live gradients, :math:`C = [[1, c], [c, 1]]` has the
    eigenvalues :math:`1 \pm c` and the eigenvectors :math:`(1, \pm 1)`. Where both count (the
    smaller above ``rounding`` times the larger), :math:`C^{-1}\mathbf 1 = \mathbf 1/(1 + c)`.
    Where :math:`1 - |c|` counts as zero, :math:`C^+` keeps the eigenvector
    :math:`(1, \operatorname{sign} c)`: for nearly parallel gradients the same
    :math:`\mathbf 1/(1 + c)`, for nearly opposite ones :math:`C^+\mathbf 1 = 0`. With one live
    gradient :math:`C = \operatorname{diag}(1, 0)` and :math:`C^+\mathbf 1 = (1, 0)`; with none,
    zero.
    """
    g11, g22, g12 = g[0][0], g[1][1], 0.5 * (g[0][1] + g[1][0])
    if not all(math.isfinite(x) for x in (g11, g22, g12)):
        return None
    n1, n2 = math.sqrt(max(g11, 0.0)), math.sqrt(max(g22, 0.0))
    top = max(n1, n2)
    live1, live2 = n1 > 1e-12 * top, n2 > 1e-12 * top
    if not (live1 and live2):
        if live1 or live2:
            return ([1.0 / n1, 0.0] if live1 else [0.0, 1.0 / n2]), 1.0
        return [0.0, 0.0], 0.0
    c = g12 / (n1 * n2)
    if c < 0 and 1.0 + c <= rounding * (1.0 - c):  # opposite: C⁺1 = 0
        return [0.0, 0.0], 0.0
    k = 1.0 / (1.0 + c)
    return [k / n1, k / n2], 2.0 * k


def two_tasks_in_closed_form(
    g: Any,
    rounding: float,
    pair: Callable[[list[list[float]], float], list[float] | None],
    general: Callable[[Any, float], Any],
) -> Any:
    """``pair``'s Python-float weights for a 2 × 2 Gramian on a CPU (a numpy array), where it
    answers (a finite Gramian); ``general`` (numpy or torch) otherwise."""
    if isinstance(g, np.ndarray) and g.shape == (2, 2):
        weights = pair(g.tolist(), rounding)
        if weights is not None:
            return np.array(weights)
    return general(g, rounding)
