r"""Equal weighting (EW): the plain sum of the task losses.

.. math:: \mathcal{L} = \sum_{i=1}^{T} L_i, \qquad w_i = 1

The baseline of every MTL comparison (e.g. the "EW" row of LibMTL's tables and of
Lin et al., TMLR 2022, arXiv:2111.10603). manytask sums rather than averages so that a single-task
run and a one-task EW run take identical steps; the static ``Task.weight`` is applied to each
loss before it reaches the balancer. No parameters. Also registered as ``sum``, the name of the
same rule among torchjd's aggregators.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import LossWeighting


@registry.register("balancer", "ew", "equal weighting: the sum of the task losses")
@registry.register(
    "balancer", "sum", "sum of the task gradients, as torchjd's Sum aggregator (alias of ew)"
)
class EqualWeighting(LossWeighting):
    """Equal weighting: ``w_i = 1`` for every task."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)

    def weights(self, losses: Tensor) -> Tensor:
        return torch.ones_like(losses)
