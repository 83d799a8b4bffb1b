r"""FAMO: fast adaptive multitask optimization.

Liu, Feng, Stone and Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023,
arXiv:2306.03792. Task logits :math:`\xi` give :math:`z = \operatorname{softmax}(\xi)`; the
model follows the gradient of :math:`\sum_i z_i \log(L_i - b_i)` rescaled so that the weights on
the task gradients sum to one (Algorithm 1):

.. math::

    w_i = \frac{c\, z_i}{L_i - b_i + \epsilon}, \qquad
    c = \Big(\sum_j \frac{z_j}{L_j - b_j + \epsilon}\Big)^{-1}

and after each model step the logits follow their own rule, driven by the decrease of the
log-losses :math:`\delta_i = \log(L_i^{\text{before}} - b_i + \epsilon) -
\log(L_i^{\text{after}} - b_i + \epsilon)`:

.. math::

    \xi \leftarrow \xi - \beta\,\big(\nabla_\xi\, z(\xi)^\top \delta + \gamma\, \xi\big)
    = \xi - \beta\,\big(z \odot (\delta - z^\top \delta) + \gamma\,\xi\big)

(tasks whose log-loss fell less gain weight; :math:`\gamma` decays old information).

Defaults: :math:`\beta` = ``lr = 0.025`` (the paper's and the official code's logit learning
rate); :math:`\gamma` = ``gamma = 0.001``, the value of the paper's practical algorithm
(Appendix, as reported by the torchjd maintainers, who compared it with the code) and of
LibMTL's FAMO (the official repository's run scripts use 0.001 for QM9 and 0.01 for CelebA; its
``weight_methods.py`` defaults to 1e-5 and its stand-alone ``famo.py`` to 0.01); ``min_losses``
:math:`b = 0` (the code's default; the paper assumes :math:`L_i > b_i`); :math:`\epsilon =
10^{-8}` (code). ``logit_optimizer = "adam"``: the official code, with which the paper's results
were obtained, updates :math:`\xi` with Adam (betas 0.9/0.999, eps 1e-8) whose weight decay (L2
added to the gradient) is :math:`\gamma`; ``"sgd"`` is the plain step of the paper's Algorithm 1
written above. The official code also clips the shared parameters' gradient norm to 1
(``max_norm``); that is not part of the weighting and in manytask is the Trainer's ``grad_clip``
option (off by default).

**Deviation: the post-update loss.** The paper and its code measure :math:`L^{\text{after}}` by
running the model again on the *same* batch after the optimizer step (an extra forward pass).
A balancer's ``backward()`` only sees the losses of each step, so manytask uses the *next*
step's losses: at step :math:`t` it first updates :math:`\xi` with
:math:`\delta = \log(L_{t-1} - b + \epsilon) - \log(L_t - b + \epsilon)`, then weights step
:math:`t` with the new :math:`z`. The timing is the paper's (the logits used at step
:math:`t` have seen every update up to step :math:`t-1`); the difference is that :math:`\delta`
compares two different batches, so it carries batch-to-batch noise in addition to the effect of
the update, and no extra forward pass is paid. Step 1 has no previous loss and leaves
:math:`\xi = 0` (equal :math:`z`). Consecutive steps across an epoch boundary are compared
like any others.

**Absent tasks.** A loss of exactly zero is a task absent from the batch (a mixed-task batch, or
no label for it); FAMO assumes every task in every step, and such a loss would take nearly all
of :math:`c` (its :math:`1/(L_i - b_i + \epsilon)` is :math:`10^8`), shrinking every other
weight to about 1e-8. manytask leaves it out: the weights are normalised over the tasks present
(weight 0 for the absent ones, whose loss has no gradient anyway), and the logit update uses
the tasks present at both steps, the others taking the :math:`z`-weighted mean of their
:math:`\delta`, so that only the decay :math:`\gamma\xi` moves their logits. With every task
present this is the rule above.

State: the logits, Adam's moments and the previous losses are buffers, the update count is
extra state, so ``state_dict()`` resumes exactly. The weights and the logit update use only the
rank-averaged losses, so every rank holds the same logits and the update is that of the union
batch (exact under ``torch.distributed``). With ``loss_transform="log"`` the method is applied to
:math:`\log L_i`, which must then stay above :math:`b_i`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import LossWeighting, present_tasks
from manytask.errors import ConfigError

_EPS = 1e-8
_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


@registry.register(
    "balancer",
    "famo",
    "fast adaptive multitask optimization: loss-driven softmax logits "
    "(Liu et al., NeurIPS 2023, arXiv:2306.03792)",
)
class FAMO(LossWeighting):
    """FAMO with logits updated from the change of log-losses between consecutive steps.

    Args:
        tasks: task names.
        lr: learning rate β of the logits (> 0).
        gamma: decay γ of the logits (≥ 0; Adam's weight decay when ``logit_optimizer="adam"``).
        min_losses: lower bound ``b_i`` of each loss, in task order (default zeros).
        logit_optimizer: ``"adam"`` (official code) or ``"sgd"`` (the paper's Algorithm 1).
    """

    logits: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    previous: Tensor
    min_losses: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        lr: float = 0.025,
        gamma: float = 0.001,
        min_losses: list[float] | None = None,
        logit_optimizer: Literal["adam", "sgd"] = "adam",
    ) -> None:
        super().__init__(tasks)
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"famo: lr must be > 0, got {lr}")
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ConfigError(f"famo: gamma must be ≥ 0, got {gamma}")
        if logit_optimizer not in ("adam", "sgd"):
            raise ConfigError(
                f"famo: logit_optimizer must be 'adam' or 'sgd', got {logit_optimizer!r}"
            )
        bounds = [0.0] * self.num_tasks if min_losses is None else [float(b) for b in min_losses]
        if len(bounds) != self.num_tasks:
            raise ConfigError(
                f"famo: min_losses must hold one value per task ({self.num_tasks}), "
                f"got {len(bounds)}"
            )
        if not all(math.isfinite(b) for b in bounds):
            raise ConfigError(f"famo: min_losses must be finite, got {bounds}")
        self.lr = float(lr)
        self.gamma = float(gamma)
        self.logit_optimizer = logit_optimizer
        k = self.num_tasks
        self.register_buffer("logits", torch.zeros(k))
        self.register_buffer("exp_avg", torch.zeros(k))
        self.register_buffer("exp_avg_sq", torch.zeros(k))
        self.register_buffer("previous", torch.ones(k))
        self.register_buffer("min_losses", torch.tensor(bounds), persistent=False)
        self._steps = 0  # steps seen
        self._updates = 0  # logit updates made

    def _shifted_log(self, losses: Tensor) -> Tensor:
        return torch.log(losses - self.min_losses + _EPS)

    def _update_logits(self, losses: Tensor) -> None:
        delta = self._shifted_log(self.previous) - self._shifted_log(losses)
        z = torch.softmax(self.logits, dim=0)
        # tasks absent at either step take the z-weighted mean δ of the others: their own term
        # of z ⊙ (δ − zᵀδ) vanishes (module docstring, Absent tasks)
        known = present_tasks(losses) & present_tasks(self.previous)
        delta = torch.where(known, delta, 0.0)  # (an absent task's log may be NaN with b > 0)
        mass = (z * known).sum()
        mean = torch.where(mass > 0, (z * delta).sum() / mass.clamp_min(1e-30), 0.0)
        delta = torch.where(known, delta, mean)
        grad = z * (delta - (z * delta).sum()) + self.gamma * self.logits
        self._updates += 1
        if self.logit_optimizer == "sgd":
            self.logits.sub_(self.lr * grad)
            return
        # torch.optim.Adam's update (L2 weight decay, bias-corrected moments), written out so that
        # its moments are buffers of the balancer
        beta1, beta2 = _BETAS
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        correction1 = 1 - beta1**self._updates
        correction2 = 1 - beta2**self._updates
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(correction2)).add_(_ADAM_EPS)
        self.logits.addcdiv_(self.exp_avg, denom, value=-self.lr / correction1)

    def weights(self, losses: Tensor) -> Tensor:
        values = losses.detach().to(self.logits.dtype)
        if self._steps > 0:
            self._update_logits(values)
        self._steps += 1
        self.previous.copy_(values)
        z = torch.softmax(self.logits, dim=0)
        present = present_tasks(values)
        scaled = torch.where(present, z / (values - self.min_losses + _EPS), 0.0)
        total = scaled.sum()
        return (scaled / torch.where(total > 0, total, 1.0)).to(losses.dtype)

    @property
    def task_logits(self) -> Tensor:
        """The current logits ξ (a copy)."""
        return self.logits.detach().clone()

    def get_extra_state(self) -> Any:
        return {"steps": self._steps, "updates": self._updates}

    def set_extra_state(self, state: Any) -> None:
        self._steps = int(state["steps"])
        self._updates = int(state["updates"])

    def extra_repr(self) -> str:
        return (
            f"tasks={list(self.tasks)}, lr={self.lr}, gamma={self.gamma}, "
            f"logit_optimizer={self.logit_optimizer!r}"
        )
