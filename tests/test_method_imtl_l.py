"""IMTL-L: the formula by hand (model and scale gradients), torchjd's ``IMTLL`` and LibMTL's
``IMTL`` scale gradients on random inputs, convergence of the scales, state and errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import manytask as mt
from manytask.balance.weighting.imtl_l import IMTLLoss
from manytask.errors import ConfigError
from tests.peers import linear_losses, require


def losses_at_one() -> tuple[torch.nn.Parameter, dict[str, torch.Tensor]]:
    # p = (1, 1); L_a = 2 p0 + p1 = 3 with gradient (2, 1); L_b = p0² = 1 with gradient (2, 0)
    p = torch.nn.Parameter(torch.ones(2))
    return p, {"a": 2 * p[0] + p[1], "b": p[0] ** 2}


def test_weights_and_gradients_by_hand():
    # s = (0, log 2): w = e^s = (1, 2); grad = (2, 1) + 2 (2, 0) = (6, 1)
    # ∂/∂s (e^s L − s) = e^s L − 1 = (1·3 − 1, 2·1 − 1) = (2, 1)
    balancer = IMTLLoss(["a", "b"])
    with torch.no_grad():
        balancer.log_scale.copy_(torch.tensor([0.0, math.log(2.0)]))
    p, losses = losses_at_one()
    step = balancer.backward(losses)
    assert torch.allclose(step.weights, torch.tensor([1.0, 2.0]))
    assert torch.allclose(p.grad, torch.tensor([6.0, 1.0]))
    assert torch.allclose(balancer.log_scale.grad, torch.tensor([2.0, 1.0]))


def test_starts_as_equal_weighting_and_scales_are_parameters():
    balancer = mt.balance.get("imtl_l", ["a", "b"])
    assert [n for n, _ in balancer.named_parameters()] == ["log_scale"]
    p, losses = losses_at_one()
    assert torch.equal(balancer.backward(losses).weights, torch.ones(2))
    assert torch.allclose(p.grad, torch.tensor([4.0, 1.0]))


def test_scaled_loss_converges_to_one():
    # for a fixed loss L the optimum of e^s L − s is e^s L = 1, i.e. s = −log L
    balancer = IMTLLoss(["a", "b"])
    optimizer = torch.optim.SGD(balancer.parameters(), lr=0.1)
    for _ in range(400):
        optimizer.zero_grad()
        x = torch.tensor([4.0, 0.25], requires_grad=True)
        balancer.backward({"a": x[0], "b": x[1]})
        optimizer.step()
    assert torch.allclose(balancer.log_scale.detach(), -torch.tensor([4.0, 0.25]).log(), atol=1e-4)


def _random_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = 2 + seed
    jacobian = torch.randn(t, 5, generator=g)
    values = torch.rand(t, generator=g) * 3 + 0.1
    scales = torch.randn(t, generator=g)
    return jacobian, values, scales


@pytest.mark.parametrize("seed", range(5))
def test_matches_torchjd_imtll(seed):
    # torchjd's IMTLL scalarizer is Σ (e^s L − s): the same objective in float32, so the model
    # gradient and the scale gradient agree to float32 rounding: rtol 1e-5, atol 1e-6.
    scalarization = require("torchjd.scalarization")
    jacobian, values, scales = _random_case(seed)
    t = len(values)
    ours = IMTLLoss([f"t{i}" for i in range(t)])
    with torch.no_grad():
        ours.log_scale.copy_(scales)
    w1, losses = linear_losses(jacobian, values)
    ours.backward({f"t{i}": loss for i, loss in enumerate(losses)})
    theirs = scalarization.IMTLL(t)
    with torch.no_grad():
        theirs.log_scale.copy_(scales)
    w2, losses = linear_losses(jacobian, values)
    theirs(torch.stack(losses)).backward()
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours.log_scale.grad, theirs.log_scale.grad, rtol=1e-5, atol=1e-6)


def libmtl_scale_gradient(jacobian: torch.Tensor, values: torch.Tensor, scales: torch.Tensor):
    """LibMTL's IMTL on the same input: the gradient its ``loss_scale`` receives.

    LibMTL's ``IMTL`` is the hybrid method: the shared parameters get the IMTL-G direction, so
    only the loss-scale gradient, e^s L − 1 from the per-task backward passes, is IMTL-L.
    """
    require("LibMTL")
    from LibMTL.weighting.IMTL import IMTL

    t, p = jacobian.shape

    class Harness(IMTL):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.task_num = t
            self.device = torch.device("cpu")
            self.rep_grad = False
            self.W = nn.Parameter(torch.zeros(p))

        def get_share_params(self):
            return [self.W]

        def zero_grad_share_params(self) -> None:
            if self.W.grad is not None:
                self.W.grad.zero_()

    harness = Harness()
    harness.init_param()
    with torch.no_grad():
        harness.loss_scale.copy_(scales)
    losses = [(jacobian[i] * harness.W).sum() + values[i] for i in range(t)]
    harness.backward(torch.stack(losses))
    return harness.loss_scale.grad.detach().clone()


@pytest.mark.parametrize("seed", range(5))
def test_scale_gradient_matches_libmtl_imtl(seed):
    # both are e^s L − 1 in float32: rtol 1e-5, atol 1e-6
    jacobian, values, scales = _random_case(seed)
    t = len(values)
    ours = IMTLLoss([f"t{i}" for i in range(t)])
    with torch.no_grad():
        ours.log_scale.copy_(scales)
    _w, losses = linear_losses(jacobian, values)
    ours.backward({f"t{i}": loss for i, loss in enumerate(losses)})
    theirs = libmtl_scale_gradient(jacobian, values, scales)
    assert torch.allclose(ours.log_scale.grad, theirs, rtol=1e-5, atol=1e-6)


def test_log_transform_by_hand():
    # values log L with L = (e², e), i.e. (2, 1), s = 0: w = (1, 1); L_a = e² x, L_b = e y at
    # x = y = 1: grad = (1, 1); scale gradient e^s log L − 1 = (1, 0)
    balancer = mt.balance.get("imtl_l", ["a", "b"], loss_transform="log")
    x = torch.nn.Parameter(torch.ones(2))
    balancer.backward({"a": torch.e**2 * x[0], "b": torch.e * x[1]})
    assert torch.allclose(x.grad, torch.tensor([1.0, 1.0]))
    assert torch.allclose(balancer.log_scale.grad, torch.tensor([1.0, 0.0]), atol=1e-6)


def test_state_dict_round_trip():
    balancer = mt.balance.get("imtl_l", ["a", "b"], init_scale=0.3)
    with torch.no_grad():
        balancer.log_scale.add_(torch.tensor([0.1, -0.2]))
    clone = mt.balance.get("imtl_l", ["a", "b"])
    clone.load_state_dict(balancer.state_dict())
    values = torch.tensor([2.0, 5.0])
    assert torch.equal(clone.weights(values), balancer.weights(values))


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_invalid_init_scale_is_an_error(value):
    with pytest.raises(ConfigError, match="init_scale"):
        mt.balance.get("imtl_l", ["a"], init_scale=value)
