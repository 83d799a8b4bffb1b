r"""DARE: randomly drop task-vector entries and rescale the rest, then merge linearly or by TIES.

Yu, Yu, Yu, Huang and Li, "Language Models are Super Mario: Absorbing Abilities from
Homologous Models as a Free Lunch", arXiv:2311.03099, Section 3. With :math:`p = 1 - d` the
drop rate and :math:`m_t \sim \operatorname{Bernoulli}(d)` drawn per entry:

.. math::

    \tilde\tau_t = \frac{m_t \odot \tau_t}{d},

which keeps every entry's expected value. DARE is a plug-in before a merging rule; two are
registered:

- ``dare_linear`` (DARE + task arithmetic): :math:`\theta = \theta_0 + \lambda \sum_t w_t
  \tilde\tau_t`.
- ``dare_ties`` (DARE + TIES-Merging): elect :math:`\gamma = \operatorname{sgn}(\sum_t w_t
  \tilde\tau_t)` and take the disjoint mean of the agreeing :math:`\tilde\tau_t`,
  :math:`\theta = \theta_0 + \lambda \tau_m`. By default the random drop replaces TIES's
  magnitude trim (the common reading, as in mergekit's ``dare_ties``); ``trim_density < 1``
  also applies TIES's top-k trim to the rescaled vectors, the order the authors' code uses
  (DARE first, then the full TIES-Merging). mergekit's ``dare_ties`` adds the agreeing entries
  by default and takes their mean, as here, with ``normalize: true``.

Randomness: the mask is drawn from the engine's per-tensor generator only, entry by entry (the
task models' draws of one entry together), so a seed gives the same merge on any number of
threads, and the engine may merge a large tensor a block of rows at a time with the same result.

Defaults: ``density`` :math:`d = 0.8` (drop rate 0.2, the authors' example for merging WizardLM
with WizardMath in the README of their released code; the paper shows single models keep their
abilities at drop rates of 0.9 and more, so lower densities are worth trying); ``scale``
:math:`\lambda = 1` (the scaling coefficient of the authors' task-arithmetic example, which
has no drop; their DARE example combines the drop with average merging, :math:`\lambda = 1/T`,
so the two defaults together are not one of the authors' configurations, and with ``T`` models
they add ``T`` times that example's change); ``trim_density = 1`` (no extra trim, our choice);
weights all 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from manytask.merge.methods.combine import SparseTaskVectorRule
from manytask.merge.methods.param_checks import check_fraction
from manytask.merge.methods.sparsify import drop_and_rescale, top_magnitude_mask
from manytask.registry import register


@register(
    "merge_rule",
    "dare_linear",
    "DARE random drop and rescale, then task arithmetic (Yu et al., 2023, arXiv:2311.03099)",
)
class DareLinear(SparseTaskVectorRule):
    """DARE + task arithmetic.

    Args:
        density: probability d of keeping each task-vector entry (1 - drop rate), in (0, 1].
        scale: λ, the coefficient on the summed task vectors, ≥ 0.
        weights: one weight per task model (default all 1).
    """

    rule_name = "dare_linear"

    def __init__(
        self, density: float = 0.8, scale: float = 1.0, weights: list[float] | None = None
    ) -> None:
        super().__init__(scale, weights)
        self.density = check_fraction(self.rule_name, "density", density)

    def sparsify(self, vectors: Tensor, generator: torch.Generator) -> Tensor:
        """DARE's random drop, each kept entry rescaled by 1/d."""
        return drop_and_rescale(vectors, self.density, generator)

    def entrywise(self) -> bool:
        return True


@register(
    "merge_rule",
    "dare_ties",
    "DARE random drop and rescale, then TIES sign election and disjoint mean (Yu et al., "
    "2023, arXiv:2311.03099)",
)
class DareTies(DareLinear):
    """DARE + TIES-Merging.

    Args:
        density: probability d of keeping each task-vector entry (1 - drop rate), in (0, 1].
        scale: λ, the coefficient on the merged task vector, ≥ 0.
        trim_density: TIES's top-k fraction applied after the drop, in (0, 1]; 1 skips it.
        weights: one positive weight per task model (default all 1).
    """

    rule_name = "dare_ties"
    combine_mode = "ties"

    def __init__(
        self,
        density: float = 0.8,
        scale: float = 1.0,
        trim_density: float = 1.0,
        weights: list[float] | None = None,
    ) -> None:
        super().__init__(density, scale, weights)
        self.trim_density = check_fraction(self.rule_name, "trim_density", trim_density)

    def sparsify(self, vectors: Tensor, generator: torch.Generator) -> Tensor:
        """DARE's drop, then TIES's top-k trim when ``trim_density < 1``."""
        dropped = super().sparsify(vectors, generator)
        if self.trim_density < 1.0:
            dropped = dropped * top_magnitude_mask(dropped, self.trim_density)
        return dropped

    def entrywise(self) -> bool:
        return self.trim_density >= 1.0  # the top-k trim ranks a whole tensor
