"""Several single-task datasets seen as one multi-task dataset whose batches mix the tasks.

Index space: example ``i`` of task ``t`` has the global index ``o_t + i`` with
``o_t = n_1 + … + n_{t-1}`` (the order of ``torch.utils.data.ConcatDataset``), so a sampler's
batch of global indices is all a :class:`TaskMixture` needs, and the Trainer's
``dataset.batch(indices)`` works unchanged.

A mixed batch keeps the samplers' row order. Each sample carries the targets its own dataset
gives; the targets of every other task are *missing* — −1 for a class-index target, NaN for a
float target, the project's convention (:mod:`manytask.task`) — so each task's built-in loss is
computed on its own samples only, and every balancer receives the per-task losses of one mixed
batch as it would from a fully labelled one. ``task_ids`` (one task index per row, in the order
of the tasks) says which task each row came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from manytask.data.batch import MultiTaskBatch, MultiTaskDataset
from manytask.errors import ConfigError
from manytask.task import TaskSet


def global_offsets(sizes: list[int]) -> Tensor:
    """``(T + 1,)`` int64: where each task's examples start in the global index space, then the
    total."""
    return torch.cumsum(torch.tensor([0, *sizes], dtype=torch.int64), dim=0)


@dataclass(frozen=True)
class _Spec:
    """Shape after the batch dimension and dtype of one tensor of a batch."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @staticmethod
    def of(tensor: Tensor) -> _Spec:
        return _Spec(tuple(tensor.shape[1:]), tensor.dtype)

    def __str__(self) -> str:
        return f"(batch, {', '.join(map(str, self.shape))}) {self.dtype}".replace(", )", ")")


def _missing_value(name: str, dtype: torch.dtype, tasks: TaskSet | None) -> float:
    """−1 for class indices, NaN for float targets; checked against the task's kind if known."""
    kind = tasks[name].kind_ if tasks is not None else None
    if dtype.is_floating_point and kind != "multiclass":
        return float("nan")
    integer = not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool
    if integer and kind in (None, "multiclass"):
        return -1.0
    need = "an integer (class index)" if kind == "multiclass" else "a floating-point"
    raise ConfigError(
        f"the targets of task '{name}' are {dtype}; a mixed batch marks a missing label with "
        f"-1 in an integer target or NaN in a float target, so give {need} target"
    )


class TaskMixture:
    """One dataset over several task datasets: batches of global indices become mixed-task
    :class:`~manytask.data.MultiTaskBatch` objects with the other tasks' targets missing.

    Args:
        datasets: task name → that task's dataset (anything with ``len()`` and
            ``batch(indices)``), in task order; a task's index in ``task_ids`` is its position
            here. Each dataset gives the target of its own task under the task's name, and may
            give targets of other tasks of the mixture too (those are kept).
        tasks: the tasks, to check that the names and order agree and that each target type
            fits the task's loss (a class index for ``cross_entropy``, a float otherwise).
        task_ids_key: also put the task ids into the inputs mapping under this key (e.g.
            ``"task_ids"``, where :class:`~manytask.adapters.MultiTaskAdapterModel` reads them);
            needs inputs that are mappings.

    Every dataset's inputs must agree in type (tensor or mapping, same keys), dtype and shape
    after the batch dimension, and so must every task's targets: pad token sequences to one
    length before mixing. Construction reads one example of each dataset to check this.
    """

    def __init__(
        self,
        datasets: Mapping[str, MultiTaskDataset],
        tasks: TaskSet | None = None,
        task_ids_key: str | None = None,
    ) -> None:
        if not datasets:
            raise ConfigError("a task mixture needs at least one task dataset; got none")
        self.task_names = list(datasets)
        if tasks is not None and list(tasks.names) != self.task_names:
            raise ConfigError(
                f"the mixture's datasets are for tasks {self.task_names} but the tasks are "
                f"{tasks.names}; give one dataset per task, in the tasks' order"
            )
        self.datasets = [datasets[name] for name in self.task_names]
        self.sizes = [len(dataset) for dataset in self.datasets]
        for name, size in zip(self.task_names, self.sizes, strict=True):
            if size < 1:
                raise ConfigError(
                    f"the dataset of task '{name}' is empty; leave the task out of the mixture"
                )
        self.offsets = global_offsets(self.sizes)
        self.task_ids_key = task_ids_key
        self._inputs, self._targets = self._check_datasets()
        self._fill = {
            name: _missing_value(name, spec.dtype, tasks) for name, spec in self._targets.items()
        }

    def __len__(self) -> int:
        return int(self.offsets[-1])

    # checks -----------------------------------------------------------------------------
    def _check_datasets(self) -> tuple[dict[str, _Spec] | _Spec, dict[str, _Spec]]:
        first_inputs: dict[str, _Spec] | _Spec | None = None
        targets: dict[str, tuple[str, _Spec]] = {}  # task -> (dataset giving it first, spec)
        for name, dataset in zip(self.task_names, self.datasets, strict=True):
            probe = dataset.batch(torch.zeros(1, dtype=torch.int64))
            inputs = self._input_specs(name, probe)
            if first_inputs is None:
                first_inputs = inputs
            elif inputs != first_inputs:
                raise ConfigError(
                    f"the inputs of task '{name}' are {_describe(inputs)} but those of task "
                    f"'{self.task_names[0]}' are {_describe(first_inputs)}; a mixed batch "
                    "needs one input type, dtype and shape (pad sequences to one length)"
                )
            if name not in probe.targets:
                raise ConfigError(
                    f"the dataset of task '{name}' gives targets for {sorted(probe.targets)} "
                    f"but not for '{name}'; key its target by the task name"
                )
            for task, target in probe.targets.items():
                if task not in self.task_names:
                    raise ConfigError(
                        f"the dataset of task '{name}' gives targets for '{task}', which is "
                        f"not a task of the mixture ({', '.join(self.task_names)})"
                    )
                spec = _Spec.of(target)
                if task in targets and targets[task][1] != spec:
                    source, known = targets[task]
                    raise ConfigError(
                        f"the targets of task '{task}' are {known} in the dataset of task "
                        f"'{source}' but {spec} in that of task '{name}'; make them agree"
                    )
                targets.setdefault(task, (name, spec))
        assert first_inputs is not None  # at least one dataset
        return first_inputs, {task: targets[task][1] for task in self.task_names}

    def _input_specs(self, name: str, probe: MultiTaskBatch) -> dict[str, _Spec] | _Spec:
        if isinstance(probe.inputs, Tensor):
            if self.task_ids_key is not None:
                raise ConfigError(
                    f"task_ids_key='{self.task_ids_key}' needs inputs that are mappings, but "
                    f"the dataset of task '{name}' gives a tensor"
                )
            return _Spec.of(probe.inputs)
        if self.task_ids_key is not None and self.task_ids_key in probe.inputs:
            raise ConfigError(
                f"the inputs of task '{name}' already hold '{self.task_ids_key}'; choose "
                "another task_ids_key"
            )
        return {key: _Spec.of(value) for key, value in probe.inputs.items()}

    # batches ----------------------------------------------------------------------------
    def locate(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Global indices → (task index, index in that task's dataset), both int64."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if indices.dim() != 1:
            raise ConfigError(f"indices must be 1-D, got shape {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            raise ConfigError(
                f"indices must lie in [0, {len(self)}) (the mixture's total size), got "
                f"{int(indices.min())} … {int(indices.max())}"
            )
        task_ids = torch.searchsorted(self.offsets[1:], indices, right=True)
        return task_ids, indices - self.offsets[task_ids]

    def batch(self, indices: Tensor) -> MultiTaskBatch:
        """The examples at these global indices, in this order, with ``task_ids`` set."""
        task_ids, local = self.locate(indices)
        if task_ids.numel() == 0:
            raise ConfigError("a batch needs at least one index; got none")
        order = torch.argsort(task_ids, stable=True)  # rows grouped by task, each in order
        restore = torch.empty_like(order)
        restore[order] = torch.arange(order.numel())
        counts = torch.bincount(task_ids, minlength=len(self.task_names)).tolist()
        parts: list[tuple[MultiTaskBatch, int]] = []
        start = 0
        for t, count in enumerate(counts):
            if count:
                rows = order[start : start + count]
                parts.append((self.datasets[t].batch(local[rows]), count))
                start += count
        inputs: Tensor | dict[str, Tensor]
        if isinstance(self._inputs, _Spec):
            inputs = self._cat([_as_tensor(part.inputs) for part, _ in parts], restore)
        else:
            inputs = {
                key: self._cat([_as_mapping(part.inputs)[key] for part, _ in parts], restore)
                for key in self._inputs
            }
            if self.task_ids_key is not None:
                inputs[self.task_ids_key] = task_ids
        targets = {
            name: self._cat([self._target(part, name, count) for part, count in parts], restore)
            for name in self.task_names
        }
        return MultiTaskBatch(inputs=inputs, targets=targets, task_ids=task_ids)

    def _target(self, part: MultiTaskBatch, name: str, count: int) -> Tensor:
        if name in part.targets:
            return part.targets[name]
        spec = self._targets[name]
        device = next(iter(part.targets.values())).device
        return torch.full((count, *spec.shape), self._fill[name], dtype=spec.dtype, device=device)

    @staticmethod
    def _cat(pieces: list[Tensor], restore: Tensor) -> Tensor:
        joined = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return joined[restore.to(joined.device)]


def _as_tensor(inputs: Tensor | Mapping[str, Tensor]) -> Tensor:
    assert isinstance(inputs, Tensor)  # checked on construction
    return inputs


def _as_mapping(inputs: Tensor | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    assert not isinstance(inputs, Tensor)  # checked on construction
    return inputs


def _describe(specs: dict[str, _Spec] | _Spec) -> str:
    if isinstance(specs, _Spec):
        return f"a tensor {specs}"
    return "{" + ", ".join(f"{key}: {spec}" for key, spec in specs.items()) + "}"
