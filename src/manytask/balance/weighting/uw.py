r"""Uncertainty weighting (UW): learn one homoscedastic noise level per task.

Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
Geometry and Semantics", CVPR 2018, arXiv:1705.07115.

With :math:`s_i = \log \sigma_i^2` learned jointly with the model (eq. 7 of the paper, written
with the log-variance for numerical stability as §3.2 recommends):

.. math::

    \mathcal{L} = \sum_{i=1}^{T} \tfrac{1}{2} e^{-s_i} L_i + \tfrac{1}{2} s_i,
    \qquad w_i = \tfrac{1}{2} e^{-s_i}

The paper derives this form for Gaussian likelihoods and a factor-of-two variant
(:math:`e^{-s_i} L_i + \tfrac{1}{2} s_i`) for softmax likelihoods, then uses the same shape for
both in practice; manytask applies the regression form to every task, as LibMTL does, so that
the weights of different loss types stay comparable. At the optimum of :math:`s_i` for a fixed
loss, :math:`e^{s_i} = L_i`, i.e. each weighted loss tends to one half.

Defaults: ``init_log_var = 0`` (:math:`\sigma_i = 1`, all weights ½ at the start; the paper
gives no initial value). The :math:`s_i` are parameters of the balancer: pass
``balancer.parameters()`` to the optimizer (the Trainer does).

The losses must be positive: with ``loss_transform="log"`` that means losses above 1, since for
:math:`\log L_i < 0` the gradient :math:`\tfrac12(1 - e^{-s_i}\log L_i)` of :math:`s_i` stays
positive and :math:`s_i` runs to :math:`-\infty` (its weight to infinity).
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
    "balancer", "uw", "uncertainty weighting (Kendall et al., CVPR 2018, arXiv:1705.07115)"
)
class UncertaintyWeighting(LossWeighting):
    """Uncertainty weighting with learnable log-variances ``s_i``.

    Args:
        tasks: task names.
        init_log_var: initial value of every ``s_i = log σᵢ²``.
    """

    def __init__(self, tasks: Sequence[str], init_log_var: float = 0.0) -> None:
        super().__init__(tasks)
        if not math.isfinite(init_log_var):
            raise ConfigError(f"uw: init_log_var must be a finite number, got {init_log_var}")
        self.log_var = nn.Parameter(torch.full((self.num_tasks,), float(init_log_var)))

    def weights(self, losses: Tensor) -> Tensor:
        return 0.5 * torch.exp(-self.log_var.to(losses.dtype))

    def regularizer(self) -> Tensor:
        return 0.5 * self.log_var.sum()
