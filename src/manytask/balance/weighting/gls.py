r"""Geometric loss strategy (GLS): minimise the geometric mean of the task losses.

Chennupati, Sistu, Yogamani and Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and
Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019, arXiv:1904.08492:

.. math::

    \mathcal{L} = \Big(\prod_{i=1}^{T} L_i\Big)^{1/T}, \qquad
    \nabla \mathcal{L} = \sum_{i=1}^{T} \frac{G}{T\,L_i} \nabla L_i, \qquad
    w_i = \frac{G}{T\,L_i}, \quad G = \Big(\prod_j L_j\Big)^{1/T}

so GLS is the scale-invariant update :math:`\sum_i \nabla \log L_i` (``si``) multiplied by
:math:`G/T`. No parameters.

:math:`G` is computed as :math:`\exp(\tfrac1T\sum_j \log L_j)`, which neither overflows nor
underflows for many tasks as the plain product would. The weights are computed from the
rank-averaged losses, so the update is exactly that of the union batch under
``torch.distributed``. The losses must be positive (the paper's losses are). A loss of exactly
zero is a task absent from the batch (a mixed-task batch, or no label for it): it would make
:math:`G` zero and stop every task, so such tasks are left out and :math:`G` and :math:`T` are
taken over the tasks present (weight 0 for the absent ones, whose loss has no gradient anyway).
Positive values are floored at the smallest normal float32 (:math:`1.2\times10^{-38}`) to keep
the weights finite. With ``loss_transform="log"`` the
geometric mean is taken of :math:`\log L_i`, which then must all be positive (:math:`L_i > 1`).

LibMTL 1.1.5's ``GLS`` back-propagates the same objective (its gradients agree with these), but
the weights it *returns* for logging are :math:`L_i / (T \prod_j L_j)`, not the weights applied;
manytask reports :math:`w_i` above.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import LossWeighting, present_tasks

_FLOOR = torch.finfo(torch.float32).tiny


@registry.register(
    "balancer",
    "gls",
    "geometric loss strategy: minimise the geometric mean of the losses "
    "(Chennupati et al., CVPR-W 2019, arXiv:1904.08492)",
)
class GeometricLossStrategy(LossWeighting):
    """Geometric mean of the task losses: ``w_i = G / (T L_i)``."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)

    def weights(self, losses: Tensor) -> Tensor:
        present = present_tasks(losses)
        count = present.sum().clamp_min(1).to(losses.dtype)
        log_losses = torch.where(present, losses.clamp_min(_FLOOR), 1.0).log()
        mean = (log_losses * present).sum() / count
        return torch.where(present, torch.exp(mean - log_losses) / count, 0.0)
