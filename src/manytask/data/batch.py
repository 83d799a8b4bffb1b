"""Multi-task batches and in-memory multi-task datasets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from manytask.errors import ConfigError


@dataclass(frozen=True)
class MultiTaskBatch:
    """One batch: model inputs and one target tensor per task.

    ``inputs`` is a tensor (or a mapping of tensors, for models with several inputs).
    ``targets[name]`` holds the labels of task ``name``; a missing label is a negative class
    index or NaN. ``task_ids`` optionally says which task each sample belongs to, for batches
    that mix samples of different tasks.
    """

    inputs: Tensor | Mapping[str, Tensor]
    targets: Mapping[str, Tensor]
    task_ids: Tensor | None = None

    def __len__(self) -> int:
        first = self.inputs if isinstance(self.inputs, Tensor) else next(iter(self.inputs.values()))
        return int(first.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MultiTaskBatch:
        def move(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=non_blocking)

        inputs = (
            move(self.inputs)
            if isinstance(self.inputs, Tensor)
            else {k: move(v) for k, v in self.inputs.items()}
        )
        return MultiTaskBatch(
            inputs=inputs,
            targets={k: move(v) for k, v in self.targets.items()},
            task_ids=None if self.task_ids is None else move(self.task_ids),
        )


@runtime_checkable
class MultiTaskDataset(Protocol):
    """What the Trainer iterates: a length and a batch for any index tensor."""

    def __len__(self) -> int: ...

    def batch(self, indices: Tensor) -> MultiTaskBatch: ...


@dataclass
class TensorMultiTaskDataset:
    """A dataset held as tensors, batched by indexing (no per-sample Python work).

    Args:
        inputs: ``(N, ...)`` input tensor.
        targets: one ``(N, ...)`` target tensor per task.
    """

    inputs: Tensor
    targets: dict[str, Tensor]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.inputs.shape[0]
        for name, target in self.targets.items():
            if target.shape[0] != n:
                raise ConfigError(
                    f"target of task '{name}' has {target.shape[0]} rows but inputs have {n}"
                )

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def batch(self, indices: Tensor) -> MultiTaskBatch:
        return MultiTaskBatch(
            inputs=self.inputs[indices],
            targets={name: target[indices] for name, target in self.targets.items()},
        )

    def subset(self, indices: Tensor) -> TensorMultiTaskDataset:
        return TensorMultiTaskDataset(
            self.inputs[indices], {k: v[indices] for k, v in self.targets.items()}, dict(self.info)
        )
