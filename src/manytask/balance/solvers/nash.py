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
paper's assumption. To stay defined without it — a zero gradient, or zero in the convex hull
of the gradients, where no positive solution exists — :func:`power_balance` solves with
:math:`G/\bar g + \epsilon I` (:math:`\bar g` the mean diagonal, :math:`\epsilon = 10^{-12}`, or
:math:`T` times the machine epsilon of a Gramian computed in lower precision: a float32 Gramian of
nearly opposite gradients is often slightly indefinite after rounding),
which moves the weights of independent gradients by a relative :math:`O(\epsilon w_i^2)`, and
gives weight zero to tasks whose gradient is numerically zero (their weight does not change
the direction). With the default 40 Newton steps the relative residual of :math:`Gw = w^{-p}`
is about ``1e-11`` on random problems with 2–40 tasks, and stays below ``1e-8`` (the bias of the
regularisation) on badly conditioned ones (``tests/test_solvers_nash.py``). On a CPU, where
reading a value costs no device synchronisation, the loop stops as soon as the relative residual
is below ``1e-13`` (typically after 5–10 steps).
"""

from __future__ import annotations

import torch
from torch import Tensor

from manytask.balance.solvers.precision import rounding_shift

#: relative diagonal regularisation (see the module docstring); at least ``T·ε`` of the
#: Gramian's dtype, so that one rounded in float32 is still positive definite
EPSILON = 1e-12
_LINE_SEARCH = 30
#: on a CPU the loop stops once every ``|wᵢ(Aw)ᵢ − wᵢ^(1−p)|`` is below this share of
#: ``wᵢ^(1−p)`` (on other devices it runs its fixed number of steps, without host reads)
_RESIDUAL = 1e-13


def _change(w: Tensor, step: Tensor, lengths: Tensor, gramian: Tensor, p: float) -> Tensor:
    """``f(w + tΔ) − f(w)`` for every candidate length ``t``; inf outside the positive orthant.

    Computed as a difference (quadratic part from ``wᵀAΔ`` and ``ΔᵀAΔ``, barrier part through
    ``log1p``/``expm1`` of ``tΔᵢ/wᵢ``), so small decreases are resolved without cancellation
    and no matrix–matrix product is needed.
    """
    ratio = lengths[:, None] * step[None, :] / w[None, :]  # (K, T)
    inside = (ratio > -1).all(dim=-1)
    logs = torch.log1p(torch.where(ratio > -1, ratio, torch.zeros_like(ratio)))
    if p == 1.0:
        reward = logs.sum(dim=-1)  # Σ log(wᵢ + tΔᵢ) − log wᵢ
    else:
        q = 1.0 - p  # Σ ((wᵢ + tΔᵢ)^q − wᵢ^q)/q
        reward = ((w**q)[None, :] * torch.expm1(q * logs)).sum(dim=-1) / q
    a_step = gramian @ step
    quadratic = lengths * (w @ a_step) + 0.5 * lengths * lengths * (step @ a_step)
    value = quadratic - reward
    return torch.where(inside, value, torch.full_like(value, torch.inf))


def power_balance(gramian: Tensor, power: float = 1.0, iterations: int = 40) -> Tensor:
    """The positive ``w`` with ``(G w)ᵢ = wᵢ^(−power)`` (float64; see the module docstring).

    ``power = 1`` gives the Nash bargaining weights of Nash-MTL; ``power = 1/α`` FairGrad's.
    Under ``G → cG`` the weights scale by ``c^(−1/(1+power))``.
    """
    if not power > 0:
        raise ValueError(f"power must be > 0, got {power}")
    g = gramian.double()
    g = 0.5 * (g + g.T)
    t = g.shape[0]
    diagonal = g.diagonal()
    mean = diagonal.sum() / t
    mean = torch.where(mean > 0, mean, torch.ones_like(mean))
    live = diagonal > 1e-12 * diagonal.max().clamp_min(0.0)  # numerically non-zero gradients
    eye = torch.eye(t, dtype=g.dtype, device=g.device)
    a = g / mean + max(EPSILON, rounding_shift(gramian)) * eye
    p = float(power)
    # start: the best multiple c·v of v = 1/sqrt(diag); f(c v) is minimal at
    # c^(1+p) = Σ vᵢ^(1−p) / vᵀAv
    v = torch.rsqrt(a.diagonal())
    c = ((v ** (1.0 - p)).sum() / (v @ a @ v)) ** (1.0 / (1.0 + p))
    w = start = c * v
    lengths = 0.5 ** torch.arange(_LINE_SEARCH, dtype=g.dtype, device=g.device)
    may_stop = g.device.type == "cpu"  # reading a CPU tensor waits for no device
    for _ in range(iterations):
        aw = a @ w
        barrier = w ** (1.0 - p)  # w · h'(w)
        if may_stop and bool(((w * aw - barrier).abs() <= _RESIDUAL * barrier).all()):
            break
        # scaled Newton system: (W A W + p·diag(w^(1−p))) s = W ∇f, step = −W s
        system = w[:, None] * a * w[None, :] + torch.diag(p * barrier)
        rhs = w * aw - barrier
        solved, _ = torch.linalg.solve_ex(system, rhs[:, None])
        solved = torch.where(torch.isfinite(solved).all(), solved, torch.zeros_like(solved))
        step = -w * solved[:, 0]
        decrement = rhs @ solved[:, 0]  # Newton decrement λ², ≥ 0
        values = _change(w, step, lengths, a, p)
        better = values < 0
        # at the solution even the change cannot resolve the decrease: take the full step
        better[0] = better[0] | ((decrement < 1e-10) & torch.isfinite(values[0]))
        index = torch.argmax(better.to(torch.int64))
        chosen = lengths.gather(0, index.reshape(1))[0]  # (a 0-dim tensor index would sync)
        length = torch.where(better.any(), chosen, torch.zeros_like(chosen))
        w = w + length * step
    w = torch.where(torch.isfinite(w).all(), w, start)  # never inf/NaN, whatever the input
    w = w * mean ** (-1.0 / (1.0 + p))  # back to the scale of G
    return torch.where(live, w, torch.zeros_like(w))
