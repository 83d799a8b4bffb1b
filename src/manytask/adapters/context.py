"""How each sample's task reaches the adapter layers without changing the model's signature.

An :class:`~manytask.adapters.model.AdaptedModel` owns one :class:`TaskContext`; every adapter
layer it injected holds a reference to it. Setting the task ids (``with adapted.task_ids(ids):``
or ``adapted(..., task_ids=ids)``) stores them here for the duration of the forward pass, so a
Hugging Face model's ``forward(input_ids=…, attention_mask=…)`` is called unchanged and each
adapted layer reads the ids of the batch it is computing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from manytask.errors import ConfigError

TaskIds = Tensor | int | str | Sequence[int] | Sequence[str]


class TaskContext:
    """The task names and the task ids of the batch being computed."""

    def __init__(self, task_names: Sequence[str]) -> None:
        self.task_names = tuple(task_names)
        self.current: Tensor | None = None

    def resolve(self, ids: TaskIds) -> Tensor:
        """Task ids as a ``long`` tensor: indices, names, or one task for the whole batch.

        A single index or name gives a 0-d tensor (every sample of the batch is that task).
        """
        names = self.task_names
        if isinstance(ids, str):
            return torch.tensor(self.index(ids))
        if isinstance(ids, int):
            values = torch.tensor(ids)
        elif isinstance(ids, Tensor):
            if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() > 1:
                raise ConfigError(
                    "task ids must be an integer tensor of shape (batch,) or a scalar, got "
                    f"dtype {ids.dtype} and shape {tuple(ids.shape)}"
                )
            values = ids.long()
        else:
            items = list(ids)
            if items and all(isinstance(item, str) for item in items):
                return torch.tensor([self.index(str(item)) for item in items])
            if not all(isinstance(item, int) for item in items):
                raise ConfigError(
                    "task ids must be task indices or task names, not a mix; "
                    f"tasks are {list(names)}"
                )
            values = torch.tensor(items, dtype=torch.long)
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= len(names)):
            raise ConfigError(
                f"task ids must be in [0, {len(names)}) for tasks {list(names)}; got values "
                f"from {int(values.min())} to {int(values.max())}"
            )
        return values

    def index(self, name: str) -> int:
        if name not in self.task_names:
            raise ConfigError(f"unknown task '{name}'; tasks are {list(self.task_names)}")
        return self.task_names.index(name)

    @contextlib.contextmanager
    def use(self, ids: TaskIds) -> Iterator[Tensor]:
        """Set the task ids for the body of the ``with`` block, then restore the previous ones."""
        previous = self.current
        self.current = self.resolve(ids)
        try:
            yield self.current
        finally:
            self.current = previous

    def for_batch(self, batch: int, layer: str) -> Tensor:
        """The ids of a batch of ``batch`` samples, as seen by the layer named ``layer``."""
        ids = self.current
        if ids is None:
            raise ConfigError(
                f"adapter layer '{layer}' routes by task but no task ids were set; call the model "
                "as adapted(..., task_ids=ids) or inside `with adapted.task_ids(ids):`"
            )
        if ids.dim() == 0:
            return ids.expand(batch)
        if ids.shape[0] != batch:
            raise ConfigError(
                f"adapter layer '{layer}' computes a batch of {batch} samples but "
                f"{ids.shape[0]} task ids were set; give one task id per sample"
            )
        return ids
