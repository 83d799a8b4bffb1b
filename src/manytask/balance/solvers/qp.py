r"""Small non-negative quadratic programs: block pivoting on a CPU, an interior point in torch.

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

On a CPU the interior point is the fallback, not the first resort. All problems are first
solved together by block principal pivoting (:func:`_pivoting`): guess the support (where
``z > 0``), solve the equality-constrained problem on it exactly (one batched LU solve in
numpy for all columns, a third of torch's batched Cholesky time at ten tasks), move every
coordinate that violates the KKT conditions to the other side, and repeat. Full-rank dual-cone
problems with up to 40 tasks settle in 1 to 4 rounds, and each answer is kept only with a KKT
certificate to ``1e-12``. The problems it cannot certify
(a singular ``A`` on a support, from rank-deficient Gramians or duplicate tasks) go to the
interior point, which on a CPU also tries, every few iterations, the support its iterates point
to (a crossover). On 40 conflicting tasks this takes the projections of UPGrad from 9.4 ms to
0.8 ms on a 2-core CPU. With at most 7 tasks the pivoting is replaced by trying every support
in numpy (:func:`_enumerated`: all ``2^T`` systems in one batched solve, under the same
certificate); on a CPU :func:`dual_cone_weights` runs in numpy from the Gramian to the weights
(with five tasks UPGrad's weights take 0.08 instead of 0.30 ms in torch). With two tasks the
projection has a closed form (:func:`_two_task_projection`; UPGrad's weights 0.05 ms,
DualProj's 0.03 ms).

:func:`dual_cone_weights` uses it for the projection onto the dual cone of the rows of ``J``
(Quinton and Rey, arXiv:2406.16232, Proposition 1): the projection of :math:`J^\top u` is
:math:`J^\top v` with :math:`v = \arg\min_{v \ge u} v^\top G v`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from manytask.balance.solvers.backend import namespace, working
from manytask.balance.solvers.precision import relative_rounding, with_rounding_shift

_FLOAT64_EPS = float(np.finfo(np.float64).eps)
#: relative regularisation of the Newton systems (keeps them positive definite when ``A`` is
#: singular on the free variables; it changes the step, not the fixed point)
_REGULARIZATION = 1e-12
#: on a CPU the iteration stops once the dual residual and the complementarity ``zᵢsᵢ`` are
#: below this (the problem is scaled to a unit mean diagonal); elsewhere it runs its fixed count
_TOLERANCE = 1e-14


#: KKT residuals below this, relative to ``max(1, max|b|)``, certify an answer found on a
#: support (the problem is scaled to a unit mean diagonal of ``A``)
_CERTIFIED = 1e-12
#: on a CPU, rounds of block principal pivoting before the interior point takes over (the
#: dual-cone problems of well-conditioned Gramians with up to 40 tasks settle in 1 to 4 from the
#: guess ``b < 0``; badly conditioned ones take up to about 12)
_PIVOT_ROUNDS = 12
#: rounds a column may exchange all its violating coordinates without lowering their number
_PIVOT_CHANCES = 3
#: on a CPU the interior point tries the support its iterates point to every this many
#: iterations (a try costs about one iteration; most supports are found after 8 to 12)
_CROSSOVER_EVERY = 4
#: on a CPU, problems with at most this many variables try every support at once in numpy
#: (:func:`_enumerated`) instead of pivoting in torch: UPGrad's weights on random conflicting
#: Gramians took 0.06 / 0.08 / 0.12 / 0.24 ms instead of 0.31 / 0.30 / 0.32 / 0.34 ms with 4 / 5
#: / 6 / 7 tasks; with 8 the 256 supports cost more (0.42 against 0.35 ms)
_ENUMERATE_UP_TO = 7


def _support_solve(
    a: npt.NDArray[np.float64], b: npt.NDArray[np.float64], support: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """For each column ``k`` of ``b`` (``(T, K)``), the minimiser that is zero off the support
    ``S = support[:, k]``: ``A_SS z_S = −b_S``, clipped at zero.

    All columns share one batched solve in numpy (on a CPU a numpy round costs a third of
    torch's: 0.04 against 0.12 ms at ten tasks; see :func:`_on_supports`). Returns ``z``,
    whether each column is certified optimal — its system was solved and the KKT conditions
    hold to ``1e-12·max(1, max|b|)``: ``z ≥ 0``, a zero gradient ``Az + b`` on the support, a
    non-negative one off it — and the coordinates that violate them (``z < 0`` on the
    support, a negative gradient off it).
    """
    z, solved = _on_supports(a, b, support)
    tol = _CERTIFIED * np.maximum(np.abs(b).max(axis=0, initial=0.0), 1.0)
    violated = support & (z < -tol) | ~support & (a @ z + b < -tol)
    z = np.maximum(z, 0.0)
    gradient = a @ z + b
    stationary = np.where(support, np.abs(gradient) <= tol, gradient >= -tol).all(axis=0)
    certified = solved & ~violated.any(axis=0) & stationary
    return z, certified, violated & solved


#: from this many variables on, :func:`_on_supports` gathers each system onto its support
#: (below, padding every system to ``T`` costs less than the gathering: 24 against 33 µs for
#: ten columns of ten variables; 48 against 49 µs at 16, 81 against 69 at 20, 550 against 317
#: at 40)
_GATHER_FROM = 16


def _on_supports(
    a: npt.NDArray[np.float64], b: npt.NDArray[np.float64], support: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """``A_SS z_S = −b_S`` for each column of ``b`` with ``S = support[:, k]``, zero off ``S``
    (``(T, K)``), and which systems could be solved, in one batched solve.

    Each system is the identity off its support. With fewer than 16 variables every system is
    ``T × T``; from 16 on, each is gathered onto its support's coordinates (listed first) and
    padded only up to the largest support of the batch: UPGrad's supports at 40 tasks hold 15
    to 26 coordinates, and 26 × 26 systems are solved in less than half the time of 40 × 40.
    """
    t = a.shape[0]
    on = support.T  # (K, T)
    if t < _GATHER_FROM:
        systems = np.where(on[:, :, None] & on[:, None, :], a, np.eye(t))
        answers, solved = _batched_solve(systems, np.where(on, -b.T, 0.0)[:, :, None])
        return np.where(support, answers[:, :, 0].T, 0.0), solved
    sizes = on.sum(axis=1)
    width = int(sizes.max(initial=0))
    order = np.argsort(~on, axis=1, kind="stable")[:, :width]  # the support first
    # slot s beyond a column's support gets a variable of its own, T + s, whose row and column
    # of the extended matrix are those of the identity: one flat gather builds every system
    inside = np.arange(width) < sizes[:, None]
    index = np.where(inside, order, t + np.arange(width))  # (K, m)
    size = t + width
    extended = np.zeros((size, size))
    extended[:t, :t] = a
    extended[t:, t:] = np.eye(width)
    systems = extended.take(index[:, :, None] * size + index[:, None, :])
    column = np.arange(on.shape[0])[:, None]
    rhs = np.concatenate([-b, np.zeros((width, b.shape[1]))]).T[column, index]
    answers, solved = _batched_solve(systems, rhs[:, :, None])
    z = np.zeros((on.shape[0], size))
    z[column, index] = answers[:, :, 0]
    return z[:, :t].T, solved


def _batched_solve(
    systems: npt.NDArray[np.float64], rhs: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """``systems[k] x = rhs[k]`` for every ``k``, and which ones could be solved: one batched
    LU solve, or, when a system in the batch is singular, each on its own (its answer zero)."""
    try:
        answers = np.asarray(np.linalg.solve(systems, rhs), dtype=np.float64)
        return answers, np.ones(systems.shape[0], dtype=np.bool_)
    except np.linalg.LinAlgError:
        answers = np.zeros_like(rhs)
        solved = np.zeros(systems.shape[0], dtype=np.bool_)
        for k in range(systems.shape[0]):
            try:
                answers[k] = np.linalg.solve(systems[k], rhs[k])
                solved[k] = True
            except np.linalg.LinAlgError:
                pass
        return answers, solved


def _enumerated(
    a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """For each column of ``b`` (``(T, K)``, small ``T``), the minimiser found by trying every
    support: solve ``A_SS z_S = −b_S`` on all ``2^T`` supports at once (each system padded with
    the identity off its support) and keep, per column, the first support in the order of its
    bit mask whose answer passes the certificate of :func:`_support_solve`. When a support's
    system is singular every support is solved by pseudo-inverse instead; the certificate still
    decides. Returns the answers and which columns are certified."""
    t, k = b.shape
    on = (np.arange(1 << t)[:, None] >> np.arange(t) & 1).astype(bool)  # (2^T, T)
    systems = np.where(on[:, :, None] & on[:, None, :], a, np.eye(t))
    rhs = np.where(on[:, :, None], -b, 0.0)
    try:
        z = np.linalg.solve(systems, rhs)
    except np.linalg.LinAlgError:  # singular on some support
        z = np.linalg.pinv(systems) @ rhs
    tol = _CERTIFIED * np.maximum(np.abs(b).max(axis=0), 1.0)
    feasible = (z >= -tol).all(axis=1)
    z = z.clip(min=0.0)
    gradient = a @ z + b
    stationary = np.where(on[:, :, None], np.abs(gradient) <= tol, gradient >= -tol).all(axis=1)
    certified = feasible & stationary  # (2^T, K)
    first = certified.argmax(axis=0)
    done = certified.any(axis=0)
    result = np.where(done, z[first, :, np.arange(k)].T, 0.0)
    return result, done


def _pivoting(
    a: npt.NDArray[np.float64],
    b: npt.NDArray[np.float64],
    support: npt.NDArray[np.bool_],
    rounds: int,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Block principal pivoting (Júdice and Pires, *Computers & Operations Research* 21(5),
    1994, with the safeguard of Kim and Park's NNLS, *SIAM J. Sci. Comput.* 33(6), 2011) for
    the columns of ``b`` (``(T, K)``) at once, from the guessed ``support``, in numpy (it runs on
    a CPU only).

    Each round solves on the supports (:func:`_support_solve`); a column it certifies is done.
    In the others every violating coordinate changes sides (a negative ``z`` leaves the
    support, a negative gradient joins it) while that lowers the number of violations, or did
    within the last 3 rounds; otherwise only the violating coordinate of largest index does
    (Murty's rule, which cannot cycle). Returns the answers and which columns are certified; a
    column that is not (a singular ``A_SS``, or ``rounds`` used up) is left to the interior
    point.
    """
    t, k = b.shape
    result = np.zeros_like(b)
    done = np.zeros(k, dtype=bool)
    left = np.arange(k)
    fewest = np.full(k, t + 1)
    chances = np.full(k, _PIVOT_CHANCES)
    index = np.arange(t)[:, None]
    for _ in range(rounds):
        z, certified, violated = _support_solve(a, b[:, left], support)
        result[:, left[certified]] = z[:, certified]
        done[left[certified]] = True
        count = violated.sum(axis=0)
        moving = ~certified & (count > 0)
        if not moving.any():
            break
        fewer = count < fewest
        chances = np.where(fewer, _PIVOT_CHANCES, chances - 1)
        fewest = np.minimum(fewest, count)
        last = np.where(violated, index, -1).max(axis=0)
        swapped = np.where(chances >= 0, violated, index == last)
        keep = moving
        left, support = left[keep], (support ^ swapped)[:, keep]
        fewest, chances = fewest[keep], chances[keep]
    return result, done


def _step_to_boundary(x: Tensor, dx: Tensor) -> Tensor:
    """Largest ``α`` (per column) with ``x + α dx ≥ 0``; ``inf`` when ``dx ≥ 0``."""
    ratio = torch.where(dx < 0, -x / torch.where(dx < 0, dx, -torch.ones_like(dx)), torch.inf)
    return ratio.amin(dim=0)


def _interior_point(a: Tensor, b: Tensor, iterations: int, crossover: bool = False) -> Tensor:
    """The Mehrotra iteration for one problem (``b``: ``(T,)``) or a batch (``(T, K)``).

    With ``crossover`` (CPU only: it reads the certificates), every few iterations the support
    the iterates point to (``z_i > s_i``) is handed to :func:`_support_solve`; the columns it
    certifies are final and leave the batch.
    """
    if crossover:
        columns = b.reshape(b.shape[0], -1)
        result = torch.zeros_like(columns)
        left = torch.arange(columns.shape[1], device=b.device)
        z = torch.ones_like(columns)
        s = torch.ones_like(columns)
        for start in range(0, iterations, _CROSSOVER_EVERY):
            count = min(_CROSSOVER_EVERY, iterations - start)
            z, s = _mehrotra(a, columns[:, left], z, s, count)
            found, sure, _ = _support_solve(a.numpy(), columns[:, left].numpy(), (z > s).numpy())
            exact, certified = torch.from_numpy(found), torch.from_numpy(sure)
            result[:, left[certified]] = exact[:, certified]
            keep = ~certified
            left, z, s = left[keep], z[:, keep], s[:, keep]
            if left.numel() == 0:
                break
        result[:, left] = z
        return result.reshape(b.shape)
    return _mehrotra(a, b, torch.ones_like(b), torch.ones_like(b), iterations)[0]


def _mehrotra(a: Tensor, b: Tensor, z: Tensor, s: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """``iterations`` Mehrotra steps from the primal–dual point ``(z, s)``."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    regularized = a + _REGULARIZATION * eye
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
    return z, s


def nonneg_qp(quadratic: Tensor, linear: Tensor, iterations: int = 25) -> Tensor:
    """``argmin_{z ≥ 0} ½ zᵀ A z + bᵀ z`` for each column ``b`` of ``linear`` (float64).

    Args:
        quadratic: ``A``, a ``(T, T)`` positive semi-definite matrix.
        linear: ``(T,)`` or ``(T, K)``: one problem per column.
        iterations: interior-point iterations.

    The problem must be bounded below (true for every use here). When ``A`` is singular the
    minimiser need not be unique; the interior-point iterates approach the centre of the set of
    minimisers. On a CPU all columns first go through :func:`_pivoting` from the support
    ``b < 0`` (the coordinates whose gradient at zero descends), or, with at most 7 variables,
    :func:`_enumerated` in numpy; the columns they do not certify are solved as one batch by
    the interior-point method (one batched Cholesky factorisation per iteration), with a
    crossover to :func:`_support_solve` every few iterations. Elsewhere the interior point
    solves every column (certificates would read values back to the host).
    """
    a, b = working(quadratic), working(linear)  # numpy on a CPU: _enumerated or _pivoting
    return torch.as_tensor(_solve(a, b, iterations, relative_rounding(quadratic)))


def _solve(a: Any, b: Any, iterations: int, shift: float) -> Any:
    """:func:`nonneg_qp` on numpy arrays (a CPU) or on float64 tensors (an accelerator);
    ``shift`` is the :func:`relative_rounding` of the caller's matrix."""
    xp = namespace(a)
    a = 0.5 * (a + a.T)
    t = a.shape[0]
    # scale the problem so that the average diagonal entry of A is one (A = 0 stays 0)
    scale = a.diagonal().sum() / t
    scale = xp.where(scale > 0, scale, xp.ones_like(scale))
    a = with_rounding_shift(a / scale, shift, t * _FLOAT64_EPS)
    b = b / scale
    columns = b.reshape(t, -1)
    result: Any
    certified: Any
    if xp is not np:
        return _interior_point(a, b, iterations)
    if t <= _ENUMERATE_UP_TO:
        result, certified = _enumerated(a, columns)
    else:
        result, certified = _pivoting(a, columns, columns < 0, _PIVOT_ROUNDS)
    if not certified.all():
        hard = ~certified
        result[:, hard] = _interior_point(
            torch.as_tensor(a), torch.as_tensor(columns[:, hard]), iterations, crossover=True
        )
    return result.reshape(b.shape)


def dual_cone_weights(gramian: Tensor, anchors: Tensor, iterations: int = 25) -> Tensor:
    """Weights of the projections of ``Jᵀ u`` onto the dual cone ``{x : J x ≥ 0}``.

    For each column ``u`` of ``anchors`` (``(T,)`` or ``(T, K)``), returns
    ``v = argmin_{v ≥ u} vᵀ G v`` (float64), so that the projection is ``Jᵀ v``. On a CPU the
    whole computation runs in numpy, whose operations on a few numbers cost a fraction of
    torch's (the interior-point fallback excepted); two tasks are solved in closed form.
    """
    g, u = working(gramian), working(anchors)
    xp = namespace(g)
    if g.shape[0] == 2:
        v = _two_task_projection(g, u)
    else:
        v = u + _solve(g, g @ u, iterations, relative_rounding(gramian))
    # should rounding still leave a problem without a minimiser, keep that anchor unprojected
    # rather than return inf or NaN
    return torch.as_tensor(xp.where(xp.isfinite(v).all(0), v, u))


def _two_task_projection(g: Any, u: Any) -> Any:
    """``argmin_{v ≥ u} vᵀ G v`` for two tasks in closed form, for each column ``u``.

    The gradient of the objective at ``u`` is ``2Gu``, and ``uᵀGu ≥ 0`` keeps its two entries
    from both being negative. Where ``(Gu)₁ < 0``, the minimiser raises ``v₁`` alone to
    ``−G₁₂u₂ / G₁₁``, where ``(Gv)₁ = 0`` (then ``(Gv)₂ = u₂(G₂₂ − G₁₂²/G₁₁) ≥ 0``: KKT holds);
    symmetrically for ``v₂``; elsewhere ``v = u``. So ``vᵢ = max(uᵢ, −G₁₂uⱼ / Gᵢᵢ)``, and a zero
    gradient (``Gᵢᵢ = 0``, hence ``G₁₂ = 0``) leaves its entry at ``uᵢ``. The general solver's
    rounding shift is not needed: nothing here is factorised.
    """
    xp = namespace(g)
    off = 0.5 * (g[0, 1] + g[1, 0])
    diagonal = g.diagonal()[:, None]
    positive = diagonal > 0
    raised = -off * u[[1, 0]] / xp.where(positive, diagonal, 1.0)
    return xp.where(positive, xp.maximum(u, raised), u)
