"""``solvers.nash.power_balance``: positive solutions of ``(Gw)ᵢ = wᵢ^(−p)`` (Nash-MTL, FairGrad).

References:

- Nash-MTL: the authors' formulation, re-stated here — a sequence of convex programs
  (concave–convex procedure) on the Gramian divided by its Frobenius norm ``ν``: at the
  iterate ``αₖ``, minimise ``Σᵢ(Ĝα)ᵢ + ∇φ(αₖ)ᵀ(α − αₖ)/ν`` subject to
  ``log αᵢ + log ν + log (Ĝα)ᵢ ≥ 0``, with ``φ(α) = Σᵢ log αᵢ + Σᵢ log (Ĝα)ᵢ``, from
  ``α₀ = 1``, at most 20 rounds (their ``optim_niter``), solved by ECOS as in their code;
- Nash-MTL again: the convex potential ``½αᵀGα − Σ log αᵢ`` minimised by cvxpy/Clarabel;
- FairGrad: ``scipy.optimize.least_squares`` on ``Gw − w^(−1/α)``, as the authors' code.

Measured on these random problems (2–10 tasks): weights within 1e-5 (relative to the largest
weight) of the authors' procedure and 2e-5 of Clarabel's potential minimiser (both limited by
the reference solvers' tolerances), and within 5e-12 of a tightly converged least-squares
solution for FairGrad; the residual of ``Gw = w^(−p)`` of ours is ~1e-11. The tests assert
1e-3, the accuracy asked of the solver.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from manytask.balance.solvers.nash import power_balance
from manytask.balance.solvers.precision import relative_rounding
from tests.peers import require


def random_gramians(count: int, seed: int = 0, conflict: float = 0.5):
    """Gramians of 2–10 linearly independent gradients sharing a common component (so that the
    authors' procedure, which needs ``G1 > 0`` at its start, applies), over five orders of
    magnitude of scale."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        t = int(rng.integers(2, 11))
        p = int(rng.integers(t, 3 * t + 1))
        jacobian = rng.standard_normal((t, p)) + conflict * rng.standard_normal(p)
        jacobian *= 10.0 ** int(rng.integers(-2, 3))
        yield jacobian @ jacobian.T


def authors_ccp(gramian: np.ndarray, rounds: int = 20):
    """Nash-MTL weights by the authors' concave–convex procedure (see the module docstring)."""
    cp = require("cvxpy")
    t = gramian.shape[0]
    nu = np.linalg.norm(gramian)
    g = gramian / nu
    alpha = np.ones(t)
    for _ in range(rounds):
        x = cp.Variable(t, nonneg=True)
        gx = g @ x
        slope = 1.0 / alpha + (1.0 / (g @ alpha)) @ g
        constraints = [cp.log(x[i]) + cp.log(gx[i]) + np.log(nu) >= 0 for i in range(t)]
        problem = cp.Problem(cp.Minimize(cp.sum(gx) + slope @ (x - alpha) / nu), constraints)
        problem.solve(solver=cp.ECOS)
        if x.value is None:
            return None
        step = np.linalg.norm(x.value - alpha)
        alpha = np.asarray(x.value)
        if step < 1e-9:
            break
    return alpha


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def test_hand_example_two_orthogonal_gradients():
    # G = diag(4, 1): (Gw)ᵢ = 1/wᵢ gives 4w₁² = 1 and w₂² = 1, so w = (½, 1), i.e. 1/‖gᵢ‖.
    w = power_balance(torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)))
    assert torch.allclose(w, torch.tensor([0.5, 1.0], dtype=torch.float64), rtol=1e-10)
    # FairGrad with α = 2 (p = ½): 4w₁ = w₁^(−½) → w₁ = 4^(−2/3); w₂ = 1
    w = power_balance(torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)), power=0.5)
    expected = torch.tensor([4.0 ** (-2.0 / 3.0), 1.0], dtype=torch.float64)
    assert torch.allclose(w, expected, rtol=1e-10)


def test_nash_matches_the_authors_procedure():
    require("ecos")
    checked = 0
    worst = 0.0
    for gramian in random_gramians(30):
        if (gramian.sum(axis=1) <= 0).any():  # the authors' start α = 1 is not admissible
            continue
        reference = authors_ccp(gramian)
        assert reference is not None
        ours = power_balance(torch.from_numpy(gramian)).numpy()
        worst = max(worst, relative_error(ours, reference))
        checked += 1
    assert checked >= 15
    assert worst < 1e-3


def test_nash_matches_the_convex_potential_minimiser():
    cp = require("cvxpy")
    worst = 0.0
    for gramian in random_gramians(30, seed=1, conflict=0.0):  # conflicts allowed here
        t = gramian.shape[0]
        scale = np.trace(gramian) / t
        root = np.linalg.cholesky(gramian / scale)
        x = cp.Variable(t)
        objective = 0.5 * cp.sum_squares(root.T @ x) - cp.sum(cp.log(x))
        cp.Problem(cp.Minimize(objective)).solve(solver=cp.CLARABEL)
        reference = np.asarray(x.value) / np.sqrt(scale)
        ours = power_balance(torch.from_numpy(gramian)).numpy()
        worst = max(worst, relative_error(ours, reference))
    assert worst < 1e-3


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_matches_scipy_least_squares(alpha):
    optimize = require("scipy.optimize")
    worst = 0.0
    for gramian in random_gramians(15, seed=2):
        t = gramian.shape[0]
        result = optimize.least_squares(
            lambda x, g=gramian: g @ x - np.power(x, -1.0 / alpha),
            np.full(t, 1.0 / t),
            bounds=(0, np.inf),
            xtol=1e-15,
            ftol=1e-15,
            gtol=1e-15,
        )
        ours = power_balance(torch.from_numpy(gramian), power=1.0 / alpha).numpy()
        worst = max(worst, relative_error(ours, result.x))
    assert worst < 1e-3


def test_residual_is_small():
    gen = torch.Generator().manual_seed(0)
    for power in [0.2, 1.0, 3.0]:
        for _ in range(20):
            t = int(torch.randint(2, 41, (1,), generator=gen))
            p = int(torch.randint(t, 3 * t, (1,), generator=gen))
            jacobian = torch.randn(t, p, generator=gen, dtype=torch.float64)
            gramian = jacobian @ jacobian.T
            w = power_balance(gramian, power)
            residual = (gramian @ w - w ** (-power)) / w ** (-power)
            assert residual.abs().max() < 1e-8  # ~1e-11 observed


def test_scaling_law_and_degenerate_inputs():
    gen = torch.Generator().manual_seed(1)
    jacobian = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    gramian = jacobian @ jacobian.T
    # G → cG scales the weights by c^(−1/(1+p))
    for power in [1.0, 0.5]:
        w = power_balance(gramian, power)
        assert torch.allclose(power_balance(9.0 * gramian, power), w * 9.0 ** (-1 / (1 + power)))
    # a zero gradient gets weight zero and leaves the others' weights unchanged
    padded = torch.zeros(5, 5, dtype=torch.float64)
    padded[1:, 1:] = gramian
    w = power_balance(padded)
    assert w[0] == 0
    assert torch.allclose(w[1:], power_balance(gramian), rtol=1e-8)
    # no positive solution (zero in the convex hull), all-zero: finite
    for g in [torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), torch.zeros(3, 3), torch.ones(3, 3)]:
        assert torch.isfinite(power_balance(g.double())).all()


@pytest.mark.parametrize("angle_gap", [1e-3, 1e-5])
def test_nearly_opposite_float64_gradients_give_the_bisector_of_norm_sqrt2(angle_gap):
    # two tasks: w₂ = w₁√(a/c), w₁ = 1/√(a + b√(a/c)), so d = Jᵀw is the bisector of the unit
    # gradients with norm √2 however close to opposite they are; the weights grow like
    # 1/angle_gap. An absolute floor of 1e-12 on the diagonal (removed) put d off by a relative
    # 2.6e-5 at a gap of 1e-3 and 0.19 at 1e-5; the rounding shift of float64 leaves ~5e-6
    jacobian = torch.tensor(
        [[1.0, 0.0], [-10.0 * math.cos(angle_gap), 10.0 * math.sin(angle_gap)]],
        dtype=torch.float64,
    )
    w = power_balance(jacobian @ jacobian.T)
    units = jacobian / jacobian.norm(dim=1, keepdim=True)
    bisector = units.sum(0)
    exact = math.sqrt(2.0) * bisector / bisector.norm()
    assert ((w @ jacobian - exact).norm() / exact.norm()) < 2e-5


def test_invalid_power():
    with pytest.raises(ValueError, match="power"):
        power_balance(torch.eye(2), power=0.0)


@pytest.mark.parametrize("power", [1.0, 0.5, 2.0])
def test_a_float32_gramian_of_nearly_opposite_gradients_gives_finite_weights(power):
    # met on the toy problem of benchmarks/toy_pareto.py: rounded in float32 this Gramian is
    # indefinite (determinant about −3.5e-9), which made the Newton iteration return NaN
    jacobian = torch.tensor(
        [
            [-0.19870343700144738, -0.0002618950139667824],
            [0.8116635617984869, 0.0012079722166983943],
        ]
    )
    gramian = jacobian @ jacobian.T
    assert torch.linalg.det(gramian.double()) < 0
    w = power_balance(gramian, power=power)
    assert torch.isfinite(w).all() and (w > 0).all()


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_a_float32_gramian_of_gradients_of_unequal_norms_keeps_every_weight_accurate(power):
    # rounding perturbs row i of a float32 Gramian at the scale of Gᵢᵢ, so the shift that keeps
    # it positive definite is relative to Gᵢᵢ: relative to the mean diagonal it moved the weight
    # of the gradient 1000× smaller than the others by 5% (Nash-MTL) and 12% (FairGrad, p = ½)
    optimize = require("scipy.optimize")
    rng = np.random.default_rng(7)
    for spread in (1e2, 1e3):
        rows = rng.standard_normal((4, 64)) + 0.3 * rng.standard_normal(64)
        rows *= np.array([1.0, 3.0, 30.0, spread])[:, None] / np.linalg.norm(rows, axis=1)[:, None]
        jacobian = torch.tensor(rows, dtype=torch.float32)
        gramian = jacobian @ jacobian.T
        w = power_balance(gramian, power=power)
        # the solution for the float32 Gramian itself: least squares on the scale-free residual
        # wᵢ^p (Gw)ᵢ − 1, in float64, without any regularisation
        g = gramian.double().numpy()
        exact = optimize.least_squares(
            lambda x, g=g: x**power * (g @ x) - 1.0,
            power_balance(gramian.double(), power=power).numpy(),
            bounds=(0, np.inf),
            xtol=1e-15,
            ftol=1e-15,
            gtol=1e-15,
        ).x
        assert np.abs(exact**power * (g @ exact) - 1.0).max() < 1e-9
        assert np.allclose(w.numpy(), exact, rtol=1e-5, atol=0.0), spread


@pytest.mark.parametrize("power", [1.0, 0.5, 2.0])
def test_the_numpy_steps_of_a_cpu_equal_the_torch_steps_of_an_accelerator(power):
    """On a CPU power_balance runs its Newton steps in numpy; the torch steps (those of a GPU,
    with every step run) reach the same weights."""
    from manytask.balance.solvers import nash

    gen = torch.Generator().manual_seed(int(power * 10))
    for t in (2, 10, 40):
        jacobian = torch.randn(t, t + 3, generator=gen, dtype=torch.float64)
        gramian = jacobian @ jacobian.T
        on_cpu = power_balance(gramian, power)
        shift = nash.relative_rounding(gramian)
        elsewhere = nash._newton(gramian, power, 40, shift, may_stop=False)
        assert isinstance(on_cpu, torch.Tensor) and on_cpu.dtype == torch.float64
        assert torch.allclose(on_cpu, elsewhere, rtol=1e-9, atol=0)


def test_the_numpy_steps_are_silent_on_a_non_finite_gramian_as_torch_was(recwarn):
    from manytask.balance.solvers import nash

    for value in (float("nan"), float("inf")):
        gramian = torch.full((3, 3), value, dtype=torch.float64)
        w = power_balance(gramian, 1.0)
        expected = nash._newton(gramian, 1.0, 40, nash.relative_rounding(gramian), may_stop=False)
        assert torch.equal(w.isnan(), expected.isnan())
        assert torch.equal(w.nan_to_num(), expected.nan_to_num())
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_two_tasks_in_closed_form_match_the_newton_steps():
    """Nash-MTL's two-task weights on a CPU come from the closed form; they equal the Newton
    iteration's on plain, nearly opposite, unequal-norm, float32 and one-zero Gramians, and
    satisfy ``(Gw)ᵢ = 1/wᵢ``."""
    from manytask.balance.solvers import nash

    gen = torch.Generator().manual_seed(8)
    cases = [torch.randn(2, 5, generator=gen, dtype=torch.float64) for _ in range(20)]
    opposite = torch.randn(1, 5, generator=gen, dtype=torch.float64)
    cases.append(torch.cat([opposite, -opposite + 1e-4 * torch.randn(1, 5, generator=gen)]))
    cases.append(torch.cat([opposite, 1e-3 * torch.randn(1, 5, generator=gen)]))
    cases.append(torch.cat([opposite, torch.zeros(1, 5, dtype=torch.float64)]))
    for index, jacobian in enumerate(cases):
        for dtype in (torch.float64, torch.float32):
            g = (jacobian @ jacobian.T).to(dtype)
            pair = nash._nash_pair(g.double().tolist(), relative_rounding(g))
            assert pair is not None
            newton = nash._newton(g.double().numpy(), 1.0, 80, relative_rounding(g), True)
            # the nearly opposite pair (1 − cos ≈ 5e-9) fixes its weights only to ~1e-8: the
            # rounding of G's entries, divided by that gap
            assert pair == pytest.approx(newton.tolist(), rel=1e-7, abs=0.0)
            assert torch.equal(power_balance(g, 1.0), torch.tensor(pair, dtype=torch.float64))
            if dtype == torch.float64 and index < 20:  # well-conditioned: a tight residual
                w = torch.tensor(pair, dtype=torch.float64)
                live = w > 0
                residual = (g @ w)[live] * w[live] - 1.0
                assert float(residual.abs().max()) < 1e-9
    assert nash._nash_pair([[math.nan, 0.0], [0.0, 1.0]], 0.0) is None
