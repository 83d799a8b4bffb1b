"""Krum and Multi-Krum against the paper's rule by hand, against torchjd, and the parameter
checks."""

from __future__ import annotations

import pytest
import torch

import manytask as mt
from manytask.balance.aggregation.krum import Krum, krum_weights
from manytask.errors import ConfigError
from tests.peers import manytask_direction, require, torchjd_direction

# g₁ = (1, 1), g₂ = (2, 1), g₃ = (1, 2) and an outlier g₄ = (10, 10)
JACOBIAN = torch.tensor([[1.0, 1.0], [2.0, 1.0], [1.0, 2.0], [10.0, 10.0]], dtype=torch.float64)


def test_krum_by_hand():
    # squared distances: d₁₂ = d₁₃ = 1, d₂₃ = 2, d₁₄ = 162, d₂₄ = d₃₄ = 145. With f = 0 each
    # score sums the T − f − 2 = 2 nearest: s = (1 + 1, 1 + 2, 1 + 2, 145 + 145) = (2, 3, 3, 290)
    # → Krum keeps g₁; Multi-Krum with m = 3 averages g₁, g₂, g₃ = (4/3, 4/3).
    gramian = JACOBIAN @ JACOBIAN.T
    assert torch.equal(krum_weights(gramian, 0, 1), torch.tensor([1.0, 0, 0, 0]).double())
    d = Krum(list("abcd"), n_selected=3).direction(JACOBIAN, torch.ones(4))
    assert torch.allclose(d, torch.tensor([4 / 3, 4 / 3], dtype=torch.float64))


def test_ties_are_averaged():
    # three tasks, f = 0: one neighbour each; g₁ = (0, 0) and g₂ = (1, 0) are mutually nearest
    # and tie with score 1 (g₃ = (5, 0) scores 16): both are kept and averaged → (½, 0)
    jacobian = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]], dtype=torch.float64)
    d = Krum(["a", "b", "c"]).direction(jacobian, torch.ones(3))
    assert torch.allclose(d, torch.tensor([0.5, 0.0], dtype=torch.float64))
    # two tasks: no neighbour is scored, all tie: the mean
    d = Krum(["a", "b"]).direction(jacobian[1:], torch.ones(2))
    assert torch.allclose(d, torch.tensor([3.0, 0.0], dtype=torch.float64))


def test_paper_scores_squared_distances():
    """Six gradients, f = 0, four neighbours scored. Summed squared distances (the paper) are
    (69.13, 56.72, 79.09, 102.25, 79.45, 54.37): Krum keeps g₆. Summed distances (torchjd 0.18)
    are (13.94, 13.50, 14.70, 17.47, 14.81, 14.08) and would keep g₂."""
    jacobian = torch.tensor(
        [[1.1, 2.0], [0.0, 1.4], [0.1, -4.3], [2.0, 2.9], [0.3, -4.3], [-1.4, -2.4]],
        dtype=torch.float64,
    )
    weights = krum_weights(jacobian @ jacobian.T, 0, 1)
    assert torch.equal(weights, torch.tensor([0, 0, 0, 0, 0, 1.0], dtype=torch.float64))
    aggregation = require("torchjd.aggregation")
    theirs = torchjd_direction(aggregation.Krum(n_byzantine=0), jacobian)
    assert torch.allclose(theirs, jacobian[1])  # the documented difference


def clustered(t: int, f: int, gen: torch.Generator, p: int = 6):
    """``t − f`` honest gradients around a common one and ``f`` far outliers."""
    centre = torch.randn(p, generator=gen, dtype=torch.float64)
    honest = centre + 0.3 * torch.randn(t - f, p, generator=gen, dtype=torch.float64)
    outliers = 20.0 * torch.randn(f, p, generator=gen, dtype=torch.float64)
    return torch.cat([honest, outliers])[torch.randperm(t, generator=gen)]


@pytest.mark.parametrize(("t", "f", "m"), [(5, 1, 1), (7, 2, 1), (7, 2, 3), (9, 3, 2), (6, 1, 2)])
def test_matches_torchjd(t, f, m):
    """torchjd 0.18's ``Krum`` sums non-squared distances; on clustered inputs (honest gradients
    plus far outliers, T − f − 2 ≥ 2 neighbours, so no ties) both rules select the same rows:
    tolerance 1e-6 of the largest gradient norm (the selection is exact; float32 Jacobian in
    manytask's engine)."""
    aggregation = require("torchjd.aggregation")
    gen = torch.Generator().manual_seed(t * 100 + f * 10 + m)
    for _ in range(5):
        jacobian = clustered(t, f, gen)
        losses = torch.ones(t, dtype=torch.float64)
        ours = manytask_direction("krum", jacobian, losses, n_byzantine=f, n_selected=m)
        theirs = torchjd_direction(aggregation.Krum(n_byzantine=f, n_selected=m), jacobian)
        assert (ours - theirs).abs().max() <= 1e-6 * jacobian.norm(dim=1).max()


def test_outliers_are_ignored():
    gen = torch.Generator().manual_seed(5)
    jacobian = clustered(7, 2, gen)
    w = krum_weights(jacobian @ jacobian.T, 2, 3)
    outliers = jacobian.norm(dim=1) > 10
    assert w[outliers].sum() == 0 and float(w.sum()) == pytest.approx(1.0)


def test_invalid_parameters():
    with pytest.raises(ConfigError, match="n_byzantine must be ≥ 0"):
        mt.balance.get("krum", list("abcde"), n_byzantine=-1)
    with pytest.raises(ConfigError, match="more than 2·n_byzantine"):
        mt.balance.get("krum", list("abcd"), n_byzantine=1)
    with pytest.raises(ConfigError, match=r"n_selected must be in \[1, 4\]"):
        mt.balance.get("krum", list("abcd"), n_selected=5)
    with pytest.raises(ConfigError, match="n_selected"):
        mt.balance.get("krum", list("abcd"), n_selected=0)
