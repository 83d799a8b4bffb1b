r"""Combining task vectors into one, and the skeleton of the rules that sparsify, then combine.

:func:`combine` holds each way the rules fold the ``(T, *shape)`` stack :math:`\hat\tau` of one
tensor name's (sparsified) task vectors into one tensor, with optional per-model weights
:math:`w_t` (all 1 when None):

- ``"sum"``: :math:`\sum_t w_t \hat\tau_t` (task arithmetic, DARE linear, Breadcrumbs, CABS,
  the task-arithmetic vector of the TALL-mask rules);
- ``"mean"``: :math:`\sum_t w_t \hat\tau_t / \sum_t w_t` (weight averaging, DELLA linear);
- ``"ties"``: TIES's sign election and disjoint mean (TIES, DARE-TIES, Breadcrumbs-TIES,
  DELLA);
- ``"ties_sum"``: sign election and disjoint sum (the TIES vector of the TALL-mask rules).

The sign steps are those of :mod:`manytask.merge.methods.signs`.

:class:`SparseTaskVectorRule` is the skeleton of the weighted rules that merge as

.. math::

    \theta = \theta_0 + \lambda\, \operatorname{combine}\big(\operatorname{sparsify}(\tau_1,
    \dots, \tau_T)\big):

a rule declares its parameters, its :meth:`~SparseTaskVectorRule.sparsify` step and its
:attr:`~SparseTaskVectorRule.combine_mode`; a variant of a rule (``dare_ties`` of
``dare_linear``, ``breadcrumbs_ties`` of ``breadcrumbs``, ``della_linear`` of ``della``) differs
only in its combine mode, its defaults and any parameter it adds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from manytask.merge.methods.param_checks import check_range
from manytask.merge.methods.signs import disjoint_mean, disjoint_sum, elect_sign
from manytask.merge.methods.task_vectors import (
    TaskVectorRule,
    WeightedRule,
    sum_rows,
    weighted_sum,
)

Combine = Literal["sum", "mean", "ties", "ties_sum"]


def combine(vectors: Tensor, weights: Tensor | None, how: Combine) -> Tensor:
    """The ``(T, *shape)`` stack ``vectors`` folded into one tensor as ``how`` says (see the
    module docstring), with the ``(T,)`` ``weights`` (None: all 1)."""
    if how == "sum":
        return weighted_sum(vectors, weights)
    if how == "mean":
        if weights is None:
            return sum_rows(vectors).div_(len(vectors))
        return weighted_sum(vectors, weights).div_(weights.sum())
    if how not in ("ties", "ties_sum"):
        raise ValueError(f"unknown way to combine task vectors: {how!r}")
    sign = elect_sign(vectors, weights)
    if how == "ties":
        return disjoint_mean(vectors, sign, weights)
    return disjoint_sum(vectors, sign, weights)


class SparseTaskVectorRule(WeightedRule, TaskVectorRule):
    """:math:`\\theta_0 + \\lambda\\, \\operatorname{combine}(\\operatorname{sparsify}(\\tau))`
    with the ``scale`` λ ≥ 0 and optional per-model weights.

    Subclasses set :attr:`rule_name` and :attr:`combine_mode`, override :meth:`sparsify` when
    they sparsify, and check their own parameters in their constructor after calling this one's.
    Weights must be positive for every combine mode but ``"sum"``: sign election and means
    need positive weights.
    """

    #: how the sparsified task vectors are combined (see :func:`combine`)
    combine_mode: ClassVar[Combine] = "sum"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.positive_weights = cls.combine_mode != "sum"

    def __init__(self, scale: float, weights: Sequence[float] | None = None) -> None:
        super().__init__(weights)
        self.scale = check_range(self.rule_name, "scale", scale, 0.0)

    def sparsify(self, vectors: Tensor, generator: torch.Generator) -> Tensor:
        """The sparsified ``(T, *shape)`` task vectors (``vectors`` may be changed in place and
        returned); no sparsification by default."""
        return vectors

    def merge_vectors(
        self, name: str, base: Tensor, vectors: Tensor, generator: torch.Generator
    ) -> Tensor:
        weights = self.weight_tensor(len(vectors))
        merged = combine(self.sparsify(vectors, generator), weights, self.combine_mode)
        return merged.mul_(self.scale).add_(base)
