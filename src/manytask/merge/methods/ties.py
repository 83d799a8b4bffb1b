r"""TIES-Merging: trim small changes, elect a sign per entry, average the agreeing entries.

Yadav, Tam, Choshen, Raffel and Bansal, "TIES-Merging: Resolving Interference When Merging
Models", arXiv:2306.01708, Section 3 and Algorithm 1:

.. math::

    \hat\tau_t = \tau_t \odot \operatorname{top}_k(|\tau_t|), \qquad
    \gamma = \operatorname{sgn}\Big(\sum_t w_t \hat\tau_t\Big), \qquad
    \tau_m = \frac{\sum_{t \in A} w_t \hat\tau_t}{\sum_{t \in A} w_t}, \qquad
    \theta = \theta_0 + \lambda\, \tau_m,

with :math:`A` the tasks whose trimmed entry is non-zero and has the elected sign
(:mod:`manytask.merge.methods.signs`). Granularity: the paper keeps the top-k of each task
vector flattened over the whole model; streaming one tensor at a time, we keep the top-k of
each tensor (every tensor keeps the same fraction).

Defaults: ``density`` :math:`k = 0.2` (the top-20% the paper keeps, ``topk20`` in its released
scripts); ``scale`` :math:`\lambda = 1` (the value the paper recommends when no validation set
is available; its released scripts search 0.8–2.5 on validation data); weights all 1 (the
paper has none; a weight multiplies a task's trimmed vector in the election and in the mean).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from manytask.merge.methods.param_checks import check_fraction, check_range
from manytask.merge.methods.signs import disjoint_mean, elect_sign
from manytask.merge.methods.sparsify import top_magnitude_mask
from manytask.merge.methods.task_vectors import WeightedRule, base_and_vectors
from manytask.registry import register


def ties_vector(vectors: Tensor, density: float, weights: Tensor | None) -> Tensor:
    """TIES's merged task vector :math:`\\tau_m` of the ``(T, *shape)`` stack, which it trims
    in place."""
    trimmed = vectors.mul_(top_magnitude_mask(vectors, density))
    return disjoint_mean(trimmed, elect_sign(trimmed, weights), weights)


@register(
    "merge_rule",
    "ties",
    "TIES: trim to top-k magnitudes, elect sign, disjoint mean (Yadav et al., 2023, "
    "arXiv:2306.01708)",
)
class Ties(WeightedRule):
    """TIES-Merging.

    Args:
        density: fraction k of each task vector's entries kept by magnitude, in (0, 1].
        scale: λ, the coefficient on the merged task vector, ≥ 0.
        weights: one positive weight per task model (default all 1).
    """

    rule_name = "ties"
    positive_weights = True

    def __init__(
        self, density: float = 0.2, scale: float = 1.0, weights: list[float] | None = None
    ) -> None:
        super().__init__(weights)
        self.density = check_fraction(self.rule_name, "density", density)
        self.scale = check_range(self.rule_name, "scale", scale, 0.0)

    def merge_tensor(
        self,
        name: str,
        base: Tensor | None,
        models: Sequence[Tensor],
        generator: torch.Generator,
    ) -> Tensor:
        base, vectors = base_and_vectors(base, models)
        merged = ties_vector(vectors, self.density, self.weight_tensor(len(models)))
        return merged.mul_(self.scale).add_(base)
