r"""Dynamic weight average (DWA): weight each task by how slowly its loss falls.

Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019,
arXiv:1803.10704, eq. (7):

.. math::

    w_k(t) = \frac{K \exp(r_k(t-1)/\tau)}{\sum_i \exp(r_i(t-1)/\tau)},
    \qquad r_k(t-1) = \frac{\bar L_k(t-1)}{\bar L_k(t-2)}

where :math:`\bar L_k(t)` is the mean loss of task :math:`k` over the steps of epoch :math:`t`,
:math:`K` the number of tasks and :math:`\tau` a temperature. In the first two epochs
:math:`w_k = 1`.

Defaults: ``temperature = 2`` (the paper's value). The epoch means are accumulated on the device
during the epoch; the Trainer calls :meth:`end_epoch`; a custom loop must call it at the end of
each epoch, or DWA stays at equal weights. The running sums and the last two epoch means are
buffers, so a resumed run continues identically, mid-epoch included.

The ratio reads "slow" only for positive losses: with ``loss_transform="log"`` and losses below
1 both epoch means are negative, a falling loss gives :math:`r_k > 1`, and the task whose loss
falls faster gets the larger weight (a log-loss crossing 0 gives an unbounded ratio).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import LossWeighting
from manytask.errors import ConfigError


@registry.register(
    "balancer", "dwa", "dynamic weight average (Liu et al., CVPR 2019, arXiv:1803.10704)"
)
class DynamicWeightAverage(LossWeighting):
    """Dynamic weight average over epoch-mean losses.

    Args:
        tasks: task names.
        temperature: softmax temperature τ (> 0).
    """

    loss_sum: Tensor
    step_count: Tensor
    history: Tensor
    epochs_seen: Tensor

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0) -> None:
        super().__init__(tasks)
        if temperature <= 0:
            raise ConfigError(f"dwa: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        k = self.num_tasks
        self.register_buffer("loss_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("step_count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("history", torch.ones(2, k, dtype=torch.float64))  # [t-2, t-1]
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.int64))

    def weights(self, losses: Tensor) -> Tensor:
        self.loss_sum += losses.detach().to(self.loss_sum.dtype)
        self.step_count += 1
        ratio = self.history[1] / self.history[0]
        dwa = self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)
        ready = self.epochs_seen >= 2
        return torch.where(ready, dwa, torch.ones_like(dwa)).to(losses.dtype)

    def end_epoch(self) -> None:
        if int(self.step_count) == 0:
            return
        mean = self.loss_sum / self.step_count
        self.history.copy_(torch.stack([self.history[1], mean]))
        self.epochs_seen += 1
        self.loss_sum.zero_()
        self.step_count.zero_()
