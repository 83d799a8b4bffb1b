r"""Task vectors and per-model weights, shared by the rules of :mod:`manytask.merge.methods`.

A task vector is the change fine-tuning made to the base, :math:`\tau_t = \theta_t - \theta_0`
(Ilharco et al., "Editing Models with Task Arithmetic", arXiv:2212.04089). The rules stack the
task vectors of one tensor name as a ``(T, *shape)`` tensor, one row per task model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from manytask.merge.methods.param_checks import check_count, check_numbers
from manytask.merge.rule import Merged, MergeRule, TensorRows


def stack_rows(tensors: Sequence[Tensor]) -> Tensor:
    """The ``(T, *shape)`` stack of ``tensors``: the engine's own stack when they are
    :class:`~manytask.merge.rule.TensorRows` (rules may change it in place), else a new
    tensor."""
    if isinstance(tensors, TensorRows):
        return tensors.stacked
    return torch.stack(list(tensors))


def base_and_vectors(base: Tensor | None, models: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The base tensor and the ``(T, *shape)`` stack of its task vectors
    :math:`\\tau_t = \\theta_t - \\theta_0`, formed in place in the engine's stack (its rows
    then hold the task vectors) or in one new allocation of ``T`` tensors."""
    if base is None:
        raise ValueError("a task-vector rule needs the base model's tensor; base is None")
    # add_ with α = -1 is sub_'s kernel, but leaves sub_'s dispatch code unread (0.4 MiB of
    # torch's library that a merge would otherwise keep resident; docs/merging.md#memory)
    return base, stack_rows(models).add_(base, alpha=-1)


def sum_rows(vectors: Tensor) -> Tensor:
    """:math:`\\sum_t v_t` over the first axis as a chain of in-place additions, which runs at
    memory speed: ``vectors.sum(dim=0)`` reduced a ``(3, 65M)`` float32 stack 3.6× slower on
    one CPU thread."""
    total = vectors[0].clone()
    for row in vectors[1:]:
        total.add_(row)
    return total


def weighted_sum(vectors: Tensor, weights: Tensor | None = None) -> Tensor:
    """:math:`\\sum_t w_t v_t` over the first axis (plain sum when ``weights`` is None)."""
    if weights is None:
        return sum_rows(vectors)
    summed: Tensor = torch.tensordot(weights.to(vectors.dtype), vectors, dims=([0], [0]))
    return summed


class TaskVectorRule(MergeRule):
    """A rule on the task vectors: :meth:`merge_tensor` stacks them with
    :func:`base_and_vectors` and passes them to :meth:`merge_vectors`, which subclasses
    implement."""

    def merge_tensor(
        self,
        name: str,
        base: Tensor | None,
        models: Sequence[Tensor],
        generator: torch.Generator,
    ) -> Tensor | Merged:
        base, vectors = base_and_vectors(base, models)
        return self.merge_vectors(name, base, vectors, generator)

    def merge_vectors(
        self, name: str, base: Tensor, vectors: Tensor, generator: torch.Generator
    ) -> Tensor | Merged:
        """The merged tensor for ``name`` from the base tensor and the ``(T, *shape)`` stack of
        task vectors (a fresh tensor: the rule may change it in place)."""
        raise NotImplementedError


class WeightedRule(MergeRule):
    """A rule with optional per-model weights (``weights``, one float per task model).

    Subclasses set :attr:`rule_name` (the registered name, used in error messages) and
    :attr:`positive_weights` (rules that elect signs or take means need weights > 0).
    """

    rule_name: ClassVar[str] = ""
    positive_weights: ClassVar[bool] = False

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        self.weights: tuple[float, ...] | None = (
            None
            if weights is None
            else check_numbers(self.rule_name, "weights", weights, positive=self.positive_weights)
        )

    def check_models(self, count: int) -> None:
        super().check_models(count)
        if self.weights is not None:
            check_count(self.rule_name, "weights", self.weights, count)

    def weight_tensor(self, count: int) -> Tensor | None:
        """The weights as a ``(T,)`` float32 tensor, or None when none were given."""
        if self.weights is None:
            return None
        check_count(self.rule_name, "weights", self.weights, count)
        return torch.tensor(self.weights, dtype=torch.float32)
