"""MoCo against the paper's updates by hand, its step-size decay, its lazily sized state and
its parameter checks. (Neither installed peer implements MoCo: LibMTL 1.1.5 predates it and
torchjd 0.18 has none.)"""

from __future__ import annotations

import math

import pytest
import torch

import manytask as mt
from manytask.balance.aggregation.moco import MoCo
from manytask.balance.solvers.simplex import project_simplex
from manytask.errors import ConfigError
from tests.peers import linear_losses

NAMES = ["a", "b"]
J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
ONES = torch.ones(2, dtype=torch.float64)


def test_two_steps_by_hand_with_constant_rates():
    balancer = MoCo(NAMES, beta=0.5, beta_sigma=0.0, gamma=0.1, gamma_sigma=0.0)
    # step 1: y = 0 - ½(0 - J) = ½J = [[0.5, 0], [0, 1]]; YYᵀ = diag(0.25, 1)
    # λ = Π((½, ½) - 0.1·(0.125, 0.5)) = Π((0.4875, 0.45)) = (0.51875, 0.48125)  (shift +0.03125)
    # d = λᵀY = (0.51875·0.5, 0.48125·1) = (0.259375, 0.48125)
    d1 = balancer.direction(J, ONES)
    assert torch.allclose(balancer.tracking, 0.5 * J)
    assert torch.allclose(balancer.task_weights, torch.tensor([0.51875, 0.48125]).double())
    assert torch.allclose(d1, torch.tensor([0.259375, 0.48125]).double())
    # step 2, same J: y = ½y + ½J = ¾J = [[0.75, 0], [0, 1.5]]; YYᵀ = diag(0.5625, 2.25)
    # YYᵀλ = (0.2917969, 1.0828125); λ - 0.1·YYᵀλ = (0.4895703, 0.3729688), sum 0.8625391
    # shift (1 - 0.8625391)/2 = 0.0687305 → λ = (0.5583008, 0.4416992)
    # d = (0.75·0.5583008, 1.5·0.4416992) = (0.4187256, 0.6625488)
    d2 = balancer.direction(J, ONES)
    assert torch.allclose(balancer.task_weights, torch.tensor([0.5583008, 0.4416992]).double())
    assert torch.allclose(d2, torch.tensor([0.4187256, 0.6625488]).double())


def test_step_sizes_decay_with_the_step_count():
    balancer = MoCo(NAMES)  # β = 0.5, σ_β = 0.5, γ = 0.1, σ_γ = 0.5
    balancer.direction(J, ONES)
    lam1 = balancer.task_weights.clone()
    balancer.direction(J, ONES)
    # k = 2: β₂ = 0.5/√2 = 0.353553 → y = ½J - β₂(½J - J) = (0.5 + 0.176777) J = 0.676777 J
    beta2 = 0.5 / math.sqrt(2.0)
    assert torch.allclose(balancer.tracking, (0.5 + 0.5 * beta2) * J)
    # γ₂ = 0.1/√2 on the Gramian of the new y
    y = balancer.tracking
    expected = project_simplex(lam1 - 0.1 / math.sqrt(2.0) * ((y @ y.T) @ lam1))
    assert torch.allclose(balancer.task_weights, expected)
    assert int(balancer.step) == 2


def test_rho_regularises_the_weight_step():
    # after one step λ is no longer uniform, so ρλ changes the projected step
    balancer = MoCo(NAMES, beta_sigma=0.0, gamma_sigma=0.0, rho=0.5)
    balancer.direction(J, ONES)
    lam = balancer.task_weights.clone()
    balancer.direction(J, ONES)
    y = balancer.tracking
    expected = project_simplex(lam - 0.1 * ((y @ y.T) @ lam + 0.5 * lam))
    assert torch.allclose(balancer.task_weights, expected)


def test_libmtl_gradient_rescaling_is_optional():
    # h = L g/‖g‖: rows (3, 4)·2/5 = (1.2, 1.6) and (0, 2)·1/2 = (0, 1); y₁ = ½h
    balancer = MoCo(NAMES, normalize_gradients=True)
    jacobian = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=torch.float64)
    balancer.direction(jacobian, torch.tensor([2.0, 1.0], dtype=torch.float64))
    expected = 0.5 * torch.tensor([[1.2, 1.6], [0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(balancer.tracking, expected)


def test_zero_gradients_stay_finite_when_rescaled():
    balancer = MoCo(NAMES, normalize_gradients=True)
    d = balancer.direction(torch.zeros(2, 3, dtype=torch.float64), ONES)
    assert torch.equal(d, torch.zeros(3, dtype=torch.float64))


def run_steps(balancer, jacobians):
    directions = []
    for jacobian in jacobians:
        w, losses = linear_losses(jacobian, torch.ones(jacobian.shape[0]))
        balancer.backward(dict(zip(balancer.tasks, losses, strict=True)), shared=[w])
        directions.append(w.grad.detach().clone())
    return directions


def test_state_dict_round_trip_adopts_the_tracking_shape():
    g = torch.Generator().manual_seed(0)
    jacobians = [torch.randn(3, 6, generator=g) for _ in range(4)]
    original = mt.balance.get("moco", ["a", "b", "c"], rho=0.1)
    run_steps(original, jacobians[:3])
    restored = mt.balance.get("moco", ["a", "b", "c"], rho=0.1)
    assert restored.tracking.numel() == 0
    restored.load_state_dict(original.state_dict())
    assert restored.tracking.shape == (3, 6)
    assert int(restored.step) == 3
    [next_original] = run_steps(original, jacobians[3:])
    [next_restored] = run_steps(restored, jacobians[3:])
    assert torch.equal(next_original, next_restored)


def test_loading_a_fresh_state_resets_the_tracking():
    used = MoCo(NAMES)
    used.direction(J, ONES)
    used.load_state_dict(MoCo(NAMES).state_dict())
    assert used.tracking.numel() == 0
    assert int(used.step) == 0
    # the next step allocates again and starts from zero, like a fresh balancer
    assert torch.equal(used.direction(J, ONES), MoCo(NAMES).direction(J, ONES))


def test_changed_parameter_count_is_an_error():
    balancer = MoCo(NAMES)
    balancer.direction(torch.ones(2, 3), torch.ones(2))
    with pytest.raises(ConfigError, match="tracking"):
        balancer.direction(torch.ones(2, 4), torch.ones(2))


def test_feature_mode_is_refused():
    with pytest.raises(ConfigError, match="mode='parameters'"):
        mt.balance.get("moco", NAMES, mode="features")


def test_a_non_finite_step_leaves_the_state_alone():
    # an AMP overflow gives inf gradients; the scaler skips that step, so must the state
    g = torch.Generator().manual_seed(0)
    jacobian = torch.randn(3, 4, generator=g, dtype=torch.float64)
    losses = torch.rand(3, generator=g, dtype=torch.float64) + 0.1
    balancer = MoCo(["a", "b", "c"])
    balancer.direction(jacobian, losses)
    before = {k: v.clone() for k, v in balancer.state_dict().items() if torch.is_tensor(v)}
    overflow = jacobian.clone()
    overflow[0, 1] = float("inf")
    balancer.direction(overflow, losses)
    after = balancer.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize(
    "params",
    [
        {"beta": 0.0},
        {"beta": 1.5},
        {"gamma": 0.0},
        {"beta_sigma": -1.0},
        {"gamma_sigma": -0.5},
        {"rho": -0.1},
    ],
)
def test_invalid_parameters_are_refused(params):
    with pytest.raises(ConfigError, match=next(iter(params))):
        mt.balance.get("moco", NAMES, **params)
