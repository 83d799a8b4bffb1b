"""What a data-free merging rule is: a function of one tensor name, applied as the engine streams.

A rule sees, for one tensor name at a time, the base model's tensor (``None`` for rules that need
no base) and the task models' tensors, all in float32 on the CPU, and returns the merged tensor.
It may change the task models' tensors in place (the engine's are private, the rows of a
:class:`TensorRows`), never the base's.
The engine (:mod:`manytask.merge.engine`) reads the checkpoints lazily, calls the rule once per
name, casts the result back to the base's dtype and writes it, so peak memory holds only
``1 + len(models)`` tensors of one name at a time.

Rules that need a model-wide quantity (MetaGPT's task-vector norms, EMR's rescalers) declare
``two_pass = True``: the engine streams every tensor through :meth:`MergeRule.observe` first,
then calls :meth:`MergeRule.merge_tensor` in a second pass. A rule may also return per-task
side outputs (EMR's masks) by returning a :class:`Merged` with ``extras``.

Randomness (DARE, DELLA …) uses only the ``generator`` passed in, seeded by the engine from the
user's seed and the tensor name, so results never depend on order, threads or shards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from manytask.errors import ConfigError


class TensorRows(list[Tensor]):
    """The task models' tensors of one name as the engine hands them to a rule: the rows of one
    ``(T, *shape)`` tensor, :attr:`stacked`, that the engine reads every name into and the rule
    may change in place (:func:`~manytask.merge.methods.task_vectors.stack_rows` returns it
    instead of copying the rows into a new stack)."""

    def __init__(self, stacked: Tensor) -> None:
        super().__init__(stacked.unbind(0))
        self.stacked = stacked


@dataclass(frozen=True)
class Merged:
    """A merged tensor with optional side outputs: ``extras[output][...]`` is written to the
    side checkpoint ``output`` under the same tensor name (e.g. EMR's per-task masks)."""

    tensor: Tensor
    extras: Mapping[str, Tensor] = field(default_factory=dict)


class MergeRule:
    """Base class of data-free rules. Subclasses set the class attributes and implement
    :meth:`merge_tensor` (and :meth:`observe` with ``two_pass = True``).

    Constructor arguments are the rule's parameters (validated against the signature when built
    from a config); each subclass documents its formula, its paper and where every default
    comes from.
    """

    #: the rule takes the base model's tensors (task vectors are ``model - base``)
    needs_base: ClassVar[bool] = True
    #: bounds on the number of task models
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    #: the engine streams all tensors through :meth:`observe` before merging
    two_pass: ClassVar[bool] = False

    def check_models(self, count: int) -> None:
        """Raise a :class:`ConfigError` when ``count`` task models do not suit this rule."""
        name = type(self).__name__
        if count < self.min_models:
            raise ConfigError(f"{name} needs at least {self.min_models} task models, got {count}")
        if self.max_models is not None and count > self.max_models:
            raise ConfigError(f"{name} takes at most {self.max_models} task models, got {count}")

    def entrywise(self) -> bool:
        """Whether each merged entry depends only on the same entry of the inputs (and on the
        generator's draws, taken entry by entry in storage order, the task models' draws of an
        entry together). The engine may then merge a large tensor a block of rows at a time,
        with the same result. False by default."""
        return False

    def begin(self) -> None:
        """Called by the engine before a merge's first tensor: forget what an earlier merge
        left (model-wide sums, per-tensor records), so that one rule object can serve several
        merges. Nothing by default."""

    def observe(self, name: str, base: Tensor | None, models: Sequence[Tensor]) -> None:
        """First pass of a two-pass rule: accumulate what the rule needs from tensor ``name``."""
        raise NotImplementedError(f"{type(self).__name__} is not a two-pass rule")

    def merge_tensor(
        self,
        name: str,
        base: Tensor | None,
        models: Sequence[Tensor],
        generator: torch.Generator,
    ) -> Tensor | Merged:
        """The merged float32 tensor for ``name`` (same shape as the inputs)."""
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """Model-wide values worth reporting or saving beside the output (JSON-serialisable),
        e.g. the coefficients a two-pass rule computed. Empty by default."""
        return {}
