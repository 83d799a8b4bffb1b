"""The cosine matrix of a Gramian: the scale-free form in which IMTL-G and ConFIG invert it.

Rounding perturbs entry ``(i, j)`` of a float32 Gramian at the scale of ``‖gᵢ‖‖gⱼ‖``, so a
rank tolerance relative to the largest eigenvalue of ``G`` itself would count a gradient 1,000×
shorter than the others as zero; on the cosines ``Cᵢⱼ = Gᵢⱼ / (‖gᵢ‖‖gⱼ‖)`` the same tolerance
acts alike on every task, however unequal the norms.
"""

from __future__ import annotations

import torch
from torch import Tensor


def unit_cosines(gramian: Tensor) -> tuple[Tensor, Tensor]:
    """``(C, 1/n)``: the cosines of the gradients and their inverse norms, in float64.

    A gradient whose norm is below ``1e-12`` times the largest counts as zero: its inverse norm
    and its row and column of ``C`` are zero.
    """
    g = gramian.double()
    norms = g.diagonal().clamp_min(0.0).sqrt()
    live = norms > 1e-12 * norms.max().clamp_min(0.0)
    inverse_norms = torch.where(live, 1.0 / torch.where(live, norms, torch.ones_like(norms)), 0.0)
    return g * inverse_norms[:, None] * inverse_norms[None, :], inverse_norms
