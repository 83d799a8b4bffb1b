r"""The streaming merge engine: one tensor name at a time, in checkpoint order.

For every tensor name of the reference checkpoint (the base, or the first task model when there
is no base) the engine

1. reads the base's and every task model's tensor (shapes, dtypes and names were checked from
   the headers before anything was read; an error names the tensor and the checkpoint);
2. copies integer and boolean tensors (counters, indices, masks) from the reference when every
   model holds the same values, and stops with an error otherwise;
3. converts floating-point tensors to float32 into buffers that the engine reuses for every
   name (a rule may change the task models' tensors in place, not the base's: the report
   reads the inputs before the rule runs and the base after), seeds a fresh
   ``torch.Generator`` with the CRC-32 of the name's UTF-8 bytes started from the seed,
   ``zlib.crc32(name, seed)`` (32 bits, all that torch's CPU generator, mt19937, uses of a
   seed; for one name, distinct seeds below 2³² give distinct generator seeds, since CRC-32 is
   an invertible affine map of its start value), so random rules (DARE, DELLA …) give the same
   tensor whatever the order, threads or sharding;
4. calls :meth:`MergeRule.merge_tensor`, casts the result to the base's dtype (or the requested
   output dtype), hands it to the writer and to the report, and drops every reference.

Two-pass rules (``two_pass = True``) first see every floating-point tensor through
:meth:`MergeRule.observe`. Side outputs (:attr:`Merged.extras`) are written as side checkpoints
``extras/<output>/`` beside the merged one.

**Memory.** At most one name's tensors are alive at once: the inputs in float32, the rule's
working tensors, and the merged tensor until the writer has spooled it to disk. The inputs live
in buffers allocated once for the largest tensor and reused for every name: float32 space for
the task models (one stack) and the base, into which float32 tensors are read in place, and one
byte buffer that file reads of other dtypes land in before their conversion. Fresh
allocations of that size cost page faults every time (the kernel zeroes each page): reading and
converting into them took about four times as long as copying into memory already touched.
:class:`MergePlan` estimates the peak as

.. math::  n_\text{inputs} \cdot \text{numel}_\text{largest} \cdot 4\,\text{B}
           + \text{read buffer} + \text{largest output tensor},

with :math:`n_\text{inputs}` = task models + 1 with a base (the issue's estimate) and the read
buffer the largest stored floating-point tensor's bytes among those not stored in float32 (zero
for float32 checkpoints); the rule's own temporaries (its result;
TIES's magnitudes and masks) come on top. Rules that stack the task vectors use the engine's
stack (:class:`~manytask.merge.rule.TensorRows`) instead of copying it.

**Blocks of rows.** With a rule that merges entry by entry (:meth:`MergeRule.entrywise`), a
tensor whose float32 inputs exceed ``_BLOCK_BYTES`` (2 MiB) is read, merged and written to
the output file a block of rows at a time, when every input reads rows alone
(:attr:`~manytask.merge.io.TensorSource.reads_rows`): each merged block is written before the
next is read, so neither the inputs nor the merged tensor are ever whole in memory. The buffers
are then sized for the largest block, and the estimate counts a block instead of the tensor (for
the output too). One generator serves the whole tensor, and entrywise rules draw entry by entry,
so the result does not depend on the blocks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Union

import torch
import yaml
from torch import Tensor

from manytask import atomic, registry
from manytask.errors import ConfigError, DataError, ManytaskError
from manytask.merge.config import DEFAULT_MAX_SHARD_SIZE, parse_size
from manytask.merge.io import (
    AdaptedModelSource,
    LoraAdapterSource,
    ShardWriter,
    StateDictSource,
    TensorInfo,
    TensorSource,
    check_output_free,
    default_model_name,
    is_lora_adapter,
    open_checkpoint,
    output_occupied,
    shard_file_names,
    shard_sizes,
    staged_directory,
)
from manytask.merge.report import MergeReport
from manytask.merge.rule import Merged, MergeRule, TensorRows

#: a checkpoint: a path (file or folder), a state dict, or an open source
ModelInput = Union[str, "os.PathLike[str]", Mapping[str, Tensor], TensorSource]
#: progress callback: (steps done, steps in all); a two-pass rule has two steps per tensor
ProgressCallback = Callable[[int, int], None]

OUTPUT_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
NON_FLOAT_POLICIES = ("must_match", "from_base")
_EXTRA_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def tensor_seed(seed: int, name: str) -> int:
    """The seed of tensor ``name``'s generator: ``zlib.crc32(name, seed)`` (see the module
    docstring), for a merge ``seed`` in ``[0, 2³²)``."""
    return zlib.crc32(name.encode("utf-8"), seed)


def is_fitted(rule: str) -> bool:
    """Whether the registered merge rule ``rule`` needs data (``fitted = True``); a data-free
    name is found without importing the fitted rules."""
    return bool(getattr(registry.get("merge_rule", rule), "fitted", False))


def resolve_rule(rule: str | MergeRule, params: Mapping[str, Any] | None) -> tuple[MergeRule, str]:
    """A rule instance and its name, from a registered name (plus parameters) or an instance."""
    if isinstance(rule, MergeRule):
        if params:
            raise ConfigError(
                f"params {sorted(params)} were given with a rule instance "
                f"({type(rule).__name__}); pass them to its constructor instead"
            )
        for entry in registry.entries("merge_rule"):
            if entry.obj is type(rule):
                return rule, entry.name
        return rule, type(rule).__name__
    if not isinstance(rule, str):
        raise ConfigError(
            f"rule must be a registered rule name or a MergeRule, got {type(rule).__name__}"
        )
    built = registry.call_with_params("merge_rule", rule, dict(params or {}))
    if not isinstance(built, MergeRule):
        raise ConfigError(
            f"merge_rule '{rule}' is a {type(built).__name__}, not a data-free MergeRule; "
            "fitted rules need a model and data (see manytask.merge.fitted)"
        )
    return built, rule


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _output_dtype(dtype: str | torch.dtype) -> torch.dtype | None:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigError(f"output dtype must be floating point, got {dtype}")
        return dtype
    if dtype not in OUTPUT_DTYPES:
        raise ConfigError(f"output dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    return OUTPUT_DTYPES[dtype]


def _check_options(seed: int, non_float: str) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if non_float not in NON_FLOAT_POLICIES:
        raise ConfigError(
            f"non_float must be one of {', '.join(NON_FLOAT_POLICIES)}, got {non_float!r}"
        )


# --------------------------------------------------------------------------------------------
# opening and checking the inputs


@dataclass
class _Inputs:
    base: TensorSource | None
    models: list[TensorSource]
    names: list[str]
    described: dict[str, Any]  # base and model paths, for the summary

    @property
    def sources(self) -> list[TensorSource]:
        return ([self.base] if self.base is not None else []) + self.models

    @property
    def reference(self) -> TensorSource:
        return self.sources[0]


def _describe(spec: ModelInput) -> str:
    if isinstance(spec, (str, os.PathLike)):
        return str(spec)
    return "<in memory>" if isinstance(spec, Mapping) else repr(spec)


def _name_models(models: Sequence[ModelInput] | Mapping[str, ModelInput]) -> list[tuple[str, Any]]:
    if isinstance(models, Mapping):
        if any(isinstance(v, Tensor) for v in models.values()):
            raise ConfigError(
                "models must be a list of checkpoints (or a mapping of names to checkpoints), "
                "not one state dict"
            )
        named = [(str(k), v) for k, v in models.items()]
    elif isinstance(models, (str, os.PathLike)):
        raise ConfigError("models must be a list of checkpoints, not one path")
    else:
        named = []
        taken: set[str] = set()
        for i, spec in enumerate(models):
            guess = (
                default_model_name(Path(spec))
                if isinstance(spec, (str, os.PathLike))
                else f"model{i}"
            )
            name, k = guess, 2
            while name in taken:
                name, k = f"{guess}-{k}", k + 1
            taken.add(name)
            named.append((name, spec))
    if not named:
        raise ConfigError("models is empty; give at least one task model")
    return named


def _open_one(
    spec: ModelInput, label: str, allow_pickle_conversion: bool, stack: contextlib.ExitStack
) -> TensorSource:
    if isinstance(spec, TensorSource):
        return spec  # the caller's: not closed here
    if isinstance(spec, Mapping):
        return StateDictSource(spec, label)
    if isinstance(spec, (str, os.PathLike)):
        source = open_checkpoint(Path(spec), label, allow_pickle_conversion)
        stack.callback(source.close)
        return source
    raise ConfigError(
        f"{label}: expected a checkpoint path, a state dict or a TensorSource, "
        f"got {type(spec).__name__}"
    )


def _open_inputs(
    base: ModelInput | None,
    models: Sequence[ModelInput] | Mapping[str, ModelInput],
    rule: MergeRule,
    rule_name: str,
    allow_pickle_conversion: bool,
    stack: contextlib.ExitStack,
) -> _Inputs:
    named = _name_models(models)
    rule.check_models(len(named))
    if rule.needs_base and base is None:
        raise ConfigError(
            f"rule '{rule_name}' needs a base model (its task vectors are model − base); "
            "set base to the checkpoint the task models were fine-tuned from"
        )
    base_source = None
    if base is not None:
        label = f"base '{base}'" if isinstance(base, (str, os.PathLike)) else "base"
        base_source = _open_one(base, label, allow_pickle_conversion, stack)
    sources: list[TensorSource] = []
    for name, spec in named:
        where = f" ('{spec}')" if isinstance(spec, (str, os.PathLike)) else ""
        label = f"model '{name}'{where}"
        if isinstance(spec, (str, os.PathLike)) and is_lora_adapter(Path(spec)):
            if base_source is None:
                raise ConfigError(
                    f"{label} is a LoRA adapter: its weights are deltas of a base model, so "
                    "the merge needs base"
                )
            adapter = LoraAdapterSource(Path(spec), label, allow_pickle_conversion)
            stack.callback(adapter.close)
            sources.append(AdaptedModelSource(base_source, adapter, label))
        else:
            sources.append(_open_one(spec, label, allow_pickle_conversion, stack))
    described = {
        "base": None if base is None else _describe(base),
        "models": [{"name": n, "path": _describe(s)} for n, s in named],
    }
    return _Inputs(base_source, sources, [n for n, _ in named], described)


def _check_inputs(inputs: _Inputs, explicit_dtype: bool) -> list[tuple[str, TensorInfo]]:
    """Names in checkpoint order with their headers, after checking that every checkpoint holds
    the same names with the same shapes and dtypes; reads no tensor data."""
    reference, *others = inputs.sources
    order = reference.keys()
    known = set(order)
    for source in others:
        keys = source.keys()
        present = set(keys)
        missing = [k for k in order if k not in present]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(
                f"tensor '{missing[0]}' of {reference.label} is missing from {source.label}"
                f"{more}; every checkpoint must hold the same tensors"
            )
        extra = [k for k in keys if k not in known]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise DataError(
                f"{source.label} holds tensor '{extra[0]}'{more}, which {reference.label} does "
                "not; every checkpoint must hold the same tensors"
            )
    checked = []
    for name in order:
        info = reference.info(name)
        for source in others:
            other = source.info(name)
            if other.shape != info.shape:
                raise DataError(
                    f"tensor '{name}' has shape {list(other.shape)} in {source.label} but "
                    f"{list(info.shape)} in {reference.label}"
                )
            if other.dtype != info.dtype:
                floats = info.is_floating and other.is_floating
                hint = (
                    "set the output dtype (output.dtype, e.g. float32) to merge mixed "
                    "floating-point precisions explicitly"
                    if floats
                    else "a tensor must be floating point in every checkpoint or in none"
                )
                if not (floats and explicit_dtype):
                    raise DataError(
                        f"tensor '{name}' is {_dtype_name(other.dtype)} in {source.label} but "
                        f"{_dtype_name(info.dtype)} in {reference.label}; {hint}"
                    )
        checked.append((name, info))
    return checked


# --------------------------------------------------------------------------------------------
# the plan (dry run)


@dataclass(frozen=True)
class CheckpointSummary:
    """One input checkpoint in a plan."""

    role: str  # "base" or "model"
    name: str
    path: str
    tensors: int
    nbytes: int


@dataclass(frozen=True)
class MergePlan:
    """What a merge will read, hold and write, from the checkpoint headers alone."""

    rule: str
    two_pass: bool
    checkpoints: list[CheckpointSummary]
    tensors: int
    merged_tensors: int
    parameters: int
    largest_tensor: str
    largest_shape: tuple[int, ...]
    largest_numel: int
    inputs_per_tensor: int
    output: Path | None
    output_exists: bool
    output_dtype: str
    output_bytes: int
    shard_bytes: list[int]
    largest_output_bytes: int = 0
    read_buffer_bytes: int = 0
    #: entries of one input held at once: the largest tensor, or less when large tensors are
    #: merged a block of rows at a time (``blocked_tensors`` of them)
    held_numel: int = 0
    blocked_tensors: int = 0

    @property
    def copied_tensors(self) -> int:
        return self.tensors - self.merged_tensors

    @property
    def output_buffer_bytes(self) -> int:
        """The merged tensor on its way to the writer, which writes it to disk at once: the
        largest output tensor, or block of rows for tensors merged in blocks."""
        return self.largest_output_bytes

    @property
    def peak_memory_bytes(self) -> int:
        """``inputs × held entries × 4 B + read buffer + largest output tensor`` (module
        docstring); the held entries are the largest tensor's unless tensors go in blocks."""
        return (
            self.inputs_per_tensor * self.held_numel * 4
            + self.read_buffer_bytes
            + self.output_buffer_bytes
        )

    @property
    def shard_files(self) -> list[str]:
        return shard_file_names(len(self.shard_bytes))

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "passes": 2 if self.two_pass else 1,
            "checkpoints": [vars(c) for c in self.checkpoints],
            "tensors": self.tensors,
            "merged_tensors": self.merged_tensors,
            "copied_tensors": self.copied_tensors,
            "parameters": self.parameters,
            "largest_tensor": {
                "name": self.largest_tensor,
                "shape": list(self.largest_shape),
                "numel": self.largest_numel,
            },
            "inputs_per_tensor": self.inputs_per_tensor,
            "held_numel": self.held_numel,
            "blocked_tensors": self.blocked_tensors,
            "output_buffer_bytes": self.output_buffer_bytes,
            "peak_memory_bytes": self.peak_memory_bytes,
            "output": None if self.output is None else str(self.output),
            "output_exists": self.output_exists,
            "output_dtype": self.output_dtype,
            "output_bytes": self.output_bytes,
            "shards": [
                {"file": f, "bytes": b}
                for f, b in zip(self.shard_files, self.shard_bytes, strict=True)
            ],
        }

    def to_text(self) -> str:
        models = sum(c.role == "model" for c in self.checkpoints)
        passes = (
            "two passes (the rule observes every tensor first)" if self.two_pass else "one pass"
        )
        width = max(len(c.name) for c in self.checkpoints)
        lines = [f"merge plan: rule '{self.rule}' over {models} task model(s), {passes}"]
        lines.append("checkpoints:")
        for c in self.checkpoints:
            lines.append(
                f"  {c.role:<5} {c.name:<{width}}  {c.tensors:>6} tensors  "
                f"{format_bytes(c.nbytes):>10}  {c.path}"
            )
        lines += [
            f"tensors: {self.tensors} ({self.merged_tensors} merged, {self.copied_tensors} "
            f"copied), {self.parameters:,} parameters",
            f"largest tensor: '{self.largest_tensor}' {list(self.largest_shape)} "
            f"({self.largest_numel:,} elements)",
            f"peak memory estimate: {self.inputs_per_tensor} inputs × {self.held_numel:,} × 4 B "
            f"(float32) + read buffer {format_bytes(self.read_buffer_bytes)} + largest output "
            f"tensor {format_bytes(self.output_buffer_bytes)} = "
            f"{format_bytes(self.peak_memory_bytes)} (plus the rule's working tensors)",
        ]
        if self.blocked_tensors:
            lines.append(
                f"merged a block of rows at a time (the rule is entrywise): "
                f"{self.blocked_tensors} tensor(s) of more than {format_bytes(_BLOCK_BYTES)} of "
                "float32 inputs"
            )
        shards = len(self.shard_bytes)
        files = self.shard_files[0] if shards == 1 else f"{shards} shards"
        lines.append(
            f"output: {files}, {format_bytes(self.output_bytes)}, dtype {self.output_dtype}"
            + (f", in '{self.output}'" if self.output is not None else "")
        )
        if self.output_exists:
            lines.append(f"note: '{self.output}' exists; the merge needs --overwrite to replace it")
        return "\n".join(lines)


def format_bytes(count: int) -> str:
    """``1234567`` → ``"1.23 MB"`` (decimal units, as sizes are given)."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{count} B" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _make_plan(
    inputs: _Inputs,
    checked: list[tuple[str, TensorInfo]],
    rule: MergeRule,
    rule_name: str,
    out_dtype: torch.dtype | None,
    max_shard_size: int,
    output: Path | None,
) -> MergePlan:
    def summary(role: str, name: str, path: str | None, source: TensorSource) -> CheckpointSummary:
        total = sum(source.info(k).nbytes for k, _ in checked)
        return CheckpointSummary(role, name, path or "<in memory>", len(checked), total)

    checkpoints = []
    if inputs.base is not None:
        checkpoints.append(summary("base", "base", inputs.described["base"], inputs.base))
    for entry, source in zip(inputs.described["models"], inputs.models, strict=True):
        checkpoints.append(summary("model", entry["name"], entry["path"], source))
    blocks = _block_rows(inputs, checked, rule)

    def output_bytes(info: TensorInfo, rows: int | None) -> int:
        """Bytes of the output tensor, or of one block of ``rows`` rows of it."""
        if not info.is_floating:
            return info.nbytes
        return _held_numel(info, rows) * (out_dtype or info.dtype).itemsize

    sizes = [output_bytes(info, None) for _, info in checked]
    # a tensor merged in blocks reaches the writer a block at a time
    held_out = [output_bytes(info, blocks.get(name)) for name, info in checked]
    largest_name, largest = max(checked, key=lambda item: item[1].numel, default=("", None))
    held = [_held_numel(info, blocks.get(name)) for name, info in checked if info.is_floating]
    return MergePlan(
        rule=rule_name,
        two_pass=rule.two_pass,
        checkpoints=checkpoints,
        tensors=len(checked),
        merged_tensors=sum(info.is_floating for _, info in checked),
        parameters=sum(info.numel for _, info in checked),
        largest_tensor=largest_name,
        largest_shape=largest.shape if largest is not None else (),
        largest_numel=largest.numel if largest is not None else 0,
        inputs_per_tensor=len(inputs.sources),
        output=output,
        output_exists=output is not None and output_occupied(output),
        output_dtype="auto (as the inputs)" if out_dtype is None else _dtype_name(out_dtype),
        output_bytes=sum(sizes),
        shard_bytes=shard_sizes(sizes, max_shard_size),
        largest_output_bytes=max(held_out, default=0),
        read_buffer_bytes=_read_buffer_bytes(inputs, checked, blocks),
        held_numel=max(held, default=0),
        blocked_tensors=len(blocks),
    )


def _read_buffer_bytes(
    inputs: _Inputs, checked: list[tuple[str, TensorInfo]], blocks: dict[str, int]
) -> int:
    """The largest floating-point tensor (or block of rows) any input stores in another dtype
    than float32, in bytes (float32 tensors are read straight into the float32 workspace)."""
    return max(
        (
            _held_numel(s.info(n), blocks.get(n)) * s.info(n).dtype.itemsize
            for n, info in checked
            if info.is_floating
            for s in inputs.sources
            if s.info(n).dtype != torch.float32
        ),
        default=0,
    )


def plan(
    models: Sequence[ModelInput] | Mapping[str, ModelInput],
    rule: str | MergeRule,
    *,
    base: ModelInput | None = None,
    params: Mapping[str, Any] | None = None,
    output: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    allow_pickle_conversion: bool = False,
    seed: int = 0,
    non_float: str = "must_match",
    name: str | None = None,
) -> MergePlan:
    """The dry run of :func:`merge` (same arguments): check the inputs from their headers and
    return what the merge would read, hold in memory and write. Writes nothing."""
    del name  # accepted so that plan(**kwargs) mirrors merge(**kwargs)
    _check_options(seed, non_float)
    rule_obj, rule_name = resolve_rule(rule, params)
    out_dtype = _output_dtype(dtype)
    limit = parse_size(max_shard_size)
    with contextlib.ExitStack() as stack:
        inputs = _open_inputs(base, models, rule_obj, rule_name, allow_pickle_conversion, stack)
        checked = _check_inputs(inputs, explicit_dtype=out_dtype is not None)
        target = None if output is None else Path(output)
        return _make_plan(inputs, checked, rule_obj, rule_name, out_dtype, limit, target)


# --------------------------------------------------------------------------------------------
# streaming


class Writer(Protocol):
    """Where merged tensors go: :class:`~manytask.merge.io.ShardWriter` (files) or a state dict."""

    def add(self, name: str, tensor: Tensor) -> None: ...

    def add_rows(
        self, name: str, dtype: torch.dtype, shape: Sequence[int], blocks: Iterable[Tensor]
    ) -> None: ...


class _StateDictWriter:
    """A :class:`Writer` into a dict; a tensor given in blocks of rows is gathered."""

    def __init__(self, result: dict[str, Tensor]) -> None:
        self.result = result

    def add(self, name: str, tensor: Tensor) -> None:
        self.result[name] = tensor

    def add_rows(
        self, name: str, dtype: torch.dtype, shape: Sequence[int], blocks: Iterable[Tensor]
    ) -> None:
        gathered = torch.empty(tuple(shape), dtype=dtype)
        start = 0
        for block in blocks:
            gathered[start : start + block.shape[0]].copy_(block)
            start += block.shape[0]
        self.result[name] = gathered


ExtraWriter = Callable[[str, str, Tensor], None]


#: a tensor whose float32 inputs (the task models and the base) take more than this is merged a
#: block of rows at a time by a rule that merges entry by entry (MergeRule.entrywise), when every
#: input can read a block of rows alone; the blocks are at least one row. 2 MiB: on the MiniLM
#: and 1B sets of benchmarks/merge_scale.py, 8, 4, 2 and 1 MiB ran within 15% of one another
#: (2 MiB the fastest on the 1B set) and the peak fell by 8 MiB from 8 to 2 MiB
_BLOCK_BYTES = 2 << 20


def _block_rows(
    inputs: _Inputs, checked: list[tuple[str, TensorInfo]], rule: MergeRule
) -> dict[str, int]:
    """Rows per block of the tensor names merged in blocks (module docstring, Memory)."""
    if rule.two_pass or not rule.entrywise() or not all(s.reads_rows for s in inputs.sources):
        return {}
    count = len(inputs.sources)
    blocks = {}
    for name, info in checked:
        if not info.is_floating or len(info.shape) < 1 or info.numel * 4 * count <= _BLOCK_BYTES:
            continue
        rows = max(1, _BLOCK_BYTES // (info.numel // info.shape[0] * 4 * count))
        if rows < info.shape[0]:
            blocks[name] = rows
    return blocks


def _held_numel(info: TensorInfo, rows: int | None) -> int:
    """Entries of one input held at once: the tensor, or one block of ``rows`` rows."""
    return info.numel if rows is None else info.numel // info.shape[0] * rows


class _Workspace:
    """The buffers the inputs of every tensor name are read into (module docstring, Memory):
    float32 space for the task models (one ``(T, …)`` stack) then the base, and the byte buffer
    that file reads land in; sized for the largest tensor or block."""

    def __init__(
        self, inputs: _Inputs, checked: list[tuple[str, TensorInfo]], blocks: dict[str, int]
    ) -> None:
        numel = max(
            (_held_numel(info, blocks.get(name)) for name, info in checked if info.is_floating),
            default=0,
        )
        self.floats = torch.empty(len(inputs.sources) * numel)
        self.raw = torch.empty(_read_buffer_bytes(inputs, checked, blocks), dtype=torch.uint8)

    def holds(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is a view of the float32 inputs (and so changes with the next
        name); a rule's result can be nothing else of the workspace."""
        return tensor.untyped_storage().data_ptr() == self.floats.untyped_storage().data_ptr()

    def _read(
        self, source: TensorSource, name: str, shape: tuple[int, ...], rows: slice | None, slot: int
    ) -> Tensor:
        numel = math.prod(shape)
        target = self.floats[slot * numel : (slot + 1) * numel]
        # a float32 tensor is read into its place in the workspace; others into the byte buffer,
        # then converted
        buffer = target.view(torch.uint8) if source.info(name).dtype == torch.float32 else self.raw
        if rows is None:
            tensor = source.read_into(name, buffer)
        else:
            tensor = source.read_rows_into(name, rows.start, rows.stop, buffer)
        if tuple(tensor.shape) != shape:
            raise DataError(
                f"tensor '{name}' read from {source.label} has shape {list(tensor.shape)}, but "
                f"its header says {list(shape)}"
            )
        if tensor.data_ptr() != target.data_ptr():  # not read in place
            target.view(shape).copy_(tensor)
        return target.view(shape)

    def read_floats(
        self, inputs: _Inputs, name: str, info: TensorInfo, rows: slice | None = None
    ) -> tuple[Tensor | None, TensorRows]:
        """The base's and the task models' tensors of ``name`` (or of its ``rows``) in float32;
        the models are the rows of one ``(T, …)`` tensor."""
        shape = info.shape if rows is None else (rows.stop - rows.start, *info.shape[1:])
        for slot, source in enumerate(inputs.models):
            self._read(source, name, shape, rows, slot)
        count, numel = len(inputs.models), math.prod(shape)
        models = TensorRows(self.floats[: count * numel].view(count, *shape))
        if inputs.base is None:
            return None, models
        return self._read(inputs.base, name, shape, rows, count), models


def _unpack(result: Any, rule_name: str, name: str, shape: tuple[int, ...]) -> Merged:
    merged = result if isinstance(result, Merged) else Merged(result)
    if not isinstance(merged.tensor, Tensor):
        raise ManytaskError(
            f"rule '{rule_name}' returned a {type(merged.tensor).__name__} for tensor '{name}'; "
            "a rule returns a Tensor or a Merged"
        )
    if tuple(merged.tensor.shape) != shape:
        raise ManytaskError(
            f"rule '{rule_name}' returned shape {list(merged.tensor.shape)} for tensor '{name}' "
            f"of shape {list(shape)}"
        )
    return merged


def _stream_merge(
    inputs: _Inputs,
    checked: list[tuple[str, TensorInfo]],
    rule: MergeRule,
    rule_name: str,
    *,
    seed: int,
    out_dtype: torch.dtype | None,
    non_float: str,
    writer: Writer,
    write_extra: ExtraWriter,
    report: MergeReport | None,
    on_tensor: ProgressCallback | None = None,
) -> dict[str, float]:
    """Run ``rule`` over every checked tensor name; return the seconds each pass took."""
    steps = len(checked) * (2 if rule.two_pass else 1)
    done = 0
    timings: dict[str, float] = {}
    blocks = _block_rows(inputs, checked, rule)
    run = _Run(
        inputs, _Workspace(inputs, checked, blocks), rule, rule_name,
        inputs.base is not None and rule.needs_base, seed, out_dtype, writer, write_extra, report,
    )  # fmt: skip

    def step() -> None:
        nonlocal done
        done += 1
        if on_tensor is not None:
            on_tensor(done, steps)

    rule.begin()
    with torch.no_grad():
        if rule.two_pass:
            start = time.perf_counter()
            for name, info in checked:
                if info.is_floating:
                    run.observe(name, info)
                step()
            timings["observe_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        for name, info in checked:
            if name in blocks:
                run.merge_blocks(name, info, blocks[name])
            elif info.is_floating:
                run.merge_one(name, info)
            else:
                run.copy_non_float(name, info, non_float)
            step()
        timings["merge_seconds"] = time.perf_counter() - start
    return timings


@dataclass(frozen=True)
class _Run:
    """What every tensor name of one merge shares: the inputs and their buffers, the rule, the
    seed, the output dtype and where the results go."""

    inputs: _Inputs
    workspace: _Workspace
    rule: MergeRule
    rule_name: str
    rule_base: bool  # whether the rule is given the base
    seed: int
    out_dtype: torch.dtype | None
    writer: Writer
    write_extra: ExtraWriter
    report: MergeReport | None

    def observe(self, name: str, info: TensorInfo) -> None:
        """The first pass of a two-pass rule over one tensor name."""
        base, models = self.workspace.read_floats(self.inputs, name, info)
        self.rule.observe(name, base if self.rule_base else None, models)

    def copy_non_float(self, name: str, info: TensorInfo, policy: str) -> None:
        reference, *others = self.inputs.sources
        kept = reference.get(name)
        if policy == "must_match":
            for source in others:
                if not torch.equal(kept, source.get(name)):
                    which = "base's" if self.inputs.base is not None else "first model's"
                    raise DataError(
                        f"{_dtype_name(info.dtype)} tensor '{name}' differs between "
                        f"{reference.label} and {source.label}; integer and boolean tensors "
                        "(counters, indices, masks) are copied, not merged: make them equal, or "
                        f"set non_float: from_base to keep the {which}"
                    )
        self.writer.add(name, kept.clone())  # never an alias of a caller's tensor
        if self.report is not None:
            self.report.add_copied(name, info.shape, _dtype_name(info.dtype))

    def merge_one(self, name: str, info: TensorInfo) -> None:
        base, models = self.workspace.read_floats(self.inputs, name, info)
        seen = self.report.observe_inputs(base, models) if self.report is not None else None
        generator = torch.Generator().manual_seed(tensor_seed(self.seed, name))
        result = self.rule.merge_tensor(name, base if self.rule_base else None, models, generator)
        merged = _unpack(result, self.rule_name, name, info.shape)
        if self.report is not None and seen is not None:
            self.report.add(name, seen, base, merged.tensor, _dtype_name(info.dtype))

        def owned(tensor: Tensor) -> Tensor:  # never hand out a view of the reused buffers
            return tensor.clone() if self.workspace.holds(tensor) else tensor

        self.writer.add(name, owned(merged.tensor.to(self.out_dtype or info.dtype)))
        for output, extra in merged.extras.items():
            self.write_extra(output, name, owned(extra))

    def merge_blocks(self, name: str, info: TensorInfo, rows: int) -> None:
        """:meth:`merge_one` for an entrywise rule, ``rows`` rows of the inputs at a time: one
        generator for the whole tensor (an entrywise rule draws entry by entry, so the blocks
        take consecutive stretches of its stream); each merged block goes to the writer before
        the next is read, so the merged tensor is never whole in memory; the report's row is
        combined from the blocks' rows."""
        generator = torch.Generator().manual_seed(tensor_seed(self.seed, name))
        out_dtype = self.out_dtype or info.dtype
        parts = []

        def merged_blocks() -> Iterator[Tensor]:
            for start in range(0, info.shape[0], rows):
                block = slice(start, min(start + rows, info.shape[0]))
                base, models = self.workspace.read_floats(self.inputs, name, info, block)
                report = self.report
                seen = report.observe_inputs(base, models) if report is not None else None
                result = self.rule.merge_tensor(
                    name, base if self.rule_base else None, models, generator
                )
                merged = _unpack(result, self.rule_name, name, tuple(models.stacked.shape[1:]))
                if merged.extras:
                    raise ManytaskError(
                        f"rule '{self.rule_name}' says it merges entry by entry but returned "
                        f"side outputs for tensor '{name}'; a rule with side outputs is not "
                        "entrywise"
                    )
                if report is not None and seen is not None:
                    parts.append(report.block_stats(name, seen, base, merged.tensor))
                yield merged.tensor.to(out_dtype)  # written before the next block is read

        self.writer.add_rows(name, out_dtype, info.shape, merged_blocks())
        if self.report is not None:
            self.report.add_blocks(name, parts, info.shape, _dtype_name(info.dtype))


def _check_extra_name(output: str, rule_name: str) -> None:
    if not isinstance(output, str) or not _EXTRA_NAME.fullmatch(output):
        raise ManytaskError(
            f"rule '{rule_name}' names a side output {output!r}; side outputs need plain names "
            "(letters, digits, '_', '.', '-')"
        )


# --------------------------------------------------------------------------------------------
# the public entry points


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge` wrote: the output folder, its summary, the report and the files."""

    output: Path
    summary: dict[str, Any]
    report: MergeReport
    files: list[Path]


def merge(
    models: Sequence[ModelInput] | Mapping[str, ModelInput],
    rule: str | MergeRule,
    *,
    output: str | Path,
    base: ModelInput | None = None,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    dtype: str | torch.dtype = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    allow_pickle_conversion: bool = False,
    non_float: str = "must_match",
    name: str | None = None,
    on_tensor: ProgressCallback | None = None,
    config: Mapping[str, Any] | None = None,
) -> MergeResult:
    """Merge task models into one checkpoint, streamed tensor by tensor, written atomically.

    Args:
        models: task checkpoints (paths, PEFT LoRA adapter folders, state dicts or sources), as
            a list or as a mapping from the name used in the report to the checkpoint.
        rule: a registered rule name (``manytask list merge_rules``) or a :class:`MergeRule`.
        output: the run folder to create: merged checkpoint, ``merge_config.yaml``,
            ``summary.json``, ``report.json``, ``report.md`` (and ``extras/`` for side outputs).
        base: the checkpoint the task models were fine-tuned from (``None`` for rules with
            ``needs_base = False``).
        params: the rule's parameters when ``rule`` is a name.
        seed: seed of the per-tensor generators of random rules.
        dtype: ``"auto"`` (each tensor as the base stores it) or a floating-point output dtype;
            an explicit dtype also allows inputs of mixed floating-point dtypes.
        max_shard_size: bytes per output shard (``"5GB"``: the default of transformers'
            ``save_pretrained``).
        overwrite: replace an existing output (only once the new one is complete).
        allow_pickle_conversion: read pickle checkpoints with ``torch.load(weights_only=True)``
            instead of refusing them.
        non_float: ``"must_match"`` (integer/bool tensors must be equal everywhere) or
            ``"from_base"`` (copy the base's, or the first model's without a base).
        name: the merge's name in the report (default: the output folder's name).
        on_tensor: progress callback ``(steps done, steps in all)``.
        config: the resolved config to save as ``merge_config.yaml`` (default: these arguments).
    """
    started = time.perf_counter()
    _check_options(seed, non_float)
    rule_obj, rule_name = resolve_rule(rule, params)
    out_dtype = _output_dtype(dtype)
    limit = parse_size(max_shard_size)
    output = Path(output)
    check_output_free(output, overwrite)  # fail before any reading; checked again at the end
    title = name or output.name
    with contextlib.ExitStack() as stack:
        inputs = _open_inputs(base, models, rule_obj, rule_name, allow_pickle_conversion, stack)
        checked = _check_inputs(inputs, explicit_dtype=out_dtype is not None)
        the_plan = _make_plan(inputs, checked, rule_obj, rule_name, out_dtype, limit, output)
        report = MergeReport(inputs.names, inputs.base is not None, rule_name)
        with staged_directory(output, overwrite) as stage:
            layout = [
                (name, out_dtype if info.is_floating and out_dtype else info.dtype, info.shape)
                for name, info in checked
            ]  # known from the headers: each shard is written once, header first
            writer = ShardWriter(stage, limit, layout=layout)
            side: dict[str, ShardWriter] = {}

            def write_extra(key: str, tensor_name: str, tensor: Tensor) -> None:
                if key not in side:
                    _check_extra_name(key, rule_name)
                    side[key] = ShardWriter(stage / "extras" / key, limit)
                side[key].add(tensor_name, tensor)

            timings = _stream_merge(
                inputs, checked, rule_obj, rule_name, seed=seed, out_dtype=out_dtype,
                non_float=non_float, writer=writer, write_extra=write_extra, report=report,
                on_tensor=on_tensor,
            )  # fmt: skip
            files = writer.close()
            for extra_writer in side.values():
                files += extra_writer.close()
            resolved = dict(config) if config is not None else {
                "name": title,
                **inputs.described,
                "rule": rule_name,
                "params": dict(params or {}),
                "seed": seed,
                "output": {
                    "dir": str(output),
                    "dtype": dtype if isinstance(dtype, str) else _dtype_name(dtype),
                    "max_shard_size": limit,
                },
                "allow_pickle_conversion": allow_pickle_conversion,
                "non_float": non_float,
            }  # fmt: skip
            atomic.write_text(
                stage / "merge_config.yaml", yaml.safe_dump(_plain(resolved), sort_keys=False)
            )
            report.write(stage, title=f"Merge report: {title}")
            summary = {
                "name": title,
                "rule": rule_name,
                "params": dict(params or {}),
                "seed": seed,
                **inputs.described,
                "output_dtype": the_plan.output_dtype,
                "tensors": the_plan.tensors,
                "merged_tensors": the_plan.merged_tensors,
                "copied_tensors": the_plan.copied_tensors,
                "parameters": the_plan.parameters,
                "files": [str(f.relative_to(stage)) for f in files],
                "extras": sorted(side),
                "peak_memory_estimate_bytes": the_plan.peak_memory_bytes,
                "seconds": {**timings, "total_seconds": time.perf_counter() - started},
                "rule_summary": rule_obj.summary(),
                "totals": report.totals(),
            }
            atomic.write_json(stage / "summary.json", _plain(summary))
            relative = [f.relative_to(stage) for f in files]
    return MergeResult(output, summary, report, [output / f for f in relative])


def _plain(data: Any) -> Any:
    """JSON/YAML-safe data: paths and other objects as strings."""
    return json.loads(json.dumps(data, default=str))


def merge_state_dicts(
    base: Mapping[str, Tensor] | None,
    models: Sequence[Mapping[str, Tensor]] | Mapping[str, Mapping[str, Tensor]],
    rule: str | MergeRule,
    *,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    dtype: str | torch.dtype = "auto",
    non_float: str = "must_match",
    extras: dict[str, dict[str, Tensor]] | None = None,
) -> dict[str, Tensor]:
    """Merge state dicts in memory, with the same checks and per-tensor seeding as
    :func:`merge`; returns the merged state dict in the base's (or first model's) order.

    Side outputs of the rule are put into ``extras[output][tensor name]``; a rule that returns
    them when ``extras`` is ``None`` is an error rather than a silent loss.
    """
    _check_options(seed, non_float)
    rule_obj, rule_name = resolve_rule(rule, params)
    out_dtype = _output_dtype(dtype)
    result: dict[str, Tensor] = {}

    def write_extra(key: str, tensor_name: str, tensor: Tensor) -> None:
        if extras is None:
            raise ManytaskError(
                f"rule '{rule_name}' returns side outputs ('{key}'); pass extras={{}} to "
                "merge_state_dicts to collect them"
            )
        extras.setdefault(key, {})[tensor_name] = tensor

    with contextlib.ExitStack() as stack:
        inputs = _open_inputs(base, models, rule_obj, rule_name, False, stack)
        checked = _check_inputs(inputs, explicit_dtype=out_dtype is not None)
        _stream_merge(
            inputs, checked, rule_obj, rule_name, seed=seed, out_dtype=out_dtype,
            non_float=non_float, writer=_StateDictWriter(result), write_extra=write_extra,
            report=None,
        )  # fmt: skip
    return result
