"""MGDA against the min-norm definition by hand, its optimality conditions, the gradient
normalisations, and LibMTL's and torchjd's implementations."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from manytask.balance.aggregation.mgda import MGDA, present_min_norm
from manytask.balance.solvers.simplex import min_norm_weights
from manytask.errors import ConfigError
from tests.peers import libmtl_direction, manytask_direction, require, torchjd_direction

F64 = torch.float64


def direction(jacobian: Tensor, losses: Tensor | None = None, **params) -> Tensor:
    t = jacobian.shape[0]
    balancer = MGDA([f"t{i}" for i in range(t)], **params)
    return balancer.direction(jacobian, torch.ones(t, dtype=F64) if losses is None else losses)


def test_two_tasks_by_hand():
    # g₁ = (1, 0), g₂ = (0, 1): the hull's closest point to 0 is their midpoint
    d = direction(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64))
    assert torch.allclose(d, torch.tensor([0.5, 0.5], dtype=F64))
    # g₁ = (1, 0), g₂ = (1, 1): the hull is the segment (1, t), t ∈ [0, 1]; closest at g₁
    d = direction(torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=F64))
    assert torch.allclose(d, torch.tensor([1.0, 0.0], dtype=F64))


def test_three_tasks_by_hand():
    # the triangle (2, 0), (0, 2), (2, 2): closest point (1, 1), on the first edge
    jacobian = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 2.0]], dtype=F64)
    balancer = MGDA(["a", "b", "c"])
    w = balancer.weights(jacobian @ jacobian.T, torch.ones(3, dtype=F64))
    assert torch.allclose(w, torch.tensor([0.5, 0.5, 0.0], dtype=F64), atol=1e-6)
    # (1, 0), (0, 1), (−1, −1): the hull holds 0, a Pareto-stationary point
    d = direction(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], dtype=F64))
    assert d.abs().max() < 1e-6


@pytest.mark.parametrize("absent", [0, 1, 3])
def test_an_absent_task_is_left_out_of_the_min_norm_problem(absent):
    # a zero loss (a task absent from the batch) has a zero gradient, which as such is the
    # min-norm point: the weights are those of the tasks present, the absent one gets 0
    g = torch.Generator().manual_seed(absent)
    jacobian = torch.randn(4, 6, generator=g, dtype=F64)
    jacobian[absent] = 0.0
    losses = torch.rand(4, generator=g, dtype=F64) + 0.5
    losses[absent] = 0.0
    ours = MGDA(list("abcd")).weights(jacobian @ jacobian.T, losses)
    kept = [i for i in range(4) if i != absent]
    rest = jacobian[kept]
    alone = MGDA(list("abc")).weights(rest @ rest.T, losses[kept])
    assert ours[absent] == 0
    assert torch.allclose(ours[kept], alone, atol=1e-9)
    assert (ours @ jacobian).norm() > 0.1


def test_with_every_task_present_the_remapped_problem_is_the_problem():
    # the path an accelerator takes (no host read to skip it) changes nothing then
    g = torch.Generator().manual_seed(9)
    jacobian = torch.randn(5, 7, generator=g, dtype=F64)
    gramian = jacobian @ jacobian.T
    remapped = present_min_norm(gramian, torch.ones(5, dtype=torch.bool), 300)
    assert torch.allclose(remapped, min_norm_weights(gramian, 300), atol=1e-12)


def test_normalisations_divide_each_gradient_first():
    # g₁ = (2, 0), g₂ = (0, 4); losses 2 and 1
    jacobian = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=F64)
    losses = torch.tensor([2.0, 1.0], dtype=F64)
    # l2: (1, 0) and (0, 1) → midpoint (1/2, 1/2)
    expected = torch.tensor([0.5, 0.5], dtype=F64)
    assert torch.allclose(direction(jacobian, losses, normalization="l2"), expected)
    # loss: (1, 0) and (0, 4) → closest point of that segment: w₁ = 16/17
    expected = torch.tensor([16 / 17, 4 / 17], dtype=F64)
    assert torch.allclose(direction(jacobian, losses, normalization="loss"), expected)
    # loss+: nᵢ = Lᵢ‖gᵢ‖ = 4 and 4: (1/2, 0) and (0, 1) → w₁ = 1/(1/4 + 1) = 4/5
    expected = torch.tensor([0.4, 0.2], dtype=F64)
    assert torch.allclose(direction(jacobian, losses, normalization="loss+"), expected)


def random_jacobians(seed: int):
    gen = torch.Generator().manual_seed(seed)
    for t, p in [(2, 5), (3, 7), (4, 9), (6, 20), (10, 30)]:
        losses = torch.rand(t, generator=gen, dtype=F64) + 0.5
        yield torch.randn(t, p, generator=gen, dtype=F64), losses


def test_the_direction_meets_the_min_norm_optimality_conditions():
    """d is the min-norm point of the hull iff gᵢᵀd ≥ ‖d‖² for every i (with equality where
    wᵢ > 0)."""
    for jacobian, losses in random_jacobians(seed=0):
        t = jacobian.shape[0]
        balancer = MGDA([f"t{i}" for i in range(t)])
        w = balancer.weights(jacobian @ jacobian.T, losses)
        d = w @ jacobian
        assert w.min() >= -1e-12 and abs(float(w.sum()) - 1.0) < 1e-9
        inner, squared = jacobian @ d, float(d @ d)
        assert inner.min() >= squared - 1e-6 * jacobian.norm(dim=1).max() ** 2
        active = w > 1e-6
        assert torch.allclose(inner[active], torch.full_like(inner[active], squared), atol=1e-6)


def closer_than(ours: Tensor, theirs: Tensor, tol: float) -> None:
    """For the min-norm point d* of a convex set and any other point x of it,
    ‖x − d*‖² ≤ ‖x‖² − ‖d*‖²: a peer's (approximate) answer lies within that distance of ours
    exactly when ours is the closer to the optimum."""
    gap = float(theirs @ theirs - ours @ ours)
    assert float((theirs - ours) @ (theirs - ours)) <= gap + tol, gap


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_matches_libmtl(normalization):
    """LibMTL 1.1.5's ``MGDA`` (Frank–Wolfe, at most 250 steps, in float32): its answer is
    within the optimality bound of ours, to float32 precision."""
    require("LibMTL")
    for jacobian, losses in random_jacobians(seed=1):
        ours = manytask_direction("mgda", jacobian, losses, normalization=normalization)
        theirs = libmtl_direction("MGDA", jacobian, losses, mgda_gn=normalization).double()
        closer_than(ours, theirs, 1e-5 * float(ours @ ours + 1e-3))


def test_matches_torchjd():
    """torchjd 0.18's ``MGDA`` (Frank–Wolfe to ε = 0.001, at most 100 steps)."""
    aggregation = require("torchjd.aggregation")
    for jacobian, losses in random_jacobians(seed=2):
        ours = manytask_direction("mgda", jacobian, losses)
        theirs = torchjd_direction(aggregation.MGDA(), jacobian)
        closer_than(ours, theirs, 1e-6 * float(jacobian.norm(dim=1).max() ** 2))


def test_invalid_parameters():
    with pytest.raises(ConfigError, match="normalization must be"):
        MGDA(["a", "b"], normalization="max")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="iterations must be"):
        MGDA(["a", "b"], iterations=0)
