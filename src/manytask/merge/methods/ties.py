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
each tensor (every tensor keeps the same fraction). The count kept is :math:`k n` rounded to
the nearest integer; the authors' code keeps every entry at least as large as its
``kthvalue``, one more (401 of 2,000 at 20%).

Defaults: ``density`` :math:`k = 0.2` (the top-20% the paper keeps, ``topk20`` in its released
scripts); ``scale`` :math:`\lambda = 1` (the value the paper recommends when no validation set
is available; its released scripts search 0.8–2.5 on validation data); weights all 1 (the
paper has none; a weight multiplies a task's trimmed vector in the election and in the mean).
"""

from __future__ import annotations

import torch
from torch import Tensor

from manytask.merge.methods.combine import SparseTaskVectorRule
from manytask.merge.methods.param_checks import check_fraction
from manytask.merge.methods.sparsify import top_magnitude_mask
from manytask.registry import register


@register(
    "merge_rule",
    "ties",
    "TIES: trim to top-k magnitudes, elect sign, disjoint mean (Yadav et al., 2023, "
    "arXiv:2306.01708)",
)
class Ties(SparseTaskVectorRule):
    """TIES-Merging.

    Args:
        density: fraction k of each task vector's entries kept by magnitude, in (0, 1].
        scale: λ, the coefficient on the merged task vector, ≥ 0.
        weights: one positive weight per task model (default all 1).
    """

    rule_name = "ties"
    combine_mode = "ties"

    def __init__(
        self, density: float = 0.2, scale: float = 1.0, weights: list[float] | None = None
    ) -> None:
        super().__init__(scale, weights)
        self.density = check_fraction(self.rule_name, "density", density)

    def sparsify(self, vectors: Tensor, generator: torch.Generator) -> Tensor:
        """The trim: each task vector keeps its top ``density`` fraction of magnitudes."""
        return vectors.mul_(top_magnitude_mask(vectors, self.density))
