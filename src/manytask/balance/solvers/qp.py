r"""Small non-negative quadratic programs, solved by an interior-point method in torch.

:func:`nonneg_qp` solves, for every column :math:`b` of ``B`` at once,

.. math::

    \min_{z \ge 0} \; \tfrac12 z^\top A z + b^\top z \qquad (A \succeq 0),

with Mehrotra's predictor–corrector primal–dual interior-point method (Nocedal and Wright,
*Numerical Optimization*, 2nd ed., §16.6): the KKT conditions :math:`Az + b = s`,
:math:`z, s \ge 0`, :math:`z_i s_i = 0` are solved by Newton steps on the perturbed system
:math:`z_i s_i = \sigma\mu`, each step reduced to the ``(T, T)`` system
:math:`(A + Z^{-1}S)\,\Delta z = r` (one Cholesky factorisation for the predictor and the
corrector, no host synchronisation) and cut at 99.5% of the
distance to the boundary; ``Δs`` is recovered from the linearised complementarity row, which
keeps the method from stalling when ``A`` is singular (rank-deficient Gramians, duplicate
tasks). On accelerators a fixed number of iterations replaces the usual stopping test (a test
would read a value back to the host); on a CPU the loop stops once the KKT residuals are below
``1e-14``. From 20 iterations on,
random dual-cone problems with up to 40 tasks (singular, badly scaled and all-zero Gramians
included) satisfy the KKT conditions to ``1e-12`` relative to the mean diagonal of ``A``, and
the directions agree with quadprog's to ``1e-8`` of the largest gradient norm where quadprog is
itself accurate (``tests/test_solvers_qp.py``). Unlike projected-gradient methods, the
iteration count does not grow with the condition number of ``A``.

On a CPU a problem whose linear term has at most four negative entries (a projection onto the
dual cone that few gradients conflict with) is first solved by a primal active-set method
(:func:`_active_set`, the scheme of Lawson and Hanson's NNLS with the exact minimiser on each
support): a handful of small solves instead of ~15 Newton iterations. Its answer is kept only
when it satisfies the KKT conditions to ``1e-12``; the interior-point method solves the other
problems, those it cannot certify (a singular ``A`` on the support), and all problems on
accelerators.

:func:`dual_cone_weights` uses it for the projection onto the dual cone of the rows of ``J``
(Quinton and Rey, arXiv:2406.16232, Proposition 1): the projection of :math:`J^\top u` is
:math:`J^\top v` with :math:`v = \arg\min_{v \ge u} v^\top G v`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from manytask.balance.solvers.precision import rounding_shift

#: relative regularisation of the Newton systems (keeps them positive definite when ``A`` is
#: singular on the free variables; it changes the step, not the fixed point)
_REGULARIZATION = 1e-12
#: on a CPU the iteration stops once the dual residual and the complementarity ``zᵢsᵢ`` are
#: below this (the problem is scaled to a unit mean diagonal); elsewhere it runs its fixed count
_TOLERANCE = 1e-14


#: problems whose linear term has at most this many negative entries go to the active-set
#: method on a CPU (each costs one small solve per support change, ~40 µs on a 2-core CPU,
#: against ~0.25 ms per iteration of the batched interior point at 40 tasks)
_ACTIVE_SET_SIZE = 4
#: the active-set answer is kept when its KKT residuals are below this, relative to ``max|b|``
_CERTIFIED = 1e-12


def _active_set(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """``argmin_{z ≥ 0} ½ zᵀAz + bᵀz`` by a primal active-set method, or ``None``.

    From ``z = 0``, the coordinate with the most negative gradient joins the support ``S``;
    the minimiser of the problem restricted to ``S`` (``A_SS z_S = −b_S``) is taken when it is
    positive, and otherwise approached as far as ``z ≥ 0`` allows, the coordinates that reach
    zero leaving ``S``. The objective decreases strictly, so no support repeats. ``None`` when
    some ``A_SS`` is not positive definite or the result misses the KKT conditions
    (``z ≥ 0``, ``∇ = Az + b ≥ 0``, ``∇_S = 0``) by more than ``1e-12·max(1, max|b|)``.
    """
    t = b.shape[0]
    tol = _CERTIFIED * max(1.0, float(np.abs(b).max()))
    z = np.zeros(t)
    support = np.zeros(t, dtype=bool)
    gradient = b.copy()
    for _ in range(3 * t + 1):
        off = np.flatnonzero(~support)
        if off.size == 0 or gradient[off].min() >= -tol:
            on = np.flatnonzero(support)
            if on.size and np.abs(gradient[on]).max() > tol:
                return None
            return z
        support[off[np.argmin(gradient[off])]] = True
        while True:
            on = np.flatnonzero(support)
            block = a[np.ix_(on, on)]
            try:
                np.linalg.cholesky(block)
            except np.linalg.LinAlgError:
                return None
            target = np.linalg.solve(block, -b[on])
            if (target > 0).all():
                z[:] = 0.0
                z[on] = target
                break
            current = z[on]
            falling = target <= 0
            alpha = float((current[falling] / (current[falling] - target[falling])).min())
            z[on] = current + alpha * (target - current)
            leaving = on[falling & (z[on] <= tol * 1e-3)]
            if leaving.size == 0:
                leaving = on[falling][np.argmin(z[on][falling])]
            z[leaving] = 0.0
            support[leaving] = False
        gradient = a @ z + b
    return None


def _step_to_boundary(x: Tensor, dx: Tensor) -> Tensor:
    """Largest ``α`` (per column) with ``x + α dx ≥ 0``; ``inf`` when ``dx ≥ 0``."""
    ratio = torch.where(dx < 0, -x / torch.where(dx < 0, dx, -torch.ones_like(dx)), torch.inf)
    return ratio.amin(dim=0)


def _interior_point(a: Tensor, b: Tensor, iterations: int) -> Tensor:
    """The Mehrotra iteration for one problem (``b``: ``(T,)``) or a batch (``(T, K)``)."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    regularized = a + _REGULARIZATION * eye
    z = torch.ones_like(b)
    s = torch.ones_like(b)
    may_stop = a.device.type == "cpu"  # reading a CPU tensor waits for no device
    for _ in range(iterations):
        residual = a @ z + b - s  # dual residual
        mu = (z * s).mean(dim=0)
        if may_stop and bool((residual.abs().amax() <= _TOLERANCE) & (mu.amax() <= _TOLERANCE)):
            break
        # A + Z⁻¹S is symmetric positive definite: one Cholesky factorisation serves the
        # predictor and the corrector solve
        columns = z.reshape(z.shape[0], -1)
        ratio = (s.reshape(columns.shape) / columns).T  # (K, T)
        factor = torch.linalg.cholesky_ex(regularized + torch.diag_embed(ratio))[0]

        def solve(rhs: Tensor, factor: Tensor = factor) -> Tensor:
            stacked = rhs.reshape(rhs.shape[0], -1).T.unsqueeze(-1)  # (K, T, 1)
            return torch.cholesky_solve(stacked, factor).squeeze(-1).T.reshape(rhs.shape)

        # predictor (affine-scaling) step
        dz_aff = solve(-s - residual)
        ds_aff = -s - s * dz_aff / z
        alpha_aff = torch.minimum(_step_to_boundary(z, dz_aff), _step_to_boundary(s, ds_aff))
        alpha_aff = alpha_aff.clamp(max=1.0)
        mu_aff = ((z + alpha_aff * dz_aff) * (s + alpha_aff * ds_aff)).mean(dim=0)
        sigma = (mu_aff / mu.clamp_min(torch.finfo(a.dtype).tiny)).clamp(0.0, 1.0) ** 3
        # corrector step towards the centred point σμ
        target = sigma * mu - z * s - dz_aff * ds_aff
        dz = solve(target / z - residual)
        ds = (target - s * dz) / z
        alpha = torch.minimum(_step_to_boundary(z, dz), _step_to_boundary(s, ds))
        alpha = (0.995 * alpha).clamp(max=1.0)
        z = z + alpha * dz
        s = s + alpha * ds
    return z


def nonneg_qp(quadratic: Tensor, linear: Tensor, iterations: int = 25) -> Tensor:
    """``argmin_{z ≥ 0} ½ zᵀ A z + bᵀ z`` for each column ``b`` of ``linear`` (float64).

    Args:
        quadratic: ``A``, a ``(T, T)`` positive semi-definite matrix.
        linear: ``(T,)`` or ``(T, K)``: one problem per column.
        iterations: interior-point iterations.

    The problem must be bounded below (true for every use here). When ``A`` is singular the
    minimiser need not be unique; the iterates approach the centre of the set of minimisers.
    On a CPU the problems with few negative entries in ``b`` go to :func:`_active_set` first;
    the others are solved as one batch by the interior-point method (one batched Cholesky
    factorisation per iteration).
    """
    a = quadratic.double()
    a = 0.5 * (a + a.T)
    b = linear.double()
    t = a.shape[0]
    # scale the problem so that the average diagonal entry of A is one (A = 0 stays 0)
    scale = a.diagonal().sum() / t
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    a = a / scale
    b = b / scale
    a = a + rounding_shift(quadratic) * torch.eye(t, dtype=a.dtype, device=a.device)
    if a.device.type != "cpu":
        return _interior_point(a, b, iterations)
    columns = b.reshape(t, -1)
    a_np, b_np = a.numpy(), columns.numpy()
    # the active set adds one coordinate per iteration, about as many as b has negative
    # entries: beyond a few, the batched interior point is the faster of the two
    small = (b_np < 0).sum(axis=0) <= _ACTIVE_SET_SIZE
    solved = [_active_set(a_np, b_np[:, k]) if small[k] else None for k in range(columns.shape[1])]
    result = torch.empty_like(columns)
    hard = [k for k, z in enumerate(solved) if z is None]
    for k, z in enumerate(solved):
        if z is not None:
            result[:, k] = torch.from_numpy(z)
    if hard:
        result[:, hard] = _interior_point(a, columns[:, hard], iterations)
    return result.reshape(b.shape)


def dual_cone_weights(gramian: Tensor, anchors: Tensor, iterations: int = 25) -> Tensor:
    """Weights of the projections of ``Jᵀ u`` onto the dual cone ``{x : J x ≥ 0}``.

    For each column ``u`` of ``anchors`` (``(T,)`` or ``(T, K)``), returns
    ``v = argmin_{v ≥ u} vᵀ G v`` (float64), so that the projection is ``Jᵀ v``.
    """
    g = gramian.double()
    u = anchors.double()
    v = u + nonneg_qp(gramian, g @ u, iterations)
    # should rounding still leave a problem without a minimiser, keep that anchor unprojected
    # rather than return inf or NaN
    return torch.where(torch.isfinite(v).all(dim=0), v, u)
