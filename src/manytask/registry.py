"""One registry of named components: balancers, architectures, encoders, datasets, metrics.

The CLI, configs, docs and ``manytask list`` all read this one source of truth. Components
register themselves with :func:`register` when their module is imported; a look-up imports the
modules that register its kind (:data:`PROVIDERS`) until the name is found, and a listing
imports them all, so that a name resolves whichever parts of manytask the caller has imported
(the package imports its parts only when they are used: ``manytask merge`` with a data-free
rule never loads the training stack, nor the fitted rules).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from manytask.errors import UnknownNameError
from manytask.validation import validate_params

KINDS = (
    "balancer",
    "architecture",
    "encoder",
    "dataset",
    "metric",
    "merge_rule",
    "adapter",
    "sampler",
)

#: the modules whose import registers each kind's components, in the order a look-up tries them
PROVIDERS: dict[str, tuple[str, ...]] = {
    "balancer": ("manytask.balance",),
    "architecture": ("manytask.nn",),
    "encoder": ("manytask.nn",),
    "dataset": ("manytask.data",),
    "metric": ("manytask.evaluate.metrics",),
    "merge_rule": ("manytask.merge.methods", "manytask.merge.fitted"),
    "adapter": ("manytask.adapters",),
    "sampler": ("manytask.data",),
}

T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """A registered component: its kind, name, the object and a one-line summary."""

    kind: str
    name: str
    obj: Any
    summary: str


_REGISTRY: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}


def _first_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def register(kind: str, name: str, summary: str | None = None) -> Callable[[T], T]:
    """Class or function decorator that registers ``obj`` under ``kind``/``name``."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown registry kind '{kind}'; valid kinds: {', '.join(KINDS)}")

    def decorate(obj: T) -> T:
        table = _REGISTRY[kind]
        if name in table and table[name].obj is not obj:
            raise ValueError(f"{kind} '{name}' is already registered by {table[name].obj!r}")
        table[name] = Entry(kind, name, obj, summary or _first_line(obj))
        return obj

    return decorate


def _kind(kind: str) -> dict[str, Entry]:
    table = _REGISTRY.get(kind)
    if table is None:
        raise ValueError(f"unknown registry kind '{kind}'; valid kinds: {', '.join(KINDS)}")
    return table


def _table(kind: str) -> dict[str, Entry]:
    """All the entries of ``kind``, once every module that registers them is imported."""
    table = _kind(kind)
    for module in PROVIDERS[kind]:
        importlib.import_module(module)  # a dictionary look-up once imported
    return table


def get(kind: str, name: str) -> Any:
    """Return the object registered as ``kind``/``name``; an unknown name lists the choices."""
    table = _kind(kind)
    for module in PROVIDERS[kind]:
        if name in table:
            break
        importlib.import_module(module)
    if name not in table:
        raise UnknownNameError(kind, name, table)
    return table[name].obj


def entries(kind: str) -> list[Entry]:
    """All entries of one kind, sorted by name."""
    table = _table(kind)
    return [table[name] for name in sorted(table)]


def names(kind: str) -> list[str]:
    return sorted(_table(kind))


def call_with_params(kind: str, name: str, params: Mapping[str, Any], /, **context: Any) -> Any:
    """Build the registered component ``name`` with user ``params`` and framework ``context``.

    ``params`` come from a config and are checked against the component's signature: an
    unknown parameter or a value of the wrong type is a :class:`ConfigError` that names the
    parameter and lists the valid ones. ``context`` (the task names, the input shape …) is
    supplied by manytask itself and is not user-settable.
    """
    obj = get(kind, name)
    checked = validate_params(obj, params, where=f"{kind} '{name}'", reserved=context)
    return obj(**context, **checked)
