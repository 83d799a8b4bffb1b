"""The two-task closed forms of the rules that invert the cosine matrix (IMTL-G, ConFIG)
against their general path through the pseudo-inverse."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from manytask.balance.aggregation.config import _config, _config_pair
from manytask.balance.aggregation.imtl import _imtl_g, _imtl_g_pair
from manytask.balance.solvers.cosines import pair_inverse_ones

FLOAT64, FLOAT32 = 2 * 2.2e-16, 2 * 1.2e-7  # two tasks' rank tolerances


def pair_gramians():
    """Two-task Gramians with a rounding: random, nearly parallel and nearly opposite (on
    either side of the float64 and float32 tolerances), unequal norms, zero gradients."""
    gen = torch.Generator().manual_seed(7)
    for _ in range(20):
        jacobian = torch.randn(2, 6, generator=gen, dtype=torch.float64)
        yield jacobian @ jacobian.T, FLOAT64
    for gap in [1e-2, 1e-5, 1e-9]:
        for sign in [1.0, -1.0]:
            second = [sign * 5.0 * math.cos(gap), 5.0 * math.sin(gap)]
            jacobian = torch.tensor([[2.0, 0.0], second], dtype=torch.float64)
            for rounding in [FLOAT64, FLOAT32]:
                yield jacobian @ jacobian.T, rounding
    yield torch.tensor([[1e12, 3e5], [3e5, 1e-2]], dtype=torch.float64), FLOAT64
    yield torch.tensor([[4.0, 2.0], [2.0, 1.0]], dtype=torch.float64), FLOAT64  # parallel
    yield torch.tensor([[4.0, -2.0], [-2.0, 1.0]], dtype=torch.float64), FLOAT64  # opposite
    yield torch.tensor([[3.0, 1e-7], [1e-7, 0.0]], dtype=torch.float64), FLOAT64  # one zero
    yield torch.tensor([[0.0, 0.0], [0.0, 2.0]], dtype=torch.float64), FLOAT64
    yield torch.zeros(2, 2, dtype=torch.float64), FLOAT64


@pytest.mark.parametrize(
    ("pair", "general"),
    [(_imtl_g_pair, _imtl_g), (_config_pair, _config)],
    ids=["imtl_g", "config"],
)
def test_two_tasks_in_closed_form_equal_the_pseudo_inverse_rule(pair, general):
    """IMTL-G's α = (n₂, n₁)/(n₁ + n₂) and ConFIG's w = ½(n₁ + n₂)(1/n₁, 1/n₂), or zeros for
    gradients opposite within the tolerance: the general rule's weights to 1e-9 of the
    largest, or to its own rounding, 1e-15 times the condition number of C, where that is
    larger (ConFIG's ‖g_v‖² = uᵀCu at an angle π − 1e-5: C's condition number is 4e10)."""
    opposite = 0
    for gramian, rounding in pair_gramians():
        expected = general(gramian.numpy(), rounding)
        got = np.array(pair(gramian.tolist(), rounding))
        norms = np.sqrt(np.diag(gramian.numpy()))
        c = abs(float(gramian[0, 1])) / max(float(norms.prod()), 1e-300)
        condition = (1 + c) / max(1 - c, 1e-300)
        scale = max(float(np.abs(expected).max()), 1.0)
        tolerance = max(1e-9, 1e-15 * condition) * scale
        assert np.abs(got - expected).max() <= tolerance, (gramian, got, expected)
        opposite += not got.any()
    assert opposite == 5  # both zero, opposite, and gap 1e-9 (both dtypes) and 1e-5 (float32)
    assert pair([[1.0, math.nan], [math.nan, 1.0]], FLOAT64) is None


def test_pair_inverse_ones_by_hand():
    # g₁ = (1, 0), g₂ = (1, 1): n = (1, √2), c = 1/√2, C⁻¹1 = 1/(1 + c), 1ᵀC⁻¹1 = 2/(1 + c)
    c = 1 / math.sqrt(2.0)
    beta, squared = pair_inverse_ones([[1.0, 1.0], [1.0, 2.0]], FLOAT64)
    assert beta == pytest.approx([1 / (1 + c), 1 / (math.sqrt(2.0) * (1 + c))], rel=1e-15)
    assert squared == pytest.approx(2 / (1 + c), rel=1e-15)
    assert pair_inverse_ones([[4.0, 0.0], [0.0, 0.0]], FLOAT64) == ([0.5, 0.0], 1.0)
