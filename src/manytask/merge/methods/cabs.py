r"""CABS: conflict-aware, balanced sparsification of the task vectors, then task arithmetic.

Yang et al., "CABS: Conflict-Aware and Balanced Sparsification for Enhancing Model Merging",
arXiv:2503.01874, Section 4. Two parts:

- Balanced sparsification (BS): :math:`n{:}m` pruning, keeping the :math:`n` largest
  magnitudes of every block of :math:`m` consecutive entries of the flattened tensor, so the
  kept weights spread evenly over the tensor.
- Conflict-aware sparsification (CA): the task vectors are pruned in turn, each only on the
  positions no earlier task kept, so no two tasks keep the same entry:

.. math::

    K_1 = \operatorname{BS}(|\tau_1|), \qquad
    K_t = \operatorname{BS}\big(|\tau_t| \odot \mathbb 1[\text{free}_t]\big) \cap \text{free}_t,
    \quad \text{free}_t = \neg \textstyle\bigcup_{j<t} K_j,

.. math::

    \theta = \theta_0 + \lambda \sum_t w_t\, \mathbb 1[K_t] \odot \tau_t .

The order of the task models is the pruning priority (the first keeps its own top entries).
When the quotas add up to more than a block (:math:`T n > m`), later tasks find fewer than
:math:`n` free entries in a block and keep only those (the authors' 7B script, for two models with
:math:`n \ge m/2`, lets the second also keep half a block of the first's positions; manytask keeps
the masks disjoint). A trailing block of :math:`r < m`
entries keeps its :math:`\operatorname{round}(n r / m)` largest (our choice: the authors' code
leaves it empty, which would drop every tensor smaller than :math:`m`, e.g. biases and norms).

Defaults: ``n = 64``, ``m = 256`` (the :math:`n{:}m` of the authors' 7B experiments in their
released code; density 0.25); ``scale`` :math:`\lambda = 1` (our choice: with non-overlapping
masks every kept entry is one task's own change, so no averaging is needed; the authors' 7B
recipe uses :math:`\lambda = 1.2` per model and their RoBERTa scripts search
:math:`[0.4, 0.9]` on validation data); weights all 1 (per-task :math:`\lambda_t` of the
paper are ``scale * weights``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from manytask.errors import ConfigError
from manytask.merge.methods.combine import SparseTaskVectorRule
from manytask.merge.methods.sparsify import block_top_mask
from manytask.registry import register


def conflict_aware_masks(vectors: Tensor, n: int, m: int) -> Tensor:
    """The ``(T, *shape)`` disjoint masks :math:`K_t` of CA with n:m balanced sparsification."""
    flat = vectors.reshape(vectors.shape[0], -1)
    masks = torch.zeros_like(flat, dtype=torch.bool)
    free = torch.ones(flat.shape[1], dtype=torch.bool, device=flat.device)
    for task in range(flat.shape[0]):
        scores = torch.where(free, flat[task].abs(), -1.0)
        kept = block_top_mask(scores, n, m).logical_and_(free)
        masks[task] = kept
        free.logical_and_(kept.logical_not())
    return masks.view_as(vectors)


@register(
    "merge_rule",
    "cabs",
    "CABS: conflict-aware sequential n:m sparsification, then task arithmetic (Yang et al., "
    "2025, arXiv:2503.01874)",
)
class Cabs(SparseTaskVectorRule):
    """CABS (CA + BS) followed by task arithmetic.

    Args:
        n: entries kept per block, 1 ≤ n ≤ m.
        m: block size, ≥ 1.
        scale: λ, the coefficient on the summed sparse task vectors, ≥ 0.
        weights: one weight per task model (default all 1).
    """

    rule_name = "cabs"

    def __init__(
        self, n: int = 64, m: int = 256, scale: float = 1.0, weights: list[float] | None = None
    ) -> None:
        super().__init__(scale, weights)
        for label, value in (("n", n), ("m", m)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ConfigError(f"cabs: {label} must be an integer ≥ 1, got {value!r}")
        if n > m:
            raise ConfigError(f"cabs: n must be at most m (n:m keeps n of every m), got {n}:{m}")
        self.n, self.m = int(n), int(m)

    def sparsify(self, vectors: Tensor, generator: torch.Generator) -> Tensor:
        """The conflict-aware n:m masks :math:`K_t`."""
        return vectors.mul_(conflict_aware_masks(vectors, self.n, self.m))
