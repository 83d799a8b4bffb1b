"""Collectives for ``torch.distributed`` that are no-ops in a single process.

manytask does not wrap models in ``DistributedDataParallel``: a balancer reduces exactly what
its method needs (loss values, the Jacobian, the Gramian), and :func:`average_gradients` then
averages the gradients nobody has reduced yet (task heads, and every parameter under
loss-weighting methods). Every rank therefore applies the same update, equal to the one a single
process would compute on the union of the ranks' batches when each rank holds the same number of
labelled samples per task (the loss of the union batch is then the mean of the ranks' losses).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn


def init_from_env() -> bool:
    """Join the process group described by ``torchrun``'s environment, if any.

    Uses NCCL when CUDA is available and gloo otherwise. Returns True when distributed.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def shutdown() -> None:
    """Leave the process group, after every rank has reached this point.

    A process that exits while still in a gloo group can abort on the way out ("terminate
    called without an active exception") as the group's threads are torn down.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int = 0) -> NoReturn:
    """End this process with status ``code``; under a process group, leave it first.

    With gloo, torch 2.13's C++ teardown at interpreter exit intermittently aborts (SIGABRT,
    "terminate called without an active exception", about one run in ten with two ranks on
    CPU) even after :func:`shutdown`: a worker thread is still joinable when the static
    destructors run. A rank that has left the group has nothing left to release, so after
    flushing its output it exits without running them (``os._exit``). Outside a distributed
    run this is ``sys.exit(code)``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def all_reduce_mean_(tensor: Tensor) -> Tensor:
    """Average ``tensor`` over ranks in place (returns it)."""
    size = world_size()
    if size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(size)
    return tensor


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks in place (returns it)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Average the ``.grad`` of ``parameters`` over ranks with one collective.

    A parameter without a gradient on some ranks counts as a zero gradient there; one without a
    gradient on every rank keeps ``grad = None``, as in a single process.
    """
    size = world_size()
    if size == 1:
        return
    params = list(parameters)
    if not params:
        return
    pieces = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32)
        for p in params
    ]
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=pieces[0].device)
    flat = torch.cat([*pieces, has_grad])
    all_reduce_sum_(flat)
    flat.div_(size)
    used = (flat[-len(params) :] > 0).tolist()  # one read, after the collective
    offset = 0
    for index, p in enumerate(params):
        n = p.numel()
        if used[index]:
            chunk = flat[offset : offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)
        offset += n


def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=src)
