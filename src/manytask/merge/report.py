r"""The merge report: per tensor, what the task vectors and the merge look like.

For each merged tensor with base :math:`\theta_0`, task models :math:`\theta_t` and merged
:math:`\theta_m` (all float32, as the rule saw them):

* norms :math:`\lVert\theta_0\rVert_2`, :math:`\lVert\tau_t\rVert_2` with
  :math:`\tau_t = \theta_t - \theta_0`, and :math:`\lVert\theta_m - \theta_0\rVert_2`
  (the merged delta);
* sparsity: the fraction of coordinates that are exactly zero, of each :math:`\tau_t` and of the
  merged delta;
* sign conflicts: the fraction of coordinates :math:`j` where two task vectors point opposite
  ways, :math:`\exists\, s, t:\ \tau_{s,j} > 0 > \tau_{t,j}` (zeros conflict with nothing);
  the quantity TIES-Merging resolves (Yadav et al., arXiv:2306.01708, Section 3).

Without a base there are no task vectors: only the norms of the models and of the merged tensor
are reported. Whole-model totals combine tensors exactly: norms as :math:`\sqrt{\sum \lVert
\cdot \rVert^2}`, fractions weighted by the number of coordinates. Everything is computed as the
engine streams and kept as numbers, never as tensors. Integer and boolean tensors, which are
copied rather than merged, are listed without statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from manytask import atomic


@dataclass(frozen=True)
class TensorStats:
    """Statistics of one tensor (``None`` where they do not apply)."""

    name: str
    shape: list[int]
    dtype: str
    numel: int
    copied: bool
    model_norms: list[float] | None = None
    merged_norm: float | None = None
    base_norm: float | None = None
    task_norms: list[float] | None = None
    task_sparsity: list[float] | None = None
    delta_norm: float | None = None
    delta_sparsity: float | None = None
    sign_conflict: float | None = None


# elements per slice: the statistics of one slice are all computed while it sits in the CPU's
# cache (a 32k-element float32 slice of each input is 128 KiB), so each input is read from main
# memory once instead of once per statistic; 32k ran as fast as 64k and 12% faster than 16k
_SLICE = 1 << 15


def _array(tensor: Tensor) -> np.ndarray:
    """A tensor's entries as a flat float32 numpy array: a view of the engine's CPU float32
    buffers (the statistics run in numpy, whose few kernels a merge loads once, where the
    same ones in torch kept 4 MiB more of the library resident on the MiniLM merge of
    ``benchmarks/merge_scale.py``)."""
    return tensor.detach().to("cpu", torch.float32).reshape(-1).numpy()


def _squares(x: np.ndarray) -> float:
    return float(np.dot(x, x))  # float32 within a slice, float64 across slices


def _root(parts: list[float]) -> float:
    return math.sqrt(math.fsum(parts))


def _nonzero(x: np.ndarray, scratch: np.ndarray) -> int:
    """How many entries of ``x`` are not zero (NaN and ±inf count as not zero): a comparison
    into ``scratch`` then a count of booleans, 5× faster than ``np.count_nonzero`` of floats."""
    return int(np.count_nonzero(np.not_equal(x, 0.0, out=scratch[: x.size])))


def _zero_share(nonzero: int, numel: int) -> float:
    return (numel - nonzero) / numel  # NaN and ±inf count as not zero


@dataclass(frozen=True)
class InputStats:
    """The statistics of one tensor name's inputs, taken before the rule runs (a rule may change
    the task models' tensors in place)."""

    numel: int
    model_norms: list[float]
    base_norm: float | None = None
    task_norms: list[float] | None = None
    task_sparsity: list[float] | None = None
    sign_conflict: float | None = None


def input_stats(base: Tensor | None, models: Sequence[Tensor]) -> InputStats:
    """Norms of the models (and base), and of each task vector, their zeros and sign conflicts.

    Computed slice by slice over the flattened tensors; sums of squares are accumulated in
    float64 across slices. A coordinate's sign conflict is read off the largest and smallest
    task-vector entry: it conflicts when the largest is > 0 and the smallest < 0.
    """
    flat = [_array(m) for m in models]
    numel = flat[0].size
    squares: list[list[float]] = [[] for _ in flat]
    if base is None:
        for start in range(0, numel, _SLICE):
            for i, model in enumerate(flat):
                squares[i].append(_squares(model[start : start + _SLICE]))
        return InputStats(numel, [_root(parts) for parts in squares])
    base_flat = _array(base)
    base_squares: list[float] = []
    task_squares: list[list[float]] = [[] for _ in flat]
    task_nonzero = [0 for _ in flat]
    conflicts = 0
    width = min(_SLICE, numel)
    vector, high, low = (np.empty(width, np.float32) for _ in range(3))
    above, below = np.empty(width, bool), np.empty(width, bool)
    for start in range(0, numel, _SLICE):
        stop = min(start + _SLICE, numel)
        size = stop - start
        piece = base_flat[start:stop]
        base_squares.append(_squares(piece))
        v, hi, lo = vector[:size], high[:size], low[:size]
        for i, model in enumerate(flat):
            part = model[start:stop]
            squares[i].append(_squares(part))
            np.subtract(part, piece, out=v)
            task_squares[i].append(_squares(v))
            task_nonzero[i] += _nonzero(v, above)  # above: scratch until the conflicts
            if i == 0:
                hi[:] = v
                lo[:] = v
            else:
                np.maximum(hi, v, out=hi)
                np.minimum(lo, v, out=lo)
        positive = np.greater(hi, 0, out=above[:size])
        conflicts += int(np.count_nonzero(positive & np.less(lo, 0, out=below[:size])))
    return InputStats(
        numel,
        [_root(parts) for parts in squares],
        base_norm=_root(base_squares),
        task_norms=[_root(parts) for parts in task_squares],
        task_sparsity=[_zero_share(count, numel) for count in task_nonzero],
        sign_conflict=conflicts / numel,
    )


def output_stats(
    name: str, inputs: InputStats, base: Tensor | None, merged: Tensor, dtype: str
) -> TensorStats:
    """The row of one merged tensor: ``inputs`` (from :func:`input_stats`, before the rule) and
    the norm and zeros of the merged tensor and of its change from the base."""
    numel, shape = merged.numel(), list(merged.shape)
    merged_flat = _array(merged)
    merged_squares: list[float] = []
    if base is None:
        for start in range(0, numel, _SLICE):
            merged_squares.append(_squares(merged_flat[start : start + _SLICE]))
        return TensorStats(
            name, shape, dtype, numel, False, inputs.model_norms, _root(merged_squares)
        )
    base_flat = _array(base)
    delta_squares: list[float] = []
    delta_nonzero = 0
    vector, scratch = np.empty(min(_SLICE, numel), np.float32), np.empty(min(_SLICE, numel), bool)
    for start in range(0, numel, _SLICE):
        stop = min(start + _SLICE, numel)
        part = merged_flat[start:stop]
        merged_squares.append(_squares(part))
        v = np.subtract(part, base_flat[start:stop], out=vector[: stop - start])
        delta_squares.append(_squares(v))
        delta_nonzero += _nonzero(v, scratch)
    return TensorStats(
        name,
        shape,
        dtype,
        numel,
        False,
        inputs.model_norms,
        _root(merged_squares),
        base_norm=inputs.base_norm,
        task_norms=inputs.task_norms,
        task_sparsity=inputs.task_sparsity,
        delta_norm=_root(delta_squares),
        delta_sparsity=_zero_share(delta_nonzero, numel),
        sign_conflict=inputs.sign_conflict,
    )


def _quadrature(values: Sequence[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


def combine_blocks(
    name: str, parts: Sequence[TensorStats], shape: Sequence[int], dtype: str
) -> TensorStats:
    """The row of a tensor merged a block of rows at a time, from the blocks' rows: norms in
    quadrature, fractions weighted by the blocks' sizes."""
    numel = sum(p.numel for p in parts)

    def norms(attr: str) -> list[float] | None:
        columns = [getattr(p, attr) for p in parts]
        if columns[0] is None:
            return None
        return [_quadrature(values) for values in zip(*columns, strict=True)]

    def norm(attr: str) -> float | None:
        values = [getattr(p, attr) for p in parts]
        return None if values[0] is None else _quadrature(values)

    def share(attr: str) -> float | None:
        values: list[float | None] = [getattr(p, attr) for p in parts]
        if values[0] is None:
            return None
        return sum(float(v or 0.0) * p.numel for v, p in zip(values, parts, strict=True)) / numel

    def shares(attr: str) -> list[float] | None:
        columns = [getattr(p, attr) for p in parts]
        if columns[0] is None:
            return None
        return [
            sum(v * p.numel for v, p in zip(values, parts, strict=True)) / numel
            for values in zip(*columns, strict=True)
        ]

    return TensorStats(
        name,
        list(shape),
        dtype,
        numel,
        False,
        norms("model_norms"),
        norm("merged_norm"),
        base_norm=norm("base_norm"),
        task_norms=norms("task_norms"),
        task_sparsity=shares("task_sparsity"),
        delta_norm=norm("delta_norm"),
        delta_sparsity=share("delta_sparsity"),
        sign_conflict=share("sign_conflict"),
    )


def tensor_stats(
    name: str, base: Tensor | None, models: Sequence[Tensor], merged: Tensor, dtype: str
) -> TensorStats:
    """The statistics of one merged tensor (see the module docstring for the definitions)."""
    return output_stats(name, input_stats(base, models), base, merged, dtype)


class MergeReport:
    """Collects :class:`TensorStats` as the engine streams; writes ``report.json`` and
    ``report.md``."""

    def __init__(self, model_names: Sequence[str], has_base: bool, rule: str) -> None:
        self.model_names = list(model_names)
        self.has_base = has_base
        self.rule = rule
        self.rows: list[TensorStats] = []

    def observe_inputs(self, base: Tensor | None, models: Sequence[Tensor]) -> InputStats:
        """The input half of a row, to take before the rule may change the models in place."""
        return input_stats(base if self.has_base else None, models)

    def add(
        self, name: str, inputs: InputStats, base: Tensor | None, merged: Tensor, dtype: str
    ) -> TensorStats:
        """Complete and keep the row of tensor ``name`` (``base`` as the rule saw it)."""
        row = output_stats(name, inputs, base if self.has_base else None, merged, dtype)
        self.rows.append(row)
        return row

    def block_stats(
        self, name: str, inputs: InputStats, base: Tensor | None, merged: Tensor
    ) -> TensorStats:
        """The statistics of one block of rows of tensor ``name`` (see :meth:`add_blocks`)."""
        return output_stats(name, inputs, base if self.has_base else None, merged, "")

    def add_blocks(
        self, name: str, parts: Sequence[TensorStats], shape: Sequence[int], dtype: str
    ) -> TensorStats:
        """Keep the row of tensor ``name``, merged a block of rows at a time, from the blocks'
        :meth:`block_stats`."""
        row = combine_blocks(name, parts, shape, dtype)
        self.rows.append(row)
        return row

    def add_copied(self, name: str, shape: Sequence[int], dtype: str) -> None:
        numel = math.prod(shape)
        self.rows.append(TensorStats(name, list(shape), dtype, numel, copied=True))

    def totals(self) -> dict[str, Any]:
        """Whole-model values: norms combined in quadrature, fractions weighted by size."""
        merged = [r for r in self.rows if not r.copied]
        sizes = [r.numel for r in merged]
        numel = sum(sizes)
        count = len(self.model_names)

        def column(attr: str, i: int | None = None) -> list[float]:
            values = [getattr(r, attr) for r in merged]
            return [float(v if i is None else v[i]) for v in values]

        def quadrature(values: Sequence[float]) -> float:
            return math.sqrt(sum(v * v for v in values))

        def weighted(values: Sequence[float]) -> float | None:
            return sum(v * n for v, n in zip(values, sizes, strict=True)) / numel if numel else None

        out: dict[str, Any] = {
            "tensors": len(self.rows),
            "merged_tensors": len(merged),
            "copied_tensors": len(self.rows) - len(merged),
            "parameters": numel,
            "model_norms": [quadrature(column("model_norms", i)) for i in range(count)],
            "merged_norm": quadrature(column("merged_norm")),
        }
        if self.has_base:
            out.update(
                base_norm=quadrature(column("base_norm")),
                task_norms=[quadrature(column("task_norms", i)) for i in range(count)],
                task_sparsity=[weighted(column("task_sparsity", i)) for i in range(count)],
                delta_norm=quadrature(column("delta_norm")),
                delta_sparsity=weighted(column("delta_sparsity")),
                sign_conflict=weighted(column("sign_conflict")),
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "models": self.model_names,
            "has_base": self.has_base,
            "totals": self.totals(),
            "tensors": [asdict(r) for r in self.rows],
        }

    def to_markdown(self, title: str = "Merge report") -> str:
        names = " / ".join(self.model_names)
        totals = self.totals()
        lines = [
            f"# {title}",
            "",
            f"Rule `{self.rule}` over {len(self.model_names)} task model(s): {names}; "
            + ("task vectors τ = model − base." if self.has_base else "no base model."),
            f"{totals['merged_tensors']} tensors merged ({totals['parameters']:,} parameters), "
            f"{totals['copied_tensors']} copied (integer or boolean).",
            "",
            "## Whole model",
            "",
            "| quantity | value |",
            "|---|---|",
        ]
        if self.has_base:
            lines += [
                f"| ‖base‖ | {_num(totals['base_norm'])} |",
                f"| ‖τ‖ ({names}) | {_many(totals['task_norms'], _num)} |",
                f"| ‖merged − base‖ | {_num(totals['delta_norm'])} |",
                f"| zeros in τ ({names}) | {_many(totals['task_sparsity'], _pct)} |",
                f"| zeros in merged − base | {_pct(totals['delta_sparsity'])} |",
                f"| sign conflicts between task vectors | {_pct(totals['sign_conflict'])} |",
            ]
        else:
            lines += [
                f"| ‖model‖ ({names}) | {_many(totals['model_norms'], _num)} |",
                f"| ‖merged‖ | {_num(totals['merged_norm'])} |",
            ]
        lines += ["", "## Per tensor", ""]
        if self.has_base:
            lines += [
                f"| tensor | shape | ‖base‖ | ‖τ‖ {names} | ‖merged − base‖ | zeros τ {names} "
                "| zeros merged − base | sign conflicts |",
                "|---|---|---|---|---|---|---|---|",
            ]
        else:
            lines += [f"| tensor | shape | ‖model‖ {names} | ‖merged‖ |", "|---|---|---|---|"]
        for r in self.rows:
            shape = "×".join(str(d) for d in r.shape) or "scalar"
            if r.copied:
                cells = ["copied"] + [""] * (5 if self.has_base else 1)
            elif self.has_base:
                cells = [
                    _num(r.base_norm),
                    _many(r.task_norms, _num),
                    _num(r.delta_norm),
                    _many(r.task_sparsity, _pct),
                    _pct(r.delta_sparsity),
                    _pct(r.sign_conflict),
                ]
            else:
                cells = [_many(r.model_norms, _num), _num(r.merged_norm)]
            lines.append("| " + " | ".join([f"`{r.name}`", shape, *cells]) + " |")
        return "\n".join(lines) + "\n"

    def write(self, directory: str | Path, title: str = "Merge report") -> None:
        directory = Path(directory)
        atomic.write_json(directory / "report.json", self.to_dict())
        atomic.write_text(directory / "report.md", self.to_markdown(title))


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _many(values: Sequence[float] | None, fmt: Any) -> str:
    return "–" if values is None else " / ".join(fmt(v) for v in values)
