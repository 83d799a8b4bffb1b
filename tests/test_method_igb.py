"""IGB: v1 by hand and against a transcription of the authors' rule; v2's random phase,
transitions and rewards by hand, one SAC update against a transcription of the authors' SAC,
the whole schedule, its state and the parameter checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

import manytask as mt
from manytask.balance.weighting.igb import ImprovableGapBalancingV1, ImprovableGapBalancingV2
from manytask.errors import ConfigError
from manytask.train.statefile import join_state, split_state


def step(balancer, values: list[float]) -> torch.Tensor:
    """One backward on losses Lᵢ = vᵢ xᵢ at x = 1; returns the (raw-loss) weights."""
    x = torch.nn.Parameter(torch.ones(len(values)))
    losses = {t: v * x[i] for i, (t, v) in enumerate(zip(balancer.tasks, values, strict=True))}
    weights = balancer.backward(losses).weights
    assert torch.allclose(x.grad, weights * torch.tensor(values))  # ∂/∂xᵢ = wᵢ vᵢ
    return weights


def run_epoch(balancer, batches) -> list[torch.Tensor]:
    out = [step(balancer, [float(v) for v in values]) for values in batches]
    balancer.end_epoch()
    return out


# IGBv1 -------------------------------------------------------------------------------------
def test_v1_by_hand():
    # base_epoch 0: epoch 0 is Σ log L (w = 1/L) and its mean losses (3, 2) are the base.
    # Epoch 1, L = (3, 1): L/B = (1, ½); ω = 2 softmax = 2 (e, e^½)/(e + e^½) = (1.244918, 0.755082)
    # raw weights ω/L = (0.414973, 0.755082)
    igb = ImprovableGapBalancingV1(["a", "b"], base_epoch=0)
    first = run_epoch(igb, [[2.0, 1.0], [4.0, 3.0]])
    assert torch.allclose(first[0], torch.tensor([0.5, 1.0]))
    assert torch.allclose(igb.base, torch.tensor([3.0, 2.0]))
    e, r = math.e, math.exp(0.5)
    omega = [2 * e / (e + r), 2 * r / (e + r)]
    assert torch.allclose(step(igb, [3.0, 1.0]), torch.tensor([omega[0] / 3, omega[1]]))


def authors_v1(epochs: list[torch.Tensor], base_epoch: int) -> list[torch.Tensor]:
    """The authors' IGBv1 (``ImprovableGapBalancing_v1`` + trainer), transcribed: ω = 1 until the
    mean training losses of epoch ``base_epoch`` are known, then T·softmax(L/base); the objective
    is Σ ω log L. Returns its gradients with respect to the loss values (float64 autograd)."""
    grads, base = [], None
    for epoch, batches in enumerate(epochs):
        for values in batches:
            losses = values.double().clone().requires_grad_(True)
            omega = torch.ones_like(losses)
            if base is not None:
                omega = len(values) * F.softmax(losses.detach() / base, dim=-1)
            (omega * torch.log(losses)).sum().backward()
            grads.append(losses.grad)
        if epoch == base_epoch:
            base = batches.double().mean(dim=0)
    return grads


@pytest.mark.parametrize("seed", range(3))
def test_v1_matches_the_authors_rule(seed):
    g = torch.Generator().manual_seed(seed)
    t = 2 + seed
    epochs = [torch.rand(3, t, generator=g) * 3 + 0.1 for _ in range(4)]
    igb = ImprovableGapBalancingV1([f"t{i}" for i in range(t)], base_epoch=1)
    ours = [w for batches in epochs for w in run_epoch(igb, batches)]
    for a, b in zip(ours, authors_v1(epochs, base_epoch=1), strict=True):
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-7)


def test_v1_state_round_trip():
    g = torch.Generator().manual_seed(4)
    epochs = [torch.rand(3, 2, generator=g) + 0.5 for _ in range(3)]
    igb = ImprovableGapBalancingV1(["a", "b"], base_epoch=0)
    run_epoch(igb, epochs[0])
    step(igb, epochs[1][0].tolist())  # inside the first epoch with a base
    clone = ImprovableGapBalancingV1(["a", "b"], base_epoch=0)
    clone.load_state_dict(igb.state_dict())
    for values in epochs[1][1:]:
        assert torch.equal(step(clone, values.tolist()), step(igb, values.tolist()))


def test_v1_log_transform_by_hand():
    # values log L with L = (e², e), before the base: w = 1/log L = (½, 1)
    igb = mt.balance.get("igb_v1", ["a", "b"], loss_transform="log")
    x = torch.nn.Parameter(torch.ones(2))
    result = igb.backward({"a": torch.e**2 * x[0], "b": torch.e * x[1]})
    assert torch.allclose(result.weights, torch.tensor([0.5, 1.0]))
    assert torch.allclose(x.grad, torch.tensor([0.5, 1.0]))


def test_v1_invalid_base_epoch():
    with pytest.raises(ConfigError, match="base_epoch must be ≥ 0"):
        mt.balance.get("igb_v1", ["a", "b"], base_epoch=-1)


# IGBv2 -------------------------------------------------------------------------------------
SMALL = {
    "base_epoch": 0,
    "buffer_size": 32,
    "batch_size": 8,
    "train_every": 2,
    "update_after_epochs": 1,
    "random_epochs": 2,
    "hidden": 16,
}


def test_v2_random_phase_by_hand():
    # the constructor draws one integer (the networks' seed) from the generator; each step of
    # the random phase then draws ε ~ N(0, I): ω = T softmax(ε), raw weights ω/L
    igb = ImprovableGapBalancingV2(["a", "b", "c"], seed=5)
    g = torch.Generator().manual_seed(5)
    torch.randint(0, 2**62, (1,), generator=g)
    for values in ([1.0, 2.0, 4.0], [0.5, 0.5, 0.5]):
        omega = 3 * torch.softmax(torch.randn(3, generator=g), dim=0)
        assert torch.allclose(step(igb, values), omega / torch.tensor(values))


def test_v2_transitions_and_reward_by_hand():
    # base_epoch 0: epoch 0 losses (2, 1), (4, 3) → base (3, 2). Epoch 1, L = (3, 1.5):
    # reward = c · min((4 − 3)/3, (3 − 1.5)/2) = 2 · min(⅓, ¾) = ⅔, stored with the previous
    # state (4, 3), the previous action and the next state (3, 1.5)
    igb = ImprovableGapBalancingV2(["a", "b"], seed=0, reward_scale=2.0, **SMALL)
    run_epoch(igb, [[2.0, 1.0], [4.0, 3.0]])
    assert igb._size == 0
    previous_action = igb.previous_action.clone()
    step(igb, [3.0, 1.5])
    assert igb._size == 1
    assert torch.equal(igb.replay_state[0], torch.tensor([4.0, 3.0]))
    assert torch.equal(igb.replay_action[0], previous_action)
    assert torch.allclose(igb.replay_reward[0], torch.tensor([2 / 3]))
    assert torch.equal(igb.replay_next[0], torch.tensor([3.0, 1.5]))


def authors_sac_update(agent, optimizers, batch, noises, discount=0.99, tau=0.005):
    """One SAC update as in the authors' ``SAC_Agent.train`` (critic, actor with frozen critic,
    entropy temperature, Polyak), transcribed with torch.distributions.Normal for the
    log-density and the given Gaussian draws in place of ``rsample``."""
    actor_opt, critic_opt, alpha_opt = optimizers
    s, a, r, s2 = batch
    k = s.shape[1]

    def act(state, eps):
        h = agent.actor.trunk(state)
        mu = agent.actor.mean(h)
        log_std = torch.clamp(agent.actor.log_std(h), -20, 2)
        std = torch.exp(log_std)
        u = mu + std * eps
        action = k * F.softmax(u, dim=-1)
        logp = Normal(mu, std).log_prob(u).sum(axis=1, keepdim=True) - (
            2 * (math.log(2) - u - F.softplus(-2 * u))
        ).sum(axis=1, keepdim=True)
        return action, logp

    alpha = agent.log_alpha.detach().exp()
    with torch.no_grad():
        a2, logp2 = act(s2, noises[0])
        t1, t2 = agent.critic_target(s2, a2)
        target = r + discount * (torch.min(t1, t2) - alpha * logp2)
    q1, q2 = agent.critic(s, a)
    q_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
    critic_opt.zero_grad()
    q_loss.backward()
    critic_opt.step()
    for p in agent.critic.parameters():
        p.requires_grad = False
    a_new, logp = act(s, noises[1])
    q1, q2 = agent.critic(s, a_new)
    a_loss = (alpha * logp - torch.min(q1, q2)).mean()
    actor_opt.zero_grad()
    a_loss.backward()
    actor_opt.step()
    for p in agent.critic.parameters():
        p.requires_grad = True
    alpha_loss = -(agent.log_alpha * (logp - k).detach()).mean()
    alpha_opt.zero_grad()
    alpha_loss.backward()
    alpha_opt.step()
    for p, pt in zip(agent.critic.parameters(), agent.critic_target.parameters(), strict=True):
        pt.data.copy_(tau * p.data + (1 - tau) * pt.data)


def test_v2_sac_update_matches_the_authors_sac():
    igb = ImprovableGapBalancingV2(["a", "b", "c"], seed=1, **SMALL)
    g = torch.Generator().manual_seed(11)
    count = 6
    batch = (
        torch.rand(count, 3, generator=g) + 0.5,
        3 * torch.softmax(torch.randn(count, 3, generator=g), dim=1),
        torch.randn(count, 1, generator=g),
        torch.rand(count, 3, generator=g) + 0.5,
    )
    noises = [torch.randn(count, 3, generator=g), torch.randn(count, 3, generator=g)]
    reference = copy.deepcopy(igb.agent)
    optimizers = (
        torch.optim.Adam(reference.actor.parameters(), lr=3e-4),
        torch.optim.Adam(reference.critic.parameters(), lr=3e-4),
        torch.optim.Adam([reference.log_alpha], lr=3e-4),
    )
    for _ in range(3):  # three updates: Adam moments and the Polyak target carry over
        draws = iter(noises)
        igb._sample = lambda n, batch=batch: batch
        igb._noise = lambda shape, device, draws=draws: next(draws)
        igb._sac_update(count)
        authors_sac_update(reference, optimizers, batch, noises)
    for (name, ours), theirs in zip(
        igb.agent.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), name


def drive(igb, epochs) -> list[torch.Tensor]:
    return [w for batches in epochs for w in run_epoch(igb, batches)]


def test_v2_schedule_trains_the_agent_and_then_follows_the_policy():
    g = torch.Generator().manual_seed(2)
    epochs = [torch.rand(6, 3, generator=g) + 0.3 for _ in range(4)]
    igb = ImprovableGapBalancingV2(["a", "b", "c"], seed=3, **SMALL)
    before = copy.deepcopy(igb.agent.state_dict())
    weights = drive(igb, epochs)
    assert all(torch.isfinite(w).all() for w in weights)
    # transitions from epoch 1 on (base from epoch 0): 3 epochs × 6 steps
    assert igb._size == 18
    after = igb.agent.state_dict()
    assert not torch.equal(before["actor.mean.weight"], after["actor.mean.weight"])
    # policy phase (epoch ≥ 2): ω is the actor's action, positive and summing to T
    for w, values in zip(weights[12:], torch.cat(epochs[2:]), strict=True):
        omega = w * values
        assert torch.allclose(omega.sum(), torch.tensor(3.0), atol=1e-5)
        assert (omega > 0).all()
    assert list(igb.parameters()) == []


def test_v2_state_round_trip_through_the_checkpoint_format():
    g = torch.Generator().manual_seed(9)
    epochs = [torch.rand(6, 2, generator=g) + 0.3 for _ in range(4)]
    igb = ImprovableGapBalancingV2(["a", "b"], seed=4, **SMALL)
    drive(igb, epochs[:2])
    step(igb, epochs[2][0].tolist())
    tensors, skeleton = split_state(igb.state_dict(), "balancer")
    clone = ImprovableGapBalancingV2(["a", "b"], seed=99, **SMALL)
    clone.load_state_dict(join_state(skeleton, tensors))
    rest = [epochs[2][1:], epochs[3]]
    for a, b in zip(drive(clone, rest), drive(igb, rest), strict=True):
        assert torch.equal(a, b)
    for (name, x), y in zip(
        igb.agent.state_dict().items(), clone.agent.state_dict().values(), strict=True
    ):
        assert torch.equal(x, y), name


def test_v2_same_seed_same_run():
    g = torch.Generator().manual_seed(5)
    epochs = [torch.rand(4, 2, generator=g) + 0.3 for _ in range(3)]
    a = drive(ImprovableGapBalancingV2(["a", "b"], seed=8, **SMALL), epochs)
    b = drive(ImprovableGapBalancingV2(["a", "b"], seed=8, **SMALL), epochs)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_v2_device_and_dtype_moves_reach_the_agent():
    igb = ImprovableGapBalancingV2(["a", "b"], seed=6, **SMALL)
    g = torch.Generator().manual_seed(6)
    drive(igb, [torch.rand(4, 2, generator=g) + 0.3 for _ in range(3)])
    igb.double()
    assert igb.agent.actor.mean.weight.dtype == torch.float64
    for slots in igb._actor_opt.state.values():
        assert slots["exp_avg"].dtype == torch.float64
    weights = drive(igb, [torch.rand(4, 2, generator=g) + 0.3])
    assert all(torch.isfinite(w).all() for w in weights)


def test_v2_log_transform_by_hand():
    # values log L with L = (e², e): random phase, ω = 2 softmax(ε); raw weights ω/(2, 1)
    igb = mt.balance.get("igb_v2", ["a", "b"], loss_transform="log", seed=3)
    g = torch.Generator().manual_seed(3)
    torch.randint(0, 2**62, (1,), generator=g)
    omega = 2 * torch.softmax(torch.randn(2, generator=g), dim=0)
    x = torch.nn.Parameter(torch.ones(2))
    result = igb.backward({"a": torch.e**2 * x[0], "b": torch.e * x[1]})
    assert torch.allclose(result.weights, omega / torch.tensor([2.0, 1.0]))
    assert torch.allclose(x.grad, result.weights)  # ∇ log L_a = (1, 0), ∇ log L_b = (0, 1)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"sac_lr": 0.0}, "sac_lr must be > 0"),
        ({"buffer_size": 0}, "buffer_size must be ≥ 1"),
        ({"batch_size": 0}, "batch_size must be ≥ 1"),
        ({"train_every": 0}, "train_every must be ≥ 1"),
        ({"update_after_epochs": -1}, "update_after_epochs must be ≥ 0"),
        ({"random_epochs": -1}, "random_epochs must be ≥ 0"),
        ({"discount": 1.5}, "discount must be in"),
        ({"tau": 0.0}, "tau must be in"),
        ({"init_alpha": 0.0}, "init_alpha must be > 0"),
        ({"hidden": 0}, "hidden must be ≥ 1"),
        ({"reward_scale": math.nan}, "reward_scale must be finite"),
        ({"seed": -1}, "seed must be ≥ 0"),
        ({"base_epoch": -2}, "base_epoch must be ≥ 0"),
    ],
)
def test_v2_invalid_parameters_are_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        mt.balance.get("igb_v2", ["a", "b"], **params)
