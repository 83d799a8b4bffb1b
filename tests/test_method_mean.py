"""Mean: the formula by hand, torchjd's ``Mean`` on random inputs, and the log transform."""

from __future__ import annotations

import pytest
import torch

import manytask as mt
from manytask.errors import ConfigError
from tests.peers import manytask_direction, require, torchjd_direction


def losses_at_one() -> tuple[torch.nn.Parameter, dict[str, torch.Tensor]]:
    # p = (1, 1); L_a = 2 p0 + p1 = 3 with gradient (2, 1); L_b = p0² = 1 with gradient (2, 0)
    p = torch.nn.Parameter(torch.ones(2))
    return p, {"a": 2 * p[0] + p[1], "b": p[0] ** 2}


def test_registered_as_a_loss_method():
    balancer = mt.balance.get("mean", ["a", "b"])
    assert balancer.needs is mt.balance.Need.LOSSES
    assert list(balancer.parameters()) == []
    assert balancer.state_dict() == {}


def test_weights_and_gradient_by_hand():
    # w = (1/2, 1/2): grad = ½ (2, 1) + ½ (2, 0) = (2, 0.5)
    p, losses = losses_at_one()
    step = mt.balance.get("mean", ["a", "b"]).backward(losses)
    assert torch.equal(step.weights, torch.tensor([0.5, 0.5]))
    assert torch.allclose(p.grad, torch.tensor([2.0, 0.5]))


def test_log_transform_by_hand():
    # log L: ∇ log L_a = (2, 1)/3, ∇ log L_b = (2, 0)/1; grad = ½ ((2/3, 1/3) + (2, 0)) = (4/3, 1/6)
    p, losses = losses_at_one()
    balancer = mt.balance.get("mean", ["a", "b"], loss_transform="log")
    step = balancer.backward(losses)
    assert torch.equal(step.weights, torch.tensor([0.5, 0.5]))
    assert torch.allclose(p.grad, torch.tensor([4 / 3, 1 / 6]))


@pytest.mark.parametrize("seed", range(5))
def test_matches_torchjd_mean(seed):
    # torchjd's Mean averages the rows of J; manytask's linear losses give W.grad = Σ wᵢ Jᵢ.
    # Both are exact up to float64 rounding of 1/T (manytask's weights are float32): rtol 1e-6.
    aggregation = require("torchjd.aggregation")
    g = torch.Generator().manual_seed(seed)
    t = 2 + seed
    jacobian = torch.randn(t, 7, generator=g, dtype=torch.float64)
    values = torch.rand(t, generator=g, dtype=torch.float64) + 0.1
    ours = manytask_direction("mean", jacobian, values)
    theirs = torchjd_direction(aggregation.Mean(), jacobian)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-12)


def test_takes_no_parameters():
    with pytest.raises(ConfigError, match="unknown key 'weights'"):
        mt.balance.get("mean", ["a"], weights=[1.0])
