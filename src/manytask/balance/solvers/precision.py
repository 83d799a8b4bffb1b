"""Tolerances the solvers share, tied to the precision a Gramian was computed in."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from manytask.balance.solvers.backend import namespace

#: eigenvalues of a Gramian at or below ``T · RANK_EPS · λ_max`` are treated as zero: the
#: Jacobian is float32, and the Gramian carries its rounding
RANK_EPS = float(torch.finfo(torch.float32).eps)


def rounding_shift(gramian: Tensor) -> float:
    """``T`` times the machine epsilon of the Gramian's dtype.

    Added to each diagonal entry of a Gramian in proportion to that entry (``G + δ·diag(G)``),
    it makes positive definite again one that rounding left slightly indefinite (a float32
    Gramian of nearly opposite gradients), which would otherwise leave the solvers' problems
    without a minimiser. Proportional, because rounding perturbs ``Gᵢⱼ`` at the scale of
    ``‖gᵢ‖‖gⱼ‖``: a shift relative to the mean diagonal instead moved the weight of a gradient
    1,000× shorter than the others by several percent.
    """
    return gramian.shape[0] * float(torch.finfo(gramian.dtype).eps)


def with_rounding_shift(scaled: Any, shift: float, floor: float) -> Any:
    """``A + diag(shift·Aᵢᵢ + floor)`` for a Gramian ``A`` already scaled to unit mean diagonal
    (array or tensor): the :func:`rounding_shift` in proportion to each diagonal entry, and an
    absolute ``floor`` that keeps a zero gradient's variable defined."""
    xp = namespace(scaled)
    return scaled + xp.diag(shift * scaled.diagonal().clip(min=0.0) + floor)
