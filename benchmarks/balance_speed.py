"""Milliseconds per training step of every balancing method, beside LibMTL and torchjd.

A shared-bottom model (``--model mlp`` or ``cnn``, see :class:`Bench`; one linear head per task)
on a batch of random regression samples, SGD. A step is: forward, per-task MSE losses, the
method's backward, optimizer step. For each method and task count, every variant — equal
weighting (the baseline), manytask in parameter and in feature mode, LibMTL's and torchjd's
implementations — runs on the same model and data in the same process, the variants timed in
turn so that drifts of a shared machine cancel in the ratios, in a new random order each round
(seeded) so that each follows every other equally often (what ran just before leaves its
traces in the caches); the figures are medians over ``--steps`` rounds after ``--warmup``
untimed ones. "features ÷ EW" here is among all five variants, where a peer's step (up to
60 ms at k = 10) often runs between the two and leaves the caches cold for the next step's
Python and numpy code; ``feature_overhead.py`` times that ratio as a pair, in several
processes.

Also times one Nash-MTL weight computation: manytask's torch solver against the cvxpy-based
reference (torchjd's ``NashMTL`` weighting, which follows the authors' cvxpy formulation), with
the largest difference of the weights.

    python benchmarks/balance_speed.py                      # every method, k = 2, 10, 40
    python benchmarks/balance_speed.py --tasks 10 --methods ew,mgda,pcgrad

Writes ``benchmarks/results/balance_speed.json`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import manytask as mt
from manytask import registry
from manytask.balance.base import GramianWeighting
from timing import timed_together  # benchmarks/timing.py (this script's folder)

ROOT = Path(__file__).resolve().parents[1]

# manytask name -> (LibMTL 1.1.5 class, its keyword arguments at their documented defaults)
LIBMTL = {
    "ew": ("EW", {}),
    "uw": ("UW", {}),
    "gls": ("GLS", {}),
    "rlw": ("RLW", {"dist": "Normal"}),
    "mgda": ("MGDA", {"mgda_gn": "none"}),
    "pcgrad": ("PCGrad", {}),
    "gradvac": ("GradVac", {"beta": 0.5}),
    "cagrad": ("CAGrad", {"calpha": 0.5, "rescale": 1}),
    "graddrop": ("GradDrop", {"leak": 0.0}),
    "imtl": ("IMTL", {}),
    "gradnorm": ("GradNorm", {"alpha": 1.5}),
}
# manytask name -> torchjd 0.18 aggregator class
TORCHJD = {
    "mgda": "MGDA",
    "pcgrad": "PCGrad",
    "upgrad": "UPGrad",
    "dualproj": "DualProj",
    "cagrad": "CAGrad",
    "nash_mtl": "NashMTL",
    "imtl_g": "IMTLG",
    "aligned_mtl": "AlignedMTL",
    "graddrop": "GradDrop",
    "gradvac": "GradVac",
    "config": "ConFIG",
    "fairgrad": "FairGrad",
    "excess_mtl": "ExcessMTL",
    "krum": "Krum",
    "trimmed_mean": "TrimmedMean",
    "mean": "Mean",
    "constant": "Constant",
}
ALIASES = ("sum", "random")
# methods whose parameter-mode update is exact (no approximation of the paper's rule) and
# that LibMTL also implements: the speed target compares these
EXACT_PARAMETER_METHODS = ["mgda", "pcgrad", "gradvac", "cagrad", "graddrop", "imtl"]


class Bench:
    """The model, data and optimizer of one measurement, rebuilt identically for each.

    ``mlp``: input 64 → 256 → 256 (ReLU), batch 256 — a small encoder, where the cost of a
    method's own arithmetic shows. ``cnn``: the Multi-Fashion CNN of the demo (conv 5×5 ×16 →
    pool → conv 5×5 ×32 → pool → linear 128) on 28×28 inputs, batch 128 — an encoder whose
    backward pass dominates the step, as in practice. One linear regression head per task; each
    head reads its own view of the representation, as manytask's models hand them out.
    """

    def __init__(self, tasks: int, model: str = "mlp", seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.tasks = tasks
        if model == "mlp":
            self.encoder: nn.Module = nn.Sequential(
                nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU()
            )
            self.x = torch.randn(256, 64)
            width = 256
        elif model == "cnn":
            self.encoder = nn.Sequential(
                nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(),
            )  # fmt: skip
            self.x = torch.randn(128, 1, 28, 28)
            width = 128
        else:
            raise SystemExit(f"--model must be mlp or cnn, got {model!r}")
        self.heads = nn.ModuleList([nn.Linear(width, 1) for _ in range(tasks)])
        self.y = torch.randn(self.x.shape[0], tasks)
        self.params = [*self.encoder.parameters(), *self.heads.parameters()]

    def forward(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        z = self.encoder(self.x)
        views = [z.view_as(z) for _ in self.heads]
        losses = [
            ((head(v).squeeze(-1) - self.y[:, i]) ** 2).mean()
            for i, (head, v) in enumerate(zip(self.heads, views, strict=True))
        ]
        return views, losses


def build(
    make: Callable[[], Callable[[], None] | None],
) -> tuple[Callable[[], None] | None, str | None]:
    """The step of one variant, or None with the error when the implementation fails — run
    once here so that a failing peer is reported and left out, not timed."""
    try:
        step = make()
        if step is not None:
            step()
        return step, None
    except Exception as error:  # a peer's bug is a result to report, not a reason to stop
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"


class EngineFloor(GramianWeighting):
    """Unit weights: feature mode's own cost with no method's arithmetic — the per-task
    gradients of the representation gathered in one backward pass, their Gramian and its
    statistics, and ``Jᵀw`` into the encoder. Every Gramian method pays this, then its rule."""

    def weights(self, gramian: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(gramian[0])


FLOOR = "(engine floor)"  # the row of EngineFloor in the results


def manytask_step(name: str, tasks: int, mode: str, model: str) -> Callable[[], None]:
    bench = Bench(tasks, model)
    names = [f"t{i}" for i in range(tasks)]
    options: dict[str, Any] = {"mode": mode} if mode == "features" else {}
    if name == "constant":
        options["weights"] = [1.0] * tasks
    balancer = (
        EngineFloor(names).configure(mode="features")  # timed in feature mode only
        if name == FLOOR
        else mt.balance.get(name, names, **options)
    )
    optimizer = torch.optim.SGD([*bench.params, *balancer.parameters()], lr=1e-3)
    shared = list(bench.encoder.parameters())

    def step() -> None:
        views, losses = bench.forward()
        optimizer.zero_grad()
        balancer.backward(dict(zip(names, losses, strict=True)), shared=shared, features=views)
        optimizer.step()
        balancer.end_epoch()

    return step


def _stub_torchvision() -> None:
    """LibMTL's package imports torchvision for its ResNet only; stub the one function."""
    if "torchvision" in sys.modules:
        return
    try:
        importlib.import_module("torchvision")
        return
    except Exception:
        pass
    tv, models, utils = (
        types.ModuleType(n)
        for n in ("torchvision", "torchvision.models", "torchvision.models.utils")
    )
    utils.load_state_dict_from_url = lambda *a, **k: None  # type: ignore[attr-defined]
    tv.models, models.utils = models, utils  # type: ignore[attr-defined]
    sys.modules.update(
        {"torchvision": tv, "torchvision.models": models, "torchvision.models.utils": utils}
    )


def libmtl_step(name: str, tasks: int, model: str) -> Callable[[], None] | None:
    if name not in LIBMTL:
        return None
    _stub_torchvision()
    try:
        module = importlib.import_module(f"LibMTL.weighting.{LIBMTL[name][0]}")
    except ImportError:
        return None
    cls = getattr(module, LIBMTL[name][0])
    kwargs = LIBMTL[name][1]
    bench = Bench(tasks, model)

    class Harness(cls):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.task_num = tasks
            self.task_name = [f"t{i}" for i in range(tasks)]
            self.device = torch.device("cpu")
            self.rep_grad = False
            self.epoch = 1  # steady state: LibMTL's GradNorm runs plain EW in epoch 0
            self.train_loss_buffer = torch.ones(tasks, 2).numpy()  # GradNorm's L_i(0)
            self.encoder = bench.encoder

        def get_share_params(self) -> Any:
            return bench.encoder.parameters()

        def zero_grad_share_params(self) -> None:
            bench.encoder.zero_grad(set_to_none=False)

    harness = Harness()
    harness.init_param()
    optimizer = torch.optim.SGD(
        [*bench.params, *[p for n, p in harness.named_parameters() if not n.startswith("encoder")]],
        lr=1e-3,
    )

    def step() -> None:
        _, losses = bench.forward()
        optimizer.zero_grad()
        harness.backward(torch.stack(losses), **kwargs)
        optimizer.step()

    return step


def torchjd_step(name: str, tasks: int, model: str) -> Callable[[], None] | None:
    if name not in TORCHJD:
        return None
    try:
        aggregation = importlib.import_module("torchjd.aggregation")
        autojac = importlib.import_module("torchjd.autojac")
    except ImportError:
        return None
    cls = getattr(aggregation, TORCHJD[name])
    # the same settings as manytask's defaults, where torchjd has no default of its own
    arguments: dict[str, Any] = {
        "constant": {"weights": torch.ones(tasks)},
        "cagrad": {"c": 0.5},
        "nash_mtl": {"n_tasks": tasks},
        "fairgrad": {"alpha": 1.0},
        "krum": {"n_byzantine": 0},
        "trimmed_mean": {"trim_number": 1 if tasks >= 3 else 0},
    }
    aggregator = cls(**arguments.get(name, {}))
    bench = Bench(tasks, model)
    optimizer = torch.optim.SGD(bench.params, lr=1e-3)
    shared = list(bench.encoder.parameters())

    def step() -> None:
        views, losses = bench.forward()
        optimizer.zero_grad()
        z = views[0]._base  # torchjd differentiates with respect to the representation itself
        autojac.mtl_backward(losses, features=z, shared_params=shared)
        autojac.jac_to_grad(shared, aggregator)
        optimizer.step()

    return step


def nash_weight_timing(tasks: int, repeats: int = 20) -> dict[str, float] | None:
    """One Nash-MTL weight computation: manytask's solver vs torchjd's cvxpy weighting."""
    if "nash_mtl" not in registry.names("balancer"):
        return None
    try:
        aggregation = importlib.import_module("torchjd.aggregation")
        reference = aggregation.NashMTL(n_tasks=tasks, update_weights_every=1)
    except Exception:
        return None
    balancer = mt.balance.get("nash_mtl", [f"t{i}" for i in range(tasks)])
    assert isinstance(balancer, GramianWeighting)
    g = torch.Generator().manual_seed(tasks)
    ours_t, ref_t, diffs = [], [], []
    for _ in range(repeats):
        jacobian = torch.randn(tasks, 50, generator=g, dtype=torch.float64)
        gramian = jacobian @ jacobian.T
        losses = torch.ones(tasks, dtype=torch.float64)
        started = time.perf_counter()
        w = balancer.weights(gramian, losses)
        ours_t.append(time.perf_counter() - started)
        reference.reset() if hasattr(reference, "reset") else None
        started = time.perf_counter()
        d_ref = reference(jacobian)
        ref_t.append(time.perf_counter() - started)
        d_ours = w.to(jacobian.dtype) @ jacobian
        diffs.append(float((d_ours - d_ref).abs().max() / d_ref.abs().max().clamp_min(1e-12)))
    ours_ms = 1000 * statistics.median(ours_t)
    ref_ms = 1000 * statistics.median(ref_t)
    return {
        "ours_ms": ours_ms,
        "cvxpy_ms": ref_ms,
        "speedup": ref_ms / ours_ms,
        "max_rel_diff": max(diffs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="all")
    parser.add_argument("--tasks", default="2,10,40")
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    parser.add_argument(
        "--modes", default="parameters,features", help="manytask modes to time, comma-separated"
    )
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="time manytask only")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "balance_speed.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    # every registered method, less the aliases (sum is ew, random is rlw)
    names = (
        [n for n in registry.names("balancer") if n not in ALIASES]
        if args.methods == "all"
        else args.methods.split(",")
    )
    sizes = [int(k) for k in args.tasks.split(",")]
    modes = args.modes.split(",")
    if "features" in modes:
        names.append(FLOOR)
    rows: list[dict[str, Any]] = []
    for k in sizes:
        for name in names:
            gradient = name == FLOOR or (
                name in registry.names("balancer")
                and not issubclass(registry.get("balancer", name), mt.balance.LossWeighting)
            )
            row: dict[str, Any] = {"method": name, "tasks": k}
            makers: dict[str, Callable[[], Callable[[], None] | None]] = {
                "ew": lambda: manytask_step("ew", k, "parameters", args.model),  # noqa: B023
            }
            if "parameters" in modes and name != FLOOR:
                makers["ours"] = lambda: manytask_step(name, k, "parameters", args.model)  # noqa: B023
            if gradient and "features" in modes:  # a method that refuses feature mode says why
                makers["ours_features"] = lambda: manytask_step(name, k, "features", args.model)  # noqa: B023
            if args.peers and name != FLOOR:
                makers["libmtl"] = lambda: libmtl_step(name, k, args.model)  # noqa: B023
                makers["torchjd"] = lambda: torchjd_step(name, k, args.model)  # noqa: B023
            steps: dict[str, Callable[[], None]] = {}
            for variant, make in makers.items():
                step, error = build(make)
                if step is not None:
                    steps[variant] = step
                elif error:
                    row[f"{variant}_error"] = error
            for variant, ms in timed_together(steps, args.warmup, args.steps, shuffle=0).items():
                row[f"{variant}_ms"] = ms
            rows.append(row)
            print(json.dumps(row), flush=True)
    nash = {k: nash_weight_timing(k) for k in sizes} if args.peers else {}
    write_results(args.out, args.model, {"rows": rows, "nash_mtl_weights": nash})
    print(markdown(rows, nash))


def write_results(path: Path, model: str, results: dict[str, Any]) -> None:
    """``results`` with the machine, the model and the command, as JSON at ``path``, written
    to a side file first and then renamed (an interrupted run leaves the last file whole)."""
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": model,
        "command": " ".join(sys.argv),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"machine": machine, **results}, indent=1))
    partial.replace(path)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def markdown(rows: list[dict[str, Any]], nash: dict[int, Any]) -> str:
    lines = [
        "| method | k | manytask ms | feature mode ms | LibMTL ms | torchjd ms "
        "| ÷ LibMTL | ÷ torchjd | features ÷ EW |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ours, feat = r.get("ours_ms"), r.get("ours_features_ms")
        lib, jd = r.get("libmtl_ms"), r.get("torchjd_ms")
        cells = [ours, feat, lib, jd, _ratio(ours, lib), _ratio(ours, jd), _ratio(feat, r["ew_ms"])]
        lines.append(f"| {r['method']} | {r['tasks']} | " + " | ".join(map(_fmt, cells)) + " |")
    if any(nash.values()):
        lines += [
            "",
            "| Nash-MTL weights, k | manytask ms | cvxpy reference ms | speed-up "
            "| max relative difference |",
            "|---:|---:|---:|---:|---:|",
        ]
    for k, v in nash.items():
        if v:
            lines.append(
                f"| {k} | {v['ours_ms']:.2f} | {v['cvxpy_ms']:.2f} | {v['speedup']:.1f}× "
                f"| {v['max_rel_diff']:.1e} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
