"""ConFIG against the paper's rule by hand and the authors' two-task form, against torchjd, and
its parameter checks."""

from __future__ import annotations

import math

import pytest
import torch

import manytask as mt
from manytask.balance.aggregation.config import ConFIG
from manytask.errors import ConfigError
from tests.peers import manytask_direction, require, torchjd_direction

ROOT2 = math.sqrt(2.0)


def test_two_tasks_by_hand():
    # g₁ = (1, 0), g₂ = (1, 1): u₁ = (1, 0), u₂ = (1, 1)/√2. g_v = U⁺1 solves u₁ᵀx = u₂ᵀx = 1:
    # x = (1, √2 − 1), ‖x‖² = 4 − 2√2. The length is Σgᵢᵀx/‖x‖ = (1 + √2)/‖x‖, so
    # d = (1 + √2)/(4 − 2√2) · (1, √2 − 1).
    jacobian = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    d = ConFIG(["a", "b"]).direction(jacobian, torch.ones(2))
    factor = (1 + ROOT2) / (4 - 2 * ROOT2)
    expected = factor * torch.tensor([1.0, ROOT2 - 1], dtype=torch.float64)
    assert torch.allclose(d, expected, atol=1e-12)
    # equal projections on the unit gradients, and positive
    units = jacobian / jacobian.norm(dim=1, keepdim=True)
    projections = units @ d
    assert torch.allclose(projections, projections[0].expand(2)) and projections[0] > 0


def authors_two_task_direction(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """The authors' closed form for two gradients, re-stated: with oᵢ the unit component of
    the *other* gradient orthogonal to gᵢ, the best direction is c₁o₁ + o₂ with
    c₁ = (o₂ᵀu₁)/(o₁ᵀu₂) (equal weights), rescaled to the projection length."""
    u1, u2 = g1 / g1.norm(), g2 / g2.norm()
    o1 = g2 - (g2 @ u1) * u1
    o2 = g1 - (g1 @ u2) * u2
    o1, o2 = o1 / o1.norm(), o2 / o2.norm()
    best = (o2 @ u1) / (o1 @ u2) * o1 + o2
    unit = best / best.norm()
    return (g1 @ unit + g2 @ unit) * unit


def test_matches_the_authors_two_task_form():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        jacobian = torch.randn(2, 6, generator=gen, dtype=torch.float64)
        ours = ConFIG(["a", "b"]).direction(jacobian, torch.ones(2))
        theirs = authors_two_task_direction(jacobian[0], jacobian[1])
        assert torch.allclose(ours, theirs, atol=1e-10)


def test_nearly_opposite_float64_gradients_keep_the_authors_direction():
    # at π − 1e-5 the cosines' small eigenvalue is 5e-11: kept by a float64 Gramian's rank
    # tolerance (4.4e-16), dropped by float32's (2.4e-7), which returned no step
    gap = 1e-5
    jacobian = torch.tensor(
        [[2.0, 0.0], [-5.0 * math.cos(gap), 5.0 * math.sin(gap)]], dtype=torch.float64
    )
    ours = ConFIG(["a", "b"]).direction(jacobian, torch.ones(2))
    theirs = authors_two_task_direction(jacobian[0], jacobian[1])
    assert ours.norm() > 0
    assert (ours - theirs).norm() < 1e-6 * theirs.norm()


def test_zero_gradient_gets_no_weight():
    jacobian = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    w = ConFIG(["a", "b", "c"]).weights(jacobian @ jacobian.T, torch.ones(3))
    assert w[2] == 0
    two = ConFIG(["a", "b"]).direction(jacobian[:2], torch.ones(2))
    assert torch.allclose(w @ jacobian, two, atol=1e-12)


def test_matches_torchjd():
    """torchjd 0.18's ``ConFIG`` (``pinv`` of the unit gradients, projection length): in float64
    (``direction``) tolerance 1e-9 of the largest gradient norm (observed ~1e-15); through
    ``backward`` (float32 Jacobian in manytask's engine) 1e-5 (observed ≤ 4e-8)."""
    aggregation = require("torchjd.aggregation")
    gen = torch.Generator().manual_seed(1)
    for t, p in [(2, 5), (3, 7), (4, 9), (5, 20), (8, 30)]:
        jacobian = torch.randn(t, p, generator=gen, dtype=torch.float64)
        losses = torch.rand(t, generator=gen, dtype=torch.float64) + 0.1
        theirs = torchjd_direction(aggregation.ConFIG(), jacobian)
        scale = jacobian.norm(dim=1).max()
        direct = ConFIG([f"t{i}" for i in range(t)]).direction(jacobian, losses)
        assert (direct - theirs).abs().max() <= 1e-9 * scale
        ours = manytask_direction("config", jacobian, losses)
        assert (ours - theirs).abs().max() <= 1e-5 * scale


def test_invalid_parameters():
    with pytest.raises(ConfigError, match="unknown key"):
        mt.balance.get("config", ["a", "b"], weight_model="equal")
