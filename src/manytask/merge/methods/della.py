r"""DELLA-Merging: magnitude-ranked random drop (MagPrune), sign election, fused mean.

Deep, Bhardwaj and Poria, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", arXiv:2406.11617, Section 3 (Drop, Elect, Fuse).

Drop (MagPrune, :func:`manytask.merge.methods.sparsify.magnitude_sampled_drop`): in each row of
:math:`n` entries ranked :math:`r = 0, \dots, n - 1` by increasing magnitude, entry :math:`r`
is kept with probability :math:`q_r = d - \epsilon/2 + \epsilon\, r / (n - 1)` and a kept
entry is divided by :math:`q_r` (the paper's :math:`1/(1 - p_i)` with drop probability
:math:`p_i = 1 - q_r`): larger changes are dropped less often, every entry keeps its expected
value. Elect: :math:`\gamma = \operatorname{sgn}(\sum_t w_t \tilde\tau_t)`. Fuse: the disjoint
mean of the agreeing entries, :math:`\theta = \theta_0 + \lambda \tau_m`.

``della_linear`` keeps the Drop and Fuse steps and skips Elect (the name mergekit gives this
variant): :math:`\theta = \theta_0 + \lambda \sum_t w_t \tilde\tau_t / \sum_t w_t`, the
weighted mean the authors' code fuses with when election is off (its ``*_noelect`` methods);
mergekit's ``della_linear`` takes the weighted sum unless its ``normalize`` is set.

Granularity: ranks are taken per row (a matrix's rows; a higher-order tensor is cut along its
first axis; a vector is one row), as in the authors' code. Randomness comes only from the
engine's per-tensor generator.

Defaults, from the command in the authors' released README: drop rate 0.3 (``density``
:math:`d = 0.7`), window ``epsilon`` :math:`\epsilon = 0.14` (keep probabilities from 0.63 to
0.77) and ``scale`` :math:`\lambda = 1.1`; weights all 1. ``epsilon`` is the whole window, as
the paper's :math:`\epsilon` and the authors' ``window_size``; mergekit's ``epsilon`` is half of
it, so a mergekit config carried over keeps half the window unless its value is doubled.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from manytask.merge.methods.combine import Combine, SparseTaskVectorRule
from manytask.merge.methods.param_checks import check_fraction, check_range
from manytask.merge.methods.sparsify import magnitude_sampled_drop
from manytask.registry import register


@register(
    "merge_rule",
    "della",
    "DELLA: magnitude-ranked random drop (MagPrune), sign election, disjoint mean (Deep et "
    "al., 2024, arXiv:2406.11617)",
)
class Della(SparseTaskVectorRule):
    """DELLA-Merging (Drop, Elect, Fuse).

    Args:
        density: mean probability d of keeping an entry (1 - drop rate), in (0, 1].
        epsilon: width ε of the window of keep probabilities around d, ≥ 0, with
            0 < d - ε/2 and d + ε/2 ≤ 1.
        scale: λ, the coefficient on the fused task vector, ≥ 0.
        weights: one positive weight per task model (default all 1).
    """

    rule_name = "della"
    combine_mode: ClassVar[Combine] = "ties"

    def __init__(
        self,
        density: float = 0.7,
        epsilon: float = 0.14,
        scale: float = 1.1,
        weights: list[float] | None = None,
    ) -> None:
        super().__init__(scale, weights)
        self.density = check_fraction(self.rule_name, "density", density)
        self.epsilon = check_range(self.rule_name, "epsilon", epsilon, 0.0)
        check_range(
            self.rule_name,
            "density - epsilon/2",
            self.density - self.epsilon / 2,
            0.0,
            low_open=True,
        )
        check_range(
            self.rule_name, "density + epsilon/2", self.density + self.epsilon / 2, 0.0, 1.0
        )

    def sparsify(self, vectors: Tensor, generator: torch.Generator) -> Tensor:
        """The Drop step, MagPrune."""
        return magnitude_sampled_drop(vectors, self.density, self.epsilon, generator)


@register(
    "merge_rule",
    "della_linear",
    "DELLA without sign election: MagPrune, then the weighted mean (Deep et al., 2024, "
    "arXiv:2406.11617)",
)
class DellaLinear(Della):
    """DELLA's Drop and Fuse steps without Elect (the parameters and defaults of
    :class:`Della`)."""

    rule_name = "della_linear"
    combine_mode = "mean"
