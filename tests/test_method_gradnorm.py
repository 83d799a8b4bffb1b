"""GradNorm against its rule by hand, against LibMTL 1.1.5 on one step, its state and its
parameter checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import manytask as mt
from manytask.balance.aggregation.gradnorm import GradNorm, gradnorm_weight_gradient
from manytask.errors import ConfigError
from tests.peers import libmtl_direction, linear_losses, manytask_direction, require

NAMES = ["a", "b"]
J = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # gradient norms n = (3, 1)


def test_two_steps_by_hand():
    balancer = GradNorm(NAMES, alpha=1.5, lr=0.1)
    # step 1, L = (1, 2) = L(0): ratios (1, 1), r = (1, 1). w = (1, 1): G = (3, 1), Ḡ = 2,
    # targets (2, 2); sign(G - target) = (+1, -1): ∂L_grad/∂w = (3, -1).
    # The step uses w = (1, 1): d = g₁ + g₂ = (3, 1).
    # Then w - 0.1·(3, -1) = (0.7, 1.1), sum 1.8 → w = 2·(0.7, 1.1)/1.8 = (0.777778, 1.222222)
    d1 = balancer.direction(J, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert torch.allclose(d1, torch.tensor([3.0, 1.0]).double())
    assert torch.allclose(balancer.task_weights, torch.tensor([7 / 9, 11 / 9]).double())
    assert torch.allclose(balancer.initial_losses, torch.tensor([1.0, 2.0]).double())
    # step 2, L = (0.5, 2): L̃ = (0.5, 1), mean 0.75, r = (2/3, 4/3), r^1.5 = (0.544331, 1.539601)
    # G = (3·7/9, 11/9) = (2.333333, 1.222222), Ḡ = 1.777778, targets (0.967699, 2.737068)
    # sign(G - target) = (+1, -1) again: the gradient is (3, -1).
    # The step uses w = (7/9, 11/9): d = (7/3, 11/9) = (2.333333, 1.222222).
    # Then w - 0.1·(3, -1) = (0.477778, 1.322222), sum 1.8 → w = (0.530864, 1.469136)
    d2 = balancer.direction(J, torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert torch.allclose(d2, torch.tensor([7 / 3, 11 / 9]).double())
    assert torch.allclose(balancer.task_weights, torch.tensor([0.530864, 1.469136]).double())
    assert torch.allclose(balancer.initial_losses, torch.tensor([1.0, 2.0]).double())


@pytest.mark.parametrize("host", [True, False])
def test_a_task_at_its_target_keeps_its_weight(monkeypatch, host):
    # first step: ratios 1, w = 1, n = (1, 2, 3) → G = (1, 2, 3), Ḡ = 2 = every target; the
    # task at its target has sign 0: ∂L_grad/∂w = (−1, 0, 3), w − 0.1·(−1, 0, 3) =
    # (1.1, 1, 0.7), sum 2.8 → w = 3·(1.1, 1, 0.7)/2.8 (the host and the device path)
    from manytask.balance.aggregation import gradnorm

    if not host:
        monkeypatch.setattr(gradnorm, "on_host", lambda *tensors: False)
    balancer = GradNorm(["a", "b", "c"], lr=0.1)
    balancer.weights(torch.diag(torch.tensor([1.0, 4.0, 9.0])), torch.tensor([0.5, 1.0, 2.0]))
    expected = torch.tensor([1.1, 1.0, 0.7], dtype=torch.float64) * 3 / 2.8
    assert torch.allclose(balancer.task_weights, expected, rtol=0, atol=1e-12)


def test_weight_gradient_by_hand():
    # n = (3, 1), w = (7/9, 11/9), L = (0.5, 2), L(0) = (1, 2) → targets (0.967699, 2.737068)
    # with G = (2.333333, 1.222222): signs (+, -) → (3, -1); with α = 0 the targets are Ḡ =
    # 1.777778 and the signs are the same
    norms = torch.tensor([3.0, 1.0]).double()
    weights = torch.tensor([7 / 9, 11 / 9]).double()
    losses = torch.tensor([0.5, 2.0]).double()
    initial = torch.tensor([1.0, 2.0]).double()
    for alpha in (1.5, 0.0):
        gradient = gradnorm_weight_gradient(norms, weights, losses, initial, alpha)
        assert torch.equal(gradient, torch.tensor([3.0, -1.0]).double())


def test_weights_are_renormalised_and_kept_non_negative():
    # a huge step would make w₁ negative: it is clamped at 0, then the rest sums to T
    balancer = GradNorm(NAMES, lr=10.0)
    balancer.direction(J, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(balancer.task_weights, torch.tensor([0.0, 2.0]).double())


def libmtl_gradnorm_step(jacobian, values, initial, alpha):
    """LibMTL 1.1.5's GradNorm after its first epoch: weights ``T softmax(s)`` at ``s = 1``
    (all one), ``L(0)`` from ``train_loss_buffer[:, 0]``. Returns its direction and the
    gradient its ``L_grad.backward()`` leaves on ``s``."""
    require("LibMTL")
    from LibMTL.weighting.GradNorm import GradNorm as Peer

    t, p = jacobian.shape

    class Harness(Peer):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.task_num = t
            self.task_name = [f"t{i}" for i in range(t)]
            self.device = torch.device("cpu")
            self.rep_grad = False
            self.epoch = 1
            self.train_loss_buffer = np.stack([initial.numpy(), np.zeros(t)], axis=1)
            self.W = nn.Parameter(torch.zeros(p))

        def get_share_params(self):
            return [self.W]

        def zero_grad_share_params(self):
            if self.W.grad is not None:
                self.W.grad.zero_()

    harness = Harness()
    harness.init_param()
    losses = [(jacobian[i].float() * harness.W).sum() + values[i].float() for i in range(t)]
    harness.backward(torch.stack(losses), alpha=alpha)
    return harness.W.grad.detach().clone(), harness.loss_scale.grad.detach().clone()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_one_step_matches_libmtl(seed):
    g = torch.Generator().manual_seed(seed)
    t = 3
    jacobian = torch.randn(t, 7, generator=g)
    initial = torch.rand(t, generator=g, dtype=torch.float64) + 0.5
    values = torch.rand(t, generator=g) + 0.1
    direction, peer_gradient = libmtl_gradnorm_step(jacobian, values, initial, 1.5)
    # at equal weights both directions are Σ gᵢ (manytask's first step has w = 1)
    assert torch.allclose(manytask_direction("gradnorm", jacobian, values), direction, atol=1e-6)
    # LibMTL's s-gradient is the w-gradient through w = T softmax(s), whose Jacobian at s = 1 is
    # I - 11ᵀ/T: it equals our closed-form gradient minus its mean (float32 in LibMTL)
    j = jacobian.double()
    ours = gradnorm_weight_gradient(
        j.norm(dim=1), torch.ones(t).double(), values.double(), initial, 1.5
    )
    assert torch.allclose(peer_gradient.double(), ours - ours.mean(), atol=1e-5)


def test_first_step_matches_libmtl_first_epoch():
    # LibMTL's first epoch (epoch 0) uses equal weights, as manytask's first step
    jacobian = torch.tensor([[1.0, -2.0, 0.5], [0.3, 1.0, 1.0]])
    values = torch.tensor([0.4, 1.2])
    expected = libmtl_direction("GradNorm", jacobian, values, alpha=1.5)
    assert torch.allclose(manytask_direction("gradnorm", jacobian, values), expected, atol=1e-6)


def run_steps(balancer, jacobians, values):
    directions = []
    for jacobian, value in zip(jacobians, values, strict=True):
        w, losses = linear_losses(jacobian, value)
        balancer.backward(dict(zip(balancer.tasks, losses, strict=True)), shared=[w])
        directions.append(w.grad.detach().clone())
    return directions


def test_state_dict_resumes_exactly():
    g = torch.Generator().manual_seed(0)
    jacobians = [torch.randn(3, 5, generator=g) for _ in range(4)]
    values = [torch.rand(3, generator=g) + 0.1 for _ in range(4)]
    original = mt.balance.get("gradnorm", ["a", "b", "c"], lr=0.05)
    run_steps(original, jacobians[:3], values[:3])
    restored = mt.balance.get("gradnorm", ["a", "b", "c"], lr=0.05)
    restored.load_state_dict(original.state_dict())
    assert bool(restored.started)
    [next_original] = run_steps(original, jacobians[3:], values[3:])
    [next_restored] = run_steps(restored, jacobians[3:], values[3:])
    assert torch.equal(next_original, next_restored)


def test_a_non_finite_step_leaves_the_state_alone():
    # an AMP overflow gives inf gradients; the scaler skips that step, so must the state
    g = torch.Generator().manual_seed(0)
    jacobian = torch.randn(3, 4, generator=g, dtype=torch.float64)
    losses = torch.rand(3, generator=g, dtype=torch.float64) + 0.1
    balancer = GradNorm(["a", "b", "c"])
    balancer.direction(jacobian, losses)
    before = {k: v.clone() for k, v in balancer.state_dict().items() if torch.is_tensor(v)}
    overflow = jacobian.clone()
    overflow[0, 1] = float("inf")
    balancer.direction(overflow, losses)
    after = balancer.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize("params", [{"alpha": -0.5}, {"lr": 0.0}, {"lr": -1.0}])
def test_invalid_parameters_are_refused(params):
    with pytest.raises(ConfigError, match=next(iter(params))):
        mt.balance.get("gradnorm", NAMES, **params)


def buffers(balancer: GradNorm) -> list[tuple[str, torch.Tensor]]:
    return [(name, value.clone()) for name, value in balancer.named_buffers()]


def test_the_update_on_a_device_equals_the_one_on_a_cpu(monkeypatch):
    """On a CPU the update runs in Python floats; on a device in torch (here on CPU tensors,
    with the host path switched off). Same weights and state over steps that include the first (the
    initial losses), a non-finite Gramian, non-finite losses and a zero initial loss."""
    from manytask.balance.aggregation import gradnorm

    g = torch.Generator().manual_seed(2)
    steps = []
    for _ in range(5):
        jac = torch.randn(3, 8, generator=g)
        steps.append((jac @ jac.T, torch.rand(3, generator=g) + 0.1))
    steps[0][1][1] = 0.0  # a zero initial loss: ratio 1
    steps.insert(2, (torch.full((3, 3), float("nan")), torch.ones(3)))
    steps.insert(4, (steps[1][0], torch.tensor([1.0, float("inf"), 1.0])))
    host, device = GradNorm(["a", "b", "c"]), GradNorm(["a", "b", "c"])
    expected = [(host.weights(x, v), dict(buffers(host))) for x, v in steps]
    monkeypatch.setattr(gradnorm, "on_host", lambda *tensors: False)
    for (x, v), (weights, state) in zip(steps, expected, strict=True):
        assert torch.allclose(device.weights(x, v), weights, rtol=0, atol=1e-6)
        for key, value in buffers(device):
            assert torch.allclose(value.double(), state[key].double(), rtol=0, atol=1e-12), key
