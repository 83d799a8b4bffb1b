r"""Improvable gap balancing (IGB): weight the log-losses by how far each task still has to go.

Dai, Fei and Lu, "Improvable Gap Balancing for Multi-Task Learning", UAI 2023,
arXiv:2307.15429 (code: ``YanqiDai/IGB4MTL``). Both variants weight the *log*-losses, on top of
the scale-invariant objective :math:`\sum_i \log L_i` (``si``):

.. math::

    \mathcal{L} = \sum_{i=1}^{T} \omega_i \log L_i, \qquad
    \text{raw-loss weights } w_i = \frac{\omega_i}{L_i}

Until a *base loss* :math:`B_i` is known, :math:`\omega_i = 1`. :math:`B_i` is the mean
training loss of epoch ``base_epoch`` (0-based; default 1, the second epoch: the authors' code,
``--base_epoch 1`` with epochs counted from 0); it stands in for the loss at the start of
training, so :math:`L_i / B_i` estimates the remaining *improvable gap* of task :math:`i`.

**IGBv1** (``igb_v1``, heuristic): :math:`\omega = T\,\operatorname{softmax}(L / B)` from the
epoch after ``base_epoch`` on, so tasks with larger remaining gaps get larger weights.

**IGBv2** (``igb_v2``, reinforcement learning): a soft actor-critic (SAC) agent chooses
:math:`\omega`. State :math:`s_t = L(t)` (the raw loss vector); action
:math:`\omega_t = T\,\operatorname{softmax}(u_t)`, :math:`u_t \sim \mathcal{N}(\mu_\phi(s_t),
\sigma_\phi(s_t)^2)`; reward :math:`r_t = c \min_i (L_i(t-1) - L_i(t)) / B_i` (the worst
relative loss decrease, scaled by :math:`c`). Transitions
:math:`(s_{t-1}, \omega_{t-1}, r_t, s_t)` enter a replay buffer once :math:`B` is known; for the
first ``random_epochs`` epochs the action is random, :math:`\omega = T\,\operatorname{softmax}
(\varepsilon)`, :math:`\varepsilon \sim \mathcal{N}(0, I)`; from epoch ``update_after_epochs`` on,
every ``train_every`` steps the agent takes :math:`\lfloor \text{train\_every}\cdot k/2 \rfloor`
SAC updates on mini-batches of :math:`\lfloor \text{batch\_size}\cdot k/2\rfloor` transitions,
:math:`k = 1 + |\text{buffer}| / \text{buffer\_size}`. SAC is the standard one (twin Q critics
with a Polyak-averaged target, entropy temperature :math:`\alpha` tuned to a target entropy of
:math:`-T`, no terminal states), with the authors' networks and constants: actor and critics are
MLPs with two hidden layers of 128 ReLU units (the actor's trunk ends in a ReLU, then linear
heads for :math:`\mu` and :math:`\log\sigma`, clamped to :math:`[-20, 2]`); Adam with learning
rate ``sac_lr = 3e-4`` for actor, critics and :math:`\log\alpha`; discount 0.99; Polyak
:math:`\tau = 0.005`; :math:`\alpha_0 = 0.2`; replay buffer of 10 000; ``batch_size = 256``;
``train_every = 50``; ``update_after_epochs = 3``; ``random_epochs = 5``. The log-probability is
the code's: the Gaussian log-density of :math:`u` minus the tanh change-of-variables term
:math:`\sum_j 2(\log 2 - u_j - \operatorname{softplus}(-2u_j))`, kept although the action
squashing is a softmax, not a tanh (the authors' choice; it changes the entropy bonus only).

**IGBv2 is implemented faithfully inside the balancer**, with these differences from the code:

- the reward scale :math:`c`: the code sets it each epoch to (initial learning rate / current
  learning rate) of the model's optimizer, which a balancer does not see. Here it is the
  attribute ``reward_scale`` (constructor default 1.0, exact for a constant learning rate); a
  custom loop with a decaying schedule can set ``balancer.reward_scale`` each epoch to match the
  code. It is configuration, not state (not in ``state_dict()``).
- epochs are counted by :meth:`end_epoch` (the Trainer calls it; the code compares its step
  counter with multiples of the epoch length, which is the same when every epoch has the same
  number of steps). A custom loop that never calls :meth:`end_epoch` stays in the random phase.
- every random number (the random-phase weights, the policy's Gaussian noise, replay sampling,
  the networks' initialisation) comes from the balancer's own generator (``seed``), so runs are
  reproducible and every rank draws the same numbers; the code uses the global RNG.
- all SAC arithmetic is float32 (the code keeps :math:`\log\alpha` in float64).
- SAC updates are skipped while the replay buffer is empty (possible only if
  ``base_epoch >= update_after_epochs``, where the code would fail).

The agent (networks, Adam states, :math:`\log\alpha`), the replay buffer, the generator and the
counters are all in ``state_dict()`` (buffers and extra state), so a resumed run continues
identically. The agent's networks are *not* ``nn.Parameter``\ s of the balancer: they are
trained by SAC alone, never by the model's optimizer. The random numbers are drawn on the CPU
and copied to the device through pinned memory without blocking, so no step waits for the
device.

Both variants compute everything from the rank-averaged losses with the same generator on every
rank, so every rank holds the same weights and agent, and the update is that of the union batch
under ``torch.distributed``. Losses must be positive (they are logged); values are floored at the
smallest normal float32. With ``loss_transform="log"`` IGB is applied to :math:`\log L_i`, which
must then be positive.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from manytask import registry
from manytask.balance.base import LossWeighting
from manytask.balance.randomness import host_to_device, seeded_generator
from manytask.errors import ConfigError

_FLOOR = torch.finfo(torch.float32).tiny
_LOG_STD_MIN, _LOG_STD_MAX = -20.0, 2.0


class _IGBBase(LossWeighting):
    """Shared part of IGBv1 and IGBv2: the base loss of epoch ``base_epoch`` and epoch counting."""

    base_sum: Tensor
    base: Tensor

    def __init__(self, tasks: Sequence[str], base_epoch: int, name: str) -> None:
        super().__init__(tasks)
        if base_epoch < 0:
            raise ConfigError(f"{name}: base_epoch must be ≥ 0 (0-based epoch), got {base_epoch}")
        self.base_epoch = int(base_epoch)
        self.register_buffer("base_sum", torch.zeros(self.num_tasks, dtype=torch.float64))
        self.register_buffer("base", torch.ones(self.num_tasks))
        self._epochs = 0  # completed epochs
        self._epoch_steps = 0  # steps in the current epoch
        self._steps = 0  # steps in the whole run

    @property
    def has_base(self) -> bool:
        """True once the base losses are known (after epoch ``base_epoch``)."""
        return self._epochs > self.base_epoch

    def _record(self, values: Tensor) -> None:
        if self._epochs == self.base_epoch:
            self.base_sum += values.to(self.base_sum.dtype)
        self._epoch_steps += 1
        self._steps += 1

    def end_epoch(self) -> None:
        if self._epoch_steps == 0:
            return
        if self._epochs == self.base_epoch:
            self.base.copy_(self.base_sum / self._epoch_steps)
        self._epochs += 1
        self._epoch_steps = 0

    def get_extra_state(self) -> Any:
        return {"epochs": self._epochs, "epoch_steps": self._epoch_steps, "steps": self._steps}

    def set_extra_state(self, state: Any) -> None:
        self._epochs = int(state["epochs"])
        self._epoch_steps = int(state["epoch_steps"])
        self._steps = int(state["steps"])


@registry.register(
    "balancer",
    "igb_v1",
    "improvable gap balancing v1: log-losses weighted by T softmax(L/L_base) "
    "(Dai et al., UAI 2023, arXiv:2307.15429)",
)
class ImprovableGapBalancingV1(_IGBBase):
    """IGBv1: ``ω = T softmax(L / B)`` on the log-losses once the base losses ``B`` are known.

    Args:
        tasks: task names.
        base_epoch: 0-based epoch whose mean training losses become the base losses.
    """

    def __init__(self, tasks: Sequence[str], base_epoch: int = 1) -> None:
        super().__init__(tasks, base_epoch, "igb_v1")

    def weights(self, losses: Tensor) -> Tensor:
        values = losses.detach().clamp_min(_FLOOR)
        ready = self.has_base
        self._record(values)
        if not ready:
            return values.reciprocal()
        omega = self.num_tasks * torch.softmax(values / self.base.to(values.dtype), dim=0)
        return omega / values


class _Actor(nn.Module):
    """Gaussian policy over pre-softmax actions (the authors' network shape)."""

    def __init__(self, tasks: int, hidden: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(tasks, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.mean = nn.Linear(hidden, tasks)
        self.log_std = nn.Linear(hidden, tasks)
        self.tasks = tasks

    def forward(self, state: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """Action ``T softmax(u)`` with ``u = μ + σ ε`` and its (code-defined) log-probability."""
        features = self.trunk(state)
        mean = self.mean(features)
        log_std = self.log_std(features).clamp(_LOG_STD_MIN, _LOG_STD_MAX)
        u = mean + log_std.exp() * noise
        action = self.tasks * torch.softmax(u, dim=-1)
        gaussian = -0.5 * noise.square() - log_std - 0.5 * math.log(2 * math.pi)
        squash = 2 * (math.log(2) - u - F.softplus(-2 * u))
        log_prob = gaussian.sum(-1, keepdim=True) - squash.sum(-1, keepdim=True)
        return action, log_prob


class _Critic(nn.Module):
    """Twin Q networks on (state, action)."""

    def __init__(self, tasks: int, hidden: int) -> None:
        super().__init__()

        def q_net() -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(2 * tasks, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, 1),
            )

        self.q1 = q_net()
        self.q2 = q_net()

    def forward(self, state: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        pair = torch.cat([state, action], dim=-1)
        return self.q1(pair), self.q2(pair)


class _Agent(nn.Module):
    """The SAC agent: actor, critic, target critic and the entropy temperature."""

    def __init__(self, tasks: int, hidden: int, init_alpha: float) -> None:
        super().__init__()
        self.actor = _Actor(tasks, hidden)
        self.critic = _Critic(tasks, hidden)
        self.critic_target = copy.deepcopy(self.critic)
        self.critic_target.requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(init_alpha)))


@registry.register(
    "balancer",
    "igb_v2",
    "improvable gap balancing v2: SAC agent picks log-loss weights "
    "(Dai et al., UAI 2023, arXiv:2307.15429)",
)
class ImprovableGapBalancingV2(_IGBBase):
    """IGBv2: a soft actor-critic agent chooses the weights of the log-losses.

    Args:
        tasks: task names.
        base_epoch: 0-based epoch whose mean training losses become the base losses.
        sac_lr: Adam learning rate of actor, critics and entropy temperature.
        buffer_size: replay buffer capacity (transitions).
        batch_size: SAC mini-batch size (scaled by ``k/2`` as in the code).
        train_every: steps between SAC training rounds.
        update_after_epochs: first epoch (0-based) with SAC training.
        random_epochs: epochs of random actions before the policy acts.
        discount: SAC discount γ.
        tau: Polyak factor of the target critic.
        init_alpha: initial entropy temperature α.
        hidden: hidden units per layer of actor and critics.
        reward_scale: multiplier ``c`` of the reward (see the module docstring).
        seed: seed of the balancer's generator; None draws one from the global torch RNG.
    """

    _agent: _Agent
    replay_state: Tensor
    replay_action: Tensor
    replay_reward: Tensor
    replay_next: Tensor
    previous_state: Tensor
    previous_action: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        base_epoch: int = 1,
        sac_lr: float = 3e-4,
        buffer_size: int = 10000,
        batch_size: int = 256,
        train_every: int = 50,
        update_after_epochs: int = 3,
        random_epochs: int = 5,
        discount: float = 0.99,
        tau: float = 0.005,
        init_alpha: float = 0.2,
        hidden: int = 128,
        reward_scale: float = 1.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(tasks, base_epoch, "igb_v2")
        checks = [
            ("sac_lr", sac_lr, sac_lr > 0 and math.isfinite(sac_lr), "> 0"),
            ("buffer_size", buffer_size, buffer_size >= 1, "≥ 1"),
            ("batch_size", batch_size, batch_size >= 1, "≥ 1"),
            ("train_every", train_every, train_every >= 1, "≥ 1"),
            ("update_after_epochs", update_after_epochs, update_after_epochs >= 0, "≥ 0"),
            ("random_epochs", random_epochs, random_epochs >= 0, "≥ 0"),
            ("discount", discount, 0 <= discount <= 1, "in [0, 1]"),
            ("tau", tau, 0 < tau <= 1, "in (0, 1]"),
            ("init_alpha", init_alpha, init_alpha > 0 and math.isfinite(init_alpha), "> 0"),
            ("hidden", hidden, hidden >= 1, "≥ 1"),
            ("reward_scale", reward_scale, math.isfinite(reward_scale), "finite"),
        ]
        for name, value, ok, valid in checks:
            if not ok:
                raise ConfigError(f"igb_v2: {name} must be {valid}, got {value}")
        if seed is not None and seed < 0:
            raise ConfigError(f"igb_v2: seed must be ≥ 0, got {seed}")
        self.sac_lr = float(sac_lr)
        self.buffer_size = int(buffer_size)
        self.batch_size = int(batch_size)
        self.train_every = int(train_every)
        self.update_after_epochs = int(update_after_epochs)
        self.random_epochs = int(random_epochs)
        self.discount = float(discount)
        self.tau = float(tau)
        self.reward_scale = float(reward_scale)
        k = self.num_tasks
        self.generator = seeded_generator(seed)
        init_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator).item())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            agent = _Agent(k, int(hidden), float(init_alpha))
        # not a registered submodule: its parameters belong to SAC, not to the model's optimizer;
        # its state travels in get_extra_state and its device follows the balancer's (_apply)
        object.__setattr__(self, "_agent", agent)
        self._actor_opt = torch.optim.Adam(agent.actor.parameters(), lr=self.sac_lr)
        self._critic_opt = torch.optim.Adam(agent.critic.parameters(), lr=self.sac_lr)
        self._alpha_opt = torch.optim.Adam([agent.log_alpha], lr=self.sac_lr)
        self.target_entropy = -float(k)
        n = self.buffer_size
        self.register_buffer("replay_state", torch.zeros(n, k))
        self.register_buffer("replay_action", torch.zeros(n, k))
        self.register_buffer("replay_reward", torch.zeros(n, 1))
        self.register_buffer("replay_next", torch.zeros(n, k))
        self.register_buffer("previous_state", torch.zeros(k))
        self.register_buffer("previous_action", torch.zeros(k))
        self._ptr = 0
        self._size = 0

    @property
    def agent(self) -> nn.Module:
        """The SAC agent (actor, twin critics, target critics, log α)."""
        return self._agent

    # random numbers: drawn on the CPU from the balancer's generator -------------------------
    def _noise(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        noise = torch.randn(shape, generator=self.generator, dtype=self.replay_state.dtype)
        return host_to_device(noise, device)

    # replay buffer ------------------------------------------------------------------------
    def _add(self, state: Tensor, action: Tensor, reward: Tensor, next_state: Tensor) -> None:
        i = self._ptr
        self.replay_state[i].copy_(state)
        self.replay_action[i].copy_(action)
        self.replay_reward[i].copy_(reward.reshape(1))
        self.replay_next[i].copy_(next_state)
        self._ptr = (self._ptr + 1) % self.buffer_size
        self._size = min(self._size + 1, self.buffer_size)

    def _sample(self, count: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        device = self.replay_state.device
        index = torch.randint(0, self._size, (count,), generator=self.generator)
        index = host_to_device(index, device)
        return (
            self.replay_state[index],
            self.replay_action[index],
            self.replay_reward[index],
            self.replay_next[index],
        )

    # SAC ----------------------------------------------------------------------------------
    def _sac_update(self, count: int) -> None:
        agent = self._agent
        state, action, reward, next_state = self._sample(count)
        device, k = state.device, self.num_tasks
        alpha = agent.log_alpha.detach().exp()
        with torch.no_grad():
            next_action, next_log_prob = agent.actor(next_state, self._noise((count, k), device))
            target_q1, target_q2 = agent.critic_target(next_state, next_action)
            target = reward + self.discount * (
                torch.min(target_q1, target_q2) - alpha * next_log_prob
            )
        q1, q2 = agent.critic(state, action)
        critic_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        self._critic_opt.zero_grad()
        critic_loss.backward()
        self._critic_opt.step()

        agent.critic.requires_grad_(False)
        new_action, log_prob = agent.actor(state, self._noise((count, k), device))
        q1, q2 = agent.critic(state, new_action)
        actor_loss = (alpha * log_prob - torch.min(q1, q2)).mean()
        self._actor_opt.zero_grad()
        actor_loss.backward()
        self._actor_opt.step()
        agent.critic.requires_grad_(True)

        alpha_loss = -(agent.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
        self._alpha_opt.zero_grad()
        alpha_loss.backward()
        self._alpha_opt.step()

        with torch.no_grad():
            for param, target_param in zip(
                agent.critic.parameters(), agent.critic_target.parameters(), strict=True
            ):
                target_param.mul_(1 - self.tau).add_(param, alpha=self.tau)

    def _train_agent(self) -> None:
        k = 1 + self._size / self.buffer_size
        rounds = int(self.train_every * (k / 2))
        count = int(self.batch_size * (k / 2))
        if self._size == 0 or count == 0:
            return
        with torch.enable_grad():
            for _ in range(rounds):
                self._sac_update(count)

    # the method ---------------------------------------------------------------------------
    def weights(self, losses: Tensor) -> Tensor:
        values = losses.detach().clamp_min(_FLOOR).to(self.replay_state.dtype)
        step = self._steps  # 0-based index of this step
        if self.has_base:
            decrease = (self.previous_state - values) / self.base
            reward = decrease.min() * self.reward_scale
            self._add(self.previous_state, self.previous_action, reward, values)
        if self._epochs >= self.update_after_epochs and step % self.train_every == 0:
            self._train_agent()
        if self._epochs < self.random_epochs:
            omega = self.num_tasks * torch.softmax(self._noise((self.num_tasks,), values.device), 0)
        else:
            with torch.no_grad():
                noise = self._noise((1, self.num_tasks), values.device)
                omega = self._agent.actor(values.unsqueeze(0), noise)[0][0]
        self.previous_state.copy_(values)
        self.previous_action.copy_(omega)
        self._record(values)
        return (omega / values).to(losses.dtype)

    # state and device ---------------------------------------------------------------------
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        super()._apply(fn, recurse)
        self._agent._apply(fn)
        for optimizer in (self._actor_opt, self._critic_opt, self._alpha_opt):
            for slots in optimizer.state.values():
                for key, value in slots.items():
                    if key != "step" and isinstance(value, Tensor):
                        slots[key] = fn(value)
        return self

    def get_extra_state(self) -> Any:
        state = super().get_extra_state()
        state.update(
            {
                "ptr": self._ptr,
                "size": self._size,
                "generator": self.generator.get_state(),
                "agent": self._agent.state_dict(),
                "actor_optimizer": self._actor_opt.state_dict(),
                "critic_optimizer": self._critic_opt.state_dict(),
                "alpha_optimizer": self._alpha_opt.state_dict(),
            }
        )
        return state

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self._ptr = int(state["ptr"])
        self._size = int(state["size"])
        self.generator.set_state(state["generator"])
        self._agent.load_state_dict(state["agent"])
        # deep copies: Optimizer.load_state_dict keeps the given tensors when their device and
        # dtype already match, and Adam updates them in place
        self._actor_opt.load_state_dict(copy.deepcopy(state["actor_optimizer"]))
        self._critic_opt.load_state_dict(copy.deepcopy(state["critic_optimizer"]))
        self._alpha_opt.load_state_dict(copy.deepcopy(state["alpha_optimizer"]))
