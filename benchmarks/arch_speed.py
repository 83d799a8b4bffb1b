"""Training samples per second of manytask's MMoE and PLE beside torch-rechub's, at equal sizes.

Three sizes (``SIZES``), each with its own table and widths; two binary tasks throughout:

- ``census``: the sizes of the census-income experiments, as torch-rechub's own example
  (``examples/ranking/run_census.py``) sets them for its comparison with the papers — 34
  categorical columns embedded in 4 dimensions and 7 numeric columns; MMoE with 8 experts of
  one layer of 16 units and towers of 8; PLE with one level of 1 shared and 2 per-task experts of
  16 units and towers of 8;
- ``small`` and ``large``: a recommendation-style table with the layout of the Criteo
  display-ads data (13 numeric columns, 26 categorical columns of 1,000 values embedded in 16
  dimensions); 8 experts of [64] with towers of [32] (PLE: 1 level), and 8 experts of
  [512, 256] with towers of [128] (PLE: 2 levels); PLE's experts half shared, half per task.

A step is forward, the two binary cross-entropies, backward and an Adam step, on a batch of
``--batch`` random rows. Both libraries get the same widths: the same number of experts, expert
layers, gate inputs and towers; each model runs as its library builds it. torch-rechub's MLP
blocks put a BatchNorm after every linear layer (gates included), which manytask's experts do
not have, so the script also times torch-rechub with those BatchNorms replaced by identities:
that row isolates the cost of its per-expert Python loop. The variants are timed in turn in one
process (``timing.timed_together``); samples/s = batch / median step.

    python benchmarks/arch_speed.py
    python benchmarks/arch_speed.py --batch 2048 --sizes small

Needs torch-rechub (``pip install --no-deps torch-rechub``, plus tqdm and scikit-learn, which it
imports). Writes ``benchmarks/results/arch_speed.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from manytask import registry
from manytask.columns import Columns
from manytask.task import Task, TaskSet
from timing import timed_together  # benchmarks/timing.py (this script's folder)

ROOT = Path(__file__).resolve().parents[1]
# per size: the table (numeric columns, categorical columns of `vocabulary` values embedded in
# `embedding` dimensions) and the widths (MMoE's experts; PLE's levels, shared and per-task
# experts; expert and tower layers)
CRITEO = {"numeric": 13, "categorical": 26, "vocabulary": 1000, "embedding": 16}
SIZES: dict[str, dict[str, Any]] = {
    "census": {
        **{"numeric": 7, "categorical": 34, "vocabulary": 100, "embedding": 4},
        **{"experts": 8, "levels": 1, "shared_experts": 1, "task_experts": 2},
        **{"expert_hidden": [16], "tower_hidden": [8]},
    },
    "small": {
        **CRITEO,
        **{"experts": 8, "levels": 1, "shared_experts": 4, "task_experts": 4},
        **{"expert_hidden": [64], "tower_hidden": [32]},
    },
    "large": {
        **CRITEO,
        **{"experts": 8, "levels": 2, "shared_experts": 4, "task_experts": 4},
        **{"expert_hidden": [512, 256], "tower_hidden": [128]},
    },
}


def batch(rows: int, size: dict[str, Any], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    numeric = torch.randn(rows, size["numeric"], generator=g)
    codes = torch.randint(0, size["vocabulary"], (rows, size["categorical"]), generator=g)
    labels = torch.randint(0, 2, (rows, 2), generator=g).float()
    return torch.cat([numeric, codes.float()], dim=1), labels


def manytask_step(
    arch: str, size: dict[str, Any], x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    tasks = TaskSet([Task("click", "bce"), Task("buy", "bce")])
    columns = Columns(
        numeric=tuple(f"n{i}" for i in range(size["numeric"])),
        categorical=tuple((f"c{i}", size["vocabulary"]) for i in range(size["categorical"])),
    )
    params: dict[str, Any] = {
        "expert_hidden": size["expert_hidden"],
        "tower_hidden": size["tower_hidden"],
        "embedding_dim": size["embedding"],
    }
    if arch == "mmoe":
        params["num_experts"] = size["experts"]
    else:
        params.update(
            num_levels=size["levels"],
            shared_experts=size["shared_experts"],
            task_experts=size["task_experts"],
        )
    torch.manual_seed(0)
    model = registry.call_with_params(
        "architecture", arch, params, tasks=tasks, input_shape=(columns.width,), columns=columns
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()

    def step() -> None:
        out = model(x)
        loss = loss_fn(out["click"], y[:, 0]) + loss_fn(out["buy"], y[:, 1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def rechub_step(
    arch: str, size: dict[str, Any], x: torch.Tensor, y: torch.Tensor, batch_norm: bool
) -> Callable[[], None]:
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.multi_task import MMOE, PLE

    numeric = size["numeric"]
    features = [DenseFeature(f"n{i}") for i in range(numeric)] + [
        SparseFeature(f"c{i}", vocab_size=size["vocabulary"] + 1, embed_dim=size["embedding"])
        for i in range(size["categorical"])
    ]
    expert = {"dims": size["expert_hidden"]}
    towers = [{"dims": size["tower_hidden"]}] * 2
    torch.manual_seed(0)
    if arch == "mmoe":
        model = MMOE(features, ["classification"] * 2, size["experts"], expert, towers)
    else:
        model = PLE(
            features,
            ["classification"] * 2,
            size["levels"],
            size["task_experts"],  # n_expert_specific
            size["shared_experts"],  # n_expert_shared
            expert,
            towers,
        )
    if not batch_norm:
        for module in list(model.modules()):
            for child, sub in list(module.named_children()):
                if isinstance(sub, nn.BatchNorm1d):
                    setattr(module, child, nn.Identity())
    inputs = {f"n{i}": x[:, i] for i in range(numeric)}
    inputs.update({f"c{i}": x[:, numeric + i].long() for i in range(size["categorical"])})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.BCELoss()  # torch-rechub's towers end in a sigmoid

    def step() -> None:
        out = model(inputs)
        loss = loss_fn(out[:, 0], y[:, 0]) + loss_fn(out[:, 1], y[:, 1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--archs", default="mmoe,ple")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "arch_speed.json"
    )
    args = parser.parse_args()
    rows = []
    for size_name in args.sizes.split(","):
        size = SIZES[size_name]
        x, y = batch(args.batch, size)
        for arch in args.archs.split(","):
            steps = {
                "manytask": manytask_step(arch, size, x, y),
                "torch_rechub": rechub_step(arch, size, x, y, batch_norm=True),
                "torch_rechub_no_bn": rechub_step(arch, size, x, y, batch_norm=False),
            }
            ms = timed_together(steps, args.warmup, args.steps)
            row = {
                "arch": arch,
                "size": size_name,
                **size,
                "batch": args.batch,
                **{f"{k}_samples_per_s": 1000 * args.batch / v for k, v in ms.items()},
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(
        "| model | size | manytask samples/s | torch-rechub | ratio | torch-rechub without "
        "BatchNorm | ratio |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ours = r["manytask_samples_per_s"]
        theirs, bare = r["torch_rechub_samples_per_s"], r["torch_rechub_no_bn_samples_per_s"]
        print(
            f"| {r['arch']} | {r['size']} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f}× "
            f"| {bare:,.0f} | {ours / bare:.2f}× |"
        )


if __name__ == "__main__":
    main()
