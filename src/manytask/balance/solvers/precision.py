"""Tolerances the solvers share, tied to the precision a Gramian was computed in."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from manytask.balance.solvers.backend import namespace


def relative_rounding(gramian: Tensor) -> float:
    """``T`` times the machine epsilon of the Gramian's dtype: the relative size of the rounding
    its entries carry (entry ``(i, j)`` at the scale of ``‖gᵢ‖‖gⱼ‖``).

    Two uses. As a shift added to each diagonal entry in proportion to that entry
    (``G + δ·diag(G)``, :func:`with_rounding_shift`), it makes positive definite again a
    Gramian that rounding left slightly indefinite (a float32 Gramian of nearly opposite
    gradients), which would otherwise leave the solvers' problems without a minimiser.
    Proportional, because a shift relative to the mean diagonal instead moved the weight of a
    gradient 1,000× shorter than the others by several percent. As a rank tolerance on the
    cosine matrix (IMTL-G, ConFIG), eigenvalues at or below it times the largest are rounding,
    not signal: float32's ``2.4e-7`` at two tasks, float64's ``4.4e-16``, so a float64 model's
    gradients at an angle ``π − 1e-5`` (cosine eigenvalue ``5e-11``) stay distinct.
    """
    return gramian.shape[0] * float(torch.finfo(gramian.dtype).eps)


def with_rounding_shift(scaled: Any, shift: float, floor: float) -> Any:
    """``A + diag(shift·Aᵢᵢ + floor)`` for a Gramian ``A`` already scaled to unit mean diagonal
    (array or tensor): the :func:`relative_rounding` in proportion to each diagonal entry, and
    an absolute ``floor`` that keeps a zero gradient's variable defined."""
    xp = namespace(scaled)
    return scaled + xp.diag(shift * scaled.diagonal().clip(min=0.0) + floor)
