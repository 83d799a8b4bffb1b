"""PCGrad against Algorithm 1 of the paper (projections of the vectors themselves, in given
orders), its numpy and torch rounds, its seeded orders, and LibMTL's and torchjd's
implementations."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from manytask.balance.aggregation.pcgrad import PCGrad, _pair_weights, _projections, pcgrad_weights
from tests.peers import libmtl_direction, manytask_direction, require, torchjd_direction

F64 = torch.float64


def algorithm_1(jacobian: Tensor, orders: Tensor) -> Tensor:
    """Yu et al.'s Algorithm 1 on the vectors: each gᵢ is projected off every gⱼ it conflicts
    with, in the order ``orders[i]`` (itself skipped), against the original gⱼ; d = Σ gᵢ^PC."""
    projected = []
    for i in range(jacobian.shape[0]):
        g = jacobian[i].clone()
        for j in orders[i].tolist():
            if j == i:
                continue
            dot = g @ jacobian[j]
            if dot < 0:
                g = g - dot / (jacobian[j] @ jacobian[j]) * jacobian[j]
        projected.append(g)
    return torch.stack(projected).sum(dim=0)


def test_two_tasks_by_hand():
    # g₁ = (1, 0), g₂ = (−1, 1), g₁ᵀg₂ = −1: g₁^PC = g₁ + g₂/2 = (1/2, 1/2),
    # g₂^PC = g₂ + g₁ = (0, 1), d = (1/2, 3/2)
    jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64)
    d = PCGrad(["a", "b"], seed=0).direction(jacobian, torch.ones(2, dtype=F64))
    assert torch.allclose(d, torch.tensor([0.5, 1.5], dtype=F64))
    # no conflict: the plain sum
    jacobian = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=F64)
    d = PCGrad(["a", "b"], seed=0).direction(jacobian, torch.ones(2, dtype=F64))
    assert torch.allclose(d, torch.tensor([2.0, 1.0], dtype=F64))


def test_weights_equal_algorithm_1_in_any_order_in_numpy_and_in_torch():
    gen = torch.Generator().manual_seed(0)
    for t, p in [(3, 4), (5, 6), (10, 8), (40, 50)]:
        jacobian = torch.randn(t, p, generator=gen, dtype=F64)
        jacobian[1] = -jacobian[0]  # an exact opposite
        jacobian[2] = 0.0  # and a zero gradient
        orders = torch.rand(t, t, generator=gen).argsort(dim=1)
        expected = algorithm_1(jacobian, orders)
        gramian = jacobian @ jacobian.T
        on_cpu = pcgrad_weights(gramian, orders)  # the numpy rounds
        assert torch.allclose(on_cpu @ jacobian, expected, atol=1e-10)
        rounds = _projections(gramian, orders, torch.eye(t, dtype=F64), torch.arange(t))
        assert torch.allclose(rounds.sum(dim=0), on_cpu, atol=1e-12)  # the torch rounds


def test_orders_come_from_the_seed_and_survive_the_state_dict():
    jacobian = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    losses = torch.ones(6, dtype=F64)
    first = PCGrad([f"t{i}" for i in range(6)], seed=3)
    a = first.direction(jacobian, losses)
    state = first.state_dict()
    b = first.direction(jacobian, losses)
    second = PCGrad([f"t{i}" for i in range(6)], seed=3)
    assert torch.equal(second.direction(jacobian, losses), a)
    second.load_state_dict(state)
    assert torch.equal(second.direction(jacobian, losses), b)


def random_jacobians(seed: int, tasks: int):
    gen = torch.Generator().manual_seed(seed)
    for p in (3, 8, 30):
        yield torch.randn(tasks, p, generator=gen, dtype=F64), torch.ones(tasks, dtype=F64)


def test_matches_libmtl_with_two_tasks():
    """LibMTL 1.1.5's ``PCGrad`` (orders from Python's ``random``; with two tasks the order does
    not matter), in float32."""
    require("LibMTL")
    for jacobian, losses in random_jacobians(seed=2, tasks=2):
        ours = manytask_direction("pcgrad", jacobian, losses)
        theirs = libmtl_direction("PCGrad", jacobian, losses).double()
        assert (ours - theirs).abs().max() <= 1e-5 * jacobian.norm(dim=1).max()


def test_matches_torchjd_with_two_tasks():
    aggregation = require("torchjd.aggregation")
    for jacobian, losses in random_jacobians(seed=3, tasks=2):
        ours = manytask_direction("pcgrad", jacobian, losses)
        theirs = torchjd_direction(aggregation.PCGrad(), jacobian)
        assert (ours - theirs).abs().max() <= 1e-6 * jacobian.norm(dim=1).max()


def test_matches_both_peers_without_conflicts_at_any_task_count():
    """Gradients with no conflicting pair: every order leaves them alone, d = Σ gᵢ."""
    aggregation = require("torchjd.aggregation")
    gen = torch.Generator().manual_seed(4)
    jacobian = torch.rand(7, 12, generator=gen, dtype=F64)  # positive entries: gᵢᵀgⱼ > 0
    losses = torch.ones(7, dtype=F64)
    ours = manytask_direction("pcgrad", jacobian, losses)
    assert torch.allclose(ours, jacobian.sum(dim=0))
    assert torch.allclose(ours, torchjd_direction(aggregation.PCGrad(), jacobian))
    require("LibMTL")
    theirs = libmtl_direction("PCGrad", jacobian, losses).double()
    assert (ours - theirs).abs().max() <= 1e-5 * jacobian.norm(dim=1).max()


def test_two_tasks_in_python_floats_equal_the_projection_rounds():
    """With two tasks each gradient has one partner; the closed form wᵢ = 1 − min(0, Gⱼᵢ)/Gᵢᵢ
    equals the rounds (either order) on conflicting, agreeing, orthogonal, zero and NaN
    Gramians."""
    g = torch.Generator().manual_seed(3)
    gramians = []
    for _ in range(30):
        jac = torch.randn(2, 4, generator=g, dtype=torch.float64)
        gramians.append(jac @ jac.T)
    gramians += [
        torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64),
        torch.tensor([[0.0, 0.0], [0.0, 4.0]], dtype=torch.float64),
        torch.tensor([[1.0, -2.0], [-2.0, 4.0]], dtype=torch.float64),
        torch.tensor([[1.0, float("nan")], [float("nan"), 4.0]], dtype=torch.float64),
    ]
    conflicts = 0
    for gramian in gramians:
        got = np.array(_pair_weights(gramian.tolist()))
        for order in ([[0, 1], [0, 1]], [[1, 0], [1, 0]]):
            rounds = _projections(gramian.numpy(), np.array(order), np.eye(2), np.arange(2))
            np.testing.assert_allclose(got, rounds.sum(axis=0), rtol=1e-15, atol=0)
        conflicts += bool(gramian[0, 1] < 0)
        assert torch.equal(
            pcgrad_weights(gramian, torch.tensor([[0, 1], [1, 0]])), torch.tensor(got)
        )
    assert conflicts > 5
