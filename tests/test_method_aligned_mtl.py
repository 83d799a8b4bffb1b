"""Aligned-MTL against the paper's rule by hand, against torchjd, and its parameter checks."""

from __future__ import annotations

import math

import pytest
import torch

import manytask as mt
from manytask.balance.aggregation.aligned_mtl import AlignedMTL
from manytask.errors import ConfigError
from tests.peers import manytask_direction, require, torchjd_direction

ROOT2 = math.sqrt(2.0)


def test_orthogonal_gradients_by_hand():
    # g₁ = (2, 0), g₂ = (0, 1): G = diag(4, 1), V = I, λ = (4, 1). With σ = λ_min = 1,
    # B = diag(1/2, 1), w = B1 = (½, 1) and d = (1, 1): both aligned gradients have norm 1.
    jacobian = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    w = AlignedMTL(["a", "b"]).weights(jacobian @ jacobian.T, torch.ones(2))
    assert torch.allclose(w, torch.tensor([0.5, 1.0], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize(("scale_mode", "sigma"), [("min", 1.0), ("median", 1.0), ("rmse", 2.0)])
def test_correlated_gradients_by_hand(scale_mode, sigma):
    # ‖g₁‖² = ‖g₂‖² = 2, g₁ᵀg₂ = 1: G = [[2, 1], [1, 2]] with eigenpairs 3 ↔ (1, 1)/√2 and
    # 1 ↔ (1, −1)/√2. Since 1 is an eigenvector (λ = 3), G^(−½)1 = 1/√3, so w = √σ/√3 · (1, 1)
    # with σ = 1 (min; torch's lower median of {1, 3} is 1 too) or the mean 2 ("rmse").
    jacobian = torch.tensor([[ROOT2, 0.0], [1 / ROOT2, math.sqrt(1.5)]], dtype=torch.float64)
    w = AlignedMTL(["a", "b"], scale_mode=scale_mode).weights(jacobian @ jacobian.T, torch.ones(2))
    expected = math.sqrt(sigma / 3.0)
    assert torch.allclose(w, torch.full((2,), expected, dtype=torch.float64), atol=1e-12)


def test_aligned_gradients_are_orthogonal_with_equal_norms():
    # B = √σ V Λ^(−½) Vᵀ (built here with LAPACK) makes the aligned Gramian BᵀGB = σI: the
    # aligned gradients are orthogonal with norm √λ_min; the method's weights are B1.
    gen = torch.Generator().manual_seed(0)
    jacobian = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    gramian = jacobian @ jacobian.T
    values, vectors = torch.linalg.eigh(gramian)
    b = values.min().sqrt() * vectors @ torch.diag(values.rsqrt()) @ vectors.T
    aligned = b.T @ gramian @ b
    assert torch.allclose(aligned, values.min() * torch.eye(3, dtype=torch.float64))
    w = AlignedMTL(["a", "b", "c"]).weights(gramian, torch.ones(3))
    assert torch.allclose(w, b @ torch.ones(3, dtype=torch.float64), atol=1e-10)


def test_rank_deficient_and_zero():
    # duplicated gradient: G has rank 1 and one non-zero eigenvalue 2‖g‖² (eigenvector
    # (1, 1)/√2), so B = √λ · (1/√λ) vvᵀ = vvᵀ and w = vvᵀ1 = (1, 1)
    jacobian = torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
    w = AlignedMTL(["a", "b"]).weights(jacobian @ jacobian.T, torch.ones(2))
    assert torch.allclose(w, torch.ones(2, dtype=torch.float64), atol=1e-7)
    # every gradient zero: the preferences themselves (ones) — the direction is zero anyway
    w = AlignedMTL(["a", "b"]).weights(torch.zeros(2, 2), torch.ones(2))
    assert torch.equal(w, torch.ones(2))


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_matches_torchjd(scale_mode):
    """torchjd 0.18's ``AlignedMTL`` with preference vector ``1`` (its default is ``1/T``; the
    authors' code sums the aligned gradients, i.e. ``1``).

    In float64 (``direction``), tolerance 1e-9 of the largest gradient norm (observed ~1e-14).
    Through ``backward`` manytask's engine forms a float32 Jacobian, and ``"median"``/``"rmse"``
    multiply the smallest eigen-component by ``√(σ/λ_min)``, which amplifies float32 rounding
    when ``J`` is ill-conditioned: that comparison uses well-conditioned inputs (``P ≥ 2T``)
    and a tolerance of 1e-5 (observed ≤ 2e-7)."""
    aggregation = require("torchjd.aggregation")
    gen = torch.Generator().manual_seed(1)
    for t, p in [(2, 5), (3, 7), (4, 4), (5, 20), (8, 30)]:
        jacobian = torch.randn(t, p, generator=gen, dtype=torch.float64)
        losses = torch.rand(t, generator=gen, dtype=torch.float64) + 0.1
        aggregator = aggregation.AlignedMTL(
            pref_vector=torch.ones(t, dtype=torch.float64), scale_mode=scale_mode
        )
        theirs = torchjd_direction(aggregator, jacobian)
        scale = jacobian.norm(dim=1).max()
        direct = AlignedMTL([f"t{i}" for i in range(t)], scale_mode=scale_mode)
        assert (direct.direction(jacobian, losses) - theirs).abs().max() <= 1e-9 * scale
        if p >= 2 * t:
            ours = manytask_direction("aligned_mtl", jacobian, losses, scale_mode=scale_mode)
            assert (ours - theirs).abs().max() <= 1e-5 * scale


def test_invalid_parameters():
    with pytest.raises(ConfigError):
        mt.balance.get("aligned_mtl", ["a", "b"], scale_mode="max")
    with pytest.raises(ConfigError, match="scale_mode must be"):
        AlignedMTL(["a", "b"], scale_mode="mean")  # type: ignore[arg-type]


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("t", [2, 3, 7])
def test_the_cpu_path_equals_the_device_path(monkeypatch, scale_mode, t):
    """On a CPU the rule's choices on the eigenvalues run in Python floats and its product in
    numpy; on a device in torch (here on the CPU, with the host path switched off). The same weights
    on full-rank, rank-deficient (duplicate and far shorter gradients) and zero Gramians."""
    from manytask.balance.aggregation import aligned_mtl

    g = torch.Generator().manual_seed(t)
    gramians = []
    for case in range(6):
        jac = torch.randn(t, 9, generator=g, dtype=torch.float64)
        if case == 1:
            jac[-1] = jac[0]  # duplicate: one eigenvalue at zero
        if case == 2:
            jac[0] *= 1e-5  # below the authors' relative tolerance
        gramians.append(jac @ jac.T)
    gramians.append(torch.zeros(t, t, dtype=torch.float64))
    host = [aligned_mtl.aligned_weights(x, scale_mode) for x in gramians]
    monkeypatch.setattr(aligned_mtl, "on_host", lambda *tensors: False)
    for x, expected in zip(gramians, host, strict=True):
        got = aligned_mtl.aligned_weights(x, scale_mode)
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12), (x, got)
