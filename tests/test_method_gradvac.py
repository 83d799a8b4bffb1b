"""GradVac against the paper's rule by hand, against torchjd and LibMTL with aligned random
orders, its state, and its parameter checks."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import manytask as mt
from manytask.balance.aggregation.gradvac import GradVac, _pair_rounds, _rounds, gradvac_weights
from manytask.errors import ConfigError
from tests.peers import libmtl_direction, manytask_direction, require, torchjd_direction

G1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
G2 = torch.tensor([-1.0, 1.0], dtype=torch.float64)


def two_task_orders() -> torch.Tensor:
    # with two tasks the only order is "the other task"; each row lists itself last
    return torch.tensor([[1, 0], [0, 1]])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def test_first_step_by_hand_corrects_to_the_zero_target():
    # g1 = (1, 0), g2 = (-1, 1): cos φ = -1/√2 < φ̂ = 0, so both directions are corrected.
    # i = 1, j = 2: w = ‖g1‖ (0·√(1-½) + (1/√2)·1) / (‖g2‖·1) = (1/√2)/√2 = 1/2
    #   → g1^PC = g1 + g2/2 = (0.5, 0.5), orthogonal to g2.
    # i = 2, j = 1: w = ‖g2‖ (1/√2) / (‖g1‖·1) = 1 → g2^PC = g2 + g1 = (0, 1), orthogonal to g1.
    # d = (0.5, 0.5) + (0, 1) = (0.5, 1.5) = 2 g1 + 1.5 g2; φ̂ ← ½·0 + ½·(-1/√2) = -0.353553.
    jacobian = torch.stack([G1, G2])
    weights, targets = gradvac_weights(
        jacobian @ jacobian.T, torch.zeros(2, 2, dtype=torch.float64), two_task_orders(), 0.5
    )
    assert torch.allclose(weights, torch.tensor([2.0, 1.5], dtype=torch.float64))
    assert torch.allclose(weights @ jacobian, torch.tensor([0.5, 1.5], dtype=torch.float64))
    half = -0.5 / math.sqrt(2.0)
    assert torch.allclose(targets, torch.tensor([[0.0, half], [half, 0.0]], dtype=torch.float64))


def test_second_step_by_hand_reaches_the_moving_target():
    # φ̂ = -1/(2√2) = -0.353553, √(1-φ̂²) = √0.875 = 0.935414; φ = -1/√2, √(1-φ²) = 0.707107.
    # numerator φ̂·0.707107 - φ·0.935414 = -0.25 + 0.661438 = 0.411438
    # i = 1: w = ‖g1‖·0.411438 / (‖g2‖·0.935414) = 0.411438 / 1.322876 = 0.311018
    # i = 2: w = ‖g2‖·0.411438 / (‖g1‖·0.935414) = 0.622036
    # d weights: (1 + 0.622036, 1 + 0.311018); new φ̂ = ½(-0.353553) + ½(-0.707107) = -0.530330
    jacobian = torch.stack([G1, G2])
    gramian = jacobian @ jacobian.T
    _, targets = gradvac_weights(
        gramian, torch.zeros(2, 2, dtype=torch.float64), two_task_orders(), 0.5
    )
    weights, targets = gradvac_weights(gramian, targets, two_task_orders(), 0.5)
    assert torch.allclose(weights, torch.tensor([1.622036, 1.311018], dtype=torch.float64))
    assert torch.allclose(targets[0, 1], torch.tensor(-0.530330, dtype=torch.float64))
    # the corrected g1^PC has exactly the old target cosine with g2
    g1_pc = G1 + 0.311018 * G2
    assert cosine(g1_pc, G2) == pytest.approx(-0.353553, abs=1e-5)


def test_targets_follow_aligned_gradients_upwards_as_in_the_paper():
    # g1 = (1, 0), g2 = (1, 1): φ = 1/√2 ≥ φ̂ = 0, no correction, d = g1 + g2; the EMA still
    # moves: φ̂ = ½·1/√2 = 0.353553 (LibMTL only updates it when it corrects, so stays at 0)
    jacobian = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    weights, targets = gradvac_weights(
        jacobian @ jacobian.T, torch.zeros(2, 2, dtype=torch.float64), two_task_orders(), 0.5
    )
    assert torch.allclose(weights, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(targets[0, 1], torch.tensor(0.5 / math.sqrt(2.0), dtype=torch.float64))


def test_balancer_runs_through_backward_and_records_targets():
    jacobian = torch.stack([G1, G2]).float()
    d = manytask_direction("gradvac", jacobian, torch.tensor([1.0, 1.0]))
    assert torch.allclose(d, torch.tensor([0.5, 1.5]), atol=1e-6)


def torchjd_orders(t: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The visiting orders torchjd's GradVac draws after ``torch.manual_seed(seed)``: one
    ``torch.randperm(T - 1)`` of the other tasks for each task in turn."""
    torch.manual_seed(seed)
    orders = []
    for _ in range(steps):
        order = torch.empty(t, t, dtype=torch.long)
        for i in range(t):
            others = [j for j in range(t) if j != i]
            perm = torch.randperm(len(others)).tolist()
            order[i] = torch.tensor([others[k] for k in perm] + [i])
        orders.append(order)
    return orders


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torchjd_over_several_steps_with_its_orders(seed):
    aggregation = require("torchjd.aggregation")
    t, p, steps = 4, 7, 5
    g = torch.Generator().manual_seed(seed)
    jacobians = [torch.randn(t, p, generator=g, dtype=torch.float64) for _ in range(steps)]
    orders = torchjd_orders(t, steps, seed)
    peer = aggregation.GradVac(beta=0.5)
    torch.manual_seed(seed)  # torchjd draws its orders from the global RNG
    targets = torch.zeros(t, t, dtype=torch.float64)
    for jacobian, order in zip(jacobians, orders, strict=True):
        expected = torchjd_direction(peer, jacobian)
        weights, targets = gradvac_weights(jacobian @ jacobian.T, targets, order, 0.5)
        # torchjd adds eps = 1e-8 to its denominators; gradients are O(1), so 1e-6 is ample
        assert torch.allclose(weights @ jacobian, expected, atol=1e-6, rtol=1e-6)


def libmtl_orders(t: int, seed: int) -> torch.Tensor:
    """LibMTL's GradVac shuffles the other tasks with Python's ``random`` for each task."""
    random.seed(seed)
    order = torch.empty(t, t, dtype=torch.long)
    for i in range(t):
        others = [j for j in range(t) if j != i]
        random.shuffle(others)
        order[i] = torch.tensor([*others, i])
    return order


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_first_step_matches_libmtl_with_its_orders(seed):
    t = 4
    g = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(t, 9, generator=g, dtype=torch.float64)
    values = torch.rand(t, generator=g, dtype=torch.float64) + 0.1
    order = libmtl_orders(t, seed)
    random.seed(seed)
    expected = libmtl_direction("GradVac", jacobian, values, beta=0.5).double()
    weights, _ = gradvac_weights(
        jacobian @ jacobian.T, torch.zeros(t, t, dtype=torch.float64), order, 0.5
    )
    # LibMTL works in float32: relative agreement to ~1e-6
    assert torch.allclose(weights @ jacobian, expected, atol=1e-5, rtol=1e-5)


def test_two_tasks_match_libmtl_through_backward():
    # two tasks leave nothing to chance; cos(g1, g2) < 0 so the correction is exercised
    jacobian = torch.tensor([[1.0, 2.0, -1.0], [-2.0, 0.5, 1.0]])
    values = torch.tensor([0.3, 0.7])
    expected = libmtl_direction("GradVac", jacobian, values, beta=0.5)
    got = manytask_direction("gradvac", jacobian, values)
    assert not torch.allclose(got, jacobian.sum(dim=0))
    assert torch.allclose(got, expected, atol=1e-5)


def test_random_orders_come_from_the_seed():
    g = torch.Generator().manual_seed(5)
    jacobian = torch.randn(5, 6, generator=g, dtype=torch.float64)
    losses = torch.ones(5, dtype=torch.float64)
    a = GradVac([f"t{i}" for i in range(5)], seed=3).direction(jacobian, losses)
    b = GradVac([f"t{i}" for i in range(5)], seed=3).direction(jacobian, losses)
    assert torch.equal(a, b)


def test_state_dict_resumes_exactly():
    tasks = [f"t{i}" for i in range(4)]
    g = torch.Generator().manual_seed(0)
    jacobians = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    losses = torch.ones(4, dtype=torch.float64)
    original = GradVac(tasks, seed=1)
    for jacobian in jacobians[:2]:
        original.direction(jacobian, losses)
    restored = GradVac(tasks, seed=99)
    restored.load_state_dict(original.state_dict())
    assert torch.equal(restored.targets, original.targets)
    assert torch.equal(
        restored.direction(jacobians[2], losses), original.direction(jacobians[2], losses)
    )


def test_a_non_finite_step_leaves_the_state_alone():
    # an AMP overflow gives inf gradients; the scaler skips that step, so must the state
    g = torch.Generator().manual_seed(0)
    jacobian = torch.randn(3, 4, generator=g, dtype=torch.float64)
    losses = torch.rand(3, generator=g, dtype=torch.float64) + 0.1
    balancer = GradVac(["a", "b", "c"], seed=0)
    balancer.direction(jacobian, losses)
    before = {k: v.clone() for k, v in balancer.state_dict().items() if torch.is_tensor(v)}
    overflow = jacobian.clone()
    overflow[0, 1] = float("inf")
    balancer.direction(overflow, losses)
    after = balancer.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize("beta", [-0.1, 1.5])
def test_invalid_beta_is_refused(beta):
    with pytest.raises(ConfigError, match="beta"):
        mt.balance.get("gradvac", ["a", "b"], beta=beta)


def test_two_tasks_in_python_floats_match_the_vectorised_rounds():
    """Two tasks take a path of Python floats; it gives the general rounds' weights and targets,
    including zero gradients, opposite ones and targets near ±1."""
    gen = torch.Generator().manual_seed(7)
    for case in range(300):
        jac = torch.randn(2, 3, generator=gen, dtype=torch.float64)
        if case % 5 == 0:
            jac[case % 2] = 0.0
        elif case % 5 == 1:
            jac[1] = -2.0 * jac[0]
        gramian = (jac @ jac.T).numpy()
        targets = (torch.rand(2, 2, generator=gen, dtype=torch.float64) * 2 - 1).numpy()
        if case % 7 == 0:
            targets[0, 1] = 1.0
        np.fill_diagonal(targets, 0.0)
        for order in ([[0, 1], [1, 0]], [[1, 0], [0, 1]]):
            weights, updated = _rounds(np, gramian, targets, np.array(order), 0.5)
            pair, pair_updated = _pair_rounds(gramian.tolist(), targets.tolist(), 0.5)
            assert np.allclose(pair, weights, rtol=1e-12, atol=1e-12), (case, pair, weights)
            assert np.allclose(pair_updated, updated, rtol=0, atol=1e-15), case
