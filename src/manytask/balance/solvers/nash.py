r"""Positive solutions of :math:`(G w)_i = w_i^{-p}`: Nash-MTL (``p = 1``) and FairGrad.

Nash-MTL (Navon et al., ICML 2022, arXiv:2202.01017, Section 3) looks for :math:`w > 0` with
:math:`G w = 1/w`; FairGrad (Ban and Ji, ICML 2024, arXiv:2402.15638, Equation 4) for
:math:`G w = w^{-1/\alpha}`. Both are the stationarity conditions of a strictly convex function
on the positive orthant,

.. math::

    f(w) = \tfrac12 w^\top G w - \sum_i h(w_i), \qquad h'(x) = x^{-p}, \qquad
    h(x) = \begin{cases} \log x & p = 1 \\ x^{1-p}/(1-p) & p \ne 1 \end{cases}

so :func:`power_balance` minimises :math:`f` by Newton's method: each step solves the
``(T, T)`` system scaled by :math:`\operatorname{diag}(w)` (which turns the barrier part of the
Hessian into a positive diagonal and keeps the system well conditioned), and its length is the
longest of :math:`1, \tfrac12, \dots, 2^{-29}` that stays in the orthant and decreases
:math:`f` (all candidates are evaluated at once; no host synchronisation). The start is the best
multiple of :math:`1/\sqrt{G_{ii}}`.

The authors of Nash-MTL instead solve a sequence of convex programs with cvxpy (a
concave–convex procedure, at most 20 per step, warm-started from the previous step's weights);
both find the same unique solution when the task gradients are linearly independent, the
paper's assumption. To stay defined without it — a zero gradient, or zero in the convex hull of
the gradients, where no positive solution exists — :func:`power_balance` solves with
:math:`G/\bar g + \operatorname{diag}(\delta\, G_{ii}/\bar g)` (:math:`\bar g` the mean
diagonal, :math:`\delta` ``T`` times the machine epsilon of the Gramian's dtype: a float32
Gramian of nearly opposite gradients is often slightly indefinite after rounding, and the shift
makes every Gramian positive definite). The shift is relative to each task's own
:math:`G_{ii}`, the scale at which rounding perturbs row ``i`` (:math:`|\Delta G_{ij}| \lesssim
\varepsilon \|g_i\| \|g_j\|`), so it is no larger than the rounding the Gramian already
carries, however unequal the gradient norms are (relative to the mean it moved the weight of a
gradient 1000× smaller than the others by 5% in float32). Tasks whose gradient is numerically
zero are decoupled from the others and get weight zero (their weight does not change the
direction), so no absolute floor is needed: an earlier floor of :math:`10^{-12}\bar g` biased
the solution by a relative :math:`10^{-12} w_i^2`, which for two float64 gradients at an angle
of :math:`\pi - 10^{-5}` (weights near :math:`10^5`) put the direction off the exact one, the
bisector of the unit gradients with norm :math:`\sqrt 2`, by a relative 0.19; now by 5e-6, and
by 5e-10 at :math:`\pi - 10^{-3}`. With the default 40 Newton steps the relative residual of
:math:`Gw = w^{-p}` is about ``1e-11`` on random problems with 2–40 tasks, and stays below
``1e-8`` on badly conditioned ones
(``tests/test_solvers_nash.py``). On a CPU, where reading a value costs no device
synchronisation, the loop stops as soon as the relative residual is below ``1e-13`` (typically
after 5–10 steps), and the steps run in numpy (:mod:`.backend`); Nash-MTL's weights of two
tasks are solved there in closed form (:func:`_nash_pair`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from manytask.balance.solvers.backend import identity_like, namespace
from manytask.balance.solvers.precision import relative_rounding, with_rounding_shift

_LINE_SEARCH = 30
#: the candidate step lengths 1, 1/2, …, 2^-29 of a CPU's line search
_LENGTHS = 0.5 ** np.arange(_LINE_SEARCH, dtype=np.float64)
#: on a CPU the loop stops once every ``|wᵢ(Aw)ᵢ − wᵢ^(1−p)|`` is below this share of
#: ``wᵢ^(1−p)`` (on other devices it runs its fixed number of steps, without host reads)
_RESIDUAL = 1e-13


def _change(w: Any, step: Any, lengths: Any, gramian: Any, p: float) -> Any:
    """``f(w + tΔ) − f(w)`` for every candidate length ``t``; inf outside the positive orthant.

    Computed as a difference (quadratic part from ``wᵀAΔ`` and ``ΔᵀAΔ``, barrier part through
    ``log1p``/``expm1`` of ``tΔᵢ/wᵢ``), so small decreases are resolved without cancellation
    and no matrix–matrix product is needed. Arrays or tensors.
    """
    xp = namespace(w)
    relative = step / w
    ratio = lengths[:, None] * relative[None, :]  # (K, T)
    # t Δᵢ/wᵢ > −1 for every i: the lengths below the one its most negative entry allows
    inside = lengths * relative.min() > -1
    logs = xp.log1p(xp.where(ratio > -1, ratio, xp.zeros_like(ratio)))
    if p == 1.0:
        reward = logs.sum(-1)  # Σ log(wᵢ + tΔᵢ) − log wᵢ
    else:
        q = 1.0 - p  # Σ ((wᵢ + tΔᵢ)^q − wᵢ^q)/q
        reward = ((w**q)[None, :] * xp.expm1(q * logs)).sum(-1) / q
    a_step = gramian @ step
    quadratic = lengths * (w @ a_step) + 0.5 * lengths * lengths * (step @ a_step)
    value = quadratic - reward
    return xp.where(inside, value, xp.full_like(value, math.inf))


def _solve(system: Any, rhs: Any) -> Any:
    """``system⁻¹ rhs``, or zeros when the system is singular or the solution not finite."""
    if isinstance(system, np.ndarray):
        try:
            solved = np.linalg.solve(system, rhs)
        except np.linalg.LinAlgError:
            return np.zeros_like(rhs)
        return solved if np.isfinite(solved).all() else np.zeros_like(rhs)
    solved, _ = torch.linalg.solve_ex(system, rhs[:, None])
    return torch.where(torch.isfinite(solved).all(), solved, torch.zeros_like(solved))[:, 0]


def power_balance(gramian: Tensor, power: float = 1.0, iterations: int = 40) -> Tensor:
    """The positive ``w`` with ``(G w)ᵢ = wᵢ^(−power)`` (float64; see the module docstring).

    ``power = 1`` gives the Nash bargaining weights of Nash-MTL; ``power = 1/α`` FairGrad's.
    Under ``G → cG`` the weights scale by ``c^(−1/(1+power))``. On a CPU the Newton steps run
    in numpy (Nash-MTL's weights at 10 tasks: 0.38 → 0.15 ms), elsewhere in torch.
    """
    if not power > 0:
        raise ValueError(f"power must be > 0, got {power}")
    shift = relative_rounding(gramian)
    g = gramian.double()
    if g.device.type == "cpu":
        if g.shape[0] == 2 and power == 1.0:
            pair = _nash_pair(g.tolist(), shift)
            if pair is not None:
                return torch.tensor(pair, dtype=torch.float64)
        with np.errstate(all="ignore"):  # a non-finite Gramian: as torch, silent
            solved = _newton(g.detach().numpy(), float(power), iterations, shift, may_stop=True)
        return torch.from_numpy(solved)
    result: Tensor = _newton(g, float(power), iterations, shift, may_stop=False)
    return result


def _nash_pair(g: list[list[float]], shift: float) -> list[float] | None:
    r"""The Nash weights (``p = 1``) of two tasks in closed form, in Python floats, on the same
    shifted and scaled Gramian ``A`` as :func:`_newton`; None for a non-finite Gramian.

    Multiplying :math:`(Aw)_i = 1/w_i` by :math:`w_i` gives :math:`A_{11}w_1^2 + A_{12}m = 1
    = A_{22}w_2^2 + A_{12}m` with :math:`m = w_1w_2`; so :math:`A_{ii}w_i^2 = 1 - A_{12}m`, and
    their product :math:`A_{11}A_{22}m^2 = (1 - A_{12}m)^2` has the one root with
    :math:`1 - A_{12}m > 0`, :math:`m = 1/(\sqrt{A_{11}A_{22}} + A_{12})` (positive: the
    shift makes ``A`` positive definite). Then :math:`w_1 = \sqrt{m\sqrt{A_{22}/A_{11}}}` and
    :math:`w_2 = \sqrt{m\sqrt{A_{11}/A_{22}}}`. A numerically zero gradient is decoupled
    (:math:`A_{12} = 0`, unit diagonal) and gets weight zero, as in :func:`_newton`.
    """
    g11, g22, g12 = g[0][0], g[1][1], 0.5 * (g[0][1] + g[1][0])
    if not all(math.isfinite(x) for x in (g11, g22, g12)):
        return None
    mean = 0.5 * (g11 + g22)
    mean = mean if mean > 0 else 1.0
    top = max(g11, g22, 0.0)
    live = (g11 > 1e-12 * top, g22 > 1e-12 * top)
    a11 = g11 / mean if live[0] else 1.0
    a22 = g22 / mean if live[1] else 1.0
    a12 = g12 / mean if all(live) else 0.0
    a11, a22 = a11 * (1.0 + shift), a22 * (1.0 + shift)  # the rounding shift of the diagonal
    denominator = math.sqrt(a11 * a22) + a12
    if not denominator > 0:
        return None
    m = 1.0 / denominator
    scale = mean**-0.5  # back to the scale of G
    w1 = math.sqrt(m * math.sqrt(a22 / a11)) * scale if live[0] else 0.0
    w2 = math.sqrt(m * math.sqrt(a11 / a22)) * scale if live[1] else 0.0
    return [w1, w2]


def _newton(g: Any, p: float, iterations: int, shift: float, may_stop: bool) -> Any:
    """The Newton iteration of :func:`power_balance` on float64 arrays or tensors; ``shift``
    is the rounding shift, relative to each diagonal entry (module docstring)."""
    xp = namespace(g)
    g = 0.5 * (g + g.T)
    t = g.shape[0]
    diagonal = g.diagonal()
    mean = diagonal.sum() / t
    mean = xp.where(mean > 0, mean, xp.ones_like(mean))
    live = diagonal > 1e-12 * diagonal.max().clip(min=0.0)  # numerically non-zero gradients
    # a zero gradient's variable is decoupled (unit row and column; its weight is set to 0 at
    # the end), so no absolute floor on the diagonal is needed to keep the system defined
    identity = identity_like(g)
    a = with_rounding_shift(xp.where(live[:, None] & live[None, :], g / mean, identity), shift, 0.0)
    # start: the best multiple c·v of v = 1/sqrt(diag); f(c v) is minimal at
    # c^(1+p) = Σ vᵢ^(1−p) / vᵀAv
    v = a.diagonal() ** -0.5
    c = ((v ** (1.0 - p)).sum() / (v @ a @ v)) ** (1.0 / (1.0 + p))
    w = start = c * v
    lengths: Any = (
        _LENGTHS if xp is np else 0.5 ** torch.arange(_LINE_SEARCH, dtype=g.dtype, device=g.device)
    )
    for _ in range(iterations):
        aw = a @ w
        barrier = w ** (1.0 - p)  # w · h'(w)
        if may_stop and bool((abs(w * aw - barrier) <= _RESIDUAL * barrier).all()):
            break  # a CPU value: no device to wait for
        # scaled Newton system: (W A W + p·diag(w^(1−p))) s = W ∇f, step = −W s
        system = w[:, None] * a * w[None, :] + xp.diag(p * barrier)
        rhs = w * aw - barrier
        solved = _solve(system, rhs)
        step = -w * solved
        decrement = rhs @ solved  # Newton decrement λ², ≥ 0
        values = _change(w, step, lengths, a, p)
        better = values < 0
        # at the solution even the change cannot resolve the decrease: take the full step
        better[0] = better[0] | ((decrement < 1e-10) & xp.isfinite(values[0]))
        index = (better * 1).argmax()
        if xp is np:
            length = lengths[index] if better.any() else 0.0
        else:  # (a 0-dim tensor index, or a branch, would wait for the device: gather)
            chosen = lengths.gather(0, index.reshape(1))[0]
            length = torch.where(better.any(), chosen, torch.zeros_like(chosen))
        w = w + length * step
    w = xp.where(xp.isfinite(w).all(), w, start)  # never inf/NaN, whatever the input
    w = w * mean ** (-1.0 / (1.0 + p))  # back to the scale of G
    return xp.where(live, w, xp.zeros_like(w))
