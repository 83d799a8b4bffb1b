"""DB-MTL against its rule by hand, its log transform both ways, its lazily sized state and its
parameter checks. (Neither installed peer implements DB-MTL: LibMTL 1.1.5 predates it and
torchjd 0.18 has none.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import manytask as mt
from manytask.balance.aggregation.db_mtl import DBMTL
from manytask.errors import ConfigError
from tests.peers import linear_losses

NAMES = ["a", "b"]


def test_two_steps_by_hand():
    balancer = DBMTL(NAMES, beta=0.5)
    # the rows are the log-loss gradients g (the engine's log transform made them)
    jacobian = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    losses = torch.tensor([2.0, 0.5], dtype=torch.float64).log()
    # step 1: ĝ = ½·0 + ½g = [[0.5, 0], [0, 1]]; norms (0.5, 1); d = 1·((1, 0) + (0, 1))
    assert torch.allclose(balancer.direction(jacobian, losses), torch.ones(2).double())
    # step 2: ĝ = ½ĝ + ½g = [[0.75, 0], [0, 1.5]]; norms (0.75, 1.5); d = 1.5·(1, 1)
    assert torch.allclose(balancer.direction(jacobian, losses), torch.full((2,), 1.5).double())


def test_every_average_is_scaled_to_the_largest_norm():
    # g = J = [[3, 4], [0, 1]]; step 1: ĝ = ½g = [[1.5, 2], [0, 0.5]]
    # norms (2.5, 0.5): α = (2.5/2.5, 2.5/0.5) = (1, 5); d = (1.5, 2) + 5·(0, 0.5) = (1.5, 4.5)
    balancer = DBMTL(NAMES, beta=0.5)
    jacobian = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    d = balancer.direction(jacobian, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(d, torch.tensor([1.5, 4.5], dtype=torch.float64))


def test_default_rate_and_decay():
    # β = 0.9, σ = 0: ĝ₁ = 0.1 g, ĝ₂ = 0.9·0.1g + 0.1g = 0.19 g
    balancer = DBMTL(NAMES)
    jacobian = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    losses = torch.ones(2, dtype=torch.float64)
    balancer.direction(jacobian, losses)
    assert torch.allclose(balancer.averages, 0.1 * jacobian)
    balancer.direction(jacobian, losses)
    assert torch.allclose(balancer.averages, 0.19 * jacobian)
    # σ = 1: β₂ = 0.5/2 = 0.25, ĝ₂ = 0.25·0.5g + 0.75g = 0.875g
    decaying = DBMTL(NAMES, beta=0.5, beta_sigma=1.0)
    decaying.direction(jacobian, losses)
    decaying.direction(jacobian, losses)
    assert torch.allclose(decaying.averages, 0.875 * jacobian)


def exponential_losses(a: torch.Tensor, c: torch.Tensor):
    """``Lᵢ = cᵢ exp(⟨aᵢ, W⟩)`` at ``W = 0``: value ``cᵢ``, ``∇ log Lᵢ = aᵢ``."""
    w = nn.Parameter(torch.zeros(a.shape[1]))
    return w, {name: c[i] * torch.exp((a[i] * w).sum()) for i, name in enumerate(NAMES)}


def test_the_log_transform_is_applied_once_either_way():
    a = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.1, -1.0]])
    c = torch.tensor([4.0, 0.25])
    w1, losses = exponential_losses(a, c)
    mt.balance.get("db_mtl", NAMES).backward(losses, shared=[w1])
    w2, losses = exponential_losses(a, c)
    mt.balance.get("db_mtl", NAMES, loss_transform="log").backward(losses, shared=[w2])
    # both see g = ∇log(Lᵢ + ε) = cᵢ/(cᵢ + ε)·aᵢ; step 1: ĝ = 0.1g; d = max‖ĝ‖ Σ ĝᵢ/‖ĝᵢ‖
    g = a * (c / (c + 1e-8))[:, None]
    norms = g.norm(dim=1, keepdim=True)
    expected = 0.1 * norms.max() * (g / norms).sum(dim=0)
    assert torch.allclose(w1.grad, expected, atol=1e-6)
    assert torch.allclose(w2.grad, expected, atol=1e-6)


def test_task_heads_are_trained_on_their_log_losses():
    # Lᵢ = cᵢ exp(⟨aᵢ, W⟩ + hᵢ) with a head scalar hᵢ: ∂ log(Lᵢ + ε)/∂hᵢ = cᵢ/(cᵢ + ε) ≈ 1, where
    # the plain gradient would be cᵢ (the authors' code runs each backward on log(L + 1e-8))
    a = torch.tensor([[1.0, -2.0], [0.3, 0.1]])
    c = torch.tensor([4.0, 0.25])
    w = nn.Parameter(torch.zeros(2))
    heads = nn.Parameter(torch.zeros(2))
    losses = {n: c[i] * torch.exp((a[i] * w).sum() + heads[i]) for i, n in enumerate(NAMES)}
    mt.balance.get("db_mtl", NAMES, loss_transform="none").backward(losses, shared=[w])
    assert heads.grad is not None
    assert torch.allclose(heads.grad, c / (c + 1e-8), atol=1e-6)


def test_a_zero_average_contributes_nothing():
    balancer = DBMTL(NAMES)
    jacobian = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    d = balancer.direction(jacobian, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(d, 0.1 * jacobian[1])


def run_steps(balancer, jacobians):
    directions = []
    for jacobian in jacobians:
        w, losses = linear_losses(jacobian, torch.full((jacobian.shape[0],), 2.0))
        balancer.backward(dict(zip(balancer.tasks, losses, strict=True)), shared=[w])
        directions.append(w.grad.detach().clone())
    return directions


def test_state_dict_round_trip_adopts_the_average_shape():
    g = torch.Generator().manual_seed(0)
    jacobians = [torch.randn(3, 4, generator=g) for _ in range(4)]
    original = mt.balance.get("db_mtl", ["a", "b", "c"], beta_sigma=0.5)
    run_steps(original, jacobians[:3])
    restored = mt.balance.get("db_mtl", ["a", "b", "c"], beta_sigma=0.5)
    assert restored.averages.numel() == 0
    restored.load_state_dict(original.state_dict())
    assert torch.equal(restored.averages, original.averages)
    [next_original] = run_steps(original, jacobians[3:])
    [next_restored] = run_steps(restored, jacobians[3:])
    assert torch.equal(next_original, next_restored)


def test_changed_parameter_count_is_an_error():
    balancer = DBMTL(NAMES)
    balancer.direction(torch.ones(2, 3), torch.ones(2))
    with pytest.raises(ConfigError, match="averages"):
        balancer.direction(torch.ones(2, 4), torch.ones(2))


def test_feature_mode_is_refused():
    with pytest.raises(ConfigError, match="mode='parameters'"):
        mt.balance.get("db_mtl", NAMES, mode="features")


def test_a_non_finite_step_leaves_the_state_alone():
    # an AMP overflow gives inf gradients; the scaler skips that step, so must the state
    g = torch.Generator().manual_seed(0)
    jacobian = torch.randn(3, 4, generator=g, dtype=torch.float64)
    losses = torch.rand(3, generator=g, dtype=torch.float64) + 0.1
    balancer = DBMTL(["a", "b", "c"])
    balancer.direction(jacobian, losses)
    before = {k: v.clone() for k, v in balancer.state_dict().items() if torch.is_tensor(v)}
    overflow = jacobian.clone()
    overflow[0, 1] = float("inf")
    balancer.direction(overflow, losses)
    after = balancer.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize(
    "params", [{"beta": -0.1}, {"beta": 1.0}, {"beta_sigma": -1.0}, {"eps": 0.0}]
)
def test_invalid_parameters_are_refused(params):
    with pytest.raises(ConfigError, match=next(iter(params))):
        mt.balance.get("db_mtl", NAMES, **params)
