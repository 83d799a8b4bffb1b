"""Injecting adapters into any ``nn.Module`` by module-name patterns, and the adapted model.

::

    import manytask.adapters as ad

    adapted = ad.inject(bert, "mtl_lora", targets=["query", "value"], tasks=["nli", "sst"])
    out = adapted(input_ids=ids, attention_mask=mask, task_ids=task_ids)   # mixed-task batch
    with adapted.task_ids(task_ids):                                       # or as a context
        out = adapted.model(input_ids=ids, attention_mask=mask)
    loss = task_loss + adapted.auxiliary_loss()                            # when it has one
    plain = adapted.export("nli")                                          # merged, no adapters

The base model's parameters are frozen; only the adapters (and modules named in ``trainable``,
such as task heads) are trained. ``task_ids`` are one task index (or name) per sample, or a
single one for the whole batch; the wrapped model's ``forward`` signature is untouched.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from manytask import registry
from manytask.adapters import bases
from manytask.adapters.context import TaskContext, TaskIds
from manytask.adapters.layer import AdapterLayer
from manytask.adapters.spec import AdapterSpec
from manytask.errors import ConfigError

#: how many module names an error message lists before it abbreviates
LISTED = 40

Targets = str | Sequence[str]


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:LISTED])
    more = len(names) - LISTED
    return shown + (f" … and {more} more" if more > 0 else "") if names else "(none)"


def _matches(pattern: str, name: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def find_modules(model: nn.Module, targets: Targets, what: str = "target") -> list[str]:
    """Names of the adaptable modules that ``targets`` select, in model order.

    A string is a regular expression that must match a module's whole name; a list holds names
    or name suffixes (``"query"`` selects ``encoder.layer.0.attention.self.query``). Every
    pattern must select at least one ``Linear``/``Conv1D``; one that selects nothing is an error
    listing the adaptable module names.
    """
    modules = [(name, module) for name, module in model.named_modules() if name]
    inside = [name for name, module in modules if isinstance(module, AdapterLayer)]
    if inside:
        raise ConfigError(
            f"the model already holds adapter layers ({_listing(inside)}); inject adapters "
            "into the base model once"
        )
    adaptable = [name for name, module in modules if bases.is_adaptable(module)]
    if isinstance(targets, str):
        try:
            regex = re.compile(targets)
        except re.error as exc:
            raise ConfigError(f"{what} pattern '{targets}' is not a valid regex: {exc}") from None
        patterns: list[tuple[str, Any]] = [(targets, lambda n: regex.fullmatch(n) is not None)]
    else:
        items = list(targets)
        if not items or not all(isinstance(item, str) and item for item in items):
            raise ConfigError(
                f"{what}s must be a regex string or a non-empty list of module names "
                f"(or name suffixes); adaptable modules are: {_listing(adaptable)}"
            )
        patterns = [(item, lambda n, p=item: _matches(p, n)) for item in items]
    chosen: set[str] = set()
    for text, test in patterns:
        hits = [name for name, _ in modules if test(name)]
        usable = [name for name in hits if name in adaptable]
        if not hits:
            raise ConfigError(
                f"{what} '{text}' matches no module of the model; adaptable modules "
                f"({bases.SUPPORTED}) are: {_listing(adaptable)}"
            )
        if not usable and what == "target":
            kinds = sorted({f"{name} ({type(dict(modules)[name]).__name__})" for name in hits})
            raise ConfigError(
                f"{what} '{text}' matches only modules adapters cannot wrap: {_listing(kinds)}; "
                f"adapters wrap {bases.SUPPORTED}; adaptable modules are: {_listing(adaptable)}"
            )
        chosen.update(usable if what == "target" else hits)
    return [name for name, _ in modules if name in chosen]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, child = name.rpartition(".")
    return (model.get_submodule(path) if path else model), child


class AdaptedModel(nn.Module):
    """A model whose target layers carry a multi-task adapter; build it with :func:`inject`.

    Args:
        model: the base model (modified in place: its target layers are wrapped).
        spec: the adapter design (from a registered method).
        targets: which layers to adapt (see :func:`find_modules`).
        tasks: the task names, in task-id order.
        trainable: modules (names or suffixes) whose parameters stay trainable, e.g. heads.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: AdapterSpec,
        targets: Targets,
        tasks: Sequence[str],
        trainable: Sequence[str] = (),
    ) -> None:
        super().__init__()
        names = list(tasks)
        if len(names) != spec.num_tasks:
            raise ConfigError(
                f"the adapter spec serves {spec.num_tasks} tasks but {len(names)} task names "
                f"were given: {names}"
            )
        self.spec = spec
        self.task_names = tuple(names)
        self._context = TaskContext(names)
        self._exported = False
        self.target_names = find_modules(model, targets)
        self.trainable_names = find_modules(model, trainable, "trainable") if trainable else []
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for name in self.target_names:
            parent, child = _parent(model, name)
            setattr(parent, child, AdapterLayer(getattr(parent, child), spec, self._context, name))
        for name in self.trainable_names:
            for parameter in model.get_submodule(name).parameters():
                parameter.requires_grad_(True)
        self.model = model

    # calling ----------------------------------------------------------------------------
    def forward(self, *args: Any, task_ids: TaskIds | None = None, **kwargs: Any) -> Any:
        """Call the wrapped model; ``task_ids`` (one per sample, or one for all) routes it."""
        if self._exported:
            raise ConfigError("this adapted model was exported in place; use the returned model")
        if task_ids is None:
            return self.model(*args, **kwargs)
        with self._context.use(task_ids):
            return self.model(*args, **kwargs)

    def task_ids(self, ids: TaskIds) -> contextlib.AbstractContextManager[Tensor]:
        """``with adapted.task_ids(ids):`` routes every forward pass in the block by ``ids``."""
        return self._context.use(ids)

    # parts ------------------------------------------------------------------------------
    def adapter_layers(self) -> dict[str, AdapterLayer]:
        return {name: self.model.get_submodule(name) for name in self.target_names}  # type: ignore[misc]

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        """The adapters' trainable parameters (not the frozen base weights)."""
        for layer in self.adapter_layers().values():
            for name, parameter in layer.named_parameters():
                if not name.startswith("base.") and parameter.requires_grad:
                    yield parameter

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Everything that trains: the adapters and the modules named in ``trainable``."""
        yield from self.adapter_parameters()
        for name in self.trainable_names:
            yield from self.model.get_submodule(name).parameters()

    def auxiliary_loss(self) -> Tensor | None:
        """The training terms of the last forward pass, or ``None`` when there are none: the
        routers' load-balancing losses (summed over layers) plus the alignment loss (averaged
        over layers, as Align-LoRA does)."""
        layers = list(self.adapter_layers().values())
        balance = [t for layer in layers if (t := layer.balance_loss()) is not None]
        align = [t for layer in layers if (t := layer.alignment_term()) is not None]
        terms = []
        if balance:
            terms.append(torch.stack(balance).sum())
        if align:
            terms.append(torch.stack(align).mean())
        if not terms:
            return None
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]

    # state ------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The adapters' tensors (and the trainable modules'), keyed by name in the base model."""
        state: dict[str, Tensor] = {}
        for name, layer in self.adapter_layers().items():
            for key, value in layer.state_dict().items():
                if not key.startswith("base."):
                    state[f"{name}.{key}"] = value.detach()
        for name in self.trainable_names:
            for key, value in self.model.get_submodule(name).state_dict().items():
                state[f"{name}.{key}"] = value.detach()
        return state

    def load_adapter_state_dict(self, tensors: Mapping[str, Tensor]) -> None:
        """Load tensors saved by :meth:`adapter_state_dict`; every key must be present with its
        shape, and no other key may be."""
        expected = self.adapter_state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ConfigError(
                "the adapter tensors do not fit this model: "
                f"missing {_listing(missing)}; unexpected {_listing(unexpected)}"
            )
        wrong = [
            f"{key} {tuple(tensors[key].shape)} (expected {tuple(value.shape)})"
            for key, value in expected.items()
            if tensors[key].shape != value.shape
        ]
        if wrong:
            raise ConfigError(f"adapter tensors of the wrong shape: {_listing(wrong)}")
        with torch.no_grad():
            for key, value in expected.items():
                value.copy_(tensors[key])

    def copy_experts_from(self, other: AdaptedModel) -> None:
        """Copy the experts ``A``, ``B`` of ``other`` (e.g. trained per-task LoRAs) into this
        model's layers of the same names: ScaLearn's second stage starts from them."""
        mine, theirs = self.adapter_layers(), other.adapter_layers()
        if set(mine) != set(theirs):
            raise ConfigError(
                f"the two adapted models adapt different layers: {_listing(sorted(mine))} vs "
                f"{_listing(sorted(theirs))}"
            )
        for name, layer in mine.items():
            source = theirs[name]
            for part in ("down", "up"):
                target, given = getattr(layer, part), getattr(source, part)
                if target.shape != given.shape:
                    raise ConfigError(
                        f"layer '{name}': {part} has shape {tuple(given.shape)} in the source but "
                        f"{tuple(target.shape)} here; both need the same rank and experts"
                    )
                with torch.no_grad():
                    target.copy_(given)

    # merging ----------------------------------------------------------------------------
    def delta_weights(self, task: str | int | None = None) -> dict[str, Tensor]:
        """Each adapted layer's update ``ΔW`` (``(out, in)``) for ``task``."""
        index = self._task_index(task)
        return {name: layer.delta_weight(index) for name, layer in self.adapter_layers().items()}

    def export(self, task: str | int | None = None, inplace: bool = False) -> nn.Module:
        """A plain model for ``task``: each adapted weight becomes ``W + ΔW_task`` and the
        adapter layers are gone (the original ``requires_grad`` flags come back).

        ``inplace=False`` (default) leaves this adapted model intact and returns a copy;
        ``inplace=True`` reuses the base model's memory and spends this adapted model.
        Token-routed methods (MoLoRA, HydraLoRA, SMoRA) have no per-task matrix and refuse.
        """
        index = self._task_index(task)
        deltas = {name: layer.delta_weight(index) for name, layer in self.adapter_layers().items()}
        model = self.model if inplace else copy.deepcopy(self.model)
        for name, delta in deltas.items():
            parent, child = _parent(model, name)
            layer = getattr(parent, child)
            assert isinstance(layer, AdapterLayer)
            bases.add_delta_(layer.base, delta)
            setattr(parent, child, layer.base)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(self._requires_grad.get(name, True))
        if inplace:
            self._exported = True
        return model

    def _task_index(self, task: str | int | None) -> int | None:
        if task is None:
            return None
        if isinstance(task, str):
            return self._context.index(task)
        if not 0 <= task < len(self.task_names):
            raise ConfigError(f"task index {task} is outside [0, {len(self.task_names)})")
        return task

    def extra_repr(self) -> str:
        layers = len(self.target_names)
        return f"method={self.spec.method}, tasks={list(self.task_names)}, layers={layers}"


def build_spec(method: str, num_tasks: int, params: Mapping[str, Any] | None = None) -> AdapterSpec:
    """The :class:`AdapterSpec` of the registered method ``method`` with ``params``."""
    spec = registry.call_with_params("adapter", method, dict(params or {}), num_tasks=num_tasks)
    if not isinstance(spec, AdapterSpec):
        kind = type(spec).__name__
        raise TypeError(f"adapter method '{method}' returned {kind}, not an AdapterSpec")
    return spec


def _task_names(tasks: Sequence[str] | Mapping[str, Any]) -> list[str]:
    names = list(tasks)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"tasks must be a non-empty list of task names, got {names!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"task names must be unique, got {names}")
    return names


def inject(
    model: nn.Module,
    method: str,
    targets: Targets,
    tasks: Sequence[str] | Mapping[str, Any],
    *,
    trainable: Sequence[str] = (),
    **params: Any,
) -> AdaptedModel:
    """Wrap ``model``'s ``targets`` with the adapter ``method`` (``manytask list adapters``).

    ``params`` are the method's own parameters (rank, number of experts …); unknown ones are
    an error that lists the valid ones. ``model`` is changed in place and its parameters are
    frozen, except those of the ``trainable`` modules.
    """
    names = _task_names(tasks)
    spec = build_spec(method, len(names), params)
    return AdaptedModel(model, spec, targets, names, trainable)
