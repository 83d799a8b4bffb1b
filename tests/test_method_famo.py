"""FAMO: the first two steps by hand (Adam and plain-step logit updates), torchjd's ``FAMO`` on
random loss sequences, the state, the log transform and the parameter checks."""

from __future__ import annotations

import math

import pytest
import torch

import manytask as mt
from manytask.balance.weighting.famo import FAMO
from manytask.errors import ConfigError
from manytask.train.statefile import join_state, split_state
from tests.peers import require


def step(balancer, values: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """One backward on losses Lᵢ = vᵢ xᵢ at x = 1 (so ∂L/∂x = diag(v)); returns weights, x.grad."""
    x = torch.nn.Parameter(torch.ones(len(values)))
    losses = {t: v * x[i] for i, (t, v) in enumerate(zip(balancer.tasks, values, strict=True))}
    result = balancer.backward(losses)
    return result.weights, x.grad


def test_first_step_by_hand():
    # ξ = 0 → z = (½, ½); L = (3, 1): w ∝ z/L = (1/6, 1/2), normalised by 2/3 → (0.25, 0.75)
    balancer = FAMO(["a", "b"])
    weights, grad = step(balancer, [3.0, 1.0])
    assert torch.allclose(weights, torch.tensor([0.25, 0.75]))
    assert torch.allclose(grad, torch.tensor([0.75, 0.75]))  # wᵢ vᵢ
    assert torch.equal(balancer.task_logits, torch.zeros(2))


def test_second_step_adam_by_hand():
    # step 2, L = (1.5, 1): δ = (log(3/1.5), log(1/1)) = (log 2, 0); zᵀδ = log2/2
    # g = z ⊙ (δ − zᵀδ) + γ ξ = ½ (log2/2, −log2/2) + 0 = (0.173287, −0.173287)
    # Adam, first update: m̂ = g, v̂ = g², ξ = −0.025 g/(|g| + 1e-8) = (−0.025, 0.025)
    # z = softmax(ξ) = (0.487503, 0.512497); z/L = (0.325002, 0.512497) → w = (0.388062, 0.611938)
    balancer = FAMO(["a", "b"])
    step(balancer, [3.0, 1.0])
    weights, _ = step(balancer, [1.5, 1.0])
    assert torch.allclose(balancer.task_logits, torch.tensor([-0.025, 0.025]), atol=1e-7)
    assert torch.allclose(weights, torch.tensor([0.388062, 0.611938]), atol=1e-6)


def test_second_step_plain_by_hand():
    # the paper's Algorithm 1: ξ = −β g = ∓0.025·0.173287 = (−0.004332, 0.004332)
    # z = (0.497834, 0.502166); z/L = (0.331889, 0.502166) → w = (0.397922, 0.602078)
    balancer = FAMO(["a", "b"], logit_optimizer="sgd")
    step(balancer, [3.0, 1.0])
    weights, _ = step(balancer, [1.5, 1.0])
    g = math.log(2) / 4
    assert torch.allclose(balancer.task_logits, torch.tensor([-0.025 * g, 0.025 * g]))
    assert torch.allclose(weights, torch.tensor([0.397922, 0.602078]), atol=1e-6)


def test_a_task_absent_from_the_batch_is_left_out():
    # task c is absent at step 2 (zero loss): the weights are normalised over a and b, and the
    # logit update is the two-task one, c's δ being the z-weighted mean of a's and b's (its own
    # term vanishes); before, c's 1/ε took nearly all the weight
    three = FAMO(["a", "b", "c"], logit_optimizer="sgd")
    step(three, [3.0, 1.0, 2.0])
    weights, _ = step(three, [1.5, 1.0, 0.0])
    # z = (⅓, ⅓, ⅓); δ = (log 2, 0, c) with c = (log 2)/2: zᵀδ = (log 2)/2,
    # g = ⅓(log2/2, −log2/2, 0): the two-task step with z scaled by ⅔
    g = math.log(2) / 6
    assert torch.allclose(three.task_logits, torch.tensor([-0.025 * g, 0.025 * g, 0.0]))
    z = torch.softmax(three.task_logits, dim=0)
    expected = torch.stack([z[0] / 1.5, z[1] / 1.0, torch.tensor(0.0)])
    assert torch.allclose(weights, expected / expected.sum(), atol=1e-7)
    assert weights[2] == 0 and weights[:2].sum() > 0.999
    step(three, [1.2, 0.9, 1.8])  # c comes back: no δ for it from the step it missed
    assert torch.isfinite(three.task_logits).all()


def test_decay_pulls_the_logits_back():
    # with equal decreases δ = (c, c) the softmax gradient vanishes; only γ ξ remains
    balancer = FAMO(["a", "b"], gamma=0.5, logit_optimizer="sgd", lr=0.1)
    balancer.logits.copy_(torch.tensor([1.0, -1.0]))
    step(balancer, [2.0, 2.0])
    step(balancer, [1.0, 1.0])
    assert torch.allclose(balancer.task_logits, torch.tensor([0.95, -0.95]))  # ξ − 0.1·0.5 ξ


def test_min_losses_shift_the_weights():
    # b = (1, 0), L = (3, 1): w ∝ ½/(3 − 1), ½/1 = (0.25, 0.5) → (1/3, 2/3)
    weights, _ = step(FAMO(["a", "b"], min_losses=[1.0, 0.0]), [3.0, 1.0])
    assert torch.allclose(weights, torch.tensor([1 / 3, 2 / 3]))


@pytest.mark.parametrize("seed", range(4))
def test_matches_torchjd_famo_with_next_step_losses(seed):
    # torchjd's FAMO is the official update (Adam, lr 0.025, weight decay 1e-3). Feeding it the
    # next step's losses as its "after" losses reproduces manytask's schedule exactly; both are
    # float32 Adam on the logits, so the weights agree to float32 rounding over 12 steps.
    scalarization = require("torchjd.scalarization")
    g = torch.Generator().manual_seed(seed)
    t = 2 + seed
    sequence = torch.rand(13, t, generator=g) * 2 + 0.05
    ours = FAMO([f"t{i}" for i in range(t)])
    theirs = scalarization.FAMO(t)
    worst = 0.0
    for i in range(12):
        values = sequence[i].clone().requires_grad_(True)
        theirs(values).backward()
        weights, _ = step(ours, sequence[i].tolist())
        worst = max(worst, float((weights - values.grad).abs().max()))
        theirs.update(sequence[i + 1])
    assert worst < 1e-6


def test_state_dict_round_trip_resumes_exactly():
    sequence = torch.rand(10, 3, generator=torch.Generator().manual_seed(3)) + 0.2
    balancer = FAMO(["a", "b", "c"])
    for values in sequence[:6]:
        step(balancer, values.tolist())
    tensors, skeleton = split_state(balancer.state_dict(), "balancer")  # the Trainer's format
    clone = FAMO(["a", "b", "c"])
    clone.load_state_dict(join_state(skeleton, tensors))
    for values in sequence[6:]:
        assert torch.equal(step(clone, values.tolist())[0], step(balancer, values.tolist())[0])


def test_log_transform_applies_famo_to_log_losses():
    # values log L with L = (e³, e): first step w ∝ ½/3, ½/1 → (0.25, 0.75) on log L
    balancer = mt.balance.get("famo", ["a", "b"], loss_transform="log")
    x = torch.nn.Parameter(torch.ones(2))
    result = balancer.backward({"a": torch.e**3 * x[0], "b": torch.e * x[1]})
    assert torch.allclose(result.weights, torch.tensor([0.25, 0.75]))
    assert torch.allclose(x.grad, torch.tensor([0.25, 0.75]))  # ∇ log Lᵢ = eᵢ


def test_logits_are_buffers_not_parameters():
    balancer = mt.balance.get("famo", ["a", "b"])
    assert list(balancer.parameters()) == []
    assert {"logits", "exp_avg", "exp_avg_sq", "previous"} <= set(balancer.state_dict())


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": math.inf}, "lr must be > 0"),
        ({"gamma": -1e-3}, "gamma must be ≥ 0"),
        ({"min_losses": [0.0]}, "one value per task"),
        ({"min_losses": [0.0, math.nan]}, "finite"),
        ({"logit_optimizer": "rmsprop"}, "logit_optimizer"),
    ],
)
def test_invalid_parameters_are_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        mt.balance.get("famo", ["a", "b"], **params)
