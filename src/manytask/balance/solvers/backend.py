"""numpy or torch: where the solvers' small loops run.

On a CPU a numpy operation on a vector of a few dozen entries costs a fraction of a torch
operation's dispatch, and the solvers' loops are dozens of such operations; on accelerators the
loops stay in torch, on the device. The solvers written for both take the namespace of their
input.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def namespace(x: Any) -> Any:
    """``numpy`` for numpy arrays, ``torch`` for tensors."""
    return np if isinstance(x, np.ndarray) else torch


def on_host(*tensors: torch.Tensor) -> bool:
    """Whether every tensor is on the CPU: where a rule's arithmetic on ``T`` numbers may run
    in Python floats (with few tasks, even numpy's calls cost more than the arithmetic)."""
    return all(x.device.type == "cpu" for x in tensors)


def working(tensor: Any) -> Any:
    """``tensor`` detached in float64: a numpy array on a CPU (where the rules' few dozen
    operations on ``T × T`` numbers cost a fraction of torch's), a tensor on other devices."""
    x = tensor.detach().double()
    return x.numpy() if x.device.type == "cpu" else x


def identity_like(a: Any) -> Any:
    """The identity of the square matrix ``a``'s size, of its kind, dtype and device."""
    if isinstance(a, np.ndarray):
        return np.eye(a.shape[0], dtype=a.dtype)
    return torch.eye(a.shape[0], dtype=a.dtype, device=a.device)


def concatenate(parts: list[Any], axis: int = 0) -> Any:
    """``parts`` (numpy arrays, or tensors) joined along ``axis``."""
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=axis)
    return torch.cat(parts, dim=axis)
