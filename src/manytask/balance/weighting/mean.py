r"""Mean: the average of the task losses.

.. math:: \mathcal{L} = \frac{1}{T} \sum_{i=1}^{T} L_i, \qquad w_i = \frac{1}{T}

The baseline that torchjd calls ``Mean`` (``torchjd.aggregation.Mean``: the mean of the rows of
the Jacobian, i.e. the gradient of the mean loss; a baseline in Quinton and Rey, "Jacobian
Descent for Multi-Objective Optimization", arXiv 2024, arXiv:2406.16232). It differs from ``ew``
only by the factor :math:`1/T`, which matters for optimizers that are not scale-invariant (SGD)
and for gradient clipping. No parameters; exact under ``torch.distributed`` (the weights are
constants).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import LossWeighting


@registry.register(
    "balancer",
    "mean",
    "mean of the task losses, w_i = 1/T (torchjd's Mean; Quinton & Rey, arXiv 2024, "
    "arXiv:2406.16232)",
)
class MeanWeighting(LossWeighting):
    """Mean of the task losses: ``w_i = 1/T`` for every task."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)

    def weights(self, losses: Tensor) -> Tensor:
        return torch.full_like(losses, 1.0 / self.num_tasks)
