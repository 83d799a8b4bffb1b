"""Properties shared by every registered gradient-based method, checked with hypothesis.

Each method declares what it promises (``permutation_invariant``, ``non_conflicting``,
``homogeneous``); every method must map finite inputs — zero rows and duplicate rows
included — to a finite direction.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import manytask as mt
from manytask import registry
from manytask.balance.base import _GradientMethod

METHODS = sorted(e.name for e in registry.entries("balancer") if issubclass(e.obj, _GradientMethod))
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def jacobians(draw, min_tasks=2, max_tasks=6):
    t = draw(st.integers(min_tasks, max_tasks))
    p = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    jacobian = torch.randn(t, p, generator=g, dtype=torch.float64) * scale
    kind = draw(st.sampled_from(["plain", "zero_row", "duplicate_row", "all_zero"]))
    if kind == "zero_row":
        jacobian[draw(st.integers(0, t - 1))] = 0.0
    elif kind == "duplicate_row":
        jacobian[1] = jacobian[0]
    elif kind == "all_zero":
        jacobian.zero_()
    losses = torch.rand(t, generator=g, dtype=torch.float64) + 0.1
    return jacobian, losses


def build(name: str, t: int) -> _GradientMethod:
    torch.manual_seed(0)
    balancer = mt.balance.get(name, [f"t{i}" for i in range(t)])
    assert isinstance(balancer, _GradientMethod)
    return balancer


def test_there_are_gradient_methods_to_check():
    assert {"mgda", "pcgrad"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
@SETTINGS
@given(data=jacobians())
def test_finite_input_gives_finite_output(name, data):
    jacobian, losses = data
    d = build(name, jacobian.shape[0]).direction(jacobian, losses)
    assert d.shape == (jacobian.shape[1],)
    assert torch.isfinite(d).all()


@pytest.mark.parametrize(
    "name", [n for n in METHODS if registry.get("balancer", n).permutation_invariant]
)
@SETTINGS
@given(data=jacobians(), perm_seed=st.integers(0, 1000))
def test_permutation_invariance(name, data, perm_seed):
    jacobian, losses = data
    perm = torch.randperm(jacobian.shape[0], generator=torch.Generator().manual_seed(perm_seed))
    balancer = build(name, jacobian.shape[0])
    a = balancer.direction(jacobian, losses)
    b = build(name, jacobian.shape[0]).direction(jacobian[perm], losses[perm])
    scale = jacobian.abs().max().clamp_min(1e-12)
    if not balancer.homogeneous:
        # the direction's scale is not J's: Nash-MTL's has norm √T (one after clipping) however
        # small J is, so rounding noise is measured against max(scale, 1) (two exactly opposite
        # gradients of size 4e-4, no solution: both orders give noise of 1e-8)
        scale = scale.clamp_min(1.0)
    assert torch.allclose(a, b, atol=1e-5 * float(scale), rtol=1e-4)


@pytest.mark.parametrize(
    "name", [n for n in METHODS if registry.get("balancer", n).non_conflicting]
)
@SETTINGS
@given(data=jacobians())
def test_no_conflict_with_any_task(name, data):
    jacobian, losses = data
    d = build(name, jacobian.shape[0]).direction(jacobian, losses)
    products = jacobian @ d
    scale = float((jacobian.norm(dim=1).max() ** 2).clamp_min(1e-30))  # d may vanish
    assert (products >= -1e-6 * scale).all(), products


@pytest.mark.parametrize("name", [n for n in METHODS if registry.get("balancer", n).homogeneous])
@SETTINGS
@given(data=jacobians(), c=st.sampled_from([0.01, 0.5, 3.0, 100.0]))
def test_homogeneous_under_scaling(name, data, c):
    jacobian, losses = data
    a = build(name, jacobian.shape[0]).direction(jacobian, losses)
    b = build(name, jacobian.shape[0]).direction(c * jacobian, losses)
    scale = float(c * jacobian.abs().max().clamp_min(1e-12))
    assert torch.allclose(b, c * a, atol=1e-5 * scale, rtol=1e-4)
