r"""Weight averaging: the uniform (or weighted) mean of the task models' weights.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", arXiv:2203.05482 (the uniform soup, Section 3):

.. math::

    \theta = \frac{\sum_t w_t \theta_t}{\sum_t w_t}

with :math:`w_t = 1` by default (the uniform soup). No base model is needed. ``weights`` are
relative: only their ratios matter. Defaults: uniform weights, as in the paper's uniform soup.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from manytask.merge.methods.combine import combine
from manytask.merge.methods.task_vectors import WeightedRule, stack_rows
from manytask.registry import register


@register(
    "merge_rule",
    "average",
    "weight average of the task models, uniform or weighted (Wortsman et al., 2022, "
    "arXiv:2203.05482)",
)
class WeightAverage(WeightedRule):
    """Mean of the task models' tensors.

    Args:
        weights: one positive relative weight per task model (default: all equal).
    """

    rule_name = "average"
    positive_weights = True
    needs_base = False

    def __init__(self, weights: list[float] | None = None) -> None:
        super().__init__(weights)

    def entrywise(self) -> bool:
        return True

    def merge_tensor(
        self,
        name: str,
        base: Tensor | None,
        models: Sequence[Tensor],
        generator: torch.Generator,
    ) -> Tensor:
        weights = self.weight_tensor(len(models))
        return combine(stack_rows(models), weights, "mean")
