"""Run peer libraries' implementations on the same inputs, for comparison tests.

Peers are optional (``make test`` installs them with ``--no-deps``): a test that needs one
calls :func:`require` and is skipped, saying why, when the peer is absent.

Every comparison feeds an arbitrary Jacobian ``J`` through linear losses
``Lᵢ = ⟨Jᵢ, W⟩ + cᵢ`` at ``W = 0``: the gradient of task ``i`` with respect to the shared
parameter ``W`` is exactly ``Jᵢ`` and its loss value is ``cᵢ``, so both libraries see the same
gradients and losses, and the resulting ``W.grad`` is each library's direction.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import manytask as mt


def require(module: str) -> Any:
    """Import a peer module or skip the test with the reason."""
    if module == "LibMTL":
        _stub_torchvision()
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.skip(f"peer '{module}' is not installed ({exc}); `make test` installs it")


def _stub_torchvision() -> None:
    """LibMTL's package ``__init__`` imports its ResNet, which imports torchvision; its
    weighting methods need neither. Torchvision cannot be installed beside the CPU torch build,
    so a stub stands in for the one function that import asks for."""
    if "torchvision" in sys.modules:
        return
    try:
        importlib.import_module("torchvision")
        return
    except Exception:  # absent or broken: either way, stub it
        pass
    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    utils = types.ModuleType("torchvision.models.utils")
    utils.load_state_dict_from_url = lambda *a, **k: None  # type: ignore[attr-defined]
    tv.models = models  # type: ignore[attr-defined]
    models.utils = utils  # type: ignore[attr-defined]
    sys.modules.update(
        {"torchvision": tv, "torchvision.models": models, "torchvision.models.utils": utils}
    )


def linear_losses(jacobian: Tensor, values: Tensor) -> tuple[nn.Parameter, list[Tensor]]:
    """A shared parameter ``W = 0`` and losses whose gradients are the rows of ``jacobian``."""
    w = nn.Parameter(torch.zeros(jacobian.shape[1], dtype=jacobian.dtype))
    losses = [(jacobian[i] * w).sum() + values[i] for i in range(jacobian.shape[0])]
    return w, losses


def manytask_direction(name: str, jacobian: Tensor, values: Tensor, **params: Any) -> Tensor:
    """manytask's direction for ``jacobian`` through the full ``backward()`` path."""
    tasks = [f"t{i}" for i in range(jacobian.shape[0])]
    return manytask_step(mt.balance.get(name, tasks, **params), jacobian, values)


def manytask_step(balancer: Any, jacobian: Tensor, values: Tensor) -> Tensor:
    """The direction of one ``backward()`` of ``balancer`` (tasks ``t0, t1, …``) on ``J``."""
    w, losses = linear_losses(jacobian, values)
    balancer.backward({f"t{i}": loss for i, loss in enumerate(losses)}, shared=[w])
    assert w.grad is not None
    return w.grad.detach().clone()


def libmtl_weighting(method: str, tasks: int, size: int) -> Any:
    """An instance of LibMTL's weighting class ``method`` (e.g. ``"MGDA"``) for ``tasks`` tasks
    sharing one parameter ``W`` of ``size`` zeros, set up as LibMTL's trainer sets it up (epoch
    0; a caller may set ``epoch`` and ``train_loss_buffer``, as the trainer does between
    epochs). :func:`libmtl_step` runs it."""
    require("LibMTL")
    module = importlib.import_module(f"LibMTL.weighting.{method}")
    cls = getattr(module, method)

    class Harness(cls):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.task_num = tasks
            self.task_name = [f"t{i}" for i in range(tasks)]
            self.device = torch.device("cpu")
            self.rep_grad = False
            self.epoch = 0
            self.W = nn.Parameter(torch.zeros(size))

        def get_share_params(self) -> Any:
            return [self.W]

        def zero_grad_share_params(self) -> None:
            if self.W.grad is not None:
                self.W.grad.zero_()

    harness = Harness()
    harness.init_param()
    return harness


def libmtl_step(harness: Any, jacobian: Tensor, values: Tensor, **kwargs: Any) -> Tensor:
    """The direction of one ``backward`` of a :func:`libmtl_weighting` instance on ``J``."""
    w = harness.W
    w.grad = None
    losses = [(jacobian[i].float() * w).sum() + values[i].float() for i in range(len(jacobian))]
    harness.backward(torch.stack(losses), **kwargs)
    assert w.grad is not None
    return w.grad.detach().clone()


def libmtl_direction(method: str, jacobian: Tensor, values: Tensor, **kwargs: Any) -> Tensor:
    """LibMTL's direction: its weighting class ``method`` (e.g. ``"MGDA"``) on the same input."""
    harness = libmtl_weighting(method, *jacobian.shape)
    return libmtl_step(harness, jacobian, values, **kwargs)


def torchjd_direction(aggregator: Any, jacobian: Tensor) -> Tensor:
    """torchjd's direction: ``aggregator`` (an instance from ``torchjd.aggregation``) on ``J``."""
    return aggregator(jacobian).detach().clone()
