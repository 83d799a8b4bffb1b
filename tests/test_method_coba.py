"""CoBa: warm-up, RCS, ACS, divergence factor and floor by hand, against a transcription of the
authors' ``compute_per_task_weight`` on random histories, state, log transform and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import manytask as mt
from manytask.balance.weighting.coba import ConvergenceBalancer
from manytask.errors import ConfigError
from manytask.train.statefile import join_state, split_state


def step(balancer, values: list[float]) -> torch.Tensor:
    """One backward on losses Lᵢ = vᵢ xᵢ at x = 1; returns the weights."""
    x = torch.nn.Parameter(torch.ones(len(values)))
    losses = {t: v * x[i] for i, (t, v) in enumerate(zip(balancer.tasks, values, strict=True))}
    weights = balancer.backward(losses).weights
    assert torch.allclose(x.grad, weights * torch.tensor(values))  # ∂/∂xᵢ = wᵢ vᵢ
    return weights


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_first_steps_by_hand():
    # warm-up 2 steps, window N = 3, τ = 1; first losses (1, 1) are the normalisers.
    coba = ConvergenceBalancer(["a", "b"], warmup_steps=2, history_length=3, tau=1.0)
    assert torch.equal(step(coba, [1.0, 1.0]), torch.tensor([0.5, 0.5]))
    assert torch.equal(step(coba, [0.8, 0.9]), torch.tensor([0.5, 0.5]))
    # step 3, window a: (1, .8, .6) → α_a = −0.2; b: (1, .9, .85) → α_b = (−(1 − .91667) +
    # (.85 − .91667))/2 = −0.075; max per step = b's history → β = −0.075.
    # RCS = softmax(2α/Σ|α|) = softmax(−1.454545, −0.545455) = (0.287186, 0.712814)
    # ACS over one slope each: softmax(−1·α/|α|) = softmax(1, 1) = (½, ½)
    # DF = 1·softmax(τ·(−1·β/|β|))[-1] = 1 → mixed = RCS; w = softmax(2 RCS) = (0.299169, 0.700831)
    assert torch.allclose(step(coba, [0.6, 0.85]), torch.tensor([0.299169, 0.700831]), atol=1e-6)
    # step 4, window a: (.8, .6, .55) → α_a = (.55 − .8)/2 = −0.125; b: (.9, .85, .84) → −0.03;
    # β = −0.03 (b is the max). RCS = softmax(2·(−.125, −.03)/.155) = (0.226916, 0.773084)
    # ACS: a: −2·(−.125)/(.2 + .125) = 0.769231, b: −2·(−.03)/(.075 + .03) = 0.571429
    #   → softmax = (0.549290, 0.450710)
    # DF: β history (−.075, −.03), Σ|β| = .105: −2β/.105 = (1.428571, 0.571429);
    #   2·softmax(·)[-1] = 2/(1 + e^0.857143) = 0.595873
    # mixed = DF·RCS + (1 − DF)·ACS = (0.357196, 0.642804)
    # w = softmax(2·mixed) = (0.360956, 0.639044)
    assert torch.allclose(step(coba, [0.55, 0.84]), torch.tensor([0.360956, 0.639044]), atol=1e-6)


def authors_weights(history: torch.Tensor, slopes: list, totals: list, tau: float):
    """The authors' ``CoBaStatus.compute_per_task_weight`` transcribed on a given history of
    normalised losses (rows = steps), with uniform regression weights (``1 ** arange``)."""
    k = history.shape[1]

    def fit(y: torch.Tensor) -> torch.Tensor:
        y = y[y != 0]  # the authors' fit_window_slope drops zero losses (absent tasks)
        if len(y) < 2:
            return torch.zeros((), dtype=torch.float64)
        x = torch.arange(len(y), dtype=torch.float64)
        design = torch.stack((x, torch.ones_like(x))).T
        return torch.linalg.solve(design.T @ design, design.T @ y)[0]

    alpha = torch.stack([fit(history[:, i]) for i in range(k)])
    beta = fit(history.max(dim=1).values)
    slopes.append(alpha)
    totals.append(beta)
    per_task = torch.stack(slopes, dim=1)  # (T, steps since the warm-up)
    total = torch.stack(totals)
    rcs = F.softmax(k * alpha / alpha.abs().sum(), dim=-1)
    acs = F.softmax(
        (-per_task.shape[1] * per_task / per_task.abs().sum(-1, keepdim=True))[:, -1], -1
    )
    df = F.softmax(-len(total) * total / total.abs().sum() * tau, dim=-1)[-1] * len(total)
    w = F.softmax((df * rcs + (1 - df) * acs) * k, dim=-1)
    minimum = 1 / (k * 10)
    floored = bool((w < minimum).any())
    if floored:
        w = w * (1 - minimum * k) + minimum
    return w, floored


@pytest.mark.parametrize("seed", range(3))
def test_matches_the_authors_rule_within_the_first_window(seed):
    # For t ≤ N the authors' windows (losses and slopes) coincide with manytask's; the losses
    # are normalised by the first one. float32 weights against float64: atol 1e-6.
    g = torch.Generator().manual_seed(seed)
    t, warmup, n = 2 + seed, 3, 12
    losses = (torch.rand(n, t, generator=g, dtype=torch.float64) * 0.3 + 1).cumprod(0)
    losses = losses.flip(0) * torch.linspace(0.5, 1.5, t, dtype=torch.float64)
    coba = ConvergenceBalancer([f"t{i}" for i in range(t)], warmup, history_length=n, tau=5.0)
    slopes: list = []
    totals: list = []
    normalised = losses / losses[0]
    for i in range(n):
        ours = step(coba, losses[i].float().tolist())
        if i < warmup:
            assert torch.allclose(ours, torch.full((t,), 1 / t))
            continue
        theirs, _ = authors_weights(normalised[: i + 1], slopes, totals, 5.0)
        assert torch.allclose(ours.double(), theirs, atol=1e-6)


def test_zero_losses_of_absent_tasks_are_left_out_as_the_authors_do():
    # task b is absent (zero loss) at the first step and at steps 4 and 5: its normaliser is its
    # first non-zero loss and its slope is fitted to its non-zero entries only; before, the zero
    # normaliser made every weight NaN after the warm-up
    g = torch.Generator().manual_seed(5)
    n, warmup = 10, 2
    losses = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.3 + 0.75).cumprod(0)
    losses[[0, 4, 5], 1] = 0.0
    coba = ConvergenceBalancer(["a", "b"], warmup, history_length=n, tau=5.0)
    first = torch.stack([losses[0, 0], losses[1, 1]])  # the first non-zero loss of each task
    normalised = losses / first
    slopes: list = []
    totals: list = []
    for i in range(n):
        ours = step(coba, losses[i].float().tolist())
        assert torch.isfinite(ours).all()
        if i < warmup:
            continue
        theirs, _ = authors_weights(normalised[: i + 1], slopes, totals, 5.0)
        assert torch.allclose(ours.double(), theirs, atol=1e-6), i


def test_the_log_transform_keeps_the_slower_task_favoured_below_one():
    # losses below 1 have negative logs: normalised by the first log-loss itself the curves were
    # mirrored and the faster task got the larger weight; by its absolute value they are not
    def last_weights(transform: str, scale: float) -> torch.Tensor:
        coba = mt.balance.get("coba", ["fast", "slow"], warmup_steps=2, history_length=6)
        coba.configure(loss_transform=transform)
        weights = torch.zeros(2)
        for s in range(8):
            x = torch.nn.Parameter(torch.ones(2))
            values = (scale * 0.5 * 0.8**s, scale * 0.5 * 0.97**s)
            weights = coba.backward({"fast": values[0] * x[0], "slow": values[1] * x[1]}).weights
        return weights

    for scale in (1.0, 10.0):  # log-losses below and above 0
        raw, logged = last_weights("none", scale), last_weights("log", scale)
        assert raw[1] > raw[0] and logged[1] > logged[0], (scale, raw, logged)


def test_the_floor_lifts_small_weights_as_the_authors_do():
    # A sequence where a divergence factor above one pushes a weight under m = 1/(10T) = 0.05:
    # the floor maps w ↦ w(1 − T·m) + m, as in the authors' rule; every weight stays ≥ m.
    g = torch.Generator().manual_seed(0)
    losses = (torch.rand(8, 2, generator=g, dtype=torch.float64) * 0.6 + 0.7).cumprod(0)
    coba = ConvergenceBalancer(["a", "b"], warmup_steps=1, history_length=8, tau=5.0)
    slopes: list = []
    totals: list = []
    hits = []
    for i in range(8):
        ours = step(coba, losses[i].float().tolist())
        assert float(ours.min()) >= 0.05 - 1e-7
        if i == 0:
            continue
        theirs, floored = authors_weights(losses[: i + 1] / losses[0], slopes, totals, 5.0)
        hits.append(floored)
        assert torch.allclose(ours.double(), theirs, atol=1e-6)
    assert any(hits)


def test_state_dict_round_trip_resumes_exactly():
    g = torch.Generator().manual_seed(4)
    losses = (torch.rand(200, 3, generator=g) * 0.2 + 0.9).cumprod(0) + 0.1
    coba = ConvergenceBalancer(["a", "b", "c"], warmup_steps=5, history_length=10)
    for values in losses[:100]:  # beyond 64 steps: the β history has grown its storage
        step(coba, values.tolist())
    tensors, skeleton = split_state(coba.state_dict(), "balancer")
    clone = ConvergenceBalancer(["a", "b", "c"], warmup_steps=5, history_length=10)
    clone.load_state_dict(join_state(skeleton, tensors))
    for values in losses[100:]:
        assert torch.equal(step(clone, values.tolist()), step(coba, values.tolist()))


def test_log_transform_applies_coba_to_log_losses():
    # with losses e^(2 − 0.1 s) and e^(3 − 0.05 s) the log-losses are linear in s; normalised by
    # the first ones, slopes are −0.05 and −0.016667: the weights follow the rule on log L
    log_values = [[2 - 0.1 * s, 3 - 0.05 * s] for s in range(5)]
    on_logs = ConvergenceBalancer(["a", "b"], warmup_steps=2, history_length=4)
    direct = [step(on_logs, v) for v in log_values]
    coba = mt.balance.get("coba", ["a", "b"], warmup_steps=2, history_length=4)
    coba.configure(loss_transform="log")
    for expected, v in zip(direct, log_values, strict=True):
        x = torch.nn.Parameter(torch.ones(2))
        losses = {"a": math.exp(v[0]) * x[0], "b": math.exp(v[1]) * x[1]}
        result = coba.backward(losses)
        assert torch.allclose(result.weights, expected, atol=1e-6)
        assert torch.allclose(x.grad, result.weights, atol=1e-6)  # ∇ log Lᵢ = eᵢ


def test_warmup_weights_are_uniform():
    coba = mt.balance.get("coba", ["a", "b", "c", "d"])
    for _ in range(5):
        assert torch.equal(step(coba, [1.0, 2.0, 3.0, 4.0]), torch.full((4,), 0.25))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"warmup_steps": -1}, "warmup_steps must be ≥ 0"),
        ({"history_length": 1}, "history_length must be ≥ 2"),
        ({"tau": -1.0}, "tau must be ≥ 0"),
        ({"tau": math.nan}, "tau must be ≥ 0"),
    ],
)
def test_invalid_parameters_are_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        mt.balance.get("coba", ["a", "b"], **params)
