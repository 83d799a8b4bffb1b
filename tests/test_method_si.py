"""Scale-invariant baseline: the formula by hand, the gradient of Σ log Lᵢ on random inputs,
scale invariance, and the log transform."""

from __future__ import annotations

import pytest
import torch

import manytask as mt
from manytask.errors import ConfigError
from tests.peers import linear_losses, manytask_direction


def losses_at_one() -> tuple[torch.nn.Parameter, dict[str, torch.Tensor]]:
    # p = (1, 1); L_a = 2 p0 + p1 = 3 with gradient (2, 1); L_b = p0² = 1 with gradient (2, 0)
    p = torch.nn.Parameter(torch.ones(2))
    return p, {"a": 2 * p[0] + p[1], "b": p[0] ** 2}


def test_weights_and_gradient_by_hand():
    # w = 1/L = (1/3, 1): grad = (2, 1)/3 + (2, 0) = (8/3, 1/3), the gradient of log L_a + log L_b
    p, losses = losses_at_one()
    step = mt.balance.get("si", ["a", "b"]).backward(losses)
    assert torch.allclose(step.weights, torch.tensor([1 / 3, 1.0]))
    assert torch.allclose(p.grad, torch.tensor([8 / 3, 1 / 3]))


@pytest.mark.parametrize("seed", range(5))
def test_equals_the_gradient_of_the_sum_of_log_losses(seed):
    # No peer library ships SI; the reference is Nash-MTL's definition, sum(log(losses)),
    # differentiated by autograd on the same linear losses. The weights are float32 (relative
    # error 6e-8 each) and the components are sums that can cancel: rtol 1e-5, atol 1e-6.
    g = torch.Generator().manual_seed(seed)
    t = 2 + seed
    jacobian = torch.randn(t, 5, generator=g, dtype=torch.float64)
    values = torch.rand(t, generator=g, dtype=torch.float64) * 10 + 0.05
    ours = manytask_direction("si", jacobian, values)
    w, losses = linear_losses(jacobian, values)
    torch.stack(losses).log().sum().backward()
    assert torch.allclose(ours, w.grad, rtol=1e-5, atol=1e-6)


def test_scale_invariance():
    # multiplying a loss by 100 leaves the update unchanged
    p, losses = losses_at_one()
    mt.balance.get("si", ["a", "b"]).backward(losses)
    q, scaled = losses_at_one()
    mt.balance.get("si", ["a", "b"]).backward({"a": 100 * scaled["a"], "b": scaled["b"]})
    assert torch.allclose(p.grad, q.grad)


def test_log_transform_by_hand():
    # values log L with L = (e², e): w = 1/log L = (1/2, 1); L_a = e² x, L_b = e y at x = y = 1,
    # ∇ log L_a = (1, 0), ∇ log L_b = (0, 1): grad = (1/2, 1), the gradient of log log L_a + …
    x = torch.nn.Parameter(torch.ones(2))
    losses = {"a": torch.e**2 * x[0], "b": torch.e * x[1]}
    step = mt.balance.get("si", ["a", "b"], loss_transform="log").backward(losses)
    assert torch.allclose(step.weights, torch.tensor([0.5, 1.0]))
    assert torch.allclose(x.grad, torch.tensor([0.5, 1.0]))


def test_zero_loss_gives_finite_weights():
    weights = mt.balance.get("si", ["a", "b"]).weights(torch.tensor([0.0, 2.0]))
    assert torch.isfinite(weights).all()
    assert weights[1] == 0.5


def test_takes_no_parameters():
    with pytest.raises(ConfigError, match="unknown key"):
        mt.balance.get("si", ["a"], eps=1.0)
