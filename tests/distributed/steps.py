"""Run a few balanced SGD steps, in one process on the whole batch or as one rank of many on
its share; used by ``tests/test_distributed.py`` (``torchrun --nproc-per-node 2 steps.py``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import manytask as mt
from manytask import distributed
from manytask.adapters.routers import TopKTokenRouter

#: (registry name, options): one method of each kind
METHODS = [
    ("rlw", {}),  # loss-based, random: the ranks share the random state
    ("uw", {}),  # loss-based with learnable parameters
    ("dwa", {}),  # loss-based with loss statistics
    ("mgda", {}),  # Gramian-based, parameter mode: J is averaged over ranks
    ("pcgrad", {}),  # Gramian-based with a random order
    ("mgda", {"mode": "features"}),  # feature mode: the per-sample Gramian is summed over ranks
    # feature mode in one backward pass, each linear head reading its own view: the Gramian
    # comes from the heads' factors (engine.LinearHeadRows), again summed over ranks
    ("mgda", {"mode": "features", "views": True}),
    ("trimmed_mean", {}),  # Jacobian aggregator: coordinate-wise on the averaged J
    ("graddrop", {}),  # Jacobian aggregator with random draws shared by the ranks
    ("gradvac", {}),  # Gramian-based with state (EMA targets)
    ("uw", {"loss_transform": "log"}),  # the log transform, exact through the union values
    ("mgda", {"loss_transform": "log"}),
    ("famo", {}),  # loss-based with its own update of logits
    ("stch", {}),  # loss-based with a warm-up on epoch statistics
    ("igb_v2", {}),  # loss-based with a reinforcement-learning agent and random draws
]
TASKS = ["a", "b", "c"]
STEPS = 3


def make_model() -> tuple[nn.Module, nn.ModuleList]:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(6, 1) for _ in TASKS])
    return encoder, heads


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 5, generator=g), torch.randn(8, len(TASKS), generator=g)


def run(name: str, options: dict, out: Path) -> None:
    encoder, heads = make_model()
    torch.manual_seed(1)  # the same seed on every rank: same random weights and orders
    views = bool(options.get("views"))
    balancer = mt.balance.get(name, TASKS, **{k: v for k, v in options.items() if k != "views"})
    params = [*encoder.parameters(), *heads.parameters(), *balancer.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1)
    rank, world = distributed.rank(), distributed.world_size()
    for step in range(STEPS):
        x, y = batch(step)
        x, y = x[rank::world], y[rank::world]
        z = encoder(x)
        inputs = [z.view_as(z) for _ in TASKS] if views else [z] * len(TASKS)
        outputs = [head(view).squeeze(-1) for head, view in zip(heads, inputs, strict=True)]
        losses = {t: ((outputs[i] - y[:, i]) ** 2).mean() for i, t in enumerate(TASKS)}
        optimizer.zero_grad()
        features = inputs if views else z
        result = balancer.backward(losses, shared=list(encoder.parameters()), features=features)
        distributed.average_gradients(result.unsynced(params))
        optimizer.step()
        balancer.end_epoch()  # DWA: every step is an "epoch" here, to exercise its statistics
    if rank == 0:
        state = {f"p{i}": p.detach().clone() for i, p in enumerate(params)}
        tag = name + "".join(f"-{k}={v}" for k, v in options.items())
        save_file(state, str(out / f"{tag}-world{world}.safetensors"))


def run_router(out: Path) -> None:
    """A top-k token router with loss-free balancing: its bias moves by the loads of the union
    batch, summed over the ranks after each optimizer step."""
    torch.manual_seed(0)
    router = TopKTokenRouter(5, 4, top_k=2, bias_update_rate=0.05, balance_weight=0, init_std=1)
    experts = nn.Linear(5, 4)
    params = [*router.parameters(), *experts.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1)
    rank, world = distributed.rank(), distributed.world_size()
    for step in range(STEPS):
        x, y = batch(step)
        x, y = x[rank::world], y[rank::world, 0]
        optimizer.zero_grad()
        ((router(x) * experts(x)).sum(-1) - y).pow(2).mean().backward()
        distributed.average_gradients(params)
        optimizer.step()
    if rank == 0:
        state = {f"p{i}": p.detach().clone() for i, p in enumerate(params)}
        state["bias"] = router.bias.clone()
        save_file(state, str(out / f"router-world{world}.safetensors"))


def main() -> None:
    out = Path(sys.argv[1])
    distributed.init_from_env()
    for name, options in METHODS:
        run(name, options, out)
    run_router(out)
    if distributed.rank() == 0:
        (out / f"done-world{distributed.world_size()}.json").write_text(json.dumps(METHODS))
    distributed.exit_process(0)


if __name__ == "__main__":
    main()
