"""Batches of model inputs as the fitted merging rules read them.

``data[i]`` is any iterable of batches for task ``i`` (a ``DataLoader``, a list …). A batch is

* a ``Tensor`` — the model is called as ``model(x)``;
* a ``tuple``/``list`` whose first item is the inputs — ``(x, y)`` from a labelled loader works,
  the rest (labels) is ignored;
* a ``Mapping`` of tensors — the model is called as ``model(**batch)`` (Hugging Face style).

Every tensor of one batch has the examples on its first axis. The rules never read labels:
Fisher uses the model's own predictive distribution, AdaMerging and Surgery are unsupervised.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from manytask.errors import ConfigError, DataError


@dataclass(frozen=True)
class Inputs:
    """The model inputs of one batch: positional ``args`` and keyword ``kwargs`` tensors."""

    args: tuple[Tensor, ...]
    kwargs: dict[str, Tensor]

    def tensors(self) -> list[tuple[str, Tensor]]:
        """Every input tensor with a stable label (``arg0`` …, ``kw:name``)."""
        named = [(f"arg{i}", t) for i, t in enumerate(self.args)]
        return named + [(f"kw:{k}", self.kwargs[k]) for k in sorted(self.kwargs)]

    @property
    def size(self) -> int:
        """The number of examples (the common length of the first axis)."""
        return int(self.tensors()[0][1].shape[0])

    def head(self, count: int) -> Inputs:
        """The first ``count`` examples."""
        if count >= self.size:
            return self
        return Inputs(
            tuple(t[:count] for t in self.args), {k: v[:count] for k, v in self.kwargs.items()}
        )

    def to(self, device: torch.device) -> Inputs:
        return Inputs(
            tuple(t.to(device) for t in self.args),
            {k: v.to(device) for k, v in self.kwargs.items()},
        )

    def call(self, module: nn.Module, tensors: Mapping[str, Tensor] | None = None) -> Any:
        """``module(*args, **kwargs)``, with the named ``tensors`` standing in for the module's
        own parameters and buffers of those names (:func:`torch.func.functional_call`)."""
        if tensors is None:
            return module(*self.args, **self.kwargs)
        return functional_call(module, dict(tensors), self.args, self.kwargs)


def as_inputs(batch: object, rule: str, task: int) -> Inputs:
    """Read one batch (see the module docstring); anything else is a :class:`ConfigError`."""
    if isinstance(batch, Tensor):
        inputs = Inputs((batch,), {})
    elif isinstance(batch, Mapping):
        bad = [str(k) for k, v in batch.items() if not isinstance(v, Tensor)]
        if bad or not batch:
            raise ConfigError(
                f"{rule}: a dict batch of task {task} must map names to tensors; "
                f"{'it is empty' if not batch else f'these are not tensors: {bad}'}"
            )
        inputs = Inputs((), {str(k): v for k, v in batch.items()})
    elif isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) > 0:
        return as_inputs(batch[0], rule, task)
    else:
        raise ConfigError(
            f"{rule}: a batch of task {task} must be a Tensor, a (inputs, ...) tuple or a dict "
            f"of tensors, got {type(batch).__name__}"
        )
    sizes = {tuple(t.shape[:1]) for _, t in inputs.tensors()}
    if len(sizes) != 1 or () in sizes:
        raise ConfigError(
            f"{rule}: the input tensors of a batch of task {task} must share their first "
            f"(example) axis, got shapes {[tuple(t.shape) for _, t in inputs.tensors()]}"
        )
    return inputs


def is_one_shot(data: Iterable[Any]) -> bool:
    """True when ``data`` is an iterator that can be read only once (a generator …); asking
    does not start an iteration (no ``DataLoader`` workers are spawned)."""
    return isinstance(data, Iterator)


def take(data: Iterable[Any], limit: int, rule: str, task: int) -> Iterator[Inputs]:
    """The batches of ``data`` up to ``limit`` examples in all (the last one cut short);
    data without any example is a :class:`DataError`."""
    seen = 0
    for batch in data:
        inputs = as_inputs(batch, rule, task).head(limit - seen)
        seen += inputs.size
        if inputs.size:
            yield inputs
        if seen >= limit:
            return  # read no further batch than needed
    if seen == 0:
        raise DataError(f"{rule}: the data of task {task} holds no example")


def cycle(data: Iterable[Any], rule: str, task: int) -> Iterator[Inputs]:
    """The batches of ``data`` without end, starting again when it runs out (AdaMerging and
    Surgery take a fixed number of steps, each on one batch per task)."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield as_inputs(batch, rule, task)
        if empty:
            raise DataError(
                f"{rule}: the data of task {task} "
                + (
                    "ran out and cannot be read again (a one-shot iterator); pass a list of "
                    "batches or a DataLoader"
                    if is_one_shot(data)
                    else "holds no batch"
                )
            )
