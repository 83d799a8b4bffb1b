"""ExcessMTL against its rule by hand, against torchjd over several steps, its lazily sized
state, and its parameter checks."""

from __future__ import annotations

import io
import math

import pytest
import torch

import manytask as mt
from manytask.balance.aggregation.excess_mtl import ExcessMTL
from manytask.errors import ConfigError
from tests.peers import linear_losses, require

NAMES = ["a", "b"]


def test_two_steps_by_hand():
    balancer = ExcessMTL(NAMES, robust_step_size=1.0)
    losses = torch.ones(2, dtype=torch.float64)
    # step 1: J = [[1, 0], [0, 2]], S = [[1, 0], [0, 4]];
    # Ê₁ = 1/√(1 + 1e-7) ≈ 1, Ê₂ = 4/√4 = 2 (a zero coordinate adds 0/√1e-7 = 0).
    # Warm-up: E⁰ = (1, 2) and the weights stay at one: d = g₁ + g₂ = (1, 2).
    first = balancer.direction(torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64), losses)
    assert torch.allclose(first, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert torch.allclose(balancer.baseline, torch.tensor([1.0, 2.0], dtype=torch.float64))
    # step 2: J = [[1, 0], [0, 1]], S = [[2, 0], [0, 5]]; Ê = (1/√2, 1/√5) = (0.707107, 0.447214);
    # Ê/E⁰ = (0.707107, 0.223607); α = 2 softmax(Ê/E⁰) with e^{0.483500} = 1.621741:
    # α = (2·1.621741/2.621741, 2/2.621741) = (1.237148, 0.762852); d = (α₁, α₂)
    second = balancer.direction(torch.eye(2, dtype=torch.float64), losses)
    ratio = math.exp(1.0 / math.sqrt(2.0) - 0.5 / math.sqrt(5.0))
    expected = torch.tensor([2 * ratio / (1 + ratio), 2 / (1 + ratio)], dtype=torch.float64)
    assert torch.allclose(second, expected, atol=1e-6)
    assert torch.allclose(expected, torch.tensor([1.237148, 0.762852], dtype=torch.float64))
    assert torch.allclose(balancer.task_weights.sum(), torch.tensor(2.0, dtype=torch.float64))


def test_longer_warmup_averages_the_baseline():
    balancer = ExcessMTL(NAMES, warmup_steps=2)
    losses = torch.ones(2)
    # steps 1 and 2 with J = diag(1, 2) then diag(1, 1): the weights stay at one and
    # E⁰ = ½(Ê¹ + Ê²) = ½((1, 2) + (1/√2, 1/√5))
    d1 = balancer.direction(torch.diag(torch.tensor([1.0, 2.0])), losses)
    d2 = balancer.direction(torch.eye(2), losses)
    assert torch.allclose(d1, torch.tensor([1.0, 2.0]))
    assert torch.allclose(d2, torch.tensor([1.0, 1.0]))
    baseline = 0.5 * torch.tensor([1.0 + 1 / math.sqrt(2.0), 2.0 + 1 / math.sqrt(5.0)])
    assert torch.allclose(balancer.baseline.float(), baseline, atol=1e-6)


def test_a_task_absent_from_the_batch_is_left_out():
    # b is absent (zero loss, zero gradient) at the warm-up step and at step 3: its baseline is
    # its first estimate after the warm-up, and its weight does not move while it is absent;
    # before, its zero baseline took all the weight and the method stopped whenever b was out
    balancer = ExcessMTL(NAMES, robust_step_size=1.0)
    absent, present = torch.tensor([1.0, 0.0]), torch.ones(2)
    d1 = balancer.direction(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), absent)
    assert torch.allclose(d1, torch.tensor([1.0, 0.0]))
    assert torch.allclose(balancer.baseline, torch.tensor([1.0, 0.0], dtype=torch.float64))
    # step 2: S = [[2, 0], [0, 4]]; Ê = (1/√2, 4/√4 = 2): a moves by Ê/E⁰ = 0.707107, b takes
    # E⁰ = 2 and keeps its logit: α = 2 softmax(0.707107, 0)
    d2 = balancer.direction(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), present)
    ratio = math.exp(1.0 / math.sqrt(2.0))
    alpha = torch.tensor([2 * ratio / (1 + ratio), 2 / (1 + ratio)])
    assert torch.allclose(d2, alpha * torch.tensor([1.0, 2.0]), atol=1e-6)
    assert torch.allclose(balancer.baseline.float(), torch.tensor([1.0, 2.0]), atol=1e-6)
    d3 = balancer.direction(torch.tensor([[1.0, 1.0], [0.0, 0.0]]), absent)
    assert d3.norm() > 0.5  # a takes its step; b's weight stays where it was
    assert torch.allclose(balancer.task_weights.sum(), torch.tensor(2.0, dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("warmup", [1, 3])
def test_matches_torchjd_with_the_same_warmup(seed, warmup):
    aggregation = require("torchjd.aggregation")
    t, steps = 3, 6
    g = torch.Generator().manual_seed(seed)
    jacobians = [torch.randn(t, 8, generator=g, dtype=torch.float64) for _ in range(steps)]
    mine = ExcessMTL([f"t{i}" for i in range(t)], robust_step_size=0.5, warmup_steps=warmup)
    # torchjd's n_warmup_steps = k is the same schedule (with k = 1 it is the authors' code);
    # its weights sum to one where the code's (and manytask's) sum to T
    peer = aggregation.ExcessMTL(robust_step_size=0.5, n_warmup_steps=warmup)
    for jacobian in jacobians:
        got = mine.direction(jacobian, torch.ones(t, dtype=torch.float64))
        expected = t * peer(jacobian)
        # the same float64 operations (same 1e-7 guards): agreement to rounding
        assert torch.allclose(got, expected, atol=1e-10)


def run_steps(balancer, jacobians):
    directions = []
    for jacobian in jacobians:
        w, losses = linear_losses(jacobian, torch.ones(jacobian.shape[0]))
        balancer.backward(dict(zip(balancer.tasks, losses, strict=True)), shared=[w])
        directions.append(w.grad.detach().clone())
    return directions


def test_state_dict_round_trip_adopts_the_accumulator_shape():
    g = torch.Generator().manual_seed(0)
    jacobians = [torch.randn(3, 5, generator=g) for _ in range(4)]
    original = mt.balance.get("excess_mtl", ["a", "b", "c"], robust_step_size=0.3)
    run_steps(original, jacobians[:3])
    assert original.squared_sum.shape == (3, 5)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = mt.balance.get("excess_mtl", ["a", "b", "c"], robust_step_size=0.3)
    assert restored.squared_sum.numel() == 0  # fresh: the placeholder
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.squared_sum, original.squared_sum)
    [next_original] = run_steps(original, jacobians[3:])
    [next_restored] = run_steps(restored, jacobians[3:])
    assert torch.equal(next_original, next_restored)


def test_changed_parameter_count_is_an_error():
    balancer = ExcessMTL(NAMES)
    balancer.direction(torch.ones(2, 3), torch.ones(2))
    with pytest.raises(ConfigError, match="accumulator"):
        balancer.direction(torch.ones(2, 4), torch.ones(2))


def test_feature_mode_is_refused():
    with pytest.raises(ConfigError, match="mode='parameters'"):
        mt.balance.get("excess_mtl", NAMES, mode="features")


def test_a_non_finite_step_leaves_the_state_alone():
    # an AMP overflow gives inf gradients; the scaler skips that step, so must the state
    g = torch.Generator().manual_seed(0)
    jacobian = torch.randn(3, 4, generator=g, dtype=torch.float64)
    losses = torch.rand(3, generator=g, dtype=torch.float64) + 0.1
    balancer = ExcessMTL(["a", "b", "c"])
    balancer.direction(jacobian, losses)
    before = {k: v.clone() for k, v in balancer.state_dict().items() if torch.is_tensor(v)}
    overflow = jacobian.clone()
    overflow[0, 1] = float("inf")
    balancer.direction(overflow, losses)
    after = balancer.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize(
    "params", [{"robust_step_size": 0.0}, {"robust_step_size": -1.0}, {"warmup_steps": 0}]
)
def test_invalid_parameters_are_refused(params):
    with pytest.raises(ConfigError, match=next(iter(params))):
        mt.balance.get("excess_mtl", NAMES, **params)
