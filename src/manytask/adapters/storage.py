"""Saving and loading adapters by name: ``<dir>/<name>.safetensors`` plus ``<dir>/<name>.json``.

The safetensors file holds the adapter tensors keyed by their names in the base model (the
frozen base weights are not saved); the JSON file holds the method's spec, the task names, the
adapted layers with their kinds and sizes, and the trainable modules. Both are written
atomically (temporary file, then rename). Nothing is pickled. Several named adapters may share
a folder; loading rebuilds the adapter on a fresh base model and checks that every adapted layer
exists there with the same kind and size.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from manytask import atomic
from manytask.adapters import bases
from manytask.adapters.model import AdaptedModel
from manytask.adapters.spec import AdapterSpec
from manytask.errors import ConfigError, DataError

FORMAT = "manytask-adapter"
VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _paths(folder: str | Path, name: str) -> tuple[Path, Path]:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"adapter name '{name}' must be letters, digits, '_', '.' or '-' (not starting "
            "with a separator)"
        )
    folder = Path(folder)
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def save_adapters(adapted: AdaptedModel, folder: str | Path, name: str = "default") -> Path:
    """Write ``adapted``'s adapters as ``<folder>/<name>.safetensors`` and ``.json``; returns
    the safetensors path."""
    tensors_path, meta_path = _paths(folder, name)
    layers = adapted.adapter_layers()
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        "spec": adapted.spec.to_dict(),
        "tasks": list(adapted.task_names),
        "layers": {
            layer_name: {
                "kind": bases.kind_of(layer.base),
                "in_features": layer.in_features,
                "out_features": layer.out_features,
            }
            for layer_name, layer in layers.items()
        },
        "trainable": list(adapted.trainable_names),
    }
    tensors = {key: value.contiguous().cpu() for key, value in adapted.adapter_state_dict().items()}
    atomic.write_with(tensors_path, lambda tmp: save_file(tensors, str(tmp)))
    atomic.write_json(meta_path, meta)
    return tensors_path


def read_adapter_meta(folder: str | Path, name: str = "default") -> dict[str, Any]:
    """The JSON description of a saved adapter (spec, tasks, layers)."""
    tensors_path, meta_path = _paths(folder, name)
    if not meta_path.is_file() or not tensors_path.is_file():
        raise DataError(
            f"no adapter '{name}' in '{folder}': expected {meta_path.name} and {tensors_path.name}"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"adapter description '{meta_path}' is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"'{meta_path}' is not a manytask adapter description")
    if meta.get("version") != VERSION:
        raise DataError(
            f"'{meta_path}' has format version {meta.get('version')}; this manytask reads {VERSION}"
        )
    return meta


def load_adapters(model: nn.Module, folder: str | Path, name: str = "default") -> AdaptedModel:
    """Inject the saved adapter ``name`` into ``model`` (a fresh base model) and load its
    weights. Every adapted layer must exist in ``model`` with the saved kind and size."""
    meta = read_adapter_meta(folder, name)
    spec = AdapterSpec.from_dict(meta["spec"])
    layers: dict[str, dict[str, Any]] = meta["layers"]
    modules = dict(model.named_modules())
    problems = []
    for layer_name, saved in layers.items():
        module = modules.get(layer_name)
        if module is None or not bases.is_adaptable(module):
            problems.append(f"'{layer_name}' is missing or not a Linear/Conv1D")
            continue
        found = (bases.kind_of(module), *bases.features(module))
        wanted = (saved["kind"], saved["in_features"], saved["out_features"])
        if found != wanted:
            problems.append(f"'{layer_name}' is {found} but the adapter was saved for {wanted}")
    if problems:
        raise ConfigError(f"adapter '{name}' does not fit this model: " + "; ".join(problems[:10]))
    targets = "|".join(re.escape(layer_name) for layer_name in layers)
    trainable = list(meta.get("trainable", []))  # full names select exactly their module
    adapted = AdaptedModel(model, spec, targets, meta["tasks"], trainable)
    tensors_path, _ = _paths(folder, name)
    adapted.load_adapter_state_dict(load_file(str(tensors_path)))
    return adapted
