r"""CAGrad's dual problem, solved by a barrier method in torch.

Liu et al. (NeurIPS 2021, arXiv:2110.14048, Section 3) reduce CAGrad to

.. math::

    \min_{w \in \Delta_T} \; a^\top w + r \sqrt{w^\top G w}, \qquad a = G\mathbf 1 / T,
    \quad r = c\,\|g_0\|,

a second-order cone program once written with an epigraph variable :math:`s \ge \|J^\top w\|`.
:func:`cagrad_dual` follows the central path of the self-concordant barrier

.. math::

    \tau\,(a^\top w + r s) - \sum_i \log w_i - \log\big(s^2 - w^\top G w\big),
    \qquad \mathbf 1^\top w = 1,

(Boyd and Vandenberghe, *Convex Optimization*, §11.3 and §11.6) with Newton steps in the
tangent space of the simplex, each with a line search over the candidate lengths
:math:`2^{-k}` evaluated together (the longest one that stays strictly feasible and decreases
the barrier objective is taken). On accelerators a fixed number of Newton steps replaces the
stopping test (on a CPU, see below);
:math:`\tau` is multiplied by ``growth`` after every step taken from a well-centred point
(Newton decrement :math:`\lambda^2 < 1/4`), up to ``final`` — so the iterates never leave the
neighbourhood of the central path, where fixed stage lengths were seen to stall. Nothing reads
a value back to the host. The duality gap at a centre is :math:`(T + 2)/\tau`; with the
defaults (80 steps, ``final = 1e13`` on a Gramian scaled to unit mean diagonal) the worst-case
improvement :math:`\min_i g_i^\top d` of the resulting direction is within ``1e-10`` of a
400-step run on random problems with 2–20 tasks (rank-deficient, duplicate and zero gradients
included), and never below cvxpy/Clarabel's (``tests/test_solvers_qp.py``). On a CPU, where
reading a value costs no device synchronisation, the loop stops once a step from the final
:math:`\tau` has a Newton decrement below ``1e-6``. Two tasks are solved in closed form
(:func:`_pair`).

On a CPU, :func:`_active_set` is tried first: on a support it solves the problem in closed form,
and it accepts its answer only with a certificate of optimality; the barrier method is the
fallback (degenerate Gramians) and the method on accelerators.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from manytask.balance.solvers.backend import namespace

_LINE_SEARCH = 30  # candidate step lengths 1, 1/2, …, 2^-29
#: on a CPU the loop stops after a step from the final τ whose Newton decrement is below this
_CENTRED = 1e-6


def _pair(g: Any, a: Any, r: Any) -> Any:
    r"""The two-task dual in closed form.

    With :math:`w = (\gamma, 1-\gamma)` the objective is :math:`a_2 + s\gamma + r\sqrt{q(\gamma)}`,
    :math:`s = a_1 - a_2`, :math:`q(\gamma) = \alpha\gamma^2 + 2\beta\gamma + \delta` (the squared
    norm of :math:`J^\top w`), convex in :math:`\gamma`. Writing :math:`u = \alpha\gamma + \beta`
    and :math:`D = \alpha\delta - \beta^2 \ge 0`, the stationarity condition
    :math:`s + r u/\sqrt{q} = 0` with :math:`q = (u^2 + D)/\alpha` gives
    :math:`u = -\operatorname{sign}(s)\sqrt{D s^2/(\alpha r^2 - s^2)}` when
    :math:`\alpha r^2 > s^2`; otherwise the derivative keeps the sign of :math:`s` and the
    minimum is at an end. The stationary point is clipped to :math:`[0, 1]`; when ``s = 0`` it is
    the min-norm point :math:`u = 0`. For numpy arrays (a CPU) or tensors.
    """
    xp = namespace(g)
    alpha = g[0, 0] - 2.0 * g[0, 1] + g[1, 1]
    beta = g[0, 1] - g[1, 1]
    delta = g[1, 1]
    s = a[0] - a[1]
    spread = (alpha * delta - beta * beta).clip(min=0.0)
    room = alpha * r * r - s * s
    # s = 0: the min-norm point (the limit r → 0⁺ when r is zero)
    interior = ((room > 0) | (s == 0)) & (alpha > 0)
    safe_room = xp.where(room > 0, room, xp.ones_like(room))
    safe_alpha = xp.where(alpha > 0, alpha, xp.ones_like(alpha))
    u = -xp.sign(s) * xp.sqrt(spread * s * s / safe_room)
    end = xp.where(s > 0, xp.zeros_like(s), xp.ones_like(s))
    gamma = xp.where(interior, ((u - beta) / safe_alpha).clip(0.0, 1.0), end)
    return xp.stack([gamma, 1.0 - gamma])


#: relative tolerance of the active-set method's optimality certificate
_KKT = 1e-9


def _on_support(
    g: np.ndarray, a: np.ndarray, r: float, support: np.ndarray
) -> tuple[np.ndarray, bool] | None:
    r"""The minimiser of :math:`a^\top w + r\sqrt{w^\top G w}` over the affine hull
    :math:`\{w : \mathbf 1^\top w = 1,\ w_i = 0 \text{ off } S\}`, or a descent ray.

    With :math:`x = G_S^{-1}\mathbf 1`, :math:`y = G_S^{-1} a_S`, :math:`p = \mathbf 1^\top x`,
    :math:`q = \mathbf 1^\top y`, :math:`s = a_S^\top y`, stationarity
    :math:`a_S + r G_S w/\rho = \mu\mathbf 1` (:math:`\rho = \sqrt{w^\top G w}`) gives
    :math:`w \propto \mu x - y`, and the two constraints leave
    :math:`\mu^2 p - 2\mu q + s = r^2`, whose root with :math:`\mu p > q` yields
    :math:`w = (\mu x - y)/(\mu p - q)`. Without a real root (:math:`q^2 < p(s - r^2)`) the
    objective is unbounded below on the hull and decreases monotonically along
    :math:`d = (q/p)\,x - y` from any point; ``(d, False)`` is returned then, ``(w, True)``
    otherwise, and ``None`` when :math:`G_S` is not positive definite.
    """
    g_s = g[np.ix_(support, support)]
    try:
        chol = np.linalg.cholesky(g_s)
    except np.linalg.LinAlgError:
        return None
    rhs = np.stack([np.ones(len(support)), a[support]], axis=1)
    xy = np.linalg.solve(chol.T, np.linalg.solve(chol, rhs))
    x, y = xy[:, 0], xy[:, 1]
    p, q, s = x.sum(), y.sum(), a[support] @ y
    if not (np.isfinite(p) and p > 0):
        return None
    disc = q * q - p * (s - r * r)
    if disc < 0:
        return (q / p) * x - y, False
    mu = (q + np.sqrt(disc)) / p
    return (mu * x - y) / (mu * p - q), True


def _active_set(
    g: npt.NDArray[np.float64], av: npt.NDArray[np.float64], r: float
) -> npt.NDArray[np.float64] | None:
    r"""CAGrad's dual by a primal active-set method (in the manner of Lawson and Hanson's NNLS),
    float64 on the host; ``None`` where it cannot certify its answer.

    From the barycentre, each step moves towards the minimiser on the affine hull of the
    current support (:func:`_on_support`) — or along its descent ray — as far as the simplex
    allows, dropping the coordinates that reach zero; at a minimiser on the support, the
    coordinate with the most negative reduced gradient is added. The objective decreases at
    every step, so no support repeats. The answer is returned only if it satisfies the KKT
    conditions to a relative ``1e-9``: :math:`\nabla_i = a_i + r (Gw)_i/\rho` equal to
    :math:`\mu` on the support and at least :math:`\mu` off it. Zero in the hull of the
    gradients (:math:`\rho = 0`, where the objective is not differentiable) and singular
    :math:`G_S` give ``None``.
    """
    t = g.shape[0]
    w = np.full(t, 1.0 / t)
    support = np.ones(t, dtype=bool)
    scale = max(float(np.abs(av).max()), r * float(np.sqrt(np.abs(np.diag(g)).max())), 1e-300)
    for _ in range(4 * t):
        index = np.flatnonzero(support)
        found = _on_support(g, av, r, index)
        if found is None:
            return None
        target, bounded = found
        step = target - w[index] if bounded else target
        shrinking = step < 0
        limit = w[index][shrinking] / -step[shrinking] if shrinking.any() else np.array([])
        if bounded and (limit.size == 0 or limit.min() >= 1.0):
            w[index] = target  # the minimiser on this support is feasible
            rho = float(np.sqrt(max(w @ g @ w, 0.0)))
            if rho <= 1e-12 * np.sqrt(max(np.abs(np.diag(g)).max(), 1e-300)):
                return None
            gradient = av + r * (g @ w) / rho
            mu = float(gradient[index].mean())
            off = ~support
            if not off.any() or gradient[off].min() >= mu - _KKT * scale:
                if np.abs(gradient[index] - mu).max() > 1e3 * _KKT * scale:
                    return None
                return w
            support[np.flatnonzero(off)[np.argmin(gradient[off])]] = True
            continue
        if limit.size == 0:
            return None  # an unbounded ray inside the simplex: cannot happen unless degenerate
        alpha = float(limit.min())
        w[index] = w[index] + alpha * step
        hit = index[shrinking][limit <= alpha * (1 + 1e-12)]
        w[hit] = 0.0
        support[hit] = False
        if not support.any():
            return None
        w[index] = np.clip(w[index], 0.0, None)
        w /= w.sum()
    return None


def _change(
    w: Tensor,
    s: Tensor,
    step_w: Tensor,
    step_s: Tensor,
    lengths: Tensor,
    gramian: Tensor,
    a: Tensor,
    r: Tensor,
    tau: Tensor,
) -> Tensor:
    """Change of the barrier objective along ``(Δw, Δs)`` for every candidate length ``t``; inf
    where the point leaves the domain.

    Computed as a difference — the cone gap ``q(t) = (s + tΔs)² − (w + tΔw)ᵀG(w + tΔw)`` is
    ``q₀`` plus a quadratic in ``t``, the logarithms go through ``log1p`` — so that decreases
    far below the size of the objective (which grows with τ) are resolved, and only
    matrix–vector products are needed.
    """
    ratio = lengths[:, None] * step_w[None, :] / w[None, :]  # (K, T)
    g_step = gramian @ step_w
    q0 = (s * s - w @ gramian @ w).clamp_min(torch.finfo(w.dtype).tiny)
    dq = lengths * 2.0 * (s * step_s - w @ g_step) + lengths * lengths * (
        step_s * step_s - step_w @ g_step
    )
    relative = dq / q0
    inside = (ratio > -1).all(dim=-1) & (relative > -1) & (s + lengths * step_s > 0)
    log_w = torch.log1p(torch.where(ratio > -1, ratio, torch.zeros_like(ratio))).sum(dim=-1)
    log_q = torch.log1p(torch.where(relative > -1, relative, torch.zeros_like(relative)))
    value = tau * lengths * (a @ step_w + r * step_s) - log_w - log_q
    return torch.where(inside, value, torch.full_like(value, torch.inf))


def cagrad_dual(
    gramian: Any,
    radius: Any,
    iterations: int = 80,
    growth: float = 10.0,
    final: float = 1e13,
) -> Any:
    """``argmin_{w ∈ Δ} aᵀw + r·sqrt(wᵀGw)`` with ``a = G 1/T`` and ``r = radius`` (float64).

    ``gramian`` should be scaled to entries of order one (the caller divides by the mean
    diagonal); ``radius`` is a non-negative scalar in the same units (``c·‖g₀‖``). Takes and
    returns a float64 numpy array (a CPU, where everything but the barrier fallback runs in
    numpy) or a tensor. One task: ``w = 1``; two: :func:`_pair`; on a CPU, :func:`_active_set`
    where it certifies its answer; otherwise the barrier method (:func:`_barrier`, with
    ``iterations``, ``growth`` and ``final``).
    """
    xp = namespace(gramian)
    g = gramian if xp is np else gramian.double()
    g = 0.5 * (g + g.T)
    t = g.shape[0]
    if t == 1:
        return xp.ones_like(g[0])
    a = g.sum(1) / t
    if t == 2:
        return _pair(g, a, radius if xp is np else radius.double())
    on_cpu = xp is np or g.device.type == "cpu"
    if on_cpu and float(radius) > 0:
        host = (g, a) if xp is np else (g.cpu().numpy(), a.cpu().numpy())
        exact = _active_set(*host, float(radius))
        if exact is not None:
            return exact if xp is np else torch.from_numpy(exact).to(g.device)
    if xp is np:
        r = torch.tensor(float(radius), dtype=torch.float64)
        w = _barrier(torch.from_numpy(g), torch.from_numpy(a), r, iterations, growth, final)
        return w.numpy()
    return _barrier(g, a, radius.double(), iterations, growth, final)


def _barrier(
    g: Tensor, a: Tensor, radius: Tensor, iterations: int, growth: float, final: float
) -> Tensor:
    """The barrier method of the module docstring on a symmetric float64 Gramian (T ≥ 3)."""
    t = g.shape[0]
    device, dtype = g.device, g.dtype
    n = t - 1
    # r = 0 (plain averaging) makes the epigraph variable unbounded; a tiny floor keeps the
    # barrier problem bounded and changes the weights by nothing measurable
    r = radius.clamp_min(1e-12)
    w = torch.full((t,), 1.0 / t, dtype=dtype, device=device)
    s = torch.sqrt((w @ g @ w).clamp_min(0.0)) + 1.0
    lengths = 0.5 ** torch.arange(_LINE_SEARCH, dtype=dtype, device=device)
    tau = torch.ones((), dtype=dtype, device=device)
    # The steps stay on {1ᵀw = 1} through an orthonormal basis N of its tangent space 1⊥
    # (columns 2…T of the Householder reflection that maps e₁ to 1/√T): Δw = N Δy. A Gramian
    # that is large along 1 (nearly equal gradients) then drops out of NᵀGN instead of
    # swamping the step, and no task is singled out.
    unit = torch.full((t,), t**-0.5, dtype=dtype, device=device)
    v = unit - torch.eye(t, dtype=dtype, device=device)[0]
    v = v * (2.0 / (v @ v)) ** 0.5  # the reflection is I − vvᵀ
    basis = (torch.eye(t, dtype=dtype, device=device) - torch.outer(v, v))[:, 1:]
    g_reduced = basis.T @ g @ basis
    may_stop = device.type == "cpu"  # reading a CPU tensor waits for no device
    for _ in range(iterations):
        gw = g @ w
        q = (s * s - w @ gw).clamp_min(torch.finfo(dtype).tiny)
        grad_w = tau * a - 1.0 / w + 2.0 * gw / q
        grad_y = basis.T @ grad_w
        grad_s = tau * r - 2.0 * s / q
        gw_reduced = basis.T @ gw
        # Nᵀ diag(d) N for the reflection N = (I − vvᵀ)[:, 1:], without a matrix product:
        # (I − vvᵀ) D (I − vvᵀ) = D − v(Dv)ᵀ − (Dv)vᵀ + (vᵀDv) vvᵀ
        d = 1.0 / (w * w)
        dv = d * v
        reflected = (
            torch.diag(d) - torch.outer(v, dv) - torch.outer(dv, v) + (v @ dv) * torch.outer(v, v)
        )
        h_yy = (
            reflected[1:, 1:]
            + 2.0 * g_reduced / q
            + 4.0 * torch.outer(gw_reduced, gw_reduced) / (q * q)
        )
        h_ys = -4.0 * s * gw_reduced / (q * q)
        h_ss = -2.0 / q + 4.0 * s * s / (q * q)
        hessian = torch.cat(
            [
                torch.cat([h_yy, h_ys[:, None]], dim=1),
                torch.cat([h_ys, h_ss.reshape(1)])[None, :],
            ],
            dim=0,
        )
        grad = torch.cat([grad_y, grad_s.reshape(1)])
        solved, _ = torch.linalg.solve_ex(hessian, -grad[:, None])
        step_y, step_s = solved[:n, 0], solved[n, 0]
        step_w = basis @ step_y
        # a failed factorisation (the Hessian is numerically singular near the end of the
        # path) yields non-finite steps: take none
        finite = torch.isfinite(step_w).all() & torch.isfinite(step_s)
        step_w = torch.where(finite, step_w, torch.zeros_like(step_w))
        step_s = torch.where(finite, step_s, torch.zeros_like(step_s))
        better = _change(w, s, step_w, step_s, lengths, g, a, r, tau) < 0
        # the longest improving step; none improves only at the floor of float64
        index = torch.argmax(better.to(torch.int64))
        chosen = lengths.gather(0, index.reshape(1))[0]  # (a 0-dim tensor index would sync)
        length = torch.where(better.any(), chosen, torch.zeros_like(chosen))
        w = w + length * step_w
        s = s + length * step_s
        # follow the central path: raise τ only from a well-centred point (small Newton
        # decrement), which keeps every later Newton step short and reliable
        decrement = -(grad @ solved[:, 0])
        if may_stop and bool((tau >= final) & (decrement < _CENTRED)):
            break  # the last centre is reached: later steps change nothing measurable
        centred = (decrement < 0.25) & (tau < final)
        tau = torch.where(centred, tau * growth, tau)
    return w
