"""SDMGrad (one batch per step) against its rule by hand, against torchjd's SDMGradWeighting fed
with the Gramian, its state and its parameter checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import manytask as mt
from manytask.balance.aggregation.sdmgrad import SDMGrad, _inner_steps, _pair_steps, sdmgrad_inner
from manytask.errors import ConfigError
from tests.peers import manytask_direction, require

NAMES = ["a", "b"]
J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)


def test_one_inner_step_by_hand():
    # G = diag(1, 4); s = (√1 + √4)/2 = 1.5; A = G/s² = diag(4/9, 16/9)
    # w = (½, ½), λ = 0.3, w̃ = (½, ½): A(w + λw̃) = A·(0.65, 0.65) = (0.288889, 1.155556)
    # w - 1·that = (0.211111, -0.655556) → Π: θ = (0.211111 - 0.655556 - 1)/2 = -0.722222,
    # both stay positive: w = (0.933333, 0.066667) = (14/15, 1/15)
    # weights = (w + 0.3·½)/1.3 = (1.083333, 0.216667)/1.3 = (5/6, 1/6); d = (5/6, 2/6)
    balancer = SDMGrad(NAMES, lam=0.3, lr=1.0, momentum=0.0, iterations=1)
    d = balancer.direction(J, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(balancer.inner_weights, torch.tensor([14 / 15, 1 / 15]).double())
    assert torch.allclose(d, torch.tensor([5 / 6, 2 / 6]).double())


def test_second_inner_step_uses_momentum_by_hand():
    # continuing with μ = 0.5: v₁ = (0.288889, 1.155556); A(w₁ + 0.15) = A·(1.083333, 0.216667)
    # = (0.481481, 0.385185); v₂ = ½v₁ + that = (0.625926, 0.962963)
    # w₁ - v₂ = (0.307407, -0.896296) → Π = (1, 0) (the second coordinate leaves the support)
    w = sdmgrad_inner(J @ J.T, torch.full((2,), 0.5).double(), 0.3, 1.0, 0.5, 2)
    assert torch.allclose(w, torch.tensor([1.0, 0.0]).double())


def test_inner_weights_are_warm_started_across_steps():
    balancer = SDMGrad(NAMES, iterations=1, lr=1.0, momentum=0.0)
    balancer.direction(J, torch.ones(2))
    after_one = balancer.inner_weights.clone()
    balancer.direction(J, torch.ones(2))
    expected = sdmgrad_inner(J @ J.T, after_one, 0.3, 1.0, 0.0, 1)
    assert torch.allclose(balancer.inner_weights, expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torchjd_weighting_on_the_gramian_over_several_steps(seed):
    aggregation = require("torchjd.aggregation")
    g = torch.Generator().manual_seed(seed)
    t = 4
    jacobians = [torch.randn(t, 9, generator=g, dtype=torch.float64) for _ in range(5)]
    mine = SDMGrad([f"t{i}" for i in range(t)])
    # torchjd's defaults equal ours (λ 0.3, lr 10, momentum 0.5, 20 iterations)
    peer = aggregation.SDMGradWeighting()
    for jacobian in jacobians:
        got = mine.direction(jacobian, torch.ones(t, dtype=torch.float64))
        expected = peer(jacobian @ jacobian.T) @ jacobian
        # torchjd divides by s² + 1e-8 where manytask divides by s² (s² ≈ 9 here): ~1e-9
        assert torch.allclose(got, expected, atol=1e-7)


def test_matches_torchjd_through_backward():
    aggregation = require("torchjd.aggregation")
    g = torch.Generator().manual_seed(4)
    jacobian = torch.randn(3, 6, generator=g)
    got = manytask_direction("sdmgrad", jacobian, torch.ones(3))
    j = jacobian.double()
    expected = aggregation.SDMGradWeighting()(j @ j.T) @ j
    assert torch.allclose(got.double(), expected, atol=1e-5)  # float32 Jacobian in manytask


def test_state_dict_resumes_exactly():
    g = torch.Generator().manual_seed(0)
    jacobians = [torch.randn(3, 5, generator=g) for _ in range(3)]
    original = SDMGrad(["a", "b", "c"])
    for jacobian in jacobians[:2]:
        original.direction(jacobian, torch.ones(3))
    restored = SDMGrad(["a", "b", "c"])
    restored.load_state_dict(original.state_dict())
    assert torch.equal(
        restored.direction(jacobians[2], torch.ones(3)),
        original.direction(jacobians[2], torch.ones(3)),
    )


def test_a_non_finite_step_leaves_the_state_alone():
    # an AMP overflow gives inf gradients; the scaler skips that step, so must the state
    g = torch.Generator().manual_seed(0)
    jacobian = torch.randn(3, 4, generator=g, dtype=torch.float64)
    losses = torch.rand(3, generator=g, dtype=torch.float64) + 0.1
    balancer = SDMGrad(["a", "b", "c"])
    balancer.direction(jacobian, losses)
    before = {k: v.clone() for k, v in balancer.state_dict().items() if torch.is_tensor(v)}
    overflow = jacobian.clone()
    overflow[0, 1] = float("inf")
    balancer.direction(overflow, losses)
    after = balancer.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize(
    "params",
    [{"lam": -0.1}, {"lr": 0.0}, {"momentum": 1.0}, {"momentum": -0.1}, {"iterations": 0}],
)
def test_invalid_parameters_are_refused(params):
    with pytest.raises(ConfigError, match=next(iter(params))):
        mt.balance.get("sdmgrad", NAMES, **params)


@pytest.mark.parametrize("seed", range(6))
def test_two_tasks_in_python_floats_match_the_numpy_steps(seed):
    """Two tasks take a path of Python floats; it agrees with the general steps, including
    starts and Gramians where a coordinate leaves the simplex's support."""
    g = torch.Generator().manual_seed(seed)
    jac = torch.randn(2, 5, generator=g, dtype=torch.float64) * torch.tensor([[1.0], [30.0]])
    gramian = (jac @ jac.T).numpy()
    start = torch.rand(2, generator=g, dtype=torch.float64)
    start = (start / start.sum()).numpy()
    for lr, momentum in [(10.0, 0.5), (1.0, 0.0), (0.1, 0.9)]:
        general = _inner_steps(gramian, start, 0.3, lr, momentum, 20)
        pair = _pair_steps(gramian.tolist(), start.tolist(), 0.3, lr, momentum, 20)
        assert np.allclose(pair, general, rtol=0, atol=1e-12), (lr, momentum, pair, general)


@pytest.mark.parametrize("t", [3, 10])
def test_the_torch_steps_of_an_accelerator_equal_the_numpy_steps(t):
    """The steps run in numpy on a CPU and in torch elsewhere (here a float64 CPU tensor):
    the same weights, and the start is left as it was."""
    g = torch.Generator().manual_seed(t)
    jac = torch.randn(t, 7, generator=g, dtype=torch.float64)
    gramian = jac @ jac.T
    start = torch.rand(t, generator=g, dtype=torch.float64)
    start /= start.sum()
    before = start.clone()
    for lr, momentum in [(10.0, 0.5), (0.1, 0.9)]:
        host = _inner_steps(gramian.numpy(), start.numpy(), 0.3, lr, momentum, 20)
        device = _inner_steps(gramian, start, 0.3, lr, momentum, 20)
        assert np.allclose(device.numpy(), host, rtol=0, atol=1e-12), (lr, momentum)
    assert torch.equal(start, before)


@pytest.mark.parametrize("t", [2, 4])
def test_the_weights_on_a_device_equal_those_on_a_cpu(monkeypatch, t):
    """A device keeps its Gramian in torch (the finite test stays on the device); on a CPU
    the bookkeeping runs in numpy, or for two tasks in Python floats. Both give the same
    weights and states over steps that include non-finite Gramians (the state is kept, as on
    a CPU)."""
    from manytask.balance.aggregation import sdmgrad

    g = torch.Generator().manual_seed(5)
    gramians = []
    for _ in range(4):
        jac = torch.randn(t, 9, generator=g)
        gramians.append(jac @ jac.T)
    gramians.insert(2, torch.full((t, t), float("inf")))
    nan = gramians[0].clone()
    nan[t - 1, t - 1] = float("nan")
    gramians.insert(4, nan)
    names = list("abcd")[:t]
    host, device = SDMGrad(names), SDMGrad(names)
    expected = [(host.weights(x, torch.ones(t)), host.inner_weights.clone()) for x in gramians]
    monkeypatch.setattr(sdmgrad, "on_host", lambda *tensors: False)
    for x, (weights, state) in zip(gramians, expected, strict=True):
        got = device.weights(x, torch.ones(t))
        assert torch.allclose(got, weights, rtol=0, atol=1e-6)
        assert torch.allclose(device.inner_weights, state, rtol=0, atol=1e-12)
