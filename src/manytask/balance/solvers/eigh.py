"""Eigen-decomposition of a small symmetric matrix without leaving the device.

``torch.linalg.eigh`` (and ``pinv``, ``svd``, which call it) synchronises a CUDA device with the
host to check its LAPACK status. The methods that need a spectrum of the ``(T, T)`` Gramian
(Aligned-MTL, IMTL-G, ConFIG) use the cyclic Jacobi method here instead on accelerators (on a
CPU, LAPACK): a fixed number of
sweeps of plane rotations, each sweep in ``m − 1`` rounds of ``m/2`` disjoint rotations applied
together (the round-robin ordering of Brent and Luk, 1985), ``m`` being ``T`` rounded up to
even. Jacobi's method converges quadratically once the off-diagonal part is small (Golub and
Van Loan, *Matrix Computations*, §8.5), more slowly with clusters of equal eigenvalues. The
default sweep counts (:func:`default_sweeps`: 10 up to 12 tasks, 15 up to 24, 25 up to 48)
reconstruct rank-deficient Gramians whose entries span twelve orders of magnitude to about
``1e-13`` of their largest entry (``tests/test_solvers_qp.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor

from manytask.balance.solvers.backend import namespace


def _round_robin(m: int) -> tuple[list[list[int]], list[list[int]]]:
    """The pairs of each of the ``m − 1`` rounds in which every index meets every other once."""
    players = list(range(m))
    firsts: list[list[int]] = []
    seconds: list[list[int]] = []
    for _ in range(m - 1):
        half = m // 2
        top, bottom = players[:half], players[half:][::-1]
        firsts.append(top)
        seconds.append(bottom)
        players = [players[0], players[-1], *players[1:-1]]  # rotate all but the first
    return firsts, seconds


@functools.lru_cache(maxsize=64)
def _schedule(m: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The round-robin pairs as index tensors on ``device`` (built, and copied there, once)."""
    firsts, seconds = _round_robin(m)
    return torch.tensor(firsts, device=device), torch.tensor(seconds, device=device)


def default_sweeps(n: int) -> int:
    """Jacobi sweeps used when none is given (measured on rank-deficient, badly scaled
    Gramians, where clusters of zero eigenvalues slow the method down)."""
    if n <= 12:
        return 10
    if n <= 24:
        return 15
    if n <= 48:
        return 25
    return 30


def symmetric_eigh(
    matrix: Tensor, sweeps: int | None = None, jacobi: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of a symmetric ``(n, n)`` matrix.

    Float64, on the matrix's device, with no host synchronisation. ``matrix ≈ V diag(λ) Vᵀ``.
    ``jacobi=None`` uses the Jacobi method everywhere except on a CPU, where there is no device
    to synchronise with and LAPACK (``torch.linalg.eigh``) is faster (0.1 ms against 60 ms for
    40 tasks); ``True`` forces the Jacobi method.
    """
    a = matrix.double()
    a = 0.5 * (a + a.T)
    if (a.device.type == "cpu") if jacobi is None else not jacobi:
        values, vectors = torch.linalg.eigh(a)
        return values, vectors
    n = a.shape[0]
    if n == 1:
        return a.diagonal().clone(), torch.ones_like(a)
    m = n + n % 2  # an even size; a padding index stays decoupled (its off-diagonal is zero)
    if m != n:
        a = torch.nn.functional.pad(a, (0, 1, 0, 1))
    eye = torch.eye(m, dtype=a.dtype, device=a.device)
    vectors = eye.clone()
    p_all, q_all = _schedule(m, a.device)
    for _ in range(default_sweeps(n) if sweeps is None else sweeps):
        for r in range(m - 1):
            p, q = p_all[r], q_all[r]
            app, aqq, apq = a[p, p], a[q, q], a[p, q]
            zero = apq == 0
            theta = (aqq - app) / (2.0 * torch.where(zero, torch.ones_like(apq), apq))
            sign = torch.where(theta >= 0, 1.0, -1.0).to(a.dtype)
            # the smaller root of t² + 2θt − 1 = 0 (rotation angle ≤ π/4), written to avoid
            # cancellation; θ² may overflow to inf, which gives t = 0 as it should
            t = sign / (theta.abs() + torch.sqrt(theta * theta + 1.0))
            t = torch.where(zero, torch.zeros_like(t), t)
            c = torch.rsqrt(t * t + 1.0)
            s = t * c
            rotation = eye.clone()
            rotation[p, p] = c
            rotation[q, q] = c
            rotation[p, q] = s
            rotation[q, p] = -s
            a = rotation.T @ a @ rotation
            vectors = vectors @ rotation
    values = a.diagonal()[:n]
    vectors = vectors[:n, :n]
    values, order = torch.sort(values)
    return values, vectors[:, order]


def psd_pseudo_inverse(
    matrix: Any, rtol: float, sweeps: int | None = None, jacobi: bool | None = None
) -> Any:
    """Moore–Penrose pseudo-inverse of a symmetric positive semi-definite matrix (float64): a
    numpy array or a tensor (:func:`symmetric_eigh`). An array's eigen-decomposition is still
    torch's LAPACK call: numpy's OpenBLAS runs ``eigh`` of 40 × 40 on threads of its own,
    which then compete with torch's for the cores (a training step at 40 tasks took 2.5×
    as long).

    Eigenvalues at or below ``rtol · λ_max`` count as zero, as ``torch.linalg.pinv(A,
    hermitian=True, rtol=rtol)`` would do; no host synchronisation (``jacobi`` as in
    :func:`symmetric_eigh`).
    """
    xp = namespace(matrix)
    values: Any
    vectors: Any
    if xp is np:
        values, vectors = (x.numpy() for x in symmetric_eigh(torch.from_numpy(matrix)))
    else:
        values, vectors = symmetric_eigh(matrix, sweeps, jacobi)
    keep = values > rtol * values[-1].clip(min=0.0)
    inverse = xp.where(keep, 1.0 / xp.where(keep, values, xp.ones_like(values)), 0.0)
    return (vectors * inverse) @ vectors.T
