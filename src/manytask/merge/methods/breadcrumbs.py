r"""Model Breadcrumbs: drop both the largest (outlier) and the smallest changes, then add.

Davari and Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks", arXiv:2312.06795, Section 3. Per layer, the task vector's entries are ranked by
magnitude; the top :math:`\gamma` fraction (outliers) and the small ones are masked out, the
mid-range band of density :math:`d` is kept:

.. math::

    m_t = \mathbb 1\big[\gamma n < \operatorname{rank}_\downarrow(|\tau_t|) \le (\gamma + d) n\big],
    \qquad \theta = \theta_0 + \lambda \sum_t w_t\, m_t \odot \tau_t .

Granularity: per tensor (the paper's "layer"); the authors' code ranks along the last axis of
each tensor (per row of a matrix). Counts round to the nearest integer, so a tensor smaller
than :math:`1/(2\gamma)` entries loses no outlier.

``breadcrumbs_ties`` follows mergekit's variant of that name (not in the paper): the same
masks, then TIES's sign election and disjoint mean (:mod:`manytask.merge.methods.signs`),
:math:`\theta = \theta_0 + \lambda \tau_m`. mergekit adds the agreeing entries instead unless
its ``normalize`` is set (its default for this variant is the sum); with ``normalize: true`` it
computes this rule.

Defaults: ``density`` :math:`d = 0.15`, ``gamma`` :math:`\gamma = 0.006` and, for
``breadcrumbs``, ``scale`` :math:`\lambda = 0.2`: the point the authors' released
hyper-parameter search (``find_best_hyperparam.py``, ``middle_keep``) starts from, inside its
ranges :math:`d \in [0.05, 0.2]`, :math:`\gamma \in [0.001, 0.01]`, :math:`\lambda \in [0.01,
1]`; we could not check the paper's final values against its text. For ``breadcrumbs_ties``,
:math:`\lambda = 1` (our choice: the disjoint mean is an average, as in TIES).
"""

from __future__ import annotations

import torch
from torch import Tensor

from manytask.merge.methods.combine import SparseTaskVectorRule
from manytask.merge.methods.param_checks import check_fraction, check_range
from manytask.merge.methods.sparsify import magnitude_band_mask
from manytask.registry import register


@register(
    "merge_rule",
    "breadcrumbs",
    "Model Breadcrumbs: drop top-γ outliers and small changes, add the rest (Davari & "
    "Belilovsky, 2023, arXiv:2312.06795)",
)
class Breadcrumbs(SparseTaskVectorRule):
    """Model Breadcrumbs.

    Args:
        density: fraction d of each task vector's entries kept (the band under the
            outliers), in (0, 1].
        gamma: fraction γ of largest-magnitude entries dropped as outliers, in [0, 1);
            density + gamma ≤ 1.
        scale: λ, the coefficient on the summed masked task vectors, ≥ 0.
        weights: one weight per task model (default all 1).
    """

    rule_name = "breadcrumbs"

    def __init__(
        self,
        density: float = 0.15,
        gamma: float = 0.006,
        scale: float = 0.2,
        weights: list[float] | None = None,
    ) -> None:
        super().__init__(scale, weights)
        self.density = check_fraction(self.rule_name, "density", density)
        self.gamma = check_range(self.rule_name, "gamma", gamma, 0.0, 1.0, high_open=True)
        check_range(self.rule_name, "density + gamma", self.density + self.gamma, 0.0, 1.0)

    def sparsify(self, vectors: Tensor, generator: torch.Generator) -> Tensor:
        """The Breadcrumbs mask: the band of density d under the top-γ magnitudes."""
        return vectors.mul_(magnitude_band_mask(vectors, self.density, self.gamma))


@register(
    "merge_rule",
    "breadcrumbs_ties",
    "Breadcrumbs masks, then TIES sign election and disjoint mean (mergekit variant of "
    "Davari & Belilovsky, 2023, arXiv:2312.06795)",
)
class BreadcrumbsTies(Breadcrumbs):
    """Model Breadcrumbs masks followed by TIES's sign election and disjoint mean.

    Args:
        density: fraction d of each task vector's entries kept, in (0, 1].
        gamma: fraction γ of largest-magnitude entries dropped, in [0, 1); density + gamma ≤ 1.
        scale: λ, the coefficient on the merged task vector, ≥ 0.
        weights: one positive weight per task model (default all 1).
    """

    rule_name = "breadcrumbs_ties"
    combine_mode = "ties"

    def __init__(
        self,
        density: float = 0.15,
        gamma: float = 0.006,
        scale: float = 1.0,
        weights: list[float] | None = None,
    ) -> None:
        super().__init__(density, gamma, scale, weights)
