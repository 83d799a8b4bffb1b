"""Tasks: what to predict, how to score it, and how missing labels are skipped.

A :class:`Task` is a frozen description. Its loss skips missing targets: a negative class index
(``cross_entropy``) or a NaN (``bce``, ``mse``, ``l1``) means "no label". The built-in losses
mask without boolean indexing, so they never synchronise with the device; a task whose targets
are all missing in a batch contributes a loss of zero that still carries a graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from manytask import registry
from manytask.errors import ConfigError

LossFn = Callable[[Tensor, Tensor], Tensor]
Kind = Literal["multiclass", "binary", "regression"]

BUILTIN_LOSSES: dict[str, Kind] = {
    "cross_entropy": "multiclass",
    "bce": "binary",
    "mse": "regression",
    "l1": "regression",
}

DEFAULT_METRICS: dict[Kind, tuple[str, ...]] = {
    "multiclass": ("accuracy", "macro_f1"),
    "binary": ("auroc", "accuracy"),
    "regression": ("mae", "rmse", "r2"),
}


def metric_names_for(kind: Kind) -> list[str]:
    """Names of the registered metrics that apply to a task of this kind."""
    return [e.name for e in registry.entries("metric") if kind in e.obj.kinds]


def label_mask(target: Tensor, kind: Kind) -> Tensor:
    """Boolean mask of the targets that carry a label (same shape as ``target``)."""
    if kind == "multiclass":
        return target >= 0
    return ~torch.isnan(target)


def _fill_missing(target: Tensor, mask: Tensor) -> Tensor:
    """Zero where the label is missing; other values (±inf included) pass through unchanged."""
    return torch.where(mask, target, torch.zeros_like(target))


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    values = torch.where(mask, values, torch.zeros_like(values))
    count = mask.sum().clamp_min(1).to(values.dtype)
    return values.sum() / count


def masked_cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over samples whose class index is ≥ 0."""
    mask = target >= 0
    per_sample = F.cross_entropy(output, target.clamp_min(0), reduction="none")
    return _masked_mean(per_sample, mask)


def _align(output: Tensor, target: Tensor) -> Tensor:
    """Let a ``(B, 1)`` output score a ``(B,)`` target and vice versa."""
    if output.shape != target.shape and output.numel() == target.numel():
        return output.reshape(target.shape)
    return output


def masked_bce(output: Tensor, target: Tensor) -> Tensor:
    """Mean binary cross-entropy on logits over labels that are not NaN."""
    output = _align(output, target)
    mask = ~torch.isnan(target)
    per_label = F.binary_cross_entropy_with_logits(
        output, _fill_missing(target, mask), reduction="none"
    )
    return _masked_mean(per_label, mask)


def masked_mse(output: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over targets that are not NaN."""
    output = _align(output, target)
    mask = ~torch.isnan(target)
    return _masked_mean((output - _fill_missing(target, mask)) ** 2, mask)


def masked_l1(output: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error over targets that are not NaN."""
    output = _align(output, target)
    mask = ~torch.isnan(target)
    return _masked_mean((output - _fill_missing(target, mask)).abs(), mask)


_LOSS_FNS: dict[str, LossFn] = {
    "cross_entropy": masked_cross_entropy,
    "bce": masked_bce,
    "mse": masked_mse,
    "l1": masked_l1,
}


@dataclass(frozen=True)
class Task:
    """A task: its name, loss, metrics (the first is primary), output size and weight.

    Args:
        name: unique task name; it keys model outputs, targets and losses.
        loss: ``"cross_entropy"``, ``"bce"``, ``"mse"``, ``"l1"`` or a callable
            ``(output, target) -> scalar``. A callable receives only the labelled samples.
        metrics: metric names from the registry (``manytask list``); the first is the primary
            metric used for model selection and leaderboards. Default: by the task kind.
        output_dim: size of the model output for this task (number of classes for
            ``cross_entropy``).
        weight: static factor applied to the loss before balancing.
        kind: ``"multiclass"``, ``"binary"`` or ``"regression"``; inferred from a built-in loss,
            required with a callable loss.
    """

    name: str
    loss: str | LossFn = "cross_entropy"
    metrics: tuple[str, ...] = ()
    output_dim: int = 1
    weight: float = 1.0
    kind: Kind | None = None
    _loss_fn: LossFn = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError(f"a task name must be a non-empty string, got {self.name!r}")
        if isinstance(self.loss, str):
            if self.loss not in BUILTIN_LOSSES:
                raise ConfigError(
                    f"task '{self.name}': unknown loss '{self.loss}'. Valid losses: "
                    f"{', '.join(BUILTIN_LOSSES)} or a callable (output, target) -> scalar"
                )
            kind = BUILTIN_LOSSES[self.loss]
            if self.kind is not None and self.kind != kind:
                raise ConfigError(
                    f"task '{self.name}': loss '{self.loss}' is a {kind} loss, "
                    f"but kind='{self.kind}' was given"
                )
            object.__setattr__(self, "kind", kind)
            object.__setattr__(self, "_loss_fn", _LOSS_FNS[self.loss])
        elif callable(self.loss):
            if self.kind is None:
                raise ConfigError(
                    f"task '{self.name}': a callable loss needs kind= one of "
                    "'multiclass', 'binary', 'regression' (it decides metrics and masking)"
                )
            object.__setattr__(self, "_loss_fn", self._masked_callable(self.loss))
        else:
            raise ConfigError(f"task '{self.name}': loss must be a name or a callable")
        if self.output_dim < 1:
            raise ConfigError(f"task '{self.name}': output_dim must be ≥ 1, got {self.output_dim}")
        if self.kind == "multiclass" and self.output_dim < 2:
            raise ConfigError(
                f"task '{self.name}': a multiclass task needs output_dim = number of classes ≥ 2"
            )
        object.__setattr__(self, "metrics", tuple(self.metrics) or DEFAULT_METRICS[self.kind_])
        for metric in self.metrics:
            spec = registry.get("metric", metric)  # registered by manytask.evaluate.metrics
            if self.kind_ not in spec.kinds:
                raise ConfigError(
                    f"task '{self.name}': metric '{metric}' does not apply to a {self.kind_} task; "
                    f"valid metrics: {', '.join(metric_names_for(self.kind_))}"
                )

    @property
    def kind_(self) -> Kind:
        assert self.kind is not None  # set in __post_init__
        return self.kind

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    def higher_is_better(self, metric: str) -> bool:
        """The direction of one of this task's metrics."""
        return bool(registry.get("metric", metric).higher_is_better)

    def _masked_callable(self, fn: LossFn) -> LossFn:
        def loss(output: Tensor, target: Tensor) -> Tensor:
            mask = label_mask(target, self.kind_)
            if mask.dim() > 1:
                mask = mask.all(dim=tuple(range(1, mask.dim())))
            if not bool(mask.any()):
                return output.sum() * 0.0
            return fn(output[mask], target[mask])

        return loss

    def raw_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """The task's loss, skipping missing targets, without ``weight`` (for reporting)."""
        return self._loss_fn(output, target)

    def compute_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """The task's loss on one batch, skipping missing targets, times ``weight``."""
        value = self._loss_fn(output, target)
        return value * self.weight if self.weight != 1.0 else value


class TaskSet(Mapping[str, Task]):
    """An ordered, name-keyed collection of tasks."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        if not tasks:
            raise ConfigError("a TaskSet needs at least one task")
        self._tasks: dict[str, Task] = {}
        for task in tasks:
            if task.name in self._tasks:
                raise ConfigError(f"duplicate task name '{task.name}'")
            self._tasks[task.name] = task

    def __getitem__(self, name: str) -> Task:
        try:
            return self._tasks[name]
        except KeyError:
            raise ConfigError(
                f"unknown task '{name}'; tasks are: {', '.join(self._tasks)}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[str]:
        return iter(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    def __repr__(self) -> str:
        return f"TaskSet({list(self._tasks.values())!r})"

    @property
    def names(self) -> list[str]:
        return list(self._tasks)

    def subset(self, names: Sequence[str]) -> TaskSet:
        return TaskSet([self[name] for name in names])

    def losses(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Per-task losses of one batch, keyed by task name, in task order."""
        missing = [name for name in self._tasks if name not in outputs or name not in targets]
        if missing:
            raise ConfigError(
                f"no output or target for task(s) {', '.join(missing)}; "
                f"outputs have {sorted(outputs)}, targets have {sorted(targets)}"
            )
        return {
            name: task.compute_loss(outputs[name], targets[name])
            for name, task in self._tasks.items()
        }
