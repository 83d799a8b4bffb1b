"""Constant weights: the formula by hand, torchjd's ``Constant`` on random inputs, the log
transform, and the parameter checks."""

from __future__ import annotations

import math

import pytest
import torch

import manytask as mt
from manytask.errors import ConfigError
from tests.peers import manytask_direction, require, torchjd_direction


def losses_at_one() -> tuple[torch.nn.Parameter, dict[str, torch.Tensor]]:
    # p = (1, 1); L_a = 2 p0 + p1 = 3 with gradient (2, 1); L_b = p0² = 1 with gradient (2, 0)
    p = torch.nn.Parameter(torch.ones(2))
    return p, {"a": 2 * p[0] + p[1], "b": p[0] ** 2}


def test_weights_and_gradient_by_hand():
    # w = (1, 3): grad = (2, 1) + 3 (2, 0) = (8, 1)
    p, losses = losses_at_one()
    step = mt.balance.get("constant", ["a", "b"], weights=[1, 3]).backward(losses)
    assert torch.equal(step.weights, torch.tensor([1.0, 3.0]))
    assert torch.allclose(p.grad, torch.tensor([8.0, 1.0]))


def test_zero_weight_drops_a_task():
    # w = (0, 2): grad = 2 (2, 0) = (4, 0)
    p, losses = losses_at_one()
    mt.balance.get("constant", ["a", "b"], weights=[0.0, 2.0]).backward(losses)
    assert torch.allclose(p.grad, torch.tensor([4.0, 0.0]))


def test_log_transform_by_hand():
    # w = (1, 3) on log L: grad = (2, 1)/3 + 3 (2, 0)/1 = (6.666…, 0.333…)
    p, losses = losses_at_one()
    balancer = mt.balance.get("constant", ["a", "b"], weights=[1, 3], loss_transform="log")
    balancer.backward(losses)
    assert torch.allclose(p.grad, torch.tensor([2 / 3 + 6, 1 / 3]))


@pytest.mark.parametrize("seed", range(5))
def test_matches_torchjd_constant(seed):
    # torchjd's Constant combines the rows of J with the given weights; manytask's linear losses
    # give W.grad = Σ wᵢ Jᵢ. The weights pass through float32 in manytask: rtol 1e-6.
    aggregation = require("torchjd.aggregation")
    g = torch.Generator().manual_seed(seed)
    t = 2 + seed
    jacobian = torch.randn(t, 6, generator=g, dtype=torch.float64)
    values = torch.rand(t, generator=g, dtype=torch.float64) + 0.1
    weights = torch.rand(t, generator=g, dtype=torch.float64) * 3
    ours = manytask_direction("constant", jacobian, values, weights=weights.tolist())
    theirs = torchjd_direction(aggregation.Constant(weights), jacobian)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-10)


def test_weights_are_configuration_not_state():
    balancer = mt.balance.get("constant", ["a", "b"], weights=[1.0, 2.0])
    assert "constant_weights" not in balancer.state_dict()
    other = mt.balance.get("constant", ["a", "b"], weights=[5.0, 1.0])
    other.load_state_dict(balancer.state_dict())
    assert torch.equal(other.weights(torch.ones(2)), torch.tensor([5.0, 1.0]))


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0], "one value per task"),
        ([1.0, 2.0, 3.0], "one value per task"),
        ([1.0, -0.5], "finite and ≥ 0"),
        ([1.0, math.nan], "finite and ≥ 0"),
        ([math.inf, 1.0], "finite and ≥ 0"),
        ([0.0, 0.0], "at least one"),
    ],
)
def test_invalid_weights_are_errors(weights, message):
    with pytest.raises(ConfigError, match=message):
        mt.balance.get("constant", ["a", "b"], weights=weights)


def test_weights_are_required():
    with pytest.raises(ConfigError, match="weights"):
        mt.balance.get("constant", ["a", "b"])
