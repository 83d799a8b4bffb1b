"""CAGrad against the paper's rule by hand and by brute force, against LibMTL and torchjd, and
its parameter checks."""

from __future__ import annotations

import math

import pytest
import torch

import manytask as mt
from manytask.balance.aggregation.cagrad import CAGrad
from manytask.errors import ConfigError
from tests.peers import libmtl_direction, manytask_direction, require, torchjd_direction


@pytest.mark.parametrize(("rescale", "divisor"), [(0, 1.0), (1, 1.25), (2, 1.5)])
def test_orthogonal_unit_gradients_by_hand(rescale, divisor):
    # g₁ = (1, 0), g₂ = (0, 1): g₀ = (½, ½), ‖g₀‖ = 1/√2. By symmetry w* = (½, ½), so
    # g_w = g₀, λ = c‖g₀‖/‖g_w‖ = c and d = (g₀ + c g₀)/ρ = (1 + c)(½, ½)/ρ.
    # With c = ½: (¾, ¾)/ρ, ρ = 1, 1 + c² = 1.25 or 1 + c = 1.5. Weights (½ + c·½)/ρ each.
    jacobian = torch.eye(2, dtype=torch.float64)
    balancer = CAGrad(["a", "b"], c=0.5, rescale=rescale)
    d = balancer.direction(jacobian, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(d, torch.full((2,), 0.75 / divisor, dtype=torch.float64), atol=1e-7)


@pytest.mark.parametrize("tasks", [2, 4])
def test_the_step_towards_the_worst_task_has_length_c_times_the_mean_gradient(tasks):
    # d = g₀ + λ g_w with λ = c‖g₀‖/‖g_w‖ exactly (rescale 0): ‖d − g₀‖ = c‖g₀‖ however unequal
    # the gradient norms; adding 1e-8 to ‖g_w‖ (in RMS units) shortened it by up to 1e-4
    g = torch.Generator().manual_seed(tasks)
    jacobian = torch.randn(tasks, 2 * tasks, generator=g, dtype=torch.float64)
    jacobian *= torch.logspace(-2, 2, tasks, dtype=torch.float64)[:, None]
    d = CAGrad([f"t{i}" for i in range(tasks)], c=0.5, rescale=0).direction(
        jacobian, torch.ones(tasks, dtype=torch.float64)
    )
    g0 = jacobian.mean(dim=0)
    assert float((d - g0).norm()) == pytest.approx(0.5 * float(g0.norm()), rel=1e-9)


def test_c_zero_is_the_mean():
    jacobian = torch.tensor([[1.0, 2.0], [-3.0, 0.5], [0.0, 1.0]], dtype=torch.float64)
    d = CAGrad(["a", "b", "c"], c=0.0).direction(jacobian, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(d, jacobian.mean(dim=0), atol=1e-9)


def test_primal_optimality_by_brute_force():
    # In two dimensions the primal max_d min_i g_iᵀd over ‖d − g₀‖ ≤ c‖g₀‖ can be solved by
    # scanning the circle d = g₀ + c‖g₀‖(cos θ, sin θ) (the optimum lies on it when c‖g₀‖ does
    # not reach the unconstrained maximiser, which does not exist for a linear min). The
    # direction with rescale=0 must reach the scan's best value (two scans of 10⁵ angles each).
    jacobian = torch.tensor([[2.0, 0.3], [-1.0, 1.0], [0.4, -0.6]], dtype=torch.float64)
    for c in [0.2, 0.5, 0.9]:
        d = CAGrad(["a", "b", "c"], c=c, rescale=0).direction(jacobian, torch.ones(3))
        g0 = jacobian.mean(dim=0)
        radius = c * g0.norm()
        theta = torch.linspace(0, 2 * math.pi, 100_001, dtype=torch.float64)
        for _ in range(2):  # a coarse scan, then a fine one around its best angle
            circle = g0 + radius * torch.stack([theta.cos(), theta.sin()], dim=1)
            values = (circle @ jacobian.T).min(dim=1).values
            best, at = values.max(), theta[values.argmax()]
            step = theta[1] - theta[0]
            theta = torch.linspace(float(at - 2 * step), float(at + 2 * step), 100_001).double()
        # 1e-7: the ‖g_w‖ + 1e-8 of the step length (module docstring) puts d just inside the ball
        assert float((jacobian @ d).min()) == pytest.approx(float(best), abs=1e-7)
        assert float((d - g0).norm()) <= float(radius) * (1 + 1e-7)


def random_inputs(t: int, count: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        p = int(torch.randint(t, 4 * t, (1,), generator=gen))
        jacobian = torch.randn(t, p, generator=gen, dtype=torch.float64)
        yield jacobian, torch.rand(t, generator=gen, dtype=torch.float64) + 0.1


@pytest.mark.filterwarnings("ignore:Solution may be inaccurate")
@pytest.mark.parametrize("c", [0.1, 0.5, 0.9])
def test_matches_torchjd(c):
    """torchjd 0.18's ``CAGrad(c)`` (no rescaling: our ``rescale=0``) solves the same dual with
    cvxpy/Clarabel at its default tolerances. Directions agree to 1e-4 of the largest gradient
    norm (observed ≤ 4.4e-5); where they differ, ours has the larger worst-case improvement
    ``min_i g_iᵀd`` (checked one-sidedly, up to the float32 precision of the engine)."""
    aggregation = require("torchjd.aggregation")
    for t in [2, 3, 5, 8]:
        for jacobian, losses in random_inputs(t, 3, seed=t):
            ours = manytask_direction("cagrad", jacobian, losses, c=c, rescale=0)
            theirs = torchjd_direction(aggregation.CAGrad(c=c), jacobian)
            scale = jacobian.norm(dim=1).max()
            assert (ours - theirs).abs().max() <= 1e-4 * scale
            gain_ours, gain_theirs = (jacobian @ ours).min(), (jacobian @ theirs).min()
            assert gain_ours >= gain_theirs - 1e-6 * scale**2


@pytest.mark.parametrize("rescale", [0, 1, 2])
@pytest.mark.parametrize("c", [0.1, 0.5, 0.9])
def test_matches_libmtl(c, rescale):
    """LibMTL 1.1.5's ``CAGrad`` (its objective is written for exactly three tasks) solves the
    dual with SciPy's SLSQP from the uniform point, at SLSQP's default tolerance (1e-6 on the
    objective), in float32: tolerance 3e-4 of the largest gradient norm (observed ≤ 8e-5)."""
    require("LibMTL")
    for jacobian, losses in random_inputs(3, 3, seed=10):
        ours = manytask_direction("cagrad", jacobian, losses, c=c, rescale=rescale)
        theirs = libmtl_direction("CAGrad", jacobian, losses, calpha=c, rescale=rescale)
        assert (ours - theirs.double()).abs().max() <= 3e-4 * jacobian.norm(dim=1).max()


def test_invalid_parameters():
    with pytest.raises(ConfigError, match="c must be ≥ 0"):
        mt.balance.get("cagrad", ["a", "b"], c=-0.1)
    with pytest.raises(ConfigError, match="rescale must be 0, 1 or 2"):
        mt.balance.get("cagrad", ["a", "b"], rescale=3)
