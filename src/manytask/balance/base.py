"""The Balancer contract: one ``backward()`` that leaves ``.grad`` on every parameter.

A balancer combines the per-task losses of one step into parameter gradients, exactly where a
plain ``loss.backward()`` would put them, so any optimizer, scheduler, gradient clipping and AMP
scaler works unchanged::

    balancer = manytask.balance.get("uw", tasks=["left", "right"])
    losses = tasks.losses(model(x), targets)          # {name: scalar tensor}
    step = balancer.backward(losses, shared=model.shared_parameters())
    optimizer.step()

Methods are split by what they need (:class:`Need`), so the engine computes exactly that:

- ``LOSSES``: the method maps loss values to weights ``w`` and back-propagates ``Σ wᵢ Lᵢ``
  once (:class:`LossWeighting`). No per-task gradient is ever formed.
- ``GRADIENTS``: per-task gradients of the shared parameters, stacked as rows of ``J``.
- ``GRAMIAN``: only ``G = J Jᵀ``; the update ``Jᵀ w`` is then one backward of ``Σ wᵢ Lᵢ``.
- ``FEATURE_GRADIENTS``: per-task gradients with respect to the shared representation, followed
  by one backward through the encoder.

A balancer is an ``nn.Module``: learnable weights (uncertainty weighting) are parameters that
the optimizer must receive (``balancer.parameters()``), and all state (loss history, random
generator) is in ``state_dict()`` so that a resumed run continues identically.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from manytask.errors import ConfigError


class Need(str, enum.Enum):
    """What a balancing method needs the engine to compute at each step."""

    LOSSES = "losses"
    GRADIENTS = "gradients"
    GRAMIAN = "gramian"
    FEATURE_GRADIENTS = "feature_gradients"


@dataclass(frozen=True)
class BalanceStep:
    """What one ``backward()`` produced, for logging.

    Tensors stay on the device and detached; reading them (``float(...)``) is the caller's
    choice of when to synchronise. ``grad_norms`` and ``cosines`` are filled only by methods
    that computed per-task gradients anyway.
    """

    weights: Tensor
    grad_norms: Tensor | None = None
    cosines: Tensor | None = None


class Balancer(nn.Module, abc.ABC):
    """Base class of every balancing method.

    Args:
        tasks: the task names, in the order in which weights are reported.
    """

    needs: ClassVar[Need]

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        names = list(tasks)
        if not names:
            raise ConfigError(f"{type(self).__name__} needs at least one task name")
        if len(set(names)) != len(names):
            raise ConfigError(f"{type(self).__name__}: task names must be unique, got {names}")
        self.tasks: tuple[str, ...] = tuple(names)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def stack_losses(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The losses as a ``(T,)`` tensor in task order, after checking names and shapes."""
        missing = [t for t in self.tasks if t not in losses]
        extra = [t for t in losses if t not in self.tasks]
        if missing or extra:
            raise ConfigError(
                f"{type(self).__name__} was built for tasks {list(self.tasks)}; "
                f"losses are missing {missing} and have unexpected {extra}"
            )
        values = []
        for name in self.tasks:
            loss = losses[name]
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ConfigError(
                    f"the loss of task '{name}' must be a scalar tensor, got "
                    f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, Tensor) else ''}"
                )
            if not loss.requires_grad:
                raise ConfigError(
                    f"the loss of task '{name}' does not require grad: it was computed under "
                    "torch.no_grad() or from detached outputs, so backward() cannot train on it"
                )
            values.append(loss.reshape(()))
        return torch.stack(values)

    @abc.abstractmethod
    def backward(
        self,
        losses: Mapping[str, Tensor],
        shared: Iterable[nn.Parameter] | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
    ) -> BalanceStep:
        """Combine the task losses and leave gradients on the parameters.

        Args:
            losses: one scalar loss per task name.
            shared: the shared parameters (needed by gradient-based methods).
            features: the shared representation(s) (needed by representation-level methods).
        """
        ...

    def end_epoch(self) -> None:
        """Called by the Trainer after each training epoch; methods with epoch statistics
        (DWA) use it. In a custom loop, call it at the end of each epoch."""

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}"


class LossWeighting(Balancer):
    """A method that weights the task losses: the update is ``∇ (Σᵢ wᵢ Lᵢ + r)``.

    Subclasses implement :meth:`weights` (``(T,)`` loss values → ``(T,)`` weights; the result may
    depend on learnable parameters) and may add a regulariser ``r`` (:meth:`regularizer`).
    Shared and task-specific parameters both receive the weighted gradient.
    """

    needs: ClassVar[Need] = Need.LOSSES

    @abc.abstractmethod
    def weights(self, losses: Tensor) -> Tensor:
        """The ``(T,)`` weights for the ``(T,)`` loss values of this step."""

    def regularizer(self) -> Tensor | None:
        return None

    def backward(
        self,
        losses: Mapping[str, Tensor],
        shared: Iterable[nn.Parameter] | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
    ) -> BalanceStep:
        stacked = self.stack_losses(losses)
        weights = self.weights(stacked)
        total = (weights * stacked).sum()
        reg = self.regularizer()
        if reg is not None:
            total = total + reg
        total.backward()  # type: ignore[no-untyped-call]
        return BalanceStep(weights=weights.detach())
