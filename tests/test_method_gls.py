"""Geometric loss strategy: the formula by hand, LibMTL's ``GLS`` and torchjd's
``GeometricMean`` on random inputs, and the log transform."""

from __future__ import annotations

import math

import pytest
import torch

import manytask as mt
from manytask.errors import ConfigError
from tests.peers import libmtl_direction, linear_losses, manytask_direction, require


def losses_at_one() -> tuple[torch.nn.Parameter, dict[str, torch.Tensor]]:
    # p = (1, 1); L_a = 2 p0 + p1 = 3 with gradient (2, 1); L_b = p0² = 1 with gradient (2, 0)
    p = torch.nn.Parameter(torch.ones(2))
    return p, {"a": 2 * p[0] + p[1], "b": p[0] ** 2}


def test_weights_and_gradient_by_hand():
    # G = (3·1)^(1/2) = √3; w = G/(T L) = (√3/6, √3/2) = (0.288675, 0.866025)
    # grad = √3/6 (2, 1) + √3/2 (2, 0) = (4√3/3, √3/6) = (2.309401, 0.288675)
    p, losses = losses_at_one()
    step = mt.balance.get("gls", ["a", "b"]).backward(losses)
    r3 = math.sqrt(3)
    assert torch.allclose(step.weights, torch.tensor([r3 / 6, r3 / 2]))
    assert torch.allclose(p.grad, torch.tensor([4 * r3 / 3, r3 / 6]))


def test_a_task_absent_from_the_batch_is_left_out():
    # L = (3, 0, 1): the zero is an absent task; G and T are those of the tasks present,
    # G = √3, w = (√3/6, 0, √3/2), as for the two tasks alone (the product would stop all)
    r3 = math.sqrt(3)
    weights = mt.balance.get("gls", ["a", "b", "c"]).weights(torch.tensor([3.0, 0.0, 1.0]))
    assert torch.allclose(weights, torch.tensor([r3 / 6, 0.0, r3 / 2]))
    none = mt.balance.get("gls", ["a", "b"]).weights(torch.zeros(2))
    assert torch.equal(none, torch.zeros(2))


@pytest.mark.parametrize("seed", range(5))
def test_equals_the_gradient_of_the_geometric_mean(seed):
    # autograd of (Π L)^(1/T) on the same float64 linear losses; manytask's weights are float32
    # (components can cancel): rtol 1e-5, atol 1e-6
    g = torch.Generator().manual_seed(seed)
    t = 2 + seed
    jacobian = torch.randn(t, 5, generator=g, dtype=torch.float64)
    values = torch.rand(t, generator=g, dtype=torch.float64) * 5 + 0.05
    ours = manytask_direction("gls", jacobian, values)
    w, losses = linear_losses(jacobian, values)
    torch.stack(losses).prod().pow(1.0 / t).backward()
    assert torch.allclose(ours, w.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_matches_libmtl_gls(seed):
    # LibMTL back-propagates (Π L)^(1/T) in float32 (its harness builds float32 losses); the
    # difference is float32 rounding of a product of up to six terms: rtol 1e-5.
    require("LibMTL")
    g = torch.Generator().manual_seed(seed)
    t = 2 + seed
    jacobian = torch.randn(t, 6, generator=g, dtype=torch.float64)
    values = torch.rand(t, generator=g, dtype=torch.float64) * 3 + 0.1
    ours = manytask_direction("gls", jacobian, values)
    theirs = libmtl_direction("GLS", jacobian, values).double()
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_matches_torchjd_geometric_mean(seed):
    # torchjd's GeometricMean scalarizer is exp(mean(log L)); its autograd gradient in float64
    # against manytask's float32 weights (components can cancel): rtol 1e-5, atol 1e-6.
    scalarization = require("torchjd.scalarization")
    g = torch.Generator().manual_seed(seed)
    t = 2 + seed
    jacobian = torch.randn(t, 6, generator=g, dtype=torch.float64)
    values = torch.rand(t, generator=g, dtype=torch.float64) * 3 + 0.1
    ours = manytask_direction("gls", jacobian, values)
    w, losses = linear_losses(jacobian, values)
    scalarization.GeometricMean()(torch.stack(losses)).backward()
    assert torch.allclose(ours, w.grad, rtol=1e-5, atol=1e-6)


def test_log_transform_by_hand():
    # values log L with L = (e², e), i.e. (2, 1): G = √2, w = G/(T log L) = (√2/4, √2/2);
    # L_a = e² x, L_b = e y at x = y = 1: ∇ log L_a = (1, 0), ∇ log L_b = (0, 1)
    x = torch.nn.Parameter(torch.ones(2))
    losses = {"a": torch.e**2 * x[0], "b": torch.e * x[1]}
    step = mt.balance.get("gls", ["a", "b"], loss_transform="log").backward(losses)
    r2 = math.sqrt(2)
    assert torch.allclose(step.weights, torch.tensor([r2 / 4, r2 / 2]))
    assert torch.allclose(x.grad, torch.tensor([r2 / 4, r2 / 2]))


def test_zero_and_tiny_losses_give_finite_weights():
    gls = mt.balance.get("gls", ["a", "b", "c"])
    assert torch.isfinite(gls.weights(torch.tensor([0.0, 1.0, 2.0]))).all()
    assert torch.isfinite(gls.weights(torch.tensor([1e-30, 1e3, 1e3]))).all()


def test_takes_no_parameters():
    with pytest.raises(ConfigError, match="unknown key"):
        mt.balance.get("gls", ["a"], power=2)
