"""FairGrad against the paper's rule by hand, against Nash-MTL (α = 1) and torchjd, and its
parameter checks (the solver is compared with SciPy in ``tests/test_solvers_nash.py``)."""

from __future__ import annotations

import math

import pytest
import torch

import manytask as mt
from manytask.balance.aggregation.fairgrad import FairGrad
from manytask.errors import ConfigError
from tests.peers import manytask_direction, require, torchjd_direction

ONES = torch.ones(2, dtype=torch.float64)


@pytest.mark.parametrize("alpha", [0.5, 2.0, 10.0])
def test_orthogonal_gradients_by_hand(alpha):
    # g₁ = (2, 0), g₂ = (0, 1): G = diag(4, 1) and Gw = w^(−1/α) gives 4w₁ = w₁^(−1/α), i.e.
    # w₁ = 4^(−α/(α+1)), and w₂ = 1; d = (2w₁, 1).
    jacobian = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    balancer = FairGrad(["a", "b"], alpha=alpha, max_norm=0.0)
    w = balancer.weights(jacobian @ jacobian.T, ONES)
    expected = torch.tensor([4.0 ** (-alpha / (alpha + 1)), 1.0], dtype=torch.float64)
    assert torch.allclose(w, expected, rtol=1e-10)
    d = balancer.direction(jacobian, ONES)
    assert torch.allclose(d, torch.tensor([2 * expected[0], 1.0], dtype=torch.float64))


def test_clipping_by_hand():
    # with α = 2 above, ‖d‖² = 4w₁² + 1 > 1, so max_norm = 1 scales w by 1/‖d‖
    jacobian = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    w1 = 4.0 ** (-2.0 / 3.0)
    norm = math.sqrt(4 * w1 * w1 + 1)
    w = FairGrad(["a", "b"], alpha=2.0).weights(jacobian @ jacobian.T, ONES)
    assert torch.allclose(w, torch.tensor([w1, 1.0], dtype=torch.float64) / norm, rtol=1e-10)


def test_alpha_one_is_nash_mtl():
    gen = torch.Generator().manual_seed(0)
    for t in [2, 3, 6]:
        jacobian = torch.randn(t, 2 * t, generator=gen, dtype=torch.float64)
        fair = FairGrad([str(i) for i in range(t)], alpha=1.0).direction(jacobian, torch.ones(t))
        nash = mt.balance.get("nash_mtl", [str(i) for i in range(t)]).direction(
            jacobian, torch.ones(t)
        )
        assert torch.allclose(fair, nash, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_matches_torchjd(alpha):
    """torchjd 0.18's ``FairGrad`` runs the authors' ``scipy.optimize.least_squares`` (default
    tolerances, no clipping: ``max_norm=0`` here). Relative tolerance 1e-5 on the direction:
    SciPy's default ``xtol = 1e-8`` and manytask's float32 Jacobian (observed ≤ 1e-7)."""
    aggregation = require("torchjd.aggregation")
    gen = torch.Generator().manual_seed(1)
    for t, p in [(2, 5), (3, 7), (5, 20), (8, 30)]:
        jacobian = torch.randn(t, p, generator=gen, dtype=torch.float64)
        jacobian = jacobian + torch.randn(p, generator=gen, dtype=torch.float64)
        losses = torch.rand(t, generator=gen, dtype=torch.float64) + 0.1
        ours = manytask_direction("fairgrad", jacobian, losses, alpha=alpha, max_norm=0.0)
        theirs = torchjd_direction(aggregation.FairGrad(alpha=alpha), jacobian)
        assert (ours - theirs).norm() <= 1e-5 * theirs.norm()


def test_invalid_parameters():
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        mt.balance.get("fairgrad", ["a", "b"], alpha=0.0)
    with pytest.raises(ConfigError, match="max_norm must be ≥ 0"):
        mt.balance.get("fairgrad", ["a", "b"], max_norm=-0.5)
    with pytest.raises(ConfigError, match="iterations must be ≥ 1"):
        mt.balance.get("fairgrad", ["a", "b"], iterations=0)
