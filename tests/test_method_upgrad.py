"""UPGrad against the paper's rule by hand, against torchjd, and its parameter checks."""

from __future__ import annotations

import pytest
import torch

import manytask as mt
from manytask.balance.aggregation.upgrad import UPGrad
from manytask.errors import ConfigError
from tests.peers import manytask_direction, require, torchjd_direction

G1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
G2 = torch.tensor([-1.0, 1.0], dtype=torch.float64)


def test_two_tasks_by_hand():
    # Dual cone of g₁ = (1, 0), g₂ = (−1, 1): {y : y₁ ≥ 0, y₂ ≥ y₁}.
    # π(g₁): g₂ᵀg₁ = −1 < 0, so project onto g₂ᵀy = 0: g₁ + ½g₂ = (½, ½) — y₁ ≥ 0 holds.
    # π(g₂): g₁ᵀg₂ = −1 < 0, so project onto g₁ᵀy = 0: g₂ + g₁ = (0, 1) — g₂ᵀy = 1 ≥ 0 holds.
    # d = ½((½, ½) + (0, 1)) = (¼, ¾); as weights: π(g₁) = 1·g₁ + ½·g₂, π(g₂) = g₁ + g₂,
    # so w = ½((1, ½) + (1, 1)) = (1, ¾).
    jacobian = torch.stack([G1, G2])
    balancer = UPGrad(["a", "b"])
    w = balancer.weights(jacobian @ jacobian.T, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(w, torch.tensor([1.0, 0.75], dtype=torch.float64), atol=1e-10)
    d = balancer.direction(jacobian, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(d, torch.tensor([0.25, 0.75], dtype=torch.float64), atol=1e-10)


def test_no_conflict_means_the_mean():
    # gradients that do not conflict are their own projections: d = mean
    jacobian = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    d = UPGrad(["a", "b"]).direction(jacobian, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(d, jacobian.mean(dim=0), atol=1e-10)


def random_inputs(count: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for t, p in [(2, 5), (3, 7), (4, 4), (5, 20), (8, 30)][:count]:
        jacobian = torch.randn(t, p, generator=gen, dtype=torch.float64)
        yield jacobian, torch.rand(t, generator=gen, dtype=torch.float64) + 0.1


def test_matches_torchjd_exact_projector():
    """torchjd's ``UPGrad`` with its quadprog projector told not to regularise
    (``reg_eps = norm_eps = 0``; fine on these full-rank inputs) solves the same problem
    exactly: the directions agree to 1e-6 of the largest gradient norm, the float32 precision of
    the Jacobian manytask's engine forms (observed ≤ 3e-8)."""
    aggregation = require("torchjd.aggregation")
    linalg = require("torchjd._linalg")
    for jacobian, losses in random_inputs(5):
        ours = manytask_direction("upgrad", jacobian, losses)
        projector = linalg.QuadprogProjector(reg_eps=0.0, norm_eps=0.0)
        theirs = torchjd_direction(aggregation.UPGrad(projector=projector), jacobian)
        assert (ours - theirs).abs().max() <= 1e-6 * jacobian.norm(dim=1).max()


def test_matches_torchjd_default():
    """torchjd's default projector divides G by its trace and adds 1e-4·I before quadprog,
    which moves its directions by up to ~1e-4 of the largest gradient norm (observed
    ≤ 1.3e-4): tolerance 1e-3."""
    aggregation = require("torchjd.aggregation")
    for jacobian, losses in random_inputs(5, seed=1):
        ours = manytask_direction("upgrad", jacobian, losses)
        theirs = torchjd_direction(aggregation.UPGrad(), jacobian)
        assert (ours - theirs).abs().max() <= 1e-3 * jacobian.norm(dim=1).max()


def test_weights_are_reported_and_stateless_between_steps():
    jacobian = torch.stack([G1, G2])
    balancer = mt.balance.get("upgrad", ["a", "b"])
    restored = mt.balance.get("upgrad", ["a", "b"])
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    losses = {"a": (jacobian[0] * w).sum(), "b": (jacobian[1] * w).sum()}
    step = balancer.backward(losses, shared=[w])
    assert torch.allclose(step.weights.double(), torch.tensor([1.0, 0.75]).double(), atol=1e-6)
    restored.load_state_dict(balancer.state_dict())
    assert torch.equal(restored.last_weights, balancer.last_weights)


def test_invalid_parameters():
    with pytest.raises(ConfigError, match="iterations must be ≥ 1"):
        mt.balance.get("upgrad", ["a", "b"], iterations=0)
    with pytest.raises(ConfigError, match="unknown key"):
        mt.balance.get("upgrad", ["a", "b"], pref_vector=[1, 1])
