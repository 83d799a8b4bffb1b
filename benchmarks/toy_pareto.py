"""The two-objective toy problem of CAGrad, Nash-MTL and FAMO, for every balancing method.

The losses are the closed-form pair of Liu et al. (CAGrad, NeurIPS 2021, ``toy.py``) with the
first loss scaled by ``--scale`` (0.1, as in Nash-MTL's and FAMO's toy experiments, to make the
tasks imbalanced). Each method starts from the five points those papers use and takes
``--iters`` Adam steps (lr 1e-3) on the two coordinates, which are the shared parameters.

Both losses are shifted by a constant (+21, times ``scale`` for the first) so that they are
positive: gradients are unchanged, and methods that take logarithms of the losses (GLS, SI,
DB-MTL, FAMO …) are well defined — FAMO's own toy does the same through its ``min_losses``.

Methods run at their defaults, except FAMO with ``gamma = 0``, the value of FAMO's own toy
script (``experiments/toy/run.sh``: the toy needs a very small decay). Methods that count
epochs (DWA, STCH, IGB) are told that an epoch ended every ``--epoch-steps`` steps (1,000: 50
epochs in all); the others do not depend on it.

A run "ends on the Pareto front" when no point of a dense grid over the square [-10, 10]²
dominates its final point by more than ``--tol`` in both losses. Writes a table (stdout and
``benchmarks/results/toy_pareto.json``) and the trajectories over the loss contours
(``docs/images/toy_pareto.png``).

    python benchmarks/toy_pareto.py                 # every registered method, 50,000 steps
    python benchmarks/toy_pareto.py --methods ew,mgda,cagrad --iters 20000
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import manytask as mt
from manytask import registry
from manytask.atomic import write_text

INITS = [(-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)]
LOWER = 5e-6
SHIFT = 21.0
ROOT = Path(__file__).resolve().parents[1]
# aliases (`sum` is `ew`, `random` is `rlw`) and `constant`, which needs user weights (with
# equal ones it is `ew`)
SKIPPED = ("sum", "random", "constant")
#: parameters other than the defaults: FAMO's toy script uses no decay (module docstring)
METHOD_PARAMS: dict[str, dict[str, float]] = {"famo": {"gamma": 0.0}}


def toy_losses(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The two losses at points ``x`` of shape ``(..., 2)`` (shifted to be positive)."""
    x1, x2 = x[..., 0], x[..., 1]
    f1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), LOWER).log() + 6
    f2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), LOWER).log() + 6
    c1 = torch.clamp(torch.tanh(x2 * 0.5), 0)
    f1_sq = ((-x1 + 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    f2_sq = ((-x1 - 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    c2 = torch.clamp(torch.tanh(-x2 * 0.5), 0)
    l1 = (f1 * c1 + f1_sq * c2 + SHIFT) * scale
    l2 = f2 * c1 + f2_sq * c2 + SHIFT
    return torch.stack([l1, l2], dim=-1)


def run(
    method: str, start: tuple[float, float], iters: int, scale: float, record: int, epoch: int
) -> dict:
    torch.manual_seed(0)
    balancer = mt.balance.get(method, ["f1", "f2"], **METHOD_PARAMS.get(method, {}))
    x = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    params = [x, *balancer.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    path = [list(start)]
    started = time.perf_counter()
    for step in range(iters):
        f = toy_losses(x, scale)
        optimizer.zero_grad()
        balancer.backward({"f1": f[0], "f2": f[1]}, shared=[x])
        optimizer.step()
        if (step + 1) % epoch == 0:
            balancer.end_epoch()
        if (step + 1) % record == 0:
            path.append(x.detach().tolist())
    seconds = time.perf_counter() - started
    final = x.detach()
    return {
        "start": list(start),
        "end": final.tolist(),
        "losses": toy_losses(final, scale).tolist(),
        "path": path,
        "finite": bool(torch.isfinite(final).all()),
        "ms_per_step": 1000 * seconds / iters,
    }


def pareto_check(ends: torch.Tensor, scale: float, tol: float, n: int = 801) -> torch.Tensor:
    """True where no grid point dominates the end point by more than ``tol`` in both losses."""
    axis = torch.linspace(-10, 10, n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1).reshape(-1, 2)
    grid_losses = toy_losses(grid, scale)
    on_front = []
    for end in ends:
        if not torch.isfinite(end).all():
            on_front.append(False)
            continue
        f = toy_losses(end, scale)
        dominated = ((grid_losses <= f - tol).all(dim=1)).any()
        on_front.append(not bool(dominated))
    return torch.tensor(on_front)


def plot(results: dict, scale: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    cols = 6
    rows = math.ceil(len(names) / cols)
    axis = torch.linspace(-10, 10, 300, dtype=torch.float64)
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    mean = toy_losses(torch.stack([xx, yy], -1), scale).mean(-1)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.0 * rows), squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= len(names):
            ax.axis("off")
            continue
        name = names[index]
        ax.contour(xx.numpy(), yy.numpy(), mean.numpy(), levels=20, linewidths=0.6, cmap="viridis")
        for run_ in results[name]["runs"]:
            p = torch.tensor(run_["path"])
            color = "tab:green" if run_["on_front"] else "tab:red"
            ax.plot(p[:, 0], p[:, 1], color=color, linewidth=1.2)
            ax.plot(*run_["start"], "ko", markersize=3)
        hits = sum(r["on_front"] for r in results[name]["runs"])
        ax.set_title(f"{name} ({hits}/{len(INITS)})", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
    fig.suptitle(
        f"Toy problem (scale {scale}): trajectories over the mean-loss contours; "
        "green ends on the Pareto front, red does not",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # room for the title above the first row
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="all", help="comma-separated names, or 'all'")
    parser.add_argument("--iters", type=int, default=50_000)
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--epoch-steps", type=int, default=1000, help="steps per epoch")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "toy_pareto.json"
    )
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "images" / "toy_pareto.png")
    parser.add_argument(
        "--merge", action="store_true", help="add to the results already in --out (same settings)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # two coordinates: threads only add contention
    names = registry.names("balancer") if args.methods == "all" else args.methods.split(",")
    record = max(args.iters // 200, 1)
    meta = {
        "iters": args.iters,
        "scale": args.scale,
        "tol": args.tol,
        "inits": INITS,
        "shift": SHIFT,
        "epoch_steps": args.epoch_steps,
        "method_params": METHOD_PARAMS,
    }
    results: dict = {}
    if args.merge and args.out.exists():
        previous = json.loads(args.out.read_text())
        if previous["meta"] != json.loads(json.dumps(meta)):
            raise SystemExit(
                f"--merge: {args.out} was made with other settings: {previous['meta']}"
            )
        results = previous["results"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'method':<14} {'on front':>8} {'mean final loss':>16} {'ms/step':>8}")
    for name in names:
        if name in SKIPPED:
            continue
        runs = [
            run(name, start, args.iters, args.scale, record, args.epoch_steps) for start in INITS
        ]
        flags = pareto_check(torch.tensor([r["end"] for r in runs]), args.scale, args.tol)
        for r, flag in zip(runs, flags.tolist(), strict=True):
            r["on_front"] = bool(flag)
        mean_loss = sum(sum(r["losses"]) for r in runs) / len(runs)
        ms = sum(r["ms_per_step"] for r in runs) / len(runs)
        results[name] = {"runs": runs, "on_front": int(flags.sum()), "ms_per_step": ms}
        print(
            f"{name:<14} {int(flags.sum()):>6}/{len(INITS)} {mean_loss:>16.4f} {ms:>8.3f}",
            flush=True,
        )
        # after every method, so that a stopped run keeps the methods it finished
        results = dict(sorted(results.items()))
        write_text(args.out, json.dumps({"meta": meta, "results": results}))
    plot(results, args.scale, args.plot)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
