"""One registry of named components: balancers, architectures, encoders, datasets, metrics.

The CLI, configs, docs and ``manytask list`` all read this one source of truth. Components
register themselves with :func:`register` when their module is imported.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from manytask.config import validate_params
from manytask.errors import UnknownNameError

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


def get(kind: str, name: str) -> Any:
    """Return the object registered as ``kind``/``name``; an unknown name lists the choices."""
    table = _REGISTRY.get(kind)
    if table is None:
        raise ValueError(f"unknown registry kind '{kind}'; valid kinds: {', '.join(KINDS)}")
    if name not in table:
        raise UnknownNameError(kind, name, table)
    return table[name].obj


def entries(kind: str) -> list[Entry]:
    """All entries of one kind, sorted by name."""
    return [_REGISTRY[kind][name] for name in sorted(_REGISTRY[kind])]


def names(kind: str) -> list[str]:
    return sorted(_REGISTRY[kind])


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
