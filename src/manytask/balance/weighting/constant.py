r"""Constant: fixed, user-given task weights.

.. math:: \mathcal{L} = \sum_{i=1}^{T} c_i L_i, \qquad w_i = c_i \ge 0

The baseline that torchjd calls ``Constant`` (``torchjd.aggregation.Constant``: the rows of the
Jacobian combined with pre-determined weights; torchjd accompanies Quinton and Rey, "Jacobian
Descent for Multi-Objective Optimization", arXiv 2024, arXiv:2406.16232). Linear scalarization
with fixed weights is the oldest multi-task baseline and has no single source paper.

``weights`` must hold one finite, non-negative number per task, in task order, with at least one
positive (all zero would never train). The weights are configuration, not state: they are a
non-persistent buffer, so a resumed run uses the weights of its configuration. Exact under
``torch.distributed`` (the weights are constants).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import LossWeighting
from manytask.errors import ConfigError


@registry.register(
    "balancer",
    "constant",
    "fixed user-given task weights (torchjd's Constant; Quinton & Rey, arXiv 2024, "
    "arXiv:2406.16232)",
)
class ConstantWeighting(LossWeighting):
    """Fixed weights ``w_i = c_i``.

    Args:
        tasks: task names.
        weights: one non-negative weight per task, in task order.
    """

    constant_weights: Tensor

    def __init__(self, tasks: Sequence[str], weights: list[float]) -> None:
        super().__init__(tasks)
        values = [float(w) for w in weights]
        if len(values) != self.num_tasks:
            raise ConfigError(
                f"constant: weights must hold one value per task ({self.num_tasks} for tasks "
                f"{list(self.tasks)}), got {len(values)}"
            )
        bad = [w for w in values if not math.isfinite(w) or w < 0]
        if bad:
            raise ConfigError(f"constant: weights must be finite and ≥ 0, got {values}")
        if not any(w > 0 for w in values):
            raise ConfigError("constant: at least one of the weights must be > 0, got all zeros")
        self.register_buffer("constant_weights", torch.tensor(values), persistent=False)

    def weights(self, losses: Tensor) -> Tensor:
        return self.constant_weights.to(device=losses.device, dtype=losses.dtype)

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}, weights={self.constant_weights.tolist()}"
