"""Two-stage multi-task models: a shared stage, then one task stage per task.

The gated architectures (MoE, MMoE, DSelect-k, CGC/PLE, AdaTT, HoME) are written as

    h      = input_layer(x)
    parts  = shared_stage(h)              # named tensors, built from shared parameters only
    out[t] = task_stage(t, h, parts)      # built from task t's own parameters only

The split is placed so that **every** path from a shared parameter to a task's output passes
through ``parts``: a task stage reads the input ``h`` and ``parts``, nothing else that a shared
parameter produced. When ``h`` itself depends on parameters (a tabular input layer embeds
categorical columns) and the task stages read it, ``h`` is carried inside ``parts``.

With ``return_features=True`` the parts are packed into one base tensor ``Z`` (``(B, …)``: the
single part itself, or every part flattened and concatenated), each task stage reads its own
view of ``Z`` (unpacked back into the parts), and the views are returned. ``Z`` is therefore a
complete cut between the shared and the task-specific parameters: ``∂Lₜ/∂θ_shared =
(∂Z/∂θ_shared)ᵀ ∂Lₜ/∂Z`` exactly, which is what representation-level balancing needs
(``manytask.balance.engine.one_pass_feature_backward``).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from manytask.errors import ConfigError
from manytask.nn.base import MultiTaskModel
from manytask.nn.gates import Gate
from manytask.task import TaskSet

Shapes = list[tuple[str, tuple[int, ...]]]


def pack(parts: Mapping[str, Tensor]) -> tuple[Tensor, Shapes]:
    """One base tensor holding every part, and what :func:`unpack` needs to split it again.

    A single part that is not itself a view is used as it is; otherwise each part is flattened
    to ``(B, -1)`` and the parts are concatenated along dimension 1.
    """
    if not parts:
        raise ValueError("nothing to pack: the shared stage returned no tensors")
    shapes = [(name, tuple(t.shape[1:])) for name, t in parts.items()]
    tensors = list(parts.values())
    if len(tensors) == 1 and tensors[0]._base is None:
        return tensors[0], shapes
    base = torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)
    return base, shapes


def unpack(view: Tensor, shapes: Shapes) -> dict[str, Tensor]:
    """The parts again, as pieces of ``view`` (the inverse of :func:`pack`)."""
    if len(shapes) == 1 and view.shape[1:] == shapes[0][1]:
        return {shapes[0][0]: view}
    sizes = [math.prod(shape) for _, shape in shapes]
    pieces = torch.split(view, sizes, dim=1)
    return {
        name: piece.reshape(piece.shape[0], *shape)
        for (name, shape), piece in zip(shapes, pieces, strict=True)
    }


def check_positive(name: str, value: int, minimum: int = 1) -> None:
    """A :class:`ConfigError` naming ``name`` unless ``value ≥ minimum``."""
    if value < minimum:
        raise ConfigError(f"{name} must be ≥ {minimum}, got {value}")


def check_widths(name: str, widths: Sequence[int], allow_empty: bool = True) -> None:
    """A :class:`ConfigError` naming ``name`` for an empty list (unless allowed) or a width < 1."""
    if not widths and not allow_empty:
        raise ConfigError(f"{name} needs at least one width, e.g. [64]")
    if any(w < 1 for w in widths):
        raise ConfigError(f"{name} widths must be ≥ 1, got {list(widths)}")


def check_dropout(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {value}")


def row(table: nn.ModuleList, index: int) -> nn.ModuleList:
    """``table[index]``, a :class:`nn.ModuleList` itself (per-level lists of per-task modules)."""
    item = table[index]
    assert isinstance(item, nn.ModuleList)
    return item


class StagedModel(MultiTaskModel):
    """Base class of the two-stage architectures (see the module docstring).

    Subclasses implement :meth:`shared_stage`, :meth:`task_stage`, :meth:`shared_modules` and
    :meth:`task_modules`, and set ``tasks_read_input`` (True when a task stage reads ``h``).

    Args:
        tasks: the tasks, in output order.
        front: the input layer (:func:`manytask.nn.inputs.input_layer`).
    """

    tasks_read_input: bool = True

    def __init__(self, tasks: TaskSet, front: nn.Module) -> None:
        super().__init__()
        self.task_names = tuple(tasks.names)
        self.front = front
        #: the input layer has parameters, so ``h`` belongs to the shared stage
        self.input_trainable = any(True for _ in front.parameters())

    @abc.abstractmethod
    def shared_stage(self, h: Tensor) -> dict[str, Tensor]:
        """The tensors the task stages read, built by the shared parameters."""

    @abc.abstractmethod
    def task_stage(self, index: int, h: Tensor, parts: Mapping[str, Tensor]) -> Tensor:
        """Task ``index``'s output from the input ``h`` and the shared ``parts``."""

    @abc.abstractmethod
    def shared_modules(self) -> list[nn.Module]:
        """Modules whose parameters can influence more than one task's output."""

    @abc.abstractmethod
    def task_modules(self, index: int) -> list[nn.Module]:
        """Modules whose parameters influence only task ``index``'s output."""

    def forward(  # type: ignore[override]
        self, x: Tensor, return_features: bool = False
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], list[Tensor]]:
        h = self.front(x)
        parts = self.shared_stage(h)
        if self.tasks_read_input and self.input_trainable:
            parts = {"input": h, **parts}
        if not return_features:
            return {name: self.task_stage(i, h, parts) for i, name in enumerate(self.task_names)}
        base, shapes = pack(parts)
        views = [base.view_as(base) for _ in self.task_names]
        outputs = {}
        for i, (name, view) in enumerate(zip(self.task_names, views, strict=True)):
            own = unpack(view, shapes)
            outputs[name] = self.task_stage(i, own.get("input", h), own)
        return outputs, views

    def auxiliary_loss(self) -> Tensor:
        """The sum of the gates' auxiliary losses from the last forward pass (load balancing,
        entropy …), a scalar to add to the training loss; zero when no gate has one."""
        terms = [g.auxiliary_loss() for g in self.modules() if isinstance(g, Gate)]
        present = [t for t in terms if t is not None]
        if present:
            return torch.stack([t.float() for t in present]).sum()
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)

    def _index(self, name: str) -> int:
        if name not in self.task_names:
            raise ConfigError(f"unknown task '{name}'; tasks are: {', '.join(self.task_names)}")
        return self.task_names.index(name)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return _unique(self.shared_modules())

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        return _unique(self.task_modules(self._index(name)))


def _unique(modules: Sequence[nn.Module]) -> Iterator[nn.Parameter]:
    seen: set[int] = set()
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield p
