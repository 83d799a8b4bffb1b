r"""CoBa: convergence balancer, from the slopes of the recent loss history.

Gong, Yu, Liao, Liu, Chen and Li, "CoBa: Convergence Balancer for Multitask Finetuning of Large
Language Models", EMNLP 2024, arXiv:2410.06741 (code: ``codefuse-ai/MFTCoder``,
``CoBaStatus``). With normalised losses :math:`\tilde L_i(s) = L_i(s) / L_i(1)` and
:math:`\alpha_i(t)` the least-squares slope of :math:`\tilde L_i` over the last :math:`N`
steps (``history_length``), and :math:`\beta(t)` the slope of :math:`\max_i \tilde L_i` over the
same window:

.. math::

    \mathrm{RCS}_i(t) &= \operatorname{softmax}_i\Big(
    \frac{T\,\alpha_i(t)}{\sum_j |\alpha_j(t)|}\Big)
    \quad\text{(relative convergence: slower tasks weigh more)}\\
    \mathrm{ACS}_i(t) &= \operatorname{softmax}_i\Big(\frac{-n\,\alpha_i(t)}
    {\sum_{s} |\alpha_i(s)|}\Big)
    \quad\text{(absolute convergence, over the last } n \le N \text{ slopes of task } i)\\
    \mathrm{DF}(t) &= M \operatorname{softmax}_{m}\Big(\tau\,
    \frac{-M\,\beta(m)}{\sum_{m'} |\beta(m')|}\Big)\Big|_{m = t}
    \quad\text{(divergence factor, over all } M \text{ slopes since the warm-up)}\\
    w(t) &= \operatorname{floor}\Big(\operatorname{softmax}\big(T\,[\mathrm{DF}(t)\,\mathrm{RCS}(t)
    + (1 - \mathrm{DF}(t))\,\mathrm{ACS}(t)]\big)\Big)

where the floor maps :math:`w \mapsto w (1 - T m) + m` with :math:`m = 1/(10T)` whenever some
weight is below :math:`m`. While the overall loss converges (DF near or above 1), RCS speeds up
slow tasks; when it turns upward (DF small), ACS takes weight from diverging tasks. The weights
sum to one; during the first ``warmup_steps`` steps they are uniform, :math:`1/T`.

The details follow the authors' code, since the paper's method section could not be consulted
when this was written: the normalisation by the first loss, uniform regression weights, the final
``softmax(T ·)`` and the minimum-weight floor, and a divergence factor that is not clipped.
Defaults are the code's: ``warmup_steps = 100``, ``history_length = 200``, ``tau = 5`` (its
README recommends a window of 2–5 warm-ups and :math:`\tau = 5`).

**Deviation: training losses.** CoBa fits the slopes to *validation* losses, evaluated on a
validation batch after every step. A balancer sees only the training losses of each step, so
manytask fits them to the training losses (the loss of step :math:`t` is measured after update
:math:`t-1`, the same timing as the code's validation loss). Training losses are noisier and
measure fitting rather than generalisation, so CoBa here balances the convergence of the
training objectives and cannot detect overfitting (a diverging validation loss) as the paper
does. Other differences from the code: it divides the validation losses by
``valid_task_loss_begining`` (by its name the losses at the start of training; the code that
sets it was not available), here by each task's first non-zero training loss; its ACS window, by
an indexing quirk, spans :math:`N - W + 1` slopes once :math:`t > N`, here the last :math:`N`;
it can update every ``coba_update_interval`` steps, here every step; the denominators (sums of
absolute slopes) are floored at :math:`10^{-30}`, so constant losses give uniform scores instead
of NaN.

**Zero losses.** A task absent from a batch (a mixed-task batch, or no label for it) has a zero
loss. As the authors' code does with its validation losses, such losses are left out: a task's
normaliser is its first non-zero loss, and each slope is fitted to the non-zero entries of the
window only, placed one after the other (the code's ``y = y[y != 0]``); a task with fewer than
two of them in the window has slope 0, and the largest normalised loss of a step is taken over
the tasks present.

State: the first losses, the window of normalised losses and which of them were present, the
window of slopes (buffers) and the
full history of :math:`\beta` with the step count (extra state) are in ``state_dict()``, so a run
resumes exactly. The history of :math:`\beta` grows by one float64 per step. Everything is
computed from rank-averaged losses, so the weights are the same on every rank and the update is
that of the union batch under ``torch.distributed``. With ``loss_transform="log"`` CoBa is
applied to :math:`\log L_i`; the normalisation divides by the absolute value of the first
(non-zero) log-loss, so that a falling log-loss keeps a negative slope when the losses are below
1 (dividing by a negative first value would mirror the curves and give the larger weight to the
faster task).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from manytask import registry
from manytask.balance.base import LossWeighting, present_tasks
from manytask.errors import ConfigError

_DENOM_FLOOR = 1e-30


def _slopes(window: Tensor, present: Tensor) -> Tensor:
    """Least-squares slopes of the columns of ``window`` (rows are consecutive steps) over the
    entries marked in ``present`` (0/1), placed at ``x = 0, 1, …`` in their order (absent
    entries are dropped, as the authors' ``fit_window_slope`` drops zero losses); 0 for a column
    with fewer than two entries."""
    x = (present.cumsum(dim=0) - 1) * present
    count = present.sum(dim=0)
    enough = count >= 2
    count = count.clamp_min(1)
    dx = (x - (x * present).sum(dim=0) / count) * present
    dy = window - (window * present).sum(dim=0) / count
    spread = dx.square().sum(dim=0)
    slopes = (dx * dy).sum(dim=0) / torch.where(enough, spread, torch.ones_like(spread))
    return torch.where(enough, slopes, torch.zeros_like(slopes))


@registry.register(
    "balancer",
    "coba",
    "convergence balancer from loss-slope history (training losses) "
    "(Gong et al., EMNLP 2024, arXiv:2410.06741)",
)
class ConvergenceBalancer(LossWeighting):
    """CoBa on the training losses.

    Args:
        tasks: task names.
        warmup_steps: steps with uniform weights before CoBa starts (≥ 0).
        history_length: window N of losses (and of slopes for ACS) used for the slopes (≥ 2).
        tau: temperature τ of the divergence factor (≥ 0).
    """

    initial: Tensor
    history: Tensor
    present: Tensor
    slope_history: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        warmup_steps: int = 100,
        history_length: int = 200,
        tau: float = 5.0,
    ) -> None:
        super().__init__(tasks)
        if warmup_steps < 0:
            raise ConfigError(f"coba: warmup_steps must be ≥ 0, got {warmup_steps}")
        if history_length < 2:
            raise ConfigError(
                f"coba: history_length must be ≥ 2 (a slope needs two points), got {history_length}"
            )
        if not tau >= 0:
            raise ConfigError(f"coba: tau must be ≥ 0, got {tau}")
        self.warmup_steps = int(warmup_steps)
        self.history_length = int(history_length)
        self.tau = float(tau)
        k, n = self.num_tasks, self.history_length
        # each task's normaliser, its first non-zero loss (0 until it has one)
        self.register_buffer("initial", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("history", torch.zeros(n, k, dtype=torch.float64))
        self.register_buffer("present", torch.zeros(n, k, dtype=torch.float64))  # non-zero losses
        self.register_buffer("slope_history", torch.zeros(n, k, dtype=torch.float64))
        self._steps = 0
        self._slopes_seen = 0
        self._total_slopes = torch.zeros(64, dtype=torch.float64)  # capacity grows as needed

    @property
    def minimum_weight(self) -> float:
        return 1.0 / (10 * self.num_tasks)

    def _push(self, buffer: Tensor, row: Tensor) -> None:
        buffer.copy_(buffer.roll(-1, dims=0))
        buffer[-1].copy_(row)

    def _append_total_slope(self, value: Tensor) -> Tensor:
        m = self._slopes_seen
        if m >= self._total_slopes.shape[0]:
            grown = self._total_slopes.new_zeros(2 * self._total_slopes.shape[0])
            grown[:m].copy_(self._total_slopes[:m])
            self._total_slopes = grown
        self._total_slopes[m].copy_(value)
        self._slopes_seen = m + 1
        return self._total_slopes[: m + 1]

    def weights(self, losses: Tensor) -> Tensor:
        values = losses.detach().to(torch.float64)
        self._steps += 1
        present = present_tasks(values)  # each of these has its normaliser once it is set
        self.initial.copy_(torch.where((self.initial == 0) & present, values.abs(), self.initial))
        scale = torch.where(present, self.initial, torch.ones_like(self.initial))
        self._push(self.history, torch.where(present, values / scale, torch.zeros_like(values)))
        self._push(self.present, present.to(torch.float64))
        k = self.num_tasks
        if self._steps <= self.warmup_steps:
            return torch.full_like(losses, 1.0 / k)
        start = self.history_length - min(self._steps, self.history_length)
        window, mask = self.history[start:], self.present[start:]
        alpha = _slopes(window, mask)
        # the slope of the largest normalised loss of each step, over the steps with any task
        largest = torch.where(mask > 0, window, torch.full_like(window, -torch.inf)).max(dim=1)
        any_present = (mask > 0).any(dim=1, keepdim=True)
        peaks = torch.where(
            any_present, largest.values.unsqueeze(1), torch.zeros_like(largest.values.unsqueeze(1))
        )
        beta = _slopes(peaks, any_present.to(torch.float64))[0]
        self._push(self.slope_history, alpha)
        betas = self._append_total_slope(beta)

        rcs = torch.softmax(k * alpha / alpha.abs().sum().clamp_min(_DENOM_FLOOR), dim=0)
        n = min(self._slopes_seen, self.history_length)
        recent = self.slope_history[self.history_length - n :]
        acs_logits = -n * alpha / recent.abs().sum(dim=0).clamp_min(_DENOM_FLOOR)
        acs = torch.softmax(acs_logits, dim=0)
        m = betas.shape[0]
        normalised = -m * betas / betas.abs().sum().clamp_min(_DENOM_FLOOR)
        divergence = m * torch.softmax(self.tau * normalised, dim=0)[-1]
        mixed = divergence * rcs + (1 - divergence) * acs
        w = torch.softmax(k * mixed, dim=0)
        low = self.minimum_weight
        floored = w * (1 - low * k) + low
        w = torch.where((w < low).any(), floored, w)
        return w.to(losses.dtype)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        super()._apply(fn, recurse)
        self._total_slopes = fn(self._total_slopes)
        return self

    def get_extra_state(self) -> Any:
        return {
            "steps": self._steps,
            "slopes_seen": self._slopes_seen,
            "total_slopes": self._total_slopes[: self._slopes_seen].clone(),
        }

    def set_extra_state(self, state: Any) -> None:
        self._steps = int(state["steps"])
        self._slopes_seen = int(state["slopes_seen"])
        saved = state["total_slopes"]
        capacity = max(64, 2 * self._slopes_seen)
        self._total_slopes = self.history.new_zeros(capacity)
        self._total_slopes[: self._slopes_seen].copy_(saved)

    def extra_repr(self) -> str:
        return (
            f"tasks={list(self.tasks)}, warmup_steps={self.warmup_steps}, "
            f"history_length={self.history_length}, tau={self.tau}"
        )
