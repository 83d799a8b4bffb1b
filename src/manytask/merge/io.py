r"""Checkpoint input and output for merging: lazy readers and an atomic, sharded writer.

Readers (:class:`TensorSource`) list the tensor names and give each tensor's shape and dtype from
the file headers alone; they read a tensor only when :meth:`TensorSource.get` asks for it. A
merge therefore holds the tensors of one name at a time, whatever the size of the models.

* :class:`SafetensorsSource`: one ``.safetensors`` file, read with positioned reads (not mapped).
* :class:`ShardedSource`: a sharded checkpoint described by an index file
  ``*.index.json`` holding ``{"weight_map": {tensor name: shard file}}`` (Hugging Face layout).
* :class:`StateDictSource`: a ``state_dict`` already in memory.
* :class:`LoraAdapterSource`: a PEFT LoRA adapter, presented as dense deltas under the adapted
  base weight's name, and :class:`AdaptedModelSource`: base + delta, the full task model that a
  base and one adapter stand for.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685,
Section 4.1) adapts a weight as :math:`W = W_0 + \frac{\alpha}{r} B A` with
:math:`A \in \mathbb{R}^{r \times d_{in}}`, :math:`B \in \mathbb{R}^{d_{out} \times r}`;
rsLoRA (Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA",
arXiv:2312.03732) scales by :math:`\alpha / \sqrt{r}` instead. The delta is formed densely, so a
rule applied to the adapted models sees the exact task vectors :math:`\tau = \frac{\alpha}{r} BA`
(up to float32 rounding of :math:`(W_0 + \Delta W) - W_0`), where combining the factors ``A`` and
``B`` separately would add cross terms.

Pickle checkpoints (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) are refused: unpickling a file can
run arbitrary code. The user may opt in to a *weights-only* conversion, which reads them with
``torch.load(weights_only=True)`` (torch's restricted unpickler, which accepts tensors and plain
containers only), memory-mapped where the file format allows.

The writer (:class:`ShardWriter`) fills shards of at most ``max_shard_size`` bytes in the order
the tensors arrive and names them like Hugging Face does (``model.safetensors``, or
``model-00001-of-00003.safetensors`` … plus ``model.safetensors.index.json``).
:func:`staged_directory` builds an output directory beside its destination and renames it into
place only when complete, so an interrupted merge never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import pickle
import re
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor

from manytask import atomic
from manytask.errors import ConfigError, DataError, ManytaskError, RunExistsError

#: safetensors' dtype codes (the ``dtype`` field of the header) and the torch dtypes they hold
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SAFETENSORS_METADATA = {"format": "pt"}  # what transformers' from_pretrained checks for
CHECKPOINT_PREFIX = "model"


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_floating(self) -> bool:
        return self.dtype.is_floating_point


class TensorSource(ABC):
    """A checkpoint read lazily: names, then one tensor at a time.

    ``label`` names the checkpoint in error messages, e.g. ``model 'sst2' ('ckpt/sst2')``.
    """

    label: str

    @abstractmethod
    def keys(self) -> list[str]:
        """Tensor names in checkpoint order."""

    @abstractmethod
    def info(self, name: str) -> TensorInfo:
        """Shape and dtype of tensor ``name`` without reading it."""

    @abstractmethod
    def get(self, name: str) -> Tensor:
        """Read tensor ``name`` as a CPU tensor. Treat it as read-only: it may be the caller's
        own tensor."""

    #: :meth:`read_rows_into` reads only the rows asked for (no source reads a whole tensor
    #: to hand out a block of it)
    reads_rows: bool = False

    def read_into(self, name: str, buffer: Tensor) -> Tensor:
        """Tensor ``name``, read into the front of the ``uint8`` tensor ``buffer`` by sources
        that read files (the result is a view of ``buffer``, valid until it is reused); others
        return :meth:`get`. Read-only, as :meth:`get`."""
        return self.get(name)

    def read_rows_into(self, name: str, start: int, stop: int, buffer: Tensor) -> Tensor:
        """Rows ``start:stop`` (along the first axis) of tensor ``name``, as :meth:`read_into`
        reads the whole tensor; by default a slice of it (sources with :attr:`reads_rows` read
        only those rows)."""
        return self.read_into(name, buffer)[start:stop]

    def close(self) -> None:  # noqa: B027 (a no-op default: most sources hold no file)
        """Release open files (the default holds none)."""

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label})"

    def _missing(self, name: str) -> DataError:
        return DataError(f"tensor '{name}' is not in {self.label}")


class StateDictSource(TensorSource):
    """A ``state_dict`` in memory; :meth:`get` returns the stored tensor, detached."""

    reads_rows = True  # a block of rows is a view of the tensor in memory

    def __init__(self, state_dict: Mapping[str, Tensor], label: str = "state dict") -> None:
        self.label = label
        for key, value in state_dict.items():
            if not isinstance(key, str) or not isinstance(value, Tensor):
                raise DataError(
                    f"{label}: entry {key!r} is a {type(value).__name__}; a state dict maps "
                    "tensor names (str) to tensors"
                )
        self._tensors = dict(state_dict)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        tensor = self._lookup(name)
        return TensorInfo(tuple(tensor.shape), tensor.dtype)

    def get(self, name: str) -> Tensor:
        return self._lookup(name).detach()

    def _lookup(self, name: str) -> Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise self._missing(name) from None


# the safetensors layout: an 8-byte little-endian header length, a JSON header mapping each name
# to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data that follows
# the header), and an optional "__metadata__" entry of strings
_HEADER_LENGTH_BYTES = 8
_MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors format itself sets


@dataclass(frozen=True)
class _Stored:
    info: TensorInfo
    begin: int  # absolute file offsets
    end: int


class SafetensorsSource(TensorSource):
    """One ``.safetensors`` file; names in the order the tensors are stored.

    The header is parsed once; :meth:`get` reads one tensor's bytes with a positioned read into
    a buffer of its own. The file is not memory-mapped: the pages of a mapping that a merge
    has touched count as the process's resident memory for as long as the file stays open, so a
    mapped 1B-parameter merge kept every checkpoint it had read resident (10.9 GB peak for task
    arithmetic on three bfloat16 models, against 2.5 GB read this way; ``benchmarks/
    merge_scale.py``). Tensors are read as stored (little-endian, as the format prescribes).
    """

    def __init__(self, path: str | Path, label: str | None = None) -> None:
        self.path = Path(path)
        self.label = label or f"'{self.path}'"
        if not self.path.is_file():
            raise DataError(f"checkpoint file '{self.path}' does not exist")
        self._file: Any = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        try:
            self._stored = self._read_header()
        except BaseException:
            self.close()
            raise
        self._keys = sorted(self._stored, key=lambda name: self._stored[name].begin)

    def _unreadable(self, why: str) -> DataError:
        return DataError(f"'{self.path}' is not a readable safetensors file: {why}")

    def _read_header(self) -> dict[str, _Stored]:
        size = self.path.stat().st_size
        prefix = self._file.read(_HEADER_LENGTH_BYTES)
        if len(prefix) < _HEADER_LENGTH_BYTES:
            raise self._unreadable(f"it has {size} bytes, fewer than a header needs")
        length = int.from_bytes(prefix, "little")
        if length > min(_MAX_HEADER_BYTES, size - _HEADER_LENGTH_BYTES):
            raise self._unreadable(f"its header length {length} exceeds the file's size {size}")
        try:
            header = json.loads(self._file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._unreadable(f"its header is not JSON ({exc})") from None
        if not isinstance(header, dict):
            raise self._unreadable("its header is not a JSON object")
        data_start = _HEADER_LENGTH_BYTES + length
        stored: dict[str, _Stored] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                code, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._unreadable(
                    f"the header entry of tensor '{name}' lacks dtype, shape or data_offsets"
                ) from None
            if code not in DTYPES:
                raise DataError(
                    f"tensor '{name}' in {self.label} has dtype {code}, which torch cannot hold; "
                    f"supported: {', '.join(DTYPES)}"
                )
            info = TensorInfo(shape, DTYPES[code])
            if any(d < 0 for d in shape) or end - begin != info.nbytes or begin < 0:
                raise self._unreadable(
                    f"tensor '{name}' has shape {list(shape)} and dtype {code} "
                    f"({info.nbytes} bytes) but data offsets [{begin}, {end}]"
                )
            if data_start + end > size:
                raise self._unreadable(f"tensor '{name}' ends past the end of the file")
            stored[name] = _Stored(info, data_start + begin, data_start + end)
        return stored

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, name: str) -> TensorInfo:
        return self._entry(name).info

    def get(self, name: str) -> Tensor:
        """Tensor ``name`` in a buffer of its own (the caller may change it)."""
        entry = self._entry(name)
        return self.read_into(name, torch.empty(entry.end - entry.begin, dtype=torch.uint8))

    reads_rows = True  # a block of rows is one contiguous byte range of the file

    def read_into(self, name: str, buffer: Tensor) -> Tensor:
        entry = self._entry(name)
        self._read_range(name, entry.begin, entry.end, buffer)
        return buffer[: entry.end - entry.begin].view(entry.info.dtype).reshape(entry.info.shape)

    def read_rows_into(self, name: str, start: int, stop: int, buffer: Tensor) -> Tensor:
        entry = self._entry(name)
        shape = entry.info.shape
        if not shape or not 0 <= start <= stop <= shape[0]:
            raise ManytaskError(
                f"rows {start}:{stop} of tensor '{name}' (shape {list(shape)}) do not exist"
            )
        row = (entry.end - entry.begin) // shape[0] if shape[0] else 0
        self._read_range(name, entry.begin + start * row, entry.begin + stop * row, buffer)
        block = buffer[: (stop - start) * row].view(entry.info.dtype)
        return block.reshape(stop - start, *shape[1:])

    def _read_range(self, name: str, begin: int, end: int, buffer: Tensor) -> None:
        """Bytes ``begin:end`` of the file into the front of ``buffer``, by positioned reads."""
        size = end - begin
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < size:
            raise ManytaskError(
                f"reading tensor '{name}' ({size} bytes) needs a 1-D uint8 buffer of at least "
                f"that size; got {buffer.dtype} of shape {list(buffer.shape)}"
            )
        if self._file is None:
            raise ManytaskError(f"{self.label} was closed; open it again to read '{name}'")
        view = buffer[:size].numpy().data  # a memoryview of the buffer
        self._file.seek(begin)
        filled = 0
        while filled < size:
            count = self._file.readinto(view[filled:])
            if not count:
                raise DataError(f"{self.label} ended while reading tensor '{name}'")
            filled += count

    def _entry(self, name: str) -> _Stored:
        try:
            return self._stored[name]
        except KeyError:
            raise self._missing(name) from None

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()


class ShardedSource(TensorSource):
    """A checkpoint split over shard files listed by an index ``*.index.json``.

    Names come shard by shard (shards in file-name order), each shard in its storage order.
    Every shard is opened once, with ``open_shard`` (a safetensors reader by default).
    """

    def __init__(
        self,
        index: str | Path,
        label: str | None = None,
        open_shard: Callable[[Path], TensorSource] | None = None,
    ) -> None:
        self.path = Path(index)
        self.label = label or f"'{self.path}'"
        weight_map = _read_weight_map(self.path)
        opener = open_shard or SafetensorsSource
        self._shards: dict[str, TensorSource] = {}
        self._where: dict[str, TensorSource] = {}
        self._keys: list[str] = []
        try:
            for file in sorted(set(weight_map.values())):
                shard_path = self.path.parent / file
                if not shard_path.is_file():
                    raise DataError(
                        f"shard '{file}' listed in index '{self.path}' does not exist "
                        f"(looked for '{shard_path}')"
                    )
                shard = self._shards[file] = opener(shard_path)
                stored = set(shard.keys())
                wanted = {name for name, f in weight_map.items() if f == file}
                absent = sorted(wanted - stored)
                if absent:
                    raise DataError(
                        f"index '{self.path}' places tensor '{absent[0]}' in shard '{file}', "
                        "which does not hold it"
                    )
                for name in shard:
                    if name in wanted:
                        self._keys.append(name)
                        self._where[name] = shard
        except BaseException:
            self.close()
            raise
        self.reads_rows = all(shard.reads_rows for shard in self._shards.values())

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, name: str) -> TensorInfo:
        return self._shard(name).info(name)

    def get(self, name: str) -> Tensor:
        return self._shard(name).get(name)

    def read_into(self, name: str, buffer: Tensor) -> Tensor:
        return self._shard(name).read_into(name, buffer)

    def read_rows_into(self, name: str, start: int, stop: int, buffer: Tensor) -> Tensor:
        return self._shard(name).read_rows_into(name, start, stop, buffer)

    def _shard(self, name: str) -> TensorSource:
        try:
            return self._where[name]
        except KeyError:
            raise self._missing(name) from None

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards = {}


def _read_weight_map(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise DataError(f"index file '{path}' does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"index file '{path}' is not valid JSON: {exc}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise DataError(
            f"index file '{path}' must hold a \"weight_map\" mapping each tensor name to the "
            "file name of its shard"
        )
    for file in set(weight_map.values()):
        if Path(file).name != file:
            raise DataError(
                f"index file '{path}' names shard '{file}'; shards must be plain file names "
                "in the index's folder"
            )
    return weight_map


# --------------------------------------------------------------------------------------------
# LoRA adapters


@dataclass(frozen=True)
class _LoraPair:
    module: str  # the adapted module's name in the adapter file (PEFT prefix included)
    a_key: str
    b_key: str
    kind: str  # "linear" (also convolutions) or "embedding"


_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.weight)?$")
_LORA_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<factor>[AB])$")


class LoraAdapterSource(TensorSource):
    r"""A PEFT LoRA adapter folder presented as dense deltas, one per adapted base weight.

    The folder holds ``adapter_config.json`` (``r``, ``lora_alpha``, optionally ``use_rslora``,
    ``fan_in_fan_out``, ``rank_pattern``, ``alpha_pattern``) and ``adapter_model.safetensors``
    with factors named ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (embeddings:
    ``<module>.lora_embedding_A`` / ``_B``). The delta of ``<module>`` is presented under the name
    ``<module>.weight`` with the PEFT wrapper prefix ``base_model.model.`` removed, i.e. the name
    of the weight it adapts in the base checkpoint:

    .. math::

        \Delta W = s \, B A, \qquad s = \alpha / r \quad (\alpha / \sqrt{r}\ \text{with rsLoRA}),

    transposed for ``fan_in_fan_out`` layers and embeddings (PEFT stores those as
    :math:`W^\top`); for a convolution, :math:`\Delta W_{o,i,\dots} = s \sum_k B_{o,k}
    A_{k,i,\dots}` (``B`` is a 1×1 kernel). The rank ``r`` is read from ``A``'s shape and checked
    against the config (``rank_pattern`` included); ``alpha_pattern`` overrides ``lora_alpha``
    per module, matched as PEFT does (the pattern matches the end of the module name after a
    dot). Deltas are float32. DoRA adapters and non-LoRA tensors (``modules_to_save``, trained
    biases) are refused: they are not low-rank deltas.
    """

    PREFIX = "base_model.model."

    def __init__(
        self,
        path: str | Path,
        label: str | None = None,
        allow_pickle_conversion: bool = False,
        prefix: str = PREFIX,
    ) -> None:
        self.path = Path(path)
        self.label = label or f"LoRA adapter '{self.path}'"
        config = _read_adapter_config(self.path / "adapter_config.json")
        self._config = config
        weights = self.path / "adapter_model.safetensors"
        if weights.is_file():
            self._factors: TensorSource = SafetensorsSource(weights, self.label)
        else:
            pickled = [self.path / f"adapter_model{s}" for s in PICKLE_SUFFIXES]
            found = [p for p in pickled if p.is_file()]
            if not found:
                raise DataError(
                    f"LoRA adapter folder '{self.path}' holds no adapter_model.safetensors"
                )
            self._factors = open_pickle(found[0], self.label, allow_pickle_conversion)
        try:
            self._pairs = self._pair_factors(prefix)
        except BaseException:
            self._factors.close()
            raise
        self._infos: dict[str, TensorInfo] = {}

    def _pair_factors(self, prefix: str) -> dict[str, _LoraPair]:
        found: dict[tuple[str, str], dict[str, str]] = {}
        strange: list[str] = []
        for key in self._factors:
            match = _LORA_KEY.match(key)
            kind = "linear"
            if match is None:
                match = _LORA_EMBEDDING_KEY.match(key)
                kind = "embedding"
            if match is None:
                strange.append(key)
                continue
            found.setdefault((match["module"], kind), {})[match["factor"]] = key
        if strange:
            dora = any("lora_magnitude_vector" in k for k in strange)
            hint = (
                "DoRA adapters are not low-rank deltas and cannot be merged as such"
                if dora
                else "only LoRA factors (lora_A/lora_B) can be presented as deltas; merge "
                "full weights (modules_to_save, biases) as a full checkpoint instead"
            )
            raise DataError(
                f"{self.label} holds tensor '{strange[0]}'"
                + (f" and {len(strange) - 1} more" if len(strange) > 1 else "")
                + f" that is not a LoRA factor: {hint}"
            )
        pairs: dict[str, _LoraPair] = {}
        for (module, kind), factors in found.items():
            if set(factors) != {"A", "B"}:
                lacking = "B" if "A" in factors else "A"
                raise DataError(f"{self.label}: module '{module}' has no lora_{lacking} factor")
            short = module[len(prefix) :] if prefix and module.startswith(prefix) else module
            pairs[f"{short}.weight"] = _LoraPair(module, factors["A"], factors["B"], kind)
        return pairs

    def keys(self) -> list[str]:
        return list(self._pairs)

    def _pair(self, name: str) -> _LoraPair:
        try:
            return self._pairs[name]
        except KeyError:
            raise self._missing(name) from None

    def _scale(self, pair: _LoraPair, rank: int) -> float:
        config = self._config
        expected = _pattern_value(config["rank_pattern"], pair.module, config["r"])
        if rank != expected:
            raise DataError(
                f"{self.label}: module '{pair.module}' has rank {rank} (rows of lora_A) but "
                f"adapter_config.json says r={expected}"
            )
        alpha = float(_pattern_value(config["alpha_pattern"], pair.module, config["lora_alpha"]))
        return alpha / math.sqrt(rank) if config["use_rslora"] else alpha / rank

    def info(self, name: str) -> TensorInfo:
        if name not in self._infos:
            pair = self._pair(name)
            a, b = self._factors.info(pair.a_key).shape, self._factors.info(pair.b_key).shape
            if len(a) < 2 or len(b) < 2 or b[1] != a[0] or any(d != 1 for d in b[2:]):
                raise DataError(
                    f"{self.label}: module '{pair.module}' has factors of shapes A {list(a)} and "
                    f"B {list(b)}, which do not multiply as B·A"
                )
            if pair.kind == "embedding" or self._config["fan_in_fan_out"]:
                if len(a) != 2:
                    raise DataError(f"{self.label}: module '{pair.module}' has a {len(a)}-d A")
                shape: tuple[int, ...] = (a[1], b[0])
            else:
                shape = (b[0], *a[1:])
            self._infos[name] = TensorInfo(shape, torch.float32)
        return self._infos[name]

    def get(self, name: str) -> Tensor:
        pair = self._pair(name)
        shape = self.info(name).shape
        a = self._factors.get(pair.a_key).to(torch.float32)
        b = self._factors.get(pair.b_key).to(torch.float32)
        scale = self._scale(pair, a.shape[0])
        delta = (b.flatten(1) @ a.flatten(1)).mul_(scale)
        if pair.kind == "embedding" or self._config["fan_in_fan_out"]:
            delta = delta.T.contiguous()
        return delta.reshape(shape)

    def close(self) -> None:
        self._factors.close()


def _read_adapter_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"LoRA adapter config '{path}' does not exist")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"LoRA adapter config '{path}' is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise DataError(f"LoRA adapter config '{path}' must hold a JSON object")
    kind = raw.get("peft_type", "LORA")
    if kind != "LORA":
        raise DataError(f"'{path}' describes a {kind} adapter; only LoRA adapters can be merged")
    if raw.get("use_dora"):
        raise DataError(
            f"'{path}' describes a DoRA adapter (use_dora: true); its weight is rescaled by a "
            "learned magnitude, not a low-rank delta, and cannot be merged as one"
        )
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise DataError(f"'{path}': \"r\" must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise DataError(f"'{path}': \"lora_alpha\" must be a number, got {alpha!r}")
    patterns = {}
    for key in ("rank_pattern", "alpha_pattern"):
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            raise DataError(f"'{path}': \"{key}\" must map module patterns to numbers")
        patterns[key] = value
    return {
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": bool(raw.get("use_rslora", False)),
        "fan_in_fan_out": bool(raw.get("fan_in_fan_out", False)),
        **patterns,
    }


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override: the first pattern that matches the end of ``module``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{pattern})$", module):
            return value
    return default


class AdaptedModelSource(TensorSource):
    """The full model a base and a LoRA adapter stand for: ``base + ΔW`` on adapted weights.

    Every name of the base is present; adapted tensors are returned in float32 (the sum is not
    rounded back to the base's dtype), all others as the base stores them. :meth:`info` reports
    the base's shape and dtype. The adapter's names must all be base weights of the same shape.
    """

    def __init__(self, base: TensorSource, adapter: TensorSource, label: str) -> None:
        self.base = base
        self.adapter = adapter
        self.label = label
        self._keys = base.keys()
        known = set(self._keys)
        self._adapted = set(adapter.keys())
        for name in adapter:
            if name not in known:
                raise DataError(
                    f"{label} adapts tensor '{name}', which the base ({base.label}) does not "
                    "hold; the adapter was trained on a different model or a different prefix"
                )
            want, got = base.info(name).shape, adapter.info(name).shape
            if want != got:
                raise DataError(
                    f"{label}: the delta of tensor '{name}' has shape {list(got)} but the base "
                    f"weight has shape {list(want)}"
                )

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def get(self, name: str) -> Tensor:
        if name not in self._adapted:
            return self.base.get(name)
        summed = self.base.get(name).to(torch.float32, copy=True)  # base tensors are read-only
        return summed.add_(self.adapter.get(name))

    def close(self) -> None:
        self.adapter.close()  # the base belongs to the caller


def is_lora_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder (it holds ``adapter_config.json``)."""
    return (Path(path) / "adapter_config.json").is_file()


# --------------------------------------------------------------------------------------------
# pickle checkpoints: refused unless the user opts in to a weights-only conversion


def pickle_refusal(path: Path) -> DataError:
    return DataError(
        f"'{path}' is a pickle checkpoint; manytask never unpickles files by default, because "
        "unpickling can run arbitrary code. Convert it once with "
        f"manytask.merge.io.convert_pickle_checkpoint('{path}', 'OUT.safetensors'), or opt in "
        "to a weights-only conversion while merging: allow_pickle_conversion: true in the "
        "merge config (allow_pickle_conversion=True in Python), which reads only tensors, "
        "with torch.load(weights_only=True)"
    )


def load_pickle_weights(path: str | Path) -> dict[str, Tensor]:
    """Read a pickle checkpoint's tensors with ``torch.load(weights_only=True)``.

    Files in torch's zip format are memory-mapped (pages are read on use); the old format is read
    whole. A file must hold a mapping of names to tensors, or such a mapping under
    ``"state_dict"`` (PyTorch Lightning). Anything that is not a tensor or a plain container is
    refused by torch's restricted unpickler.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint file '{path}' does not exist")
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the pre-zip format cannot be memory-mapped
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"'{path}' could not be read as weights only (tensors and plain containers); "
            f"torch says: {first}"
        ) from None
    if isinstance(data, Mapping) and not _is_tensor_map(data):
        nested = data.get("state_dict")
        if isinstance(nested, Mapping) and _is_tensor_map(nested):
            data = nested
    if not isinstance(data, Mapping) or not _is_tensor_map(data):
        raise DataError(
            f"'{path}' holds a {type(data).__name__} that is not a mapping of tensor names to "
            'tensors (nor one under "state_dict")'
        )
    return dict(data)


def _is_tensor_map(data: Mapping[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items())


def open_pickle(path: Path, label: str, allow_pickle_conversion: bool) -> TensorSource:
    """A pickle checkpoint as a source, only with the user's consent."""
    if not allow_pickle_conversion:
        raise pickle_refusal(path)
    return StateDictSource(load_pickle_weights(path), label)


def convert_pickle_checkpoint(
    source: str | Path, destination: str | Path, overwrite: bool = False
) -> Path:
    """Convert a pickle checkpoint to one ``.safetensors`` file (weights only), atomically.

    Tensors that share storage (tied weights) are stored once each, as separate copies.
    """
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise RunExistsError(f"'{destination}' already exists; pass overwrite=True to replace it")
    weights = load_pickle_weights(source)
    seen: set[int] = set()
    tensors: dict[str, Tensor] = {}
    for name, tensor in weights.items():
        storage = tensor.untyped_storage().data_ptr()
        tensors[name] = tensor.contiguous() if storage not in seen else tensor.clone()
        seen.add(storage)

    # imported here: a merge reads and writes safetensors with its own code, and importing
    # safetensors' library would add 0.8 MiB to every merge's peak memory
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=SAFETENSORS_METADATA)

    atomic.write_with(destination, write)
    return destination


# --------------------------------------------------------------------------------------------
# opening any checkpoint


def open_checkpoint(
    path: str | Path,
    label: str | None = None,
    allow_pickle_conversion: bool = False,
) -> TensorSource:
    """Open a full checkpoint by path: a ``.safetensors`` file, an index ``*.index.json``, or a
    folder holding ``model.safetensors`` / ``model.safetensors.index.json`` (Hugging Face and
    manytask merge outputs). Pickle files are refused unless ``allow_pickle_conversion``."""
    path = Path(path)
    label = label or f"'{path}'"
    if path.is_dir():
        for name in ("model.safetensors.index.json", "model.safetensors"):
            if (path / name).is_file():
                return open_checkpoint(path / name, label, allow_pickle_conversion)
        single = sorted(path.glob("*.safetensors"))
        if len(single) == 1:
            return SafetensorsSource(single[0], label)
        for name in ("pytorch_model.bin.index.json", "pytorch_model.bin"):
            if (path / name).is_file():
                return open_checkpoint(path / name, label, allow_pickle_conversion)
        raise DataError(
            f"folder '{path}' holds no checkpoint: expected model.safetensors, "
            "model.safetensors.index.json, a single *.safetensors file or adapter_config.json "
            "(a LoRA adapter)"
        )
    if not path.exists():
        raise DataError(f"checkpoint '{path}' does not exist")
    if path.name.endswith(".index.json"):

        def open_shard(shard: Path) -> TensorSource:
            return open_checkpoint(shard, f"{label} shard '{shard.name}'", allow_pickle_conversion)

        return ShardedSource(path, label, open_shard)
    if path.suffix == ".safetensors":
        return SafetensorsSource(path, label)
    if path.suffix in PICKLE_SUFFIXES:
        return open_pickle(path, label, allow_pickle_conversion)
    raise DataError(
        f"'{path}' is not a checkpoint manytask can read: expected a .safetensors file, an "
        "*.index.json index or a folder holding one"
    )


def default_model_name(path: str | Path) -> str:
    """A short name for a checkpoint path: the file stem, or the folder name for folders and
    for generically named files (``model.safetensors``, ``adapter_model.safetensors`` …)."""
    path = Path(path)
    if path.is_dir() or path.suffix == "":
        return path.name or str(path)
    stem = path.name.split(".")[0]
    generic = re.fullmatch(r"(model|adapter_model|pytorch_model)(-\d+-of-\d+)?", stem)
    if generic and path.parent.name:
        return path.parent.name
    return stem


# --------------------------------------------------------------------------------------------
# writing


def starts_new_shard(filled: int, size: int, max_shard_size: int) -> bool:
    """Greedy sharding: a tensor opens a new shard when the current one is not empty and would
    exceed ``max_shard_size`` with it (a tensor larger than the limit gets a shard of its own)."""
    return filled > 0 and filled + size > max_shard_size


def _shard_groups(sizes: Iterable[int], max_shard_size: int) -> list[list[int]]:
    """The sizes of the tensors each shard of :class:`ShardWriter` holds (one shard at least)."""
    groups: list[list[int]] = [[]]
    filled = 0
    for size in sizes:
        if starts_new_shard(filled, size, max_shard_size):
            groups.append([])
            filled = 0
        groups[-1].append(size)
        filled += size
    return groups


def shard_sizes(sizes: Iterable[int], max_shard_size: int) -> list[int]:
    """The bytes of each shard that :class:`ShardWriter` writes for tensors of ``sizes``."""
    return [sum(group) for group in _shard_groups(sizes, max_shard_size)]


def shard_file_names(count: int, prefix: str = CHECKPOINT_PREFIX) -> list[str]:
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


#: safetensors' names of the dtypes a checkpoint can hold
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_COPY_CHUNK = 1 << 24  # bytes per read when the spooled data are copied into a shard


#: a tensor the writer is told to expect: name, dtype, shape
Planned = tuple[str, torch.dtype, Sequence[int]]


def _header(entries: Mapping[str, Any]) -> bytes:
    """A safetensors header: its length (8 bytes, little-endian) and the JSON, padded with
    spaces so that the data start 8-byte aligned, as safetensors does."""
    header = json.dumps(
        {"__metadata__": SAFETENSORS_METADATA, **entries}, separators=(",", ":")
    ).encode("utf-8")
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header


class ShardWriter:
    """Write tensors, in order, into shards of at most ``max_shard_size`` bytes in ``directory``.

    The writer holds no tensor in memory: only names, shapes and offsets. With a ``layout`` (the
    name, dtype and shape of every tensor to come, in order, as the merge engine knows them from
    the checkpoint headers) each shard's header is known before its first tensor arrives, so the
    shard file is written once, header first, each tensor's bytes as it is added. Without one,
    each tensor's bytes go to a spool file on disk as soon as it is added, and when a shard is
    full its safetensors file (the JSON header, then the spooled bytes, copied in 16 MiB chunks)
    is written. Either way the shards are written under provisional names; :meth:`close` gives
    them their final names (``model.safetensors`` for one shard,
    ``model-0000i-of-0000N.safetensors`` plus the index ``model.safetensors.index.json``
    otherwise). Use it inside :func:`staged_directory` for an atomic output.
    """

    def __init__(
        self,
        directory: str | Path,
        max_shard_size: int,
        prefix: str = CHECKPOINT_PREFIX,
        layout: Sequence[Planned] | None = None,
    ) -> None:
        if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int):
            raise ConfigError(f"max_shard_size must be a number of bytes, got {max_shard_size!r}")
        if max_shard_size < 1:
            raise ConfigError(f"max_shard_size must be at least 1 byte, got {max_shard_size}")
        self.directory = Path(directory)
        self.max_shard_size = max_shard_size
        self.prefix = prefix
        self._entries: dict[str, dict[str, Any]] = {}  # the current shard's header
        self._filled = 0
        self._spool: Any = None  # the open spool file of the current shard
        self._written: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_size = 0
        self._closed = False
        self._layout = None if layout is None else list(layout)
        self._position = 0  # tensors of the layout added so far
        self._direct: Any = None  # the open shard file, with a layout
        self._ends: list[int] = []  # with a layout: the position after each shard's last tensor
        if self._layout is not None:
            sizes = [math.prod(shape) * dtype.itemsize for _, dtype, shape in self._layout]
            counts = [len(group) for group in _shard_groups(sizes, max_shard_size)]
            self._ends = list(itertools.accumulate(counts))

    def add(self, name: str, tensor: Tensor) -> None:
        """Write one whole tensor."""
        self.add_rows(name, tensor.dtype, tuple(tensor.shape), [tensor])

    def add_rows(
        self, name: str, dtype: torch.dtype, shape: Sequence[int], blocks: Iterable[Tensor]
    ) -> None:
        """Write one tensor of ``dtype`` and ``shape`` given as consecutive blocks of its rows
        (the first dimension), each written as it comes and then dropped: the tensor is never
        whole in memory. The blocks must add up to exactly ``shape``."""
        if self._closed:
            raise ManytaskError("the checkpoint writer is closed")
        if name in self._names:
            raise ManytaskError(f"tensor '{name}' was written twice")
        if dtype not in _SAFETENSORS_DTYPES:
            raise ManytaskError(f"tensor '{name}' has dtype {dtype}, which safetensors lacks")
        shape = list(shape)
        size = math.prod(shape) * dtype.itemsize
        if self._layout is not None:
            file = self._open_planned(name, dtype, shape)
        else:
            file = self._open_spooled(size)
        written = 0
        for block in blocks:
            if block.dtype != dtype or list(block.shape[1:]) != shape[1:]:
                raise ManytaskError(
                    f"a block of tensor '{name}' is {block.dtype} {list(block.shape)}; blocks of "
                    f"a {dtype} tensor of shape {shape} have shape [rows, *{shape[1:]}]"
                )
            data = block.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            written += data.numel()
            if written > size:
                raise ManytaskError(f"the blocks of tensor '{name}' exceed its shape {shape}")
            file.write(data.numpy().data)  # no copy of the bytes
        if written != size:
            raise ManytaskError(f"the blocks of tensor '{name}' hold {written} of its {size} bytes")
        self._names.add(name)
        self.total_size += size
        if self._layout is not None:
            self._close_planned()
        else:
            self._entries[name] = {
                "dtype": _SAFETENSORS_DTYPES[dtype],
                "shape": shape,
                "data_offsets": [self._filled, self._filled + size],
            }
            self._filled += size

    def _open_spooled(self, size: int) -> Any:
        """The current shard's spool file, after starting a new shard if ``size`` bytes would
        overfill it."""
        if starts_new_shard(self._filled, size, self.max_shard_size):
            self._flush()
        if self._spool is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            spool = self.directory / f".{self.prefix}-shard-{len(self._written) + 1:05d}.spool"
            self._spool = open(spool, "w+b")  # noqa: SIM115 - closed by _flush
        return self._spool

    def _partial_path(self) -> Path:
        index = len(self._written) + 1
        return self.directory / f".{self.prefix}-shard-{index:05d}.safetensors.partial"

    def _open_planned(self, name: str, dtype: torch.dtype, shape: list[int]) -> Any:
        """The shard file the next planned tensor goes to, checked against the layout; a new
        shard's file is opened with its header written."""
        assert self._layout is not None
        if self._position >= len(self._layout):
            raise ManytaskError(
                f"tensor '{name}' was added after all {len(self._layout)} planned tensors"
            )
        expected, planned_dtype, planned_shape = self._layout[self._position]
        if (name, dtype, shape) != (expected, planned_dtype, list(planned_shape)):
            raise ManytaskError(
                f"tensor '{name}' ({dtype}, {shape}) arrived where the writer's layout expects "
                f"'{expected}' ({planned_dtype}, {list(planned_shape)})"
            )
        if self._direct is None:
            shard = len(self._written)
            first = self._ends[shard - 1] if shard else 0
            entries: dict[str, Any] = {}
            offset = 0
            for planned_name, entry_dtype, entry_shape in self._layout[first : self._ends[shard]]:
                size = math.prod(entry_shape) * entry_dtype.itemsize
                entries[planned_name] = {
                    "dtype": _SAFETENSORS_DTYPES[entry_dtype],
                    "shape": list(entry_shape),
                    "data_offsets": [offset, offset + size],
                }
                offset += size
            self.directory.mkdir(parents=True, exist_ok=True)
            self._direct = open(self._partial_path(), "wb")  # noqa: SIM115 - closed below
            self._direct.write(_header(entries))
        return self._direct

    def _close_planned(self) -> None:
        """Count the planned tensor just written; close its shard when it was the last."""
        assert self._layout is not None
        self._position += 1
        shard = len(self._written)
        if self._position == self._ends[shard]:
            first = self._ends[shard - 1] if shard else 0
            file, self._direct = self._direct, None
            file.flush()
            os.fsync(file.fileno())
            file.close()
            names = [n for n, _, _ in self._layout[first : self._position]]
            self._written.append((Path(file.name), names))

    def _flush(self) -> None:
        path = self._partial_path()
        self.directory.mkdir(parents=True, exist_ok=True)
        header = _header(self._entries)
        spool, names = self._spool, list(self._entries)
        self._spool, self._entries, self._filled = None, {}, 0

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as out:
                out.write(header)
                if spool is not None:
                    spool.seek(0)
                    shutil.copyfileobj(spool, out, _COPY_CHUNK)

        try:
            atomic.write_with(path, write)
        finally:
            if spool is not None:
                spool.close()
                os.unlink(spool.name)
        self._written.append((path, names))

    def close(self) -> list[Path]:
        """Write what is buffered, name the shards, write the index; return the files."""
        if self._closed:
            raise ManytaskError("the checkpoint writer is already closed")
        if self._layout is not None and self._position < len(self._layout):
            missing = self._layout[self._position][0]
            raise ManytaskError(
                f"the writer got {self._position} of {len(self._layout)} planned tensors; "
                f"'{missing}' and any after it are missing"
            )
        if self._entries or not self._written:
            self._flush()
        self._closed = True
        names = shard_file_names(len(self._written), self.prefix)
        files: list[Path] = []
        weight_map: dict[str, str] = {}
        for (partial, tensor_names), final in zip(self._written, names, strict=True):
            os.replace(partial, self.directory / final)
            files.append(self.directory / final)
            weight_map.update(dict.fromkeys(tensor_names, final))
        if len(files) > 1:
            index = self.directory / f"{self.prefix}.safetensors.index.json"
            atomic.write_json(
                index, {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            )
            files.append(index)
        return files


def output_occupied(path: Path) -> bool:
    """Whether ``path`` holds something an output would replace (a file or a non-empty folder)."""
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def check_output_free(path: str | Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunExistsError(f"output '{path}' is a file, not a folder; choose another output")
    if output_occupied(path) and not overwrite:
        raise RunExistsError(
            f"output '{path}' already exists; pass --overwrite (overwrite=True) to replace it, "
            "or choose another output"
        )


@contextlib.contextmanager
def staged_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; move it to ``path`` when the block ends
    without an error, and delete it otherwise (also on ``KeyboardInterrupt``).

    An existing output is refused unless ``overwrite``; with it, the old folder is replaced only
    after the new one is complete (moved aside, the new one renamed in, the old one deleted).
    A process killed outright can leave a hidden ``.NAME.tmp-*`` folder beside ``path``, never a
    partial ``path``.
    """
    path = Path(path)
    check_output_free(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    stage.mkdir()
    try:
        yield stage
        check_output_free(path, overwrite)  # someone may have written it meanwhile
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(path, old)
            try:
                os.replace(stage, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, path)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def write_checkpoint(
    path: str | Path,
    tensors: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
    max_shard_size: int,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``tensors`` as a (sharded) checkpoint folder ``path``, atomically; return its files."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    with staged_directory(path, overwrite) as stage:
        writer = ShardWriter(stage, max_shard_size)
        for name, tensor in items:
            writer.add(name, tensor)
        files = [f.name for f in writer.close()]
    return [Path(path) / name for name in files]
