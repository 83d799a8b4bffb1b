"""The model contract every multi-task architecture meets.

A multi-task model maps inputs to one output per task (``dict[str, Tensor]``). Asked with
``return_features=True`` it also returns the shared representation that feeds the task heads,
for representation-level balancing and analysis: one view of it per task, in task order, each
the tensor that task's head consumed (so one backward pass can separate the tasks'
gradients). It says which parameters are shared and which belong to each task, so a balancer
can treat them differently.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import Literal, overload

from torch import Tensor, nn


class MultiTaskModel(nn.Module, abc.ABC):
    """Base class of multi-task architectures."""

    task_names: tuple[str, ...]

    @overload
    def forward(self, x: Tensor, return_features: Literal[False] = ...) -> dict[str, Tensor]: ...

    @overload
    def forward(
        self, x: Tensor, return_features: Literal[True]
    ) -> tuple[dict[str, Tensor], list[Tensor]]: ...

    @abc.abstractmethod
    def forward(
        self, x: Tensor, return_features: bool = False
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], list[Tensor]]:
        """Per-task outputs, and the shared representation when ``return_features``."""

    @abc.abstractmethod
    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters used by every task."""

    @abc.abstractmethod
    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """Parameters used only by task ``name``."""
