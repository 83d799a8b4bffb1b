"""MoDo (one batch per step) against its rule by hand, against torchjd's MoDoWeighting fed with
the Gramian, its state and its parameter checks."""

from __future__ import annotations

import pytest
import torch

import manytask as mt
from manytask.balance.aggregation.modo import MoDo
from manytask.errors import ConfigError
from tests.peers import manytask_direction, require

NAMES = ["a", "b"]
J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)


def test_two_steps_by_hand():
    balancer = MoDo(NAMES, gamma=0.1, rho=0.1)
    ones = torch.ones(2, dtype=torch.float64)
    # step 1: G = diag(1, 4), λ = (½, ½): Gλ + ρλ = (0.55, 2.05); λ - 0.1·that = (0.445, 0.295)
    # Π: shift (1 - 0.74)/2 = 0.13 → λ = (0.575, 0.425); d = (0.575, 2·0.425) = (0.575, 0.85)
    assert torch.allclose(balancer.direction(J, ones), torch.tensor([0.575, 0.85]).double())
    # step 2: Gλ + ρλ = (0.575 + 0.0575, 1.7 + 0.0425) = (0.6325, 1.7425)
    # λ - 0.1·that = (0.51175, 0.25075); shift (1 - 0.7625)/2 = 0.11875 → λ = (0.6305, 0.3695)
    # d = (0.6305, 0.739)
    assert torch.allclose(balancer.direction(J, ones), torch.tensor([0.6305, 0.739]).double())
    assert torch.allclose(balancer.task_weights, torch.tensor([0.6305, 0.3695]).double())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("gamma", "rho"), [(0.1, 0.1), (0.01, 0.0)])
def test_matches_torchjd_weighting_on_the_gramian_over_several_steps(seed, gamma, rho):
    aggregation = require("torchjd.aggregation")
    g = torch.Generator().manual_seed(seed)
    t = 4
    jacobians = [torch.randn(t, 9, generator=g, dtype=torch.float64) for _ in range(5)]
    mine = MoDo([f"t{i}" for i in range(t)], gamma=gamma, rho=rho)
    peer = aggregation.MoDoWeighting(gamma=gamma, rho=rho)
    for jacobian in jacobians:
        got = mine.direction(jacobian, torch.ones(t, dtype=torch.float64))
        expected = peer(jacobian @ jacobian.T) @ jacobian
        # the same float64 arithmetic; two exact simplex projections may round differently
        assert torch.allclose(got, expected, atol=1e-12)


def test_matches_torchjd_through_backward():
    aggregation = require("torchjd.aggregation")
    g = torch.Generator().manual_seed(4)
    jacobian = torch.randn(3, 6, generator=g)
    got = manytask_direction("modo", jacobian, torch.ones(3))
    j = jacobian.double()
    expected = aggregation.MoDoWeighting(gamma=0.1, rho=0.1)(j @ j.T) @ j
    assert torch.allclose(got.double(), expected, atol=1e-5)  # float32 Jacobian in manytask


def test_state_dict_resumes_exactly():
    g = torch.Generator().manual_seed(0)
    jacobians = [torch.randn(3, 5, generator=g) for _ in range(3)]
    original = MoDo(["a", "b", "c"])
    for jacobian in jacobians[:2]:
        original.direction(jacobian, torch.ones(3))
    restored = MoDo(["a", "b", "c"])
    restored.load_state_dict(original.state_dict())
    assert torch.equal(
        restored.direction(jacobians[2], torch.ones(3)),
        original.direction(jacobians[2], torch.ones(3)),
    )


def test_a_non_finite_step_leaves_the_state_alone():
    # an AMP overflow gives inf gradients; the scaler skips that step, so must the state
    g = torch.Generator().manual_seed(0)
    jacobian = torch.randn(3, 4, generator=g, dtype=torch.float64)
    losses = torch.rand(3, generator=g, dtype=torch.float64) + 0.1
    balancer = MoDo(["a", "b", "c"])
    balancer.direction(jacobian, losses)
    before = {k: v.clone() for k, v in balancer.state_dict().items() if torch.is_tensor(v)}
    overflow = jacobian.clone()
    overflow[0, 1] = float("inf")
    balancer.direction(overflow, losses)
    after = balancer.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize("params", [{"gamma": 0.0}, {"gamma": -1.0}, {"rho": -0.1}])
def test_invalid_parameters_are_refused(params):
    with pytest.raises(ConfigError, match=next(iter(params))):
        mt.balance.get("modo", NAMES, **params)
