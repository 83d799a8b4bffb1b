r"""Sign election and disjoint merges (TIES-Merging's steps 2 and 3), shared by the rules that
resolve sign conflicts: TIES, DARE-TIES, Breadcrumbs-TIES, DELLA, Consensus TIES, TALL masks.

Yadav, Tam, Choshen, Raffel and Bansal, "TIES-Merging: Resolving Interference When Merging
Models", arXiv:2306.01708, Section 3. On the ``(T, *shape)`` stack :math:`\hat\tau` of
(already sparsified) task vectors with per-model weights :math:`w_t` (all 1 in the paper):

.. math::

    \gamma = \operatorname{sgn}\Big(\sum_t w_t \hat\tau_t\Big), \qquad
    A = \{t : \hat\tau_t \neq 0,\ \operatorname{sgn}(\hat\tau_t) = \gamma\},

.. math::

    \text{disjoint mean} = \frac{\sum_{t \in A} w_t \hat\tau_t}{\sum_{t \in A} w_t}, \qquad
    \text{disjoint sum} = \sum_{t \in A} w_t \hat\tau_t,

both 0 where :math:`A` is empty. The elected sign is that of the total mass (the paper's
choice), not of the vote count. Where the total is exactly 0 the entry merges to 0; the
authors' code assigns such entries the tensor's majority sign instead, which only matters for
exact cancellations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from manytask.merge.methods.task_vectors import weighted_sum


def elect_sign(vectors: Tensor, weights: Tensor | None = None) -> Tensor:
    """:math:`\\gamma = \\operatorname{sgn}(\\sum_t w_t \\hat\\tau_t)` (-1, 0 or 1 per entry)."""
    return weighted_sum(vectors, weights).sign_()


def agreement_mask(vectors: Tensor, sign: Tensor) -> Tensor:
    """True where a task's entry is non-zero and has the elected sign."""
    return (vectors.sign() == sign) & (vectors != 0)


def disjoint_sum(vectors: Tensor, sign: Tensor, weights: Tensor | None = None) -> Tensor:
    """:math:`\\sum_{t \\in A} w_t \\hat\\tau_t`: the agreeing entries, summed."""
    agreeing = torch.where(agreement_mask(vectors, sign), vectors, 0.0)
    return weighted_sum(agreeing, weights)


def disjoint_mean(vectors: Tensor, sign: Tensor, weights: Tensor | None = None) -> Tensor:
    """:math:`\\sum_{t \\in A} w_t \\hat\\tau_t / \\sum_{t \\in A} w_t` (0 where A is empty)."""
    agree = agreement_mask(vectors, sign)
    total = weighted_sum(torch.where(agree, vectors, 0.0), weights)
    count = weighted_sum(agree.to(vectors.dtype), weights)
    return torch.where(count > 0, total / count.clamp_min(torch.finfo(count.dtype).tiny), 0.0)
