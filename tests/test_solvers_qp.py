"""The small convex and linear-algebra solvers behind the Gramian methods, against references.

- ``solvers.qp`` (non-negative QP, dual-cone projection) against quadprog through qpsolvers;
- ``solvers.eigh`` (Jacobi eigen-decomposition, pseudo-inverse) against LAPACK;
- ``solvers.cagrad`` (CAGrad's dual) against cvxpy/Clarabel.

Every random problem family mixes full-rank, rank-deficient (more tasks than dimensions),
duplicate, zero and badly scaled gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from manytask.balance.solvers.backend import working
from manytask.balance.solvers.cagrad import cagrad_dual
from manytask.balance.solvers.eigh import psd_pseudo_inverse, symmetric_eigh
from manytask.balance.solvers.precision import relative_rounding
from manytask.balance.solvers.qp import (
    _interior_point,
    _solve,
    _two_task_projection,
    dual_cone_weights,
    nonneg_qp,
)
from tests.peers import require


def random_jacobian(gen: torch.Generator, t: int, p: int, kind: str = "plain") -> torch.Tensor:
    """Gaussian rows with columns scaled over four orders of magnitude and an overall scale."""
    scale = 10.0 ** float(torch.randint(-3, 4, (1,), generator=gen))
    columns = torch.logspace(-2, 2, p, dtype=torch.float64)
    jacobian = torch.randn(t, p, generator=gen, dtype=torch.float64) * columns * scale
    if kind == "duplicate":
        jacobian[1] = jacobian[0]
    elif kind == "zero":
        jacobian[0] = 0.0
    return jacobian


def problems(count: int, max_tasks: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    kinds = ["plain", "duplicate", "zero", "plain"]
    for i in range(count):
        t = int(torch.randint(2, max_tasks + 1, (1,), generator=gen))
        p = int(torch.randint(1, 2 * t + 3, (1,), generator=gen))  # p < t: rank-deficient
        yield random_jacobian(gen, t, p, kinds[i % 4])


# --- non-negative QP and dual-cone projection ------------------------------------------------


def pivoting(g, b, support, rounds):
    """:func:`qp._pivoting` (numpy, a CPU's solver) on tensors, answering tensors."""
    from manytask.balance.solvers import qp

    z, certified = qp._pivoting(g.numpy(), b.numpy(), support.numpy(), rounds)
    return torch.from_numpy(z), torch.from_numpy(certified)


def kkt_residuals(gramian, anchors, v):
    """Violations of v ≥ u, Gv ≥ 0 and (v − u)ᵀ(Gv) = 0, relative to the mean diagonal."""
    scale = (gramian.diagonal().mean()).clamp_min(1e-300)
    s = gramian @ v / scale
    return (
        float((anchors - v).clamp_min(0).max()),
        float((-s).clamp_min(0).max()),
        float(((v - anchors) * s).abs().max()),
    )


def test_nonneg_qp_hand_example():
    # min ½zᵀAz + bᵀz, z ≥ 0 with A = [[2, 0], [0, 1]], b = (−2, 1): the first coordinate is
    # free (2z₁ − 2 = 0 → z₁ = 1), the second is pushed to its bound (gradient 1 > 0 at 0).
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    z = nonneg_qp(a, torch.tensor([-2.0, 1.0], dtype=torch.float64))
    assert torch.allclose(z, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-10)


def test_dual_cone_projection_satisfies_kkt_on_hard_problems():
    # 20 interior-point iterations reach the float64 floor; the default is 25
    worst = [0.0, 0.0, 0.0]
    for jacobian in problems(120, 40):
        gramian = jacobian @ jacobian.T
        t = gramian.shape[0]
        anchors = torch.eye(t, dtype=torch.float64) / t
        v = dual_cone_weights(gramian, anchors, iterations=20)
        assert torch.isfinite(v).all()
        worst = [max(a, b) for a, b in zip(worst, kkt_residuals(gramian, anchors, v), strict=True)]
    assert worst[0] == 0.0  # v ≥ u exactly: interior iterates
    assert worst[1] < 1e-12
    assert worst[2] < 1e-11


def test_dual_cone_projection_matches_quadprog():
    """Same direction Jᵀv as quadprog's solution of ``min vᵀGv s.t. v ≥ u``.

    quadprog needs a positive definite matrix, so it gets ``G/mean(diag) + 1e-13·I``; on
    full-rank problems that changes nothing measurable and the directions agree to 1e-8 of the
    largest gradient norm. On rank-deficient problems the comparison is by objective value
    (quadprog's own KKT residuals there are ~1e-10, larger than ours): ours is never worse.
    """
    require("quadprog")
    qpsolvers = require("qpsolvers")
    worst_direction = 0.0
    for jacobian in problems(80, 12, seed=1):
        gramian = jacobian @ jacobian.T
        t = gramian.shape[0]
        g = (gramian / gramian.diagonal().mean().clamp_min(1e-300)).numpy()
        full_rank = jacobian.shape[1] >= t and bool(jacobian.norm(dim=1).min() > 0)
        anchors = torch.eye(t, dtype=torch.float64)
        ours = dual_cone_weights(gramian, anchors)
        for i in range(min(t, 3)):
            ref = qpsolvers.solve_qp(
                g + 1e-13 * np.eye(t),
                np.zeros(t),
                -np.eye(t),
                -anchors[:, i].numpy(),
                solver="quadprog",
            )
            if ref is None:  # quadprog refuses some singular problems
                continue
            ref_v = torch.from_numpy(ref)
            if full_rank:
                diff = (ours[:, i] - ref_v) @ jacobian
                worst_direction = max(
                    worst_direction, float(diff.norm() / jacobian.norm(dim=1).max())
                )
            else:
                ours_obj = float(ours[:, i] @ torch.from_numpy(g) @ ours[:, i])
                ref_obj = float(ref_v @ torch.from_numpy(g) @ ref_v)
                assert ours_obj <= ref_obj * (1 + 1e-8) + 1e-12
    assert worst_direction < 1e-8


def test_nonneg_qp_batches_independent_problems():
    # nonneg_qp loops over the columns on the CPU and batches them elsewhere: both paths agree
    gen = torch.Generator().manual_seed(3)
    jacobian = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    gramian = jacobian @ jacobian.T
    linear = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    looped = nonneg_qp(gramian, linear)
    scale = gramian.diagonal().mean()
    batched = _interior_point(gramian / scale, linear / scale, 25)  # the accelerator path
    for k in range(4):
        single = nonneg_qp(gramian, linear[:, k])
        assert torch.allclose(looped[:, k], single, atol=1e-12)
        assert torch.allclose(batched[:, k], single, atol=1e-10)


def test_nonneg_qp_all_zero_problem_is_finite():
    z = nonneg_qp(torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    assert torch.isfinite(z).all()


# --- Jacobi eigen-decomposition --------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 20, 40])
def test_jacobi_eigh_matches_lapack(n):
    """Eigenvalues to 1e-13 of the largest and the reconstruction ``V diag(λ) Vᵀ`` to 1e-12 of
    the largest entry, on rank-deficient Gramians whose entries span twelve orders of
    magnitude (duplicates included) — the hardest case for Jacobi's method."""
    gen = torch.Generator().manual_seed(n)
    for trial in range(10):
        k = int(torch.randint(1, n + 3, (1,), generator=gen))
        jacobian = torch.randn(n, k, generator=gen, dtype=torch.float64)
        jacobian = jacobian * torch.logspace(-3, 3, k, dtype=torch.float64)
        if trial % 3 == 0 and n > 1:
            jacobian[1] = jacobian[0]
        gramian = jacobian @ jacobian.T
        values, vectors = symmetric_eigh(gramian, jacobi=True)
        reference = torch.linalg.eigvalsh(gramian)
        top = reference.abs().max()
        assert (values - reference).abs().max() <= 1e-13 * top
        rebuilt = (vectors * values) @ vectors.T
        assert (rebuilt - gramian).abs().max() <= 1e-12 * gramian.abs().max()
        assert torch.allclose(vectors.T @ vectors, torch.eye(n, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("jacobi", [True, None, "numpy"])
def test_psd_pseudo_inverse_matches_torch(jacobi):
    gen = torch.Generator().manual_seed(0)
    for t, k in [(4, 6), (6, 3), (5, 5)]:
        jacobian = torch.randn(t, k, generator=gen, dtype=torch.float64)
        gramian = jacobian @ jacobian.T
        if jacobi == "numpy":  # a CPU's path: LAPACK through numpy
            ours = torch.from_numpy(psd_pseudo_inverse(gramian.numpy(), rtol=1e-10))
        else:
            ours = psd_pseudo_inverse(gramian, rtol=1e-10, jacobi=jacobi)
        reference = torch.linalg.pinv(gramian, hermitian=True, rtol=1e-10)
        assert torch.allclose(ours, reference, atol=1e-9 * float(reference.abs().max()))


# --- CAGrad's dual ---------------------------------------------------------------------------


def _direction(jacobian, w, radius):
    x = w @ jacobian
    return jacobian.mean(dim=0) + radius * x / x.norm()


@pytest.mark.filterwarnings("ignore:Solution may be inaccurate")
def test_cagrad_dual_is_at_least_as_good_as_clarabel():
    """The primal value ``min_i g_iᵀd`` of our direction is not below cvxpy/Clarabel's (asked
    for tolerances of 1e-12), and the two directions agree to 1e-5 of the largest gradient norm.

    Clarabel stops at its own accuracy (where the directions differ, by up to a few 1e-6, its
    primal value is the lower one), so the comparison is one-sided on the value and loose on
    the direction. When the convex hull of the gradients nearly contains zero (``‖g_w‖ <
    1e-3``), ``d = g₀ + r g_w/‖g_w‖`` amplifies any error in ``w`` by ``1/‖g_w‖`` and only
    the value is compared, to 1e-6.
    """
    cp = require("cvxpy")
    worst = 0.0
    for i, jacobian in enumerate(problems(40, 12, seed=2)):
        t = jacobian.shape[0]
        gramian = jacobian @ jacobian.T
        scale = gramian.diagonal().mean()
        if not scale > 0:
            continue
        g = gramian / scale
        j = jacobian / scale.sqrt()
        c = [0.1, 0.5, 0.9, 2.0][i % 4]
        radius = c * torch.sqrt(g.sum().clamp_min(0)) / t
        ours = cagrad_dual(g, radius)
        values, vectors = np.linalg.eigh(g.numpy())
        root = vectors * np.sqrt(np.clip(values, 0, None))
        w = cp.Variable(t)
        objective = g.numpy().sum(axis=1) / t @ w + float(radius) * cp.norm(root.T @ w, 2)
        problem = cp.Problem(cp.Minimize(objective), [w >= 0, cp.sum(w) == 1])
        problem.solve(cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        reference = torch.from_numpy(np.asarray(w.value))
        hull_distance = float((reference @ g @ reference).clamp_min(0).sqrt())  # ‖g_w‖
        if hull_distance < 1e-6:  # zero in the hull: d is not unique
            continue
        d_ours = _direction(j, ours, radius)
        d_ref = _direction(j, reference, radius)
        value_ours, value_ref = float((j @ d_ours).min()), float((j @ d_ref).min())
        if hull_distance > 1e-3:
            assert value_ours >= value_ref - 1e-9
            worst = max(worst, float((d_ours - d_ref).norm() / j.norm(dim=1).max()))
        else:  # nearly Pareto-stationary: d = g₀ + r g_w/‖g_w‖ is ill-conditioned in w
            assert value_ours >= value_ref - 1e-6
    assert worst < 1e-5


def test_cagrad_dual_hand_example():
    # Two orthogonal unit gradients: g₀ = (½, ½), ‖g₀‖ = 1/√2. By symmetry w = (½, ½), so
    # g_w = g₀ and the dual objective is g₀ᵀg₀ + r‖g₀‖ at the symmetric point.
    w = cagrad_dual(torch.eye(2, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64))
    assert torch.allclose(w, torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-9)
    # Opposite gradients: the hull contains zero, and the minimiser of g_wᵀg₀ + r‖g_w‖ with
    # g₀ = 0 is g_w = 0, i.e. w = (½, ½).
    opposite = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    w = cagrad_dual(opposite, torch.tensor(0.0, dtype=torch.float64))
    assert torch.isfinite(w).all()
    assert torch.allclose(w, torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-6)


def test_cagrad_dual_is_finite_on_degenerate_input():
    for g in [torch.zeros(3, 3), torch.ones(3, 3), torch.diag(torch.tensor([1.0, 0.0, 0.0]))]:
        for radius in [0.0, 0.5]:
            w = cagrad_dual(g.double(), torch.tensor(radius, dtype=torch.float64))
            assert torch.isfinite(w).all()
            assert float(w.sum()) == pytest.approx(1.0, abs=1e-9)


# --- no host synchronisation ------------------------------------------------------------------

GRAMIAN_METHODS = [
    "upgrad",
    "dualproj",
    "cagrad",
    "nash_mtl",
    "fairgrad",
    "imtl_g",
    "imtl",
    "aligned_mtl",
    "krum",
    "config",
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", GRAMIAN_METHODS)
def test_weights_do_not_synchronise_a_cuda_device(name):
    """Every method built on these solvers computes its weights without a device-to-host
    synchronisation (``torch.cuda.set_sync_debug_mode("error")`` raises on one). A first call
    warms up the cached index tensors of the Jacobi solver."""
    import manytask as mt

    balancer = mt.balance.get(name, ["a", "b", "c", "d"]).cuda()
    jacobian = torch.randn(4, 9, device="cuda")
    gramian, losses = jacobian @ jacobian.T, torch.rand(4, device="cuda") + 0.1
    balancer.weights(gramian, losses)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        weights = balancer.weights(gramian, losses)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(weights).all()


def test_cagrad_dual_two_tasks_closed_form_matches_a_grid_search():
    # the closed form is at least as good as the best of 20,001 points of the segment
    g = torch.Generator().manual_seed(7)
    gamma = torch.linspace(0, 1, 20_001, dtype=torch.float64)
    grid = torch.stack([gamma, 1 - gamma], dim=1)
    for i in range(200):
        jac = torch.randn(2, 5, generator=g, dtype=torch.float64)
        if i % 3 == 0:  # opposite directions: zero is in the hull
            jac[1] = -jac[0] * torch.rand(1, generator=g, dtype=torch.float64)
        gram = jac @ jac.T
        gram = gram / gram.diagonal().mean()
        radius = 2 * torch.rand((), generator=g, dtype=torch.float64)
        a = gram.sum(dim=1) / 2
        w = cagrad_dual(gram, radius)
        value = a @ w + radius * torch.sqrt((w @ gram @ w).clamp_min(0))
        values = grid @ a + radius * torch.sqrt(((grid @ gram) * grid).sum(1).clamp_min(0))
        assert float(value) <= float(values.min()) + 1e-12


def test_dual_cone_weights_of_a_float32_gramian_of_nearly_opposite_gradients_are_finite():
    # met on the toy problem of benchmarks/toy_pareto.py: rounded in float32 this Gramian is
    # indefinite (determinant about −1.6e-11), which made the QP unbounded (inf weights)
    jacobian = torch.tensor(
        [[-0.03956903215788562, 7.78914687855236e-05], [2.4030523856606414, -0.005532107036450387]]
    )
    gramian = jacobian @ jacobian.T
    assert torch.linalg.det(gramian.double()) < 0
    v = dual_cone_weights(gramian, torch.eye(2))
    assert torch.isfinite(v).all()
    # the dual cone of two nearly opposite gradients is nearly a line through 0: the
    # projections are small, not blown up
    directions = v.T.to(jacobian.dtype) @ jacobian
    assert directions.norm(dim=1).max() <= jacobian.norm(dim=1).max()


@pytest.mark.parametrize("tasks", [4, 12])
def test_dual_cone_weights_of_a_float32_gramian_of_unequal_norms_match_float64(tasks):
    # the rounding shift is relative to each diagonal entry: relative to the mean it moved
    # UPGrad's projections by 1.5% of ‖d‖ when one gradient was 1,000× longer than another
    rng = np.random.default_rng(3)
    norms = np.geomspace(1.0, 1e3, tasks)
    rows = rng.standard_normal((tasks, 80)) - 0.5 * rng.standard_normal(80)
    rows *= (norms / np.linalg.norm(rows, axis=1))[:, None]
    jacobian = torch.tensor(rows, dtype=torch.float32)
    gramian = jacobian @ jacobian.T
    anchors = torch.eye(tasks)
    single = dual_cone_weights(gramian, anchors)
    double = dual_cone_weights(gramian.double(), anchors.double())
    g = jacobian.double()
    d_single, d_double = g.T @ single.sum(1), g.T @ double.sum(1)
    error = (g @ (d_single - d_double)).abs() / g.norm(dim=1) / d_double.norm()
    assert float(error.max()) < 1e-5


def test_cagrad_active_set_certifies_full_rank_problems_and_matches_the_barrier_method():
    """On full-rank Gramians (3–40 tasks, shared components of several sizes) the CPU
    active-set method returns a certified answer, whose objective is not above the barrier
    method's and whose weights agree with it to 1e-6; a rank-deficient Gramian is left to the
    barrier method (``None``)."""
    from manytask.balance.solvers import cagrad as solver

    gen = torch.Generator().manual_seed(11)
    for i in range(60):
        t = int(torch.randint(3, 41, (1,), generator=gen))
        p = int(torch.randint(t, 3 * t, (1,), generator=gen))
        common = torch.randn(1, p, generator=gen, dtype=torch.float64) * [0.0, 1.0, 3.0][i % 3]
        jacobian = random_jacobian(gen, t, p) + common * random_jacobian(gen, 1, p).abs().mean()
        g = jacobian @ jacobian.T
        g = g / g.diagonal().mean()
        a = g.sum(dim=1) / t
        radius = [0.1, 0.5, 0.9][i % 3] * torch.sqrt(g.sum()) / t
        found = solver._active_set(g.numpy(), a.numpy(), float(radius))
        assert found is not None, i
        fast = torch.from_numpy(found)
        values = []
        for w in (fast, solver._barrier(g, a, radius, 80, 10.0, 1e13)):
            values.append(float(a @ w + radius * torch.sqrt(w @ g @ w)))
        assert values[0] <= values[1] + 1e-12 * max(1.0, abs(values[1]))
        assert float(fast.sum()) == pytest.approx(1.0, abs=1e-12)
        assert float(fast.min()) >= 0.0
    deficient = random_jacobian(gen, 6, 3)
    g = deficient @ deficient.T
    g = g / g.diagonal().mean()
    assert solver._active_set(g.numpy(), g.sum(dim=1).numpy() / 6, 0.5) is None


def test_pivoting_certifies_full_rank_problems_and_matches_the_interior_point():
    """Block principal pivoting answers the dual-cone problems of a full-rank Gramian (2–40
    tasks, all anchors in one batch): every answer it certifies has ``z ≥ 0`` exactly, a
    non-negative gradient and an objective not above the interior-point method's (the columns
    of these Jacobians span four orders of magnitude, so the minimisers themselves agree only
    to ~1e-7). With enough rounds it certifies nearly all of them; those of well-conditioned
    Gramians within the default rounds."""
    from manytask.balance.solvers import qp

    gen = torch.Generator().manual_seed(12)
    certified_total = problems_total = 0
    for _ in range(40):
        t = int(torch.randint(2, 41, (1,), generator=gen))
        jacobian = random_jacobian(gen, t, t + int(torch.randint(0, 2 * t, (1,), generator=gen)))
        g = jacobian @ jacobian.T
        g = g / g.diagonal().mean()
        g = 0.5 * (g + g.T)
        b = g / t  # the dual-cone problems of the anchors e_k / T
        fast, certified = pivoting(g, b, b < 0, 60)
        certified_total += int(certified.sum())
        problems_total += t
        fast, b_ok = fast[:, certified], b[:, certified]
        assert (fast >= 0).all()
        assert float((g @ fast + b_ok).clamp_max(0).abs().sum()) <= 1e-10
        reference = qp._interior_point(g, b_ok, 40)
        objective = [0.5 * (z * (g @ z)).sum(0) + (b_ok * z).sum(0) for z in (fast, reference)]
        assert (objective[0] <= objective[1] + 1e-14 * objective[1].abs().clamp_min(1.0)).all()
    assert certified_total >= 0.95 * problems_total
    for t in (2, 10, 40):  # Gaussian gradients: well conditioned, half the pairs conflicting
        jacobian = torch.randn(t, 4 * t, generator=gen, dtype=torch.float64)
        g = jacobian @ jacobian.T
        _, certified = pivoting(g, g / t, g < 0, qp._PIVOT_ROUNDS)
        assert certified.all(), t


def test_pivoting_leaves_singular_supports_to_the_interior_point():
    from manytask.balance.solvers import qp

    duplicate = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[-1.0], [-1.0]], dtype=torch.float64)
    # both coordinates descend at zero: the guess {0, 1} is singular and is not certified
    _, certified = pivoting(duplicate, b, b < 0, qp._PIVOT_ROUNDS)
    assert not certified.any()
    # nonneg_qp hands it to the interior point, which finds a minimiser (z₀ + z₁ = 1)
    z = nonneg_qp(duplicate, b[:, 0])
    assert float(z.sum()) == pytest.approx(1.0, abs=1e-9) and (z >= 0).all()
    # one coordinate on the support is regular: pivoting finds z = (1, 0) from that guess
    z, certified = pivoting(duplicate, b, torch.tensor([[True], [False]]), 1)
    assert certified.all() and z[:, 0].tolist() == [1.0, 0.0]


def test_systems_gathered_onto_their_supports_solve_as_the_padded_ones(monkeypatch):
    """From 16 variables on, :func:`qp._on_supports` gathers each system onto its support; the
    answers equal those of the systems padded to ``T`` (one column has an empty support, one a
    singular ``A_SS`` — two equal gradients — which both forms report as unsolved)."""
    from manytask.balance.solvers import qp

    gen = np.random.default_rng(3)
    t = 24
    jacobian = gen.standard_normal((t, 3 * t))
    jacobian[1] = jacobian[0]
    a = jacobian @ jacobian.T
    b = gen.standard_normal((t, 9))
    support = gen.random((t, 9)) < 0.5
    support[:, 0] = False  # empty
    support[:2, 1] = True  # holds the two equal rows: singular
    gathered = qp._on_supports(a, b, support)
    monkeypatch.setattr(qp, "_GATHER_FROM", t + 1)
    padded = qp._on_supports(a, b, support)
    assert gathered[1].tolist() == padded[1].tolist() and not gathered[1][1]
    assert np.allclose(gathered[0], padded[0], rtol=1e-9, atol=1e-12)
    assert (gathered[0][~support] == 0).all() and (gathered[0][:, 0] == 0).all()
    # the solved columns satisfy their systems
    for k in np.flatnonzero(gathered[1]):
        on = support[:, k]
        assert np.allclose(a[np.ix_(on, on)] @ gathered[0][on, k], -b[on, k])


def test_interior_point_crossover_gives_the_plain_iterations_answer():
    """The CPU crossover returns certified answers on a support; on rank-deficient problems
    (where minimisers need not be unique) the directions ``Jᵀz`` still agree with the plain
    interior point's."""
    from manytask.balance.solvers import qp

    for jacobian in problems(30, 12, seed=5):
        t = jacobian.shape[0]
        g = jacobian @ jacobian.T
        scale = g.diagonal().mean().clamp_min(1e-300)
        g = 0.5 * (g + g.T) / scale
        b = g / t
        plain = qp._interior_point(g, b, 40)
        crossed = qp._interior_point(g, b, 40, crossover=True)
        unit = jacobian / scale.sqrt()
        difference = (unit.T @ (plain - crossed)).abs().max()
        assert float(difference) <= 1e-6 * max(1.0, float(unit.abs().max()))


def test_enumerated_supports_certify_small_problems_as_the_pivoting_does():
    """With at most 7 variables every support is tried: the certified answers satisfy the KKT
    conditions and equal the pivoting's (full rank) or give the interior point's objective and
    direction (duplicate tasks, where the minimiser is not unique); all-zero problems give 0."""
    from manytask.balance.solvers import qp

    gen = torch.Generator().manual_seed(8)
    for t in (1, 2, 3, 5, 7):
        for _ in range(30):
            jacobian = random_jacobian(gen, t, t + 3)
            g = jacobian @ jacobian.T
            g = 0.5 * (g + g.T) / g.diagonal().mean()
            b = g / t
            found, certified = qp._enumerated(g.numpy(), b.numpy())
            z = torch.from_numpy(found)
            assert certified.all()
            assert (z >= 0).all() and float((g @ z + b).clamp_max(0).abs().sum()) <= 1e-10
            pivoted, sure = pivoting(g, b, b < 0, 60)
            assert torch.allclose(z[:, sure], pivoted[:, sure], atol=1e-9)
    twin = torch.randn(1, 5, generator=gen, dtype=torch.float64)
    jacobian = torch.cat([twin, twin, -twin])  # duplicate and opposite tasks: rank one
    g = jacobian @ jacobian.T
    b = g / 3
    found, certified = qp._enumerated(g.numpy(), b.numpy())
    reference = qp._interior_point(g, b, 40)
    for z in (torch.from_numpy(found), reference):
        direction = jacobian.T @ (z + torch.eye(3, dtype=torch.float64) / 3)
        assert torch.allclose(direction, torch.zeros(5, 3, dtype=torch.float64), atol=1e-7)
    assert certified.all()
    zero, certified = qp._enumerated(np.zeros((2, 2)), np.zeros((2, 2)))
    assert certified.all() and not zero.any()


def test_two_task_projection_in_closed_form_satisfies_kkt_and_matches_the_general_solver():
    """Two tasks take vᵢ = max(uᵢ, −G₁₂uⱼ / Gᵢᵢ); on plain, duplicate, exactly opposite and
    zero gradients it satisfies the KKT conditions and gives the general solver's direction."""
    gen = torch.Generator().manual_seed(5)
    worst = [0.0, 0.0, 0.0]
    for i in range(400):
        kind = ["plain", "duplicate", "zero", "plain"][i % 4]
        jacobian = random_jacobian(gen, 2, 1 + i % 4, kind)
        if i % 5 == 0:  # exactly opposite, of unequal norms
            jacobian[1] = -3.0 * jacobian[0]
        gramian = jacobian @ jacobian.T
        anchors = torch.rand(2, 3, generator=gen, dtype=torch.float64)
        v = dual_cone_weights(gramian, anchors)
        worst = [max(a, b) for a, b in zip(worst, kkt_residuals(gramian, anchors, v), strict=True)]
        g, u = working(gramian), working(anchors)
        general = u + _solve(g, g @ u, 25, relative_rounding(gramian))
        difference = jacobian.T @ (v - torch.as_tensor(general))
        assert float(difference.abs().max()) <= 1e-8 * float(jacobian.abs().max()) + 1e-300
        assert torch.equal(v, torch.as_tensor(_two_task_projection(g, u)))  # the path taken
    assert worst[0] == 0.0
    assert worst[1] < 1e-13
    assert worst[2] < 1e-13


def test_two_task_projection_by_hand():
    # G = [[1, −2], [−2, 9]], u = (0.2, 0.6): (Gu)₁ = 0.2 − 1.2 < 0 raises v₁ to 2·0.6/1 = 1.2,
    # where (Gv)₁ = 0 and (Gv)₂ = −2.4 + 5.4 = 3 ≥ 0; (Gu)₂ = −0.4 + 5.4 > 0 leaves v₂ = u₂
    gramian = torch.tensor([[1.0, -2.0], [-2.0, 9.0]], dtype=torch.float64)
    v = dual_cone_weights(gramian, torch.tensor([[0.2], [0.6]], dtype=torch.float64))
    assert torch.allclose(v[:, 0], torch.tensor([1.2, 0.6], dtype=torch.float64))


@pytest.mark.parametrize("name", ["cagrad", "config", "imtl_g"])
def test_the_numpy_rule_of_a_cpu_equals_the_torch_rule_of_an_accelerator(name):
    """CAGrad's, ConFIG's and IMTL-G's weights run in numpy on a CPU and in torch elsewhere;
    the same code on a float64 tensor (the accelerators' path, here on the CPU) gives the same
    weights on plain, duplicate, zero and rank-deficient Gramians."""
    from manytask.balance.aggregation.cagrad import _cagrad
    from manytask.balance.aggregation.config import _config
    from manytask.balance.aggregation.imtl import _imtl_g

    rule = {
        "cagrad": lambda g: _cagrad(g, 0.5, 1),
        "config": lambda g: _config(g, relative_rounding(torch.as_tensor(g))),
        "imtl_g": lambda g: _imtl_g(g, relative_rounding(torch.as_tensor(g))),
    }[name]
    for jacobian in problems(24, 8, seed=11):
        g = jacobian @ jacobian.T
        host = rule(g.numpy())
        device = rule(g)
        assert isinstance(host, np.ndarray) and isinstance(device, torch.Tensor)
        assert np.allclose(host, device.numpy(), rtol=1e-8, atol=1e-10), (name, host, device)
