"""STCH: warm-up, nadir and smooth Tchebycheff weights by hand, a transcription of the authors'
multi-task rule on random epochs, torchjd's ``STCH`` for the paper's formula, state and errors."""

from __future__ import annotations

import math

import pytest
import torch

import manytask as mt
from manytask.balance.weighting.stch import SmoothTchebycheff
from manytask.errors import ConfigError
from manytask.train.statefile import join_state, split_state
from tests.peers import require


def step(balancer, values: list[float]) -> torch.Tensor:
    """One backward on losses Lᵢ = vᵢ xᵢ at x = 1; returns the weights."""
    x = torch.nn.Parameter(torch.ones(len(values)))
    losses = {t: v * x[i] for i, (t, v) in enumerate(zip(balancer.tasks, values, strict=True))}
    weights = balancer.backward(losses).weights
    assert torch.allclose(x.grad, weights * torch.tensor(values))  # ∂/∂xᵢ = wᵢ vᵢ
    return weights


def test_warmup_nadir_and_weights_by_hand():
    # warm-up (1 epoch): w = 1/L. Epoch 0 losses (2, 1) and (4, 3) → nadir n = (3, 2).
    # Epoch 1, L = (1.5, 1.5): f = log(L/n) = (log ½, log ¾); p = softmax(f/μ) ∝ (½, ¾) = (0.4, 0.6)
    # ∂𝓛/∂f = T p = (0.8, 1.2); ∂f/∂L = 1/L → w = (0.8/1.5, 1.2/1.5) = (0.533333, 0.8)
    stch = SmoothTchebycheff(["a", "b"], warmup_epochs=1)
    assert torch.allclose(step(stch, [2.0, 1.0]), torch.tensor([0.5, 1.0]))
    assert torch.allclose(step(stch, [4.0, 3.0]), torch.tensor([0.25, 1 / 3]))
    stch.end_epoch()
    assert torch.allclose(stch.nadir, torch.tensor([3.0, 2.0]))
    assert torch.allclose(step(stch, [1.5, 1.5]), torch.tensor([0.8 / 1.5, 1.2 / 1.5]))


def test_preference_and_ideal_point_by_hand():
    # normalization "none", no warm-up, λ = (¼, ¾) → λ̃ = Tλ = (½, 3/2), z* = (0, 0.5), μ = 1
    # L = (1, 1): λ̃ (L − z*) = (½, ¾); p = softmax = (0.437823, 0.562177)
    # w = T λ̃ p = (0.437823, 1.686532)
    stch = SmoothTchebycheff(
        ["a", "b"], warmup_epochs=0, normalization="none", preference=[1, 3], ideal=[0.0, 0.5]
    )
    e1, e2 = math.exp(0.5), math.exp(0.75)
    p = [e1 / (e1 + e2), e2 / (e1 + e2)]
    assert torch.allclose(step(stch, [1.0, 1.0]), torch.tensor([p[0], 3 * p[1]]))


def official_rule(epochs: list[torch.Tensor], mu: float, warmup_epoch: int) -> list[torch.Tensor]:
    """The authors' multi-task STCH (``Xi-L/STCH``, ``STCH_MTL/LibMTL/weighting/STCH.py``),
    transcribed: gradients of its objective with respect to the loss values, step by step.

    Epochs before ``warmup_epoch`` and ``warmup_epoch`` itself minimise Σ log(L + 1e-20), the
    latter also averaging the losses into the nadir; later epochs minimise
    T·μ·log Σ exp((log(L/nadir + 1e-20) − max)/μ). float64 autograd.
    """
    grads, total, count, nadir = [], 0.0, 0, None
    for epoch, batches in enumerate(epochs):
        for values in batches:
            losses = values.double().clone().requires_grad_(True)
            if epoch <= warmup_epoch:
                objective = torch.log(losses + 1e-20).sum()
                if epoch == warmup_epoch:
                    total, count = total + values.double(), count + 1
            else:
                if nadir is None:
                    nadir = total / count
                f = torch.log(losses / nadir + 1e-20)
                shifted = f - f.detach().max()
                objective = mu * torch.log(torch.exp(shifted / mu).sum()) * len(values)
            objective.backward()
            grads.append(losses.grad)
    return grads


@pytest.mark.parametrize(("seed", "mu"), [(0, 1.0), (1, 0.1), (2, 0.5)])
def test_matches_the_authors_multitask_rule(seed, mu):
    # manytask's warmup_epochs = the authors' STCH_warmup_epoch + 1. float32 against float64:
    # rtol 1e-5.
    g = torch.Generator().manual_seed(seed)
    t = 3 + seed
    epochs = [torch.rand(4, t, generator=g) * 2 + 0.1 for _ in range(5)]
    reference = official_rule(epochs, mu, warmup_epoch=1)
    stch = SmoothTchebycheff([f"t{i}" for i in range(t)], mu=mu, warmup_epochs=2)
    ours = []
    for batches in epochs:
        ours.extend(step(stch, values.tolist()) for values in batches)
        stch.end_epoch()
    for a, b in zip(ours, reference, strict=True):
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", range(4))
def test_paper_formula_matches_torchjd_stch(seed):
    # normalization "none": 𝓛 = Tμ log Σ exp(λ̃ (L − z*)/μ) = T² g_{μ/T}(λ), g the paper's (and
    # torchjd's STCH) scalarization; compare manytask's weights with T² × torchjd's gradient.
    # float32 on both sides: rtol 1e-5.
    scalarization = require("torchjd.scalarization")
    g = torch.Generator().manual_seed(seed)
    t, mu = 2 + seed, [1.0, 0.3, 0.1, 2.0][seed]
    preference = torch.rand(t, generator=g) + 0.1
    ideal = torch.rand(t, generator=g) * 0.1
    values = torch.rand(t, generator=g) * 2 + 0.2
    stch = SmoothTchebycheff(
        [f"t{i}" for i in range(t)],
        mu=mu,
        preference=preference.tolist(),
        warmup_epochs=0,
        normalization="none",
        ideal=ideal.tolist(),
    )
    ours = step(stch, values.tolist())
    leaf = values.clone().requires_grad_(True)
    peer = scalarization.STCH(mu / t, weights=preference / preference.sum(), reference=ideal)
    peer(leaf).backward()
    assert torch.allclose(ours, t**2 * leaf.grad, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_mid_warmup_and_after():
    g = torch.Generator().manual_seed(7)
    epochs = [torch.rand(3, 3, generator=g) + 0.2 for _ in range(4)]
    stch = SmoothTchebycheff(["a", "b", "c"], warmup_epochs=2)
    for batches in epochs[:2]:
        for values in batches:
            step(stch, values.tolist())
        stch.end_epoch()
    step(stch, epochs[2][0].tolist())  # mid-epoch, right after the warm-up
    tensors, skeleton = split_state(stch.state_dict(), "balancer")
    clone = SmoothTchebycheff(["a", "b", "c"], warmup_epochs=2)
    clone.load_state_dict(join_state(skeleton, tensors))
    for balancer in (stch, clone):
        for values in epochs[2][1:]:
            step(balancer, values.tolist())
        balancer.end_epoch()
    for values in epochs[3]:
        assert torch.equal(step(clone, values.tolist()), step(stch, values.tolist()))


def test_warmup_nadir_survives_a_resume_inside_the_last_warmup_epoch():
    g = torch.Generator().manual_seed(8)
    batches = torch.rand(4, 2, generator=g) + 0.5
    stch = SmoothTchebycheff(["a", "b"], warmup_epochs=1)
    step(stch, batches[0].tolist())
    clone = SmoothTchebycheff(["a", "b"], warmup_epochs=1)
    clone.load_state_dict(stch.state_dict())
    for balancer in (stch, clone):
        for values in batches[1:]:
            step(balancer, values.tolist())
        balancer.end_epoch()
    assert torch.equal(clone.nadir, stch.nadir)
    assert torch.allclose(stch.nadir, batches.mean(dim=0))


def test_log_transform_by_hand():
    # values log L; warm-up weights 1/(log L): L = (e², e) → (½, 1) on the log-losses
    stch = mt.balance.get("stch", ["a", "b"], loss_transform="log")
    x = torch.nn.Parameter(torch.ones(2))
    result = stch.backward({"a": torch.e**2 * x[0], "b": torch.e * x[1]})
    assert torch.allclose(result.weights, torch.tensor([0.5, 1.0]))
    assert torch.allclose(x.grad, torch.tensor([0.5, 1.0]))


def test_end_epoch_without_steps_changes_nothing():
    stch = SmoothTchebycheff(["a", "b"], warmup_epochs=1)
    stch.end_epoch()
    assert stch.in_warmup


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"mu": 0.0}, "mu must be > 0"),
        ({"mu": -1.0}, "mu must be > 0"),
        ({"warmup_epochs": -1}, "warmup_epochs must be ≥ 0"),
        ({"warmup_epochs": 0}, "warmup_epochs must be ≥ 1"),
        ({"ideal": [0.0, 0.0]}, "ideal applies to normalization='none'"),
        ({"preference": [1.0]}, "one value per task"),
        ({"preference": [1.0, -1.0]}, "preference must be ≥ 0"),
        ({"preference": [0.0, 0.0]}, "positive sum"),
        ({"normalization": "minmax"}, "normalization"),
        ({"normalization": "none", "ideal": [0.0, math.inf]}, "finite"),
    ],
)
def test_invalid_parameters_are_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        mt.balance.get("stch", ["a", "b"], **params)
