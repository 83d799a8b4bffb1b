r"""Aligned-MTL: align the principal components of the task gradients to equal strength.

Senushkin, Patakin, Kuznetsov and Konushin, "Independent Component Alignment for Multi-Task
Learning", CVPR 2023, arXiv:2305.19000, Algorithm 1. With the eigen-decomposition
:math:`G = J J^\top = V \Lambda V^\top` restricted to its ``r`` non-zero eigenvalues, the
gradients are replaced by the closest (Procrustes) set of orthogonal gradients of equal norm
:math:`\sqrt{\lambda_{\min}}`, :math:`\hat J = B^\top J`, which has condition number one, and

.. math::

    B = \sqrt{\sigma}\; V_r \Lambda_r^{-1/2} V_r^\top, \qquad d = \hat J^\top \mathbf 1 =
    J^\top (B\mathbf 1), \qquad w = B\mathbf 1 ,

where :math:`\sigma` is :math:`\lambda_{\min}` (``scale_mode="min"``, the paper's choice), the
median or the mean of the ``r`` eigenvalues (the authors' code also offers ``"median"`` and
``"rmse"``; ``"rmse"`` is their name for the mean). When every eigenvalue is zero the weights are
the task preferences themselves (ones).

Defaults: ``scale_mode="min"``; task preferences :math:`\mathbf 1` (the sum of the aligned
gradients, as the authors' code ``grads.sum(-1)``, github.com/SamsungLabs/MTL,
``code/optim/aligned``; torchjd 0.18 uses the mean, ``1/T``); rank tolerance
``λ > λ_max · T · 1.2e-7`` (the authors' ``torch.finfo().eps`` is float32's).

Solver: the eigen-decomposition is the Jacobi method of :mod:`manytask.balance.solvers.eigh`
(float64, no host synchronisation); the rank is handled with masks rather than by dropping
columns, so shapes never depend on the data.

Deviations: none in the rule (the authors' ``torch.symeig`` is replaced by an equivalent
eigensolver).

Properties: homogeneous (``B`` is invariant under ``J → cJ``) and independent of the task order;
not non-conflicting (``Jd = \sqrt{\sigma} G^{1/2}\mathbf 1`` can have negative entries).

Shared parameters receive ``d``; task-specific parameters their own task's gradient (the
authors' optional decoder scaling is not applied). Exact under ``torch.distributed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import GramianWeighting
from manytask.balance.solvers.backend import on_host
from manytask.balance.solvers.eigh import symmetric_eigh
from manytask.errors import ConfigError

ScaleMode = Literal["min", "median", "rmse"]

#: eigenvalues at or below ``T · AUTHORS_EPS · λ_max`` are treated as zero: the authors'
#: ``torch.finfo().eps``, float32's whatever the Gramian's dtype (as in their code, a gradient
#: more than about 1,500× shorter than the longest falls below it)
AUTHORS_EPS = float(torch.finfo(torch.float32).eps)


def aligned_weights(gramian: Tensor, scale_mode: ScaleMode = "min") -> Tensor:
    """``w = B 1`` (float64) for the balance transformation ``B`` of Aligned-MTL.

    On a CPU the choices on the eigenvalues run in Python floats and the product in numpy
    (:func:`_host_weights`): a few calls instead of two dozen torch operations, whose cost in
    a training step is several microseconds each."""
    if on_host(gramian):
        return _host_weights(gramian.detach().double(), scale_mode)
    g = gramian.double()
    t = g.shape[0]
    values, vectors = symmetric_eigh(g)  # ascending
    tolerance = values[-1] * t * AUTHORS_EPS
    valid = values > tolerance
    count = valid.sum()
    safe = torch.where(valid, values, torch.ones_like(values))
    if scale_mode == "min":
        # the smallest valid eigenvalue: the first valid one in ascending order
        first = (t - count).clamp(max=t - 1)
        sigma = safe.gather(0, first.reshape(1))[0]
    elif scale_mode == "median":
        # torch.median's lower median of the valid eigenvalues (they are the last ``count``)
        index = (t - count + (count - 1).clamp_min(0) // 2).clamp(max=t - 1)
        sigma = safe.gather(0, index.reshape(1))[0]
    else:
        sigma = (values * valid).sum() / count.clamp_min(1)
    inverse_root = torch.where(valid, torch.rsqrt(safe), torch.zeros_like(safe))
    ones = torch.ones(t, dtype=g.dtype, device=g.device)
    weights = torch.sqrt(sigma) * (vectors @ (inverse_root * (vectors.T @ ones)))
    return torch.where(count > 0, weights, ones)


def _host_weights(g: Tensor, scale_mode: ScaleMode) -> Tensor:
    """:func:`aligned_weights` of a float64 Gramian on the CPU. The decomposition is torch's
    (:func:`symmetric_eigh`; numpy's OpenBLAS would run a 40 × 40 one on threads of its own
    that compete with torch's: feature mode at 40 tasks took 2× as long), the rest numpy and
    Python floats."""
    t = g.shape[0]
    values, vectors = symmetric_eigh(g)  # ascending
    ordered: list[float] = values.tolist()
    tolerance = ordered[-1] * t * AUTHORS_EPS
    valid = [value for value in ordered if value > tolerance]  # the last ``len(valid)``
    if not valid:
        return torch.ones(t, dtype=torch.float64)
    if scale_mode == "min":
        sigma = valid[0]
    elif scale_mode == "median":  # torch.median's lower median
        sigma = valid[(len(valid) - 1) // 2]
    else:
        sigma = sum(valid) / len(valid)
    inverse_root = [1.0 / math.sqrt(value) if value > tolerance else 0.0 for value in ordered]
    basis = vectors.numpy()
    weights = basis @ (np.array(inverse_root) * basis.sum(0))  # V diag(λ^-½) Vᵀ 1
    return torch.from_numpy(weights * math.sqrt(sigma))


@registry.register(
    "balancer",
    "aligned_mtl",
    "align gradient components to equal strength (Senushkin et al., CVPR 2023, arXiv:2305.19000)",
)
class AlignedMTL(GramianWeighting):
    """Aligned-MTL weights from the Gramian.

    Args:
        tasks: task names.
        scale_mode: the common scale of the aligned components: the smallest (``"min"``), the
            median (``"median"``) or the mean (``"rmse"``) non-zero eigenvalue of ``G``.
    """

    permutation_invariant = True
    non_conflicting = False
    homogeneous = True

    def __init__(self, tasks: Sequence[str], scale_mode: ScaleMode = "min") -> None:
        super().__init__(tasks)
        if scale_mode not in ("min", "median", "rmse"):
            raise ConfigError(
                f"aligned_mtl: scale_mode must be min, median or rmse, got '{scale_mode}'"
            )
        self.scale_mode: ScaleMode = scale_mode

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return aligned_weights(gramian, self.scale_mode).to(gramian.dtype)
