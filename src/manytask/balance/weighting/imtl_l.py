r"""IMTL-L: the loss-balance half of Impartial Multi-Task Learning.

Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, "Towards Impartial Multi-task Learning",
ICLR 2021 (OpenReview IMPnRXEWpvr; no arXiv version). Each task gets a learnable scale
:math:`s_i`, learned jointly with the model by the same optimizer:

.. math::

    \mathcal{L} = \sum_{i=1}^{T} \big(e^{s_i} L_i - s_i\big), \qquad w_i = e^{s_i}

For a fixed loss the optimum is :math:`e^{s_i} L_i = 1`: the scaled losses are driven to a
common scale, whatever the raw scales (the paper's scale invariance). The
:math:`-s_i` term stops :math:`s_i \to -\infty`. Both the shared and the task-specific
parameters receive :math:`e^{s_i}\nabla L_i`; the paper's hybrid IMTL replaces the shared
parameters' update by the IMTL-G direction, which is a gradient method and not part of this one.

Up to the sign of the parameter and a factor of two this is the objective of uncertainty
weighting (``uw``): :math:`e^{s} L - s = 2\,(\tfrac12 e^{-u} L + \tfrac12 u)` with
:math:`u = -s`.

Defaults: ``init_scale = 0`` (every :math:`e^{s_i} = 1`, so training starts as ``ew``), as in
LibMTL's ``IMTL`` and torchjd's ``IMTLL``. The :math:`s_i` are parameters of the balancer: pass
``balancer.parameters()`` to the optimizer (the Trainer does). Under ``torch.distributed`` the
gradient of :math:`s_i` on each rank is :math:`e^{s_i} L_i^{(r)} - 1`, whose rank average is
that of the union batch, so the method is exact. The losses are meant to be positive; with
``loss_transform="log"`` :math:`\log L_i` must be positive for the optimum of :math:`s_i` to
exist.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from manytask import registry
from manytask.balance.base import LossWeighting
from manytask.errors import ConfigError


@registry.register(
    "balancer",
    "imtl_l",
    "IMTL-L: learnable loss scales e^s L - s (Liu et al., ICLR 2021, OpenReview IMPnRXEWpvr)",
)
class IMTLLoss(LossWeighting):
    """IMTL-L with learnable log-scales ``s_i``.

    Args:
        tasks: task names.
        init_scale: initial value of every ``s_i`` (the weight starts at ``e^{s_i}``).
    """

    def __init__(self, tasks: Sequence[str], init_scale: float = 0.0) -> None:
        super().__init__(tasks)
        if not math.isfinite(init_scale):
            raise ConfigError(f"imtl_l: init_scale must be a finite number, got {init_scale}")
        self.log_scale = nn.Parameter(torch.full((self.num_tasks,), float(init_scale)))

    def weights(self, losses: Tensor) -> Tensor:
        return torch.exp(self.log_scale.to(losses.dtype))

    def regularizer(self) -> Tensor:
        return -self.log_scale.sum()
