"""DualProj against the rule by hand, against torchjd, and its parameter checks."""

from __future__ import annotations

import pytest
import torch

import manytask as mt
from manytask.balance.aggregation.dualproj import DualProj
from manytask.errors import ConfigError
from tests.peers import manytask_direction, require, torchjd_direction

ONES = torch.ones(2, dtype=torch.float64)


def test_mean_inside_the_cone_is_kept():
    # g₁ = (1, 0), g₂ = (−1, 1): the mean (0, ½) has g₁ᵀm = 0 and g₂ᵀm = ½, both ≥ 0, so it is
    # its own projection: d = (0, ½), w = (½, ½).
    jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    balancer = DualProj(["a", "b"])
    w = balancer.weights(jacobian @ jacobian.T, ONES)
    assert torch.allclose(w, torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-10)


def test_conflicting_mean_is_projected_by_hand():
    # g₁ = (1, 0), g₂ = (−2, 1): the mean m = (−½, ½) has g₁ᵀm = −½ < 0, so it is projected onto
    # g₁ᵀy = 0: y = m + ½g₁ = (0, ½), and g₂ᵀy = ½ ≥ 0 holds. As weights: (0, ½) = 1·g₁ + ½·g₂,
    # so w = (1, ½) (both ≥ 1/T, as the dual problem requires).
    jacobian = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)
    balancer = DualProj(["a", "b"])
    w = balancer.weights(jacobian @ jacobian.T, ONES)
    assert torch.allclose(w, torch.tensor([1.0, 0.5], dtype=torch.float64), atol=1e-10)
    d = balancer.direction(jacobian, ONES)
    assert torch.allclose(d, torch.tensor([0.0, 0.5], dtype=torch.float64), atol=1e-10)


def random_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for t, p in [(2, 5), (3, 7), (4, 4), (5, 20), (8, 30)]:
        jacobian = torch.randn(t, p, generator=gen, dtype=torch.float64)
        yield jacobian, torch.rand(t, generator=gen, dtype=torch.float64) + 0.1


def test_matches_torchjd_exact_projector():
    """Unregularised quadprog projector (``reg_eps = norm_eps = 0``, fine on full-rank inputs):
    tolerance 1e-6 of the largest gradient norm, the float32 precision of manytask's Jacobian
    (observed ≤ 4e-8)."""
    aggregation = require("torchjd.aggregation")
    linalg = require("torchjd._linalg")
    for jacobian, losses in random_inputs():
        ours = manytask_direction("dualproj", jacobian, losses)
        projector = linalg.QuadprogProjector(reg_eps=0.0, norm_eps=0.0)
        theirs = torchjd_direction(aggregation.DualProj(projector=projector), jacobian)
        assert (ours - theirs).abs().max() <= 1e-6 * jacobian.norm(dim=1).max()


def test_matches_torchjd_default():
    """torchjd's default regularisation (``G/tr G + 1e-4·I``) moves its directions by up to
    ~1e-4 of the largest gradient norm (observed ≤ 1e-4): tolerance 1e-3."""
    aggregation = require("torchjd.aggregation")
    for jacobian, losses in random_inputs(seed=1):
        ours = manytask_direction("dualproj", jacobian, losses)
        theirs = torchjd_direction(aggregation.DualProj(), jacobian)
        assert (ours - theirs).abs().max() <= 1e-3 * jacobian.norm(dim=1).max()


def test_invalid_parameters():
    with pytest.raises(ConfigError, match="iterations must be ≥ 1"):
        mt.balance.get("dualproj", ["a", "b"], iterations=0)
