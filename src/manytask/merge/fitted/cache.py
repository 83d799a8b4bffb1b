"""A cache of the statistics fitted rules compute (Fisher diagonals, RegMean Gram matrices,
AdaMerging's coefficients, Representation Surgery's trained modules).

One entry per (rule, task model, data) — for AdaMerging, per (rule, base and task models, data),
for Surgery per (rule, merged and task models, data):
a ``.safetensors`` file of tensors and a JSON manifest,
under ``<cache>/<rule>/<key>.{safetensors,json}``. The key is the SHA-256 of the manifest's
``fields``: the rule and the version of its statistic, the settings the statistic depends on
(e.g. Fisher's number of examples, not its floor; RegMean's number of examples, not α), a
fingerprint of the task model (its class, its ``repr`` and every tensor of its state dict, the
head included) and a fingerprint of the examples read (every input tensor's dtype, shape and
bytes, and their count). Nothing is pickled: tensors go through safetensors, the rest is JSON.

Writes are atomic (the tensor file first, then the manifest that commits it). An entry is
trusted only when its manifest parses, names the same fields, and the tensor file's SHA-256 and
tensor names, shapes and dtypes match the manifest; anything else is reported with a warning
and recomputed. A change to a model's forward code that leaves its weights and ``repr`` alone is
not seen: clear the cache folder after such a change.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from manytask.atomic import write_json, write_with
from manytask.errors import ConfigError
from manytask.merge.fitted.batches import Inputs, is_one_shot

FORMAT = "manytask-fitted-statistics/1"


class Digest:
    """An incremental BLAKE2b fingerprint of labelled tensors and text."""

    def __init__(self) -> None:
        self._hash = hashlib.blake2b(digest_size=32)

    def text(self, value: str) -> None:
        data = value.encode("utf-8")
        self._hash.update(len(data).to_bytes(8, "little") + data)

    def tensor(self, label: str, tensor: Tensor) -> None:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        self.text(f"{label}|{flat.dtype}|{tuple(tensor.shape)}")
        if flat.numel():
            self._hash.update(flat.view(torch.uint8).numpy().data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def module_fingerprint(module: nn.Module) -> str:
    """Fingerprint of a model: its class, its ``repr`` (the layers) and its state dict."""
    digest = Digest()
    digest.text(f"{type(module).__module__}.{type(module).__qualname__}")
    digest.text(repr(module))
    for name, tensor in module.state_dict().items():
        digest.tensor(name, tensor)
    return digest.hexdigest()


def check_rereadable(data: Iterable[Any], rule: str, which: str = "the data") -> None:
    """With a cache the data are read twice (once to fingerprint them, :func:`cached`): a
    one-shot iterator is refused with a :class:`ConfigError`."""
    if is_one_shot(data):
        raise ConfigError(
            f"{rule}: with a cache {which} are read twice (once to fingerprint them); pass "
            "lists of batches or DataLoaders, not one-shot iterators"
        )


def states_fingerprint(
    module: nn.Module, states: Iterable[tuple[str, Mapping[str, Tensor]]]
) -> str:
    """Fingerprint of an architecture (the class and ``repr`` of ``module``) and of labelled
    state dicts (``label/name`` and every tensor): what a rule fitted on several models (its
    base, task models or merged model) depends on besides its data and settings."""
    digest = Digest()
    digest.text(f"{type(module).__module__}.{type(module).__qualname__}")
    digest.text(repr(module))
    for label, state in states:
        for name, tensor in state.items():
            digest.tensor(f"{label}/{name}", tensor)
    return digest.hexdigest()


def names_fingerprint(names: Iterable[str]) -> str:
    """Fingerprint of a set of tensor names (the merged ones: a statistic covers only those)."""
    digest = Digest()
    for name in sorted(names):
        digest.text(name)
    return digest.hexdigest()


def unmerged_states(
    modules: Iterable[nn.Module], merged: Iterable[str]
) -> list[tuple[str, dict[str, Tensor]]]:
    """The tensors each built task model holds besides the merged ones (its head, layers left
    unmerged), labelled ``built<i>`` for :func:`states_fingerprint`: a rule that runs those
    models depends on them too."""
    names = set(merged)
    return [
        (f"built{i}", {k: v for k, v in module.state_dict().items() if k not in names})
        for i, module in enumerate(modules)
    ]


class DataDigest:
    """Fingerprint and count of the examples read, updated batch by batch."""

    def __init__(self) -> None:
        self._digest = Digest()
        self.count = 0

    def update(self, inputs: Inputs) -> None:
        self.count += inputs.size
        for label, tensor in inputs.tensors():
            self._digest.tensor(label, tensor)

    def passing(self, batches: Iterable[Inputs]) -> Iterator[Inputs]:
        """Yield ``batches`` unchanged, fingerprinting each on the way."""
        for inputs in batches:
            self.update(inputs)
            yield inputs

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


@dataclass(frozen=True)
class Statistics:
    """Tensors a rule computed for one task model, and JSON facts about them (counts …)."""

    tensors: dict[str, Tensor]
    extra: dict[str, Any]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _canonical(fields: Mapping[str, Any]) -> Any:
    return json.loads(json.dumps(dict(fields), sort_keys=True))


class StatisticsCache:
    """The entries of one rule under ``root/<rule>/``."""

    def __init__(self, root: str | Path, rule: str) -> None:
        self.folder = Path(root) / rule

    @staticmethod
    def key(fields: Mapping[str, Any]) -> str:
        text = json.dumps(_canonical(fields), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def paths(self, fields: Mapping[str, Any]) -> tuple[Path, Path]:
        """The tensor file and the manifest of the entry for ``fields``."""
        key = self.key(fields)
        return self.folder / f"{key}.safetensors", self.folder / f"{key}.json"

    def load(self, fields: Mapping[str, Any]) -> Statistics | None:
        """The entry for ``fields``, or None when there is none or it cannot be trusted."""
        tensor_path, manifest_path = self.paths(fields)
        if not manifest_path.exists():
            return None
        problem, stats = self._read(fields, tensor_path, manifest_path)
        if problem:
            warnings.warn(
                f"ignoring the cached statistics {manifest_path}: {problem}; recomputing them",
                RuntimeWarning,
                stacklevel=3,
            )
        return stats

    def _read(
        self, fields: Mapping[str, Any], tensor_path: Path, manifest_path: Path
    ) -> tuple[str, Statistics | None]:
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"the manifest cannot be read ({exc})", None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            return f"the manifest is not in the format {FORMAT}", None
        if manifest.get("key") != self.key(fields) or manifest.get("fields") != _canonical(fields):
            return "the manifest describes other inputs", None
        if not tensor_path.exists():
            return f"the tensor file {tensor_path.name} is missing", None
        if _sha256(tensor_path) != manifest.get("sha256"):
            return "the tensor file's SHA-256 differs from the manifest's", None
        try:
            tensors = load_file(tensor_path)
        except (OSError, SafetensorError) as exc:
            return f"the tensor file cannot be read ({exc})", None
        listed = manifest.get("tensors")
        found = {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in tensors.items()}
        if listed != found:
            return "the tensor file does not hold the tensors the manifest lists", None
        extra = manifest.get("extra")
        return "", Statistics(tensors, extra if isinstance(extra, dict) else {})

    def save(self, fields: Mapping[str, Any], stats: Statistics) -> None:
        """Write the entry for ``fields`` atomically (tensors first, then the manifest)."""
        tensor_path, manifest_path = self.paths(fields)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in stats.tensors.items()}
        write_with(tensor_path, lambda tmp: save_file(tensors, str(tmp)))
        manifest = {
            "format": FORMAT,
            "key": self.key(fields),
            "fields": _canonical(fields),
            "sha256": _sha256(tensor_path),
            "tensors": {
                k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in tensors.items()
            },
            "extra": stats.extra,
        }
        write_json(manifest_path, manifest)


def cached(
    store: StatisticsCache | None,
    fields: Callable[[DataDigest], dict[str, Any]],
    read: Callable[[], Iterable[Inputs]],
    compute: Callable[[Iterator[Inputs]], Statistics],
    what: str,
) -> Statistics:
    """``compute`` on the batches ``read()`` yields, or the entry of ``store`` for them.

    With a store the data are read once to fingerprint them (``fields`` maps the fingerprint to
    the entry's fields) and ``compute`` runs only on a miss; the batches it reads are
    fingerprinted again and the entry is stored under what was actually used. When the two
    readings differ (a shuffling loader) a warning says that ``what`` can never hit the cache.
    """
    if store is None:
        return compute(iter(read()))
    first = DataDigest()
    for _ in first.passing(read()):
        pass
    looked_up = fields(first)
    found = store.load(looked_up)
    if found is not None:
        return found
    used = DataDigest()
    stats = compute(used.passing(read()))
    final = fields(used)
    if final != looked_up:
        warnings.warn(
            f"{what} differed between two readings (a shuffling loader?), so the cached "
            "statistics can never be reused; give the data a fixed order",
            RuntimeWarning,
            stacklevel=3,
        )
    store.save(final, stats)
    return stats
