"""The cosine matrix of a Gramian: the scale-free form in which IMTL-G and ConFIG invert it.

Rounding perturbs entry ``(i, j)`` of a float32 Gramian at the scale of ``‖gᵢ‖‖gⱼ‖``, so a
rank tolerance relative to the largest eigenvalue of ``G`` itself would count a gradient 1,000×
shorter than the others as zero; on the cosines ``Cᵢⱼ = Gᵢⱼ / (‖gᵢ‖‖gⱼ‖)`` the same tolerance
acts alike on every task, however unequal the norms.
"""

from __future__ import annotations

from typing import Any

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
