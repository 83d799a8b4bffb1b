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
# cache (a 64k-element float32 slice of each input is 256 KiB), so each input is read from main
# memory once instead of once per statistic
_SLICE = 1 << 16


def _squares(x: Tensor) -> Tensor:
    return torch.dot(x, x).double()


def tensor_stats(
    name: str, base: Tensor | None, models: Sequence[Tensor], merged: Tensor, dtype: str
) -> TensorStats:
    """The statistics of one merged tensor (see the module docstring for the definitions).

    Computed slice by slice over the flattened tensors; sums of squares are accumulated in
    float64 across slices.
    """
    numel, shape = merged.numel(), list(merged.shape)
    flat = [m.reshape(-1) for m in models]
    merged_flat = merged.reshape(-1)
    base_flat = base.reshape(-1) if base is not None else None
    squares: list[list[Tensor]] = [[] for _ in range(len(flat) + 2)]  # models, merged, base
    task_squares: list[list[Tensor]] = [[] for _ in flat]
    task_nonzero: list[list[Tensor]] = [[] for _ in flat]
    delta_squares: list[Tensor] = []
    delta_nonzero: list[Tensor] = []
    conflicts: list[Tensor] = []
    width = min(_SLICE, numel)
    vector = torch.empty(width)
    positive, negative, mask = (torch.empty(width, dtype=torch.bool) for _ in range(3))
    for start in range(0, numel, _SLICE):
        stop = min(start + _SLICE, numel)
        for i, model in enumerate(flat):
            squares[i].append(_squares(model[start:stop]))
        squares[-2].append(_squares(merged_flat[start:stop]))
        if base_flat is None:
            continue
        piece = base_flat[start:stop]
        squares[-1].append(_squares(piece))
        size = stop - start
        v, pos, neg, tmp = vector[:size], positive[:size], negative[:size], mask[:size]
        pos.zero_()
        neg.zero_()
        for i, model in enumerate(flat):
            torch.sub(model[start:stop], piece, out=v)
            task_squares[i].append(_squares(v))
            task_nonzero[i].append(torch.count_nonzero(v))
            pos.logical_or_(torch.gt(v, 0, out=tmp))
            neg.logical_or_(torch.lt(v, 0, out=tmp))
        conflicts.append(torch.count_nonzero(pos.logical_and_(neg)))
        torch.sub(merged_flat[start:stop], piece, out=v)
        delta_squares.append(_squares(v))
        delta_nonzero.append(torch.count_nonzero(v))

    def norm(parts: list[Tensor]) -> float:
        return math.sqrt(float(torch.stack(parts).sum())) if parts else 0.0

    def zeros(parts: list[Tensor]) -> float:
        return (numel - int(torch.stack(parts).sum())) / numel if parts else 0.0

    model_norms = [norm(parts) for parts in squares[: len(flat)]]
    merged_norm = norm(squares[-2])
    if base is None:
        return TensorStats(name, shape, dtype, numel, False, model_norms, merged_norm)
    return TensorStats(
        name,
        shape,
        dtype,
        numel,
        False,
        model_norms,
        merged_norm,
        base_norm=norm(squares[-1]),
        task_norms=[norm(parts) for parts in task_squares],
        task_sparsity=[zeros(parts) for parts in task_nonzero],
        delta_norm=norm(delta_squares),
        delta_sparsity=zeros(delta_nonzero),
        sign_conflict=int(torch.stack(conflicts).sum()) / numel if conflicts else 0.0,
    )


class MergeReport:
    """Collects :class:`TensorStats` as the engine streams; writes ``report.json`` and
    ``report.md``."""

    def __init__(self, model_names: Sequence[str], has_base: bool, rule: str) -> None:
        self.model_names = list(model_names)
        self.has_base = has_base
        self.rule = rule
        self.rows: list[TensorStats] = []

    def add(
        self, name: str, base: Tensor | None, models: Sequence[Tensor], merged: Tensor, dtype: str
    ) -> TensorStats:
        row = tensor_stats(name, base if self.has_base else None, models, merged, dtype)
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
