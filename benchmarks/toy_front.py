"""What Nash-MTL does on the Pareto front of the toy problem: manytask's exact solution beside
the authors' cvxpy solver.

On the front of ``toy_pareto.py`` the two task gradients are opposite to double precision. The
Nash bargaining solution then points along the bisector of the unit gradients, across both
gradients, so an exact solver takes no step along the front (the paper assumes linearly
independent gradients, which fails there). This script starts on the front and takes
``--steps`` Adam steps (lr 1e-3, as the toy) with:

- ``manytask``: ``nash_mtl`` at its defaults (float64 Jacobian, the exact solution);
- ``authors``: torchjd 0.18's ``NashMTL``, its port of the authors' cvxpy formulation (a
  sequence of at most 20 convex programs, warm-started, stopped when
  ``‖Gα − 1/α‖ < 1e-3`` on the normalised Gramian), fed the float32 Jacobian as the authors'
  training code is;
- ``equal``: the sum of the two gradients (equal weighting), the limit of a solver whose
  regularisation gives both tasks the same weight on the front (what manytask's solver did
  with its former absolute floor of 1e-12 on the diagonal).

For each it prints and writes (``--out``) the final point, the losses, and the ratio of the two
gradient norms there (equal weighting stops where they are equal). Needs ``torchjd`` and
``cvxpy`` for the ``authors`` row (``make setup`` installs them; skipped with a message otherwise).

    python benchmarks/toy_front.py --steps 20000
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

import manytask as mt
from manytask.atomic import write_text
from toy_pareto import toy_losses  # benchmarks/toy_pareto.py (this script's folder)

ROOT = Path(__file__).resolve().parents[1]
SCALE = 0.1


def jacobian(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The losses at ``x`` and their gradients, as a ``(2, 2)`` Jacobian."""
    f = toy_losses(x, SCALE)
    rows = [torch.autograd.grad(f[i], x, retain_graph=True)[0] for i in range(2)]
    return f, torch.stack(rows)


def manytask_direction() -> Callable[[torch.nn.Parameter], None]:
    balancer = mt.balance.get("nash_mtl", ["f1", "f2"])

    def step(x: torch.nn.Parameter) -> None:
        f = toy_losses(x, SCALE)
        balancer.backward({"f1": f[0], "f2": f[1]}, shared=[x])

    return step


def authors_direction() -> Callable[[torch.nn.Parameter], None] | None:
    try:
        aggregation = importlib.import_module("torchjd.aggregation")
        importlib.import_module("cvxpy")
    except ImportError as error:
        print(f"authors: skipped ({error.name} is not installed; `make setup` installs it)")
        return None
    aggregator = aggregation.NashMTL(n_tasks=2)

    def step(x: torch.nn.Parameter) -> None:
        _, jac = jacobian(x)
        x.grad = aggregator(jac.float()).to(x.dtype)

    return step


def equal_direction() -> Callable[[torch.nn.Parameter], None]:
    def step(x: torch.nn.Parameter) -> None:
        toy_losses(x, SCALE).sum().backward()

    return step


def walk(step: Callable[[torch.nn.Parameter], None], start: list[float], steps: int) -> dict:
    x = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    optimizer = torch.optim.Adam([x], lr=1e-3)
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        step(x)
        optimizer.step()
    seconds = time.perf_counter() - started
    _, jac = jacobian(x)
    norms = jac.norm(dim=1)
    return {
        "end": x.detach().tolist(),
        "losses": toy_losses(x.detach(), SCALE).tolist(),
        "gradient_norm_ratio": float(norms[0] / norms[1]),
        "ms_per_step": 1000 * seconds / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--start",
        type=float,
        nargs=2,
        default=[0.0, -8.355],
        help="a point on the front (default: where nash_mtl meets it from the start (0, 0))",
    )
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "toy_front.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    makers = {
        "manytask": manytask_direction,
        "authors": authors_direction,
        "equal": equal_direction,
    }
    results = {}
    print(f"{'solver':<9} {'end':>18} {'L1 + L2':>8} {'|g1|/|g2|':>9} {'ms/step':>8}")
    for name, make in makers.items():
        step = make()
        if step is None:
            continue
        row = walk(step, list(args.start), args.steps)
        results[name] = row
        end = ", ".join(f"{v:.3f}" for v in row["end"])
        print(
            f"{name:<9} {'(' + end + ')':>18} {sum(row['losses']):>8.3f} "
            f"{row['gradient_norm_ratio']:>9.3f} {row['ms_per_step']:>8.2f}",
            flush=True,
        )
    meta = {"start": list(args.start), "steps": args.steps, "scale": SCALE}
    write_text(args.out, json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
