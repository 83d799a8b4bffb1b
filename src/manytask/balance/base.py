"""The Balancer contract: one ``backward()`` that leaves ``.grad`` on every parameter.

A balancer combines the per-task losses of one step into parameter gradients, exactly where a
plain ``loss.backward()`` would put them, so any optimizer, scheduler, gradient clipping and AMP
scaler works unchanged::

    balancer = manytask.balance.get("upgrad", tasks=["left", "right"])
    losses = tasks.losses(model(x), targets)          # {name: scalar tensor}
    step = balancer.backward(losses, shared=model.shared_parameters())
    optimizer.step()

Methods are split by what they need (:class:`Need`), so the engine computes exactly that:

- ``LOSSES`` (:class:`LossWeighting`): loss values → weights ``w``; one backward of
  ``Σ wᵢ Lᵢ``. No per-task gradient is ever formed.
- ``GRAMIAN`` (:class:`GramianWeighting`): ``G = J Jᵀ`` → weights ``w``; the shared
  parameters get ``Jᵀ w``. In feature mode ``J`` holds the gradients with respect to the shared
  representation and the encoder gets one backward pass.
- ``GRADIENTS`` (:class:`JacobianAggregator`): the rows of ``J`` themselves → a direction ``d``
  (coordinate-wise rules, per-task gradient memories).
- ``FEATURE_GRADIENTS``: what a Gramian or Jacobian method needs when it runs in feature mode
  (``mode="features"``): the Trainer then passes the shared representation.

For every gradient-based method, task-specific parameters (heads) receive the plain gradient of
their own task's loss, collected during the per-task backward passes at no extra cost; only
the shared parameters (or the shared representation) receive the balanced direction.

A balancer is an ``nn.Module``: learnable weights are parameters that the optimizer must
receive (``balancer.parameters()``), and all state (loss history, gradient memories, random
generators) is in ``state_dict()`` so that a resumed run continues identically.

Options common to every method (set through :func:`manytask.balance.get` or
:meth:`Balancer.configure`):

- ``loss_transform="log"`` balances ``log Lᵢ`` instead of ``Lᵢ`` (scale invariance; composable
  with any method);
- ``mode="features"`` runs a gradient-based method on the shared representation;
- ``update_every=N`` recomputes the weights of a Gramian method every N steps and reuses them
  (one backward of ``Σ wᵢ Lᵢ``) in between.

Under ``torch.distributed`` a balancer reduces what its method needs (loss values, ``J`` or the
feature Gramian), so every rank computes the same weights or direction; call
:func:`manytask.distributed.average_gradients` on ``step.unsynced(params)`` afterwards (the
Trainer does).
"""

from __future__ import annotations

import abc
import enum
import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from manytask import distributed
from manytask.balance import engine
from manytask.errors import ConfigError

Mode = Literal["parameters", "features"]
LossTransform = Literal["none", "log"]


class Need(str, enum.Enum):
    """What a balancing method needs the engine to compute at each step."""

    LOSSES = "losses"
    GRADIENTS = "gradients"
    GRAMIAN = "gramian"
    FEATURE_GRADIENTS = "feature_gradients"


@dataclass(frozen=True)
class BalanceStep:
    """What one ``backward()`` produced.

    Tensors stay on the device and detached; reading them (``float(...)``) is the caller's
    choice of when to synchronise. ``weights`` is None for aggregators that produce a direction
    rather than task weights; ``gramian`` is the ``(T, T)`` Gramian of the methods that formed
    one anyway, and ``grad_norms`` and ``cosines`` are computed from it on first reading (six
    small operations a step that a loop which never reads them does not pay). ``synced`` holds
    the parameters whose gradient is already identical on every rank (the shared ones, for
    parameter-mode gradient methods).
    """

    weights: Tensor | None
    gramian: Tensor | None = None
    synced: tuple[nn.Parameter, ...] = ()

    @functools.cached_property
    def grad_norms(self) -> Tensor | None:
        """Per-task gradient norms ``√Gᵢᵢ``, or None without a Gramian."""
        return None if self.gramian is None else gramian_statistics(self.gramian)[0]

    @functools.cached_property
    def cosines(self) -> Tensor | None:
        """Pairwise gradient cosines ``Gᵢⱼ / (‖gᵢ‖‖gⱼ‖)``, or None without a Gramian."""
        return None if self.gramian is None else gramian_statistics(self.gramian)[1]

    def unsynced(self, parameters: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        """The parameters whose gradients still need averaging across ranks."""
        done = {id(p) for p in self.synced}
        return [p for p in parameters if id(p) not in done]


def present_tasks(values: Tensor) -> Tensor:
    """Which tasks have rows in the batch. A task absent from it (a mixed-task batch, or no
    label for it) has a loss of exactly zero that still carries a graph; the methods whose rules
    would read that zero as a real value leave such a task out of the step."""
    return values != 0


def gramian_statistics(gramian: Tensor) -> tuple[Tensor, Tensor]:
    """Per-task gradient norms and pairwise cosines from a Gramian (no host sync)."""
    norms = gramian.diagonal().clamp_min(0).sqrt()
    cosines = gramian / (norms[:, None] * norms[None, :]).clamp_min(1e-12)
    return norms, cosines


def _scale_of(scaler: Any, device: torch.device) -> Tensor | None:
    """The current loss scale of an AMP ``GradScaler`` as a device tensor (no host sync)."""
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return None
    scaled: Tensor = scaler.scale(torch.ones((), device=device))
    return scaled


class Balancer(nn.Module, abc.ABC):
    """Base class of every balancing method.

    Args:
        tasks: the task names, in the order in which weights are reported.
    """

    #: True when the distributed update equals the single-process one on the union batch.
    exact_distributed: ClassVar[bool] = True

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        names = list(tasks)
        if not names:
            raise ConfigError(f"{type(self).__name__} needs at least one task name")
        if len(set(names)) != len(names):
            raise ConfigError(f"{type(self).__name__}: task names must be unique, got {names}")
        self.tasks: tuple[str, ...] = tuple(names)
        self.loss_transform: LossTransform = "none"
        #: ε of the log transform, ``log(Lᵢ + ε)``: 0 except for a method whose rule adds one
        self.log_eps = 0.0

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def needs(self) -> Need:
        """What the engine computes for this method at each step."""
        return Need.LOSSES

    def configure(self, loss_transform: LossTransform = "none") -> Balancer:
        """Set the options common to every method (see the module docstring)."""
        if loss_transform not in ("none", "log"):
            raise ConfigError(f"loss_transform must be 'none' or 'log', got '{loss_transform}'")
        self.loss_transform = loss_transform
        return self

    def prepare(self, losses: Mapping[str, Tensor]) -> tuple[list[Tensor], Tensor]:
        """Check the losses; return them in task order, and their values for the method.

        The values are detached float32 losses averaged over ranks (the union batch's
        losses). With ``loss_transform="log"`` the method sees ``log L̄ᵢ``, and each loss
        becomes ``log L̄ᵢ + (Lᵢ − L̄ᵢ) / L̄ᵢ`` with ``L̄ᵢ`` detached: in one process its value and
        gradient are those of ``log Lᵢ``; under ``torch.distributed`` the ranks' values and
        gradients average to exactly the union batch's ``log L̄ᵢ`` and ``∇ log L̄ᵢ`` (a plain
        ``log Lᵢ,r`` on each rank would not). A method with a positive :attr:`log_eps` takes
        ``log(L̄ᵢ + ε)`` instead, with ``L̄ᵢ + ε`` in the denominator. A loss of exactly zero
        (a task absent from the batch) is left as it is, and the method sees 0 for it.
        """
        missing = [t for t in self.tasks if t not in losses]
        extra = [t for t in losses if t not in self.tasks]
        if missing or extra:
            raise ConfigError(
                f"{type(self).__name__} was built for tasks {list(self.tasks)}; "
                f"losses are missing {missing} and have unexpected {extra}"
            )
        items = []
        for name in self.tasks:
            loss = losses[name]
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else ""
                raise ConfigError(
                    f"the loss of task '{name}' must be a scalar tensor, got "
                    f"{type(loss).__name__}{shape}"
                )
            if not loss.requires_grad:
                raise ConfigError(
                    f"the loss of task '{name}' does not require grad: it was computed under "
                    "torch.no_grad() or from detached outputs, so backward() cannot train on it"
                )
            items.append(loss.reshape(()))
        values = torch.stack([loss.detach().float() for loss in items])
        distributed.all_reduce_mean_(values)
        if self.loss_transform == "log":
            # a loss of exactly 0 is a task absent from the batch: it stays the zero it is (its
            # log would be −∞ and its gradient NaN), and the method sees 0 for it, as without
            # the transform
            present = present_tasks(values)
            shifted = torch.where(present, values + self.log_eps, 1.0)
            logs = torch.where(present, torch.log(shifted), 0.0)
            items = [
                logs[i].to(loss.dtype)
                + (loss - values[i].to(loss.dtype)) / shifted[i].to(loss.dtype)
                for i, loss in enumerate(items)
            ]
            values = logs
        return items, values

    @abc.abstractmethod
    def backward(
        self,
        losses: Mapping[str, Tensor],
        shared: Iterable[nn.Parameter] | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
        scaler: Any = None,
    ) -> BalanceStep:
        """Combine the task losses and leave gradients on the parameters.

        Args:
            losses: one scalar loss per task name (unscaled).
            shared: the shared parameters (needed by parameter-mode gradient methods).
            features: the shared representation(s) (needed in feature mode).
            scaler: a ``torch.amp.GradScaler`` under mixed precision; the balancer scales the
                backward passes itself and computes weights from unscaled values.
        """

    def end_epoch(self) -> None:
        """Called by the Trainer after each training epoch; methods with epoch statistics
        (DWA) use it. In a custom loop, call it at the end of each epoch."""

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}"


class LossWeighting(Balancer):
    """A method that weights the task losses: the update is ``∇ (Σᵢ wᵢ Lᵢ + r)``.

    Subclasses implement :meth:`weights` (the ``(T,)`` detached loss values of the step, averaged
    over ranks → ``(T,)`` weights; the result may depend on learnable parameters) and may add a
    regulariser ``r`` (:meth:`regularizer`). Shared and task-specific parameters both receive the
    weighted gradient.
    """

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
        scaler: Any = None,
    ) -> BalanceStep:
        items, values = self.prepare(losses)
        stacked = torch.stack(items)
        weights = self.weights(values)
        total = (weights.to(stacked.dtype) * stacked).sum()
        reg = self.regularizer()
        if reg is not None:
            total = total + reg
        scale = _scale_of(scaler, stacked.device)
        (total if scale is None else total * scale).backward()
        return BalanceStep(weights=weights.detach())


class _GradientMethod(Balancer):
    """Shared machinery of the methods that look at per-task gradients.

    The class attributes declare the properties a method promises; the shared property tests
    (``tests/test_balance_properties.py``) check every registered method against them.
    """

    #: the direction does not depend on the order of the tasks
    permutation_invariant: ClassVar[bool] = False
    #: ``J d ≥ 0``: the direction never increases any task's loss to first order
    non_conflicting: ClassVar[bool] = False
    #: ``A(c J) = c A(J)`` for every ``c > 0``
    homogeneous: ClassVar[bool] = False

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.mode: Mode = "parameters"
        self._rows = engine.RowBuffer()  # the per-task gradients' memory, reused every step
        # whether the heads begin with linear maps (feature mode's factored rows)
        self._heads = engine.LinearHeads()

    @abc.abstractmethod
    def direction(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        """The method's rule: ``(T, P)`` per-task gradients and ``(T,)`` loss values → the
        ``(P,)`` direction. Stateful methods update their state."""

    @property
    def needs(self) -> Need:
        return Need.FEATURE_GRADIENTS if self.mode == "features" else self._parameter_need

    _parameter_need: ClassVar[Need] = Need.GRADIENTS

    def configure(
        self, loss_transform: LossTransform = "none", mode: Mode = "parameters"
    ) -> Balancer:
        super().configure(loss_transform)
        if mode not in ("parameters", "features"):
            raise ConfigError(f"mode must be 'parameters' or 'features', got '{mode}'")
        self.mode = mode
        return self

    #: the method reads its rows as linear-head factors
    #: (:class:`~manytask.balance.engine.LinearHeadRows`) in feature mode: the Gramian methods,
    #: which need only ``J Jᵀ`` and ``Jᵀw``, and GradDrop, whose sums factor too. The others
    #: read the rows themselves, which the factors give only where the engine's split pass
    #: spares the heads' products into ``Z``
    _reads_factors: ClassVar[bool] = False

    @abc.abstractmethod
    def _combine(self, jacobian: engine.FeatureRows, losses: Tensor) -> tuple[Tensor, BalanceStep]:
        """The direction for an unscaled Jacobian and the step record (without ``synced``)."""

    def _preempt(self, items: list[Tensor], scale: Tensor | None) -> BalanceStep | None:
        """A step that skips the per-task gradients (``update_every``), or None."""
        return None

    def backward(
        self,
        losses: Mapping[str, Tensor],
        shared: Iterable[nn.Parameter] | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
        scaler: Any = None,
    ) -> BalanceStep:
        items, values = self.prepare(losses)  # a collective: before any hook runs
        scale = _scale_of(scaler, items[0].device)
        early = self._preempt(items, scale)
        if early is not None:
            return early
        record: list[BalanceStep] = []

        def combine(jacobian: engine.FeatureRows) -> Tensor:
            if scale is not None:
                jacobian = engine.rows_unscaled(jacobian, scale)
            direction, step = self._combine(jacobian, values)
            record.append(step)
            return direction if scale is None else direction * scale

        scaled = items if scale is None else [loss * scale for loss in items]
        synced: tuple[nn.Parameter, ...] = ()
        if self.mode == "features":
            feats = engine.as_feature_list(features)
            if engine.are_task_views(feats, len(items)):
                engine.one_pass_feature_backward(
                    scaled, feats, combine, self._rows, self._heads, not self._reads_factors
                )
            else:
                direction = combine(engine.feature_jacobian(scaled, feats))
                engine.backward_through_features(torch.stack(scaled).sum(), feats, direction)
        else:
            params = list(shared) if shared is not None else []
            stash = engine.stash_gradients(params)
            jacobian = engine.shared_jacobian(scaled, params, self._rows)
            distributed.all_reduce_mean_(jacobian)
            engine.set_shared_gradients(params, combine(jacobian), stash)
            synced = tuple(params)
        step = record[0]
        return BalanceStep(step.weights, step.gramian, synced=synced)


class GramianWeighting(_GradientMethod):
    """A method whose direction is ``Jᵀ w`` with ``w`` a function of the Gramian ``G = J Jᵀ``
    (and, for some methods, of the loss values).

    Subclasses implement :meth:`weights`. In parameter mode ``J`` is averaged over ranks before
    ``G`` is formed, so the weights are those of the union batch. In feature mode the per-sample
    Gramian of each rank is summed over ranks (divided by the squared number of ranks, since the
    union loss is the mean of the ranks' losses), which is again exact.
    """

    _parameter_need: ClassVar[Need] = Need.GRAMIAN
    _reads_factors = True

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.update_every = 1
        self._steps = 0
        self.register_buffer("last_weights", torch.ones(self.num_tasks))

    last_weights: Tensor

    def configure(
        self,
        loss_transform: LossTransform = "none",
        mode: Mode = "parameters",
        update_every: int = 1,
    ) -> Balancer:
        super().configure(loss_transform, mode)
        if update_every < 1:
            raise ConfigError(f"update_every must be ≥ 1, got {update_every}")
        self.update_every = update_every
        return self

    @abc.abstractmethod
    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """``(T,)`` weights from the ``(T, T)`` Gramian and the ``(T,)`` loss values."""

    def direction(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        return self.weights(engine.gramian(jacobian), losses).to(jacobian.dtype) @ jacobian

    def _preempt(self, items: list[Tensor], scale: Tensor | None) -> BalanceStep | None:
        reuse = self._steps % self.update_every != 0
        self._steps += 1
        if not reuse:
            return None
        # between updates: one backward of Σ wᵢ Lᵢ with the last weights
        total = (self.last_weights.to(items[0].dtype) * torch.stack(items)).sum()
        (total if scale is None else total * scale).backward()
        return BalanceStep(weights=self.last_weights.detach().clone())

    def _combine(self, jacobian: engine.FeatureRows, losses: Tensor) -> tuple[Tensor, BalanceStep]:
        gramian = engine.rows_gramian(jacobian)
        if self.mode == "features" and distributed.world_size() > 1:
            gramian = distributed.all_reduce_sum_(gramian) / distributed.world_size() ** 2
        weights = self.weights(gramian, losses).to(gramian.dtype)
        self.last_weights.copy_(weights.detach())
        # reported in float32 like the reused weights, whatever the Jacobian's dtype
        step = BalanceStep(weights=weights.detach().float(), gramian=gramian.detach())
        return engine.rows_weighted_sum(jacobian, weights), step

    def get_extra_state(self) -> Any:
        return {"steps": self._steps}

    def set_extra_state(self, state: Any) -> None:
        self._steps = int(state["steps"])


class JacobianAggregator(_GradientMethod):
    """A method that maps the rows of ``J`` (per-task gradients) to a direction ``d``.

    Subclasses implement :meth:`aggregate`. In parameter mode ``J`` is averaged over ranks
    first, so the direction is that of the union batch. In feature mode the rows would have to
    be gathered from every rank; these methods refuse feature mode under ``torch.distributed``.
    """

    _parameter_need: ClassVar[Need] = Need.GRADIENTS

    @abc.abstractmethod
    def aggregate(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        """The ``(P,)`` direction from the ``(T, P)`` Jacobian and the ``(T,)`` loss values."""

    def direction(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        return self.aggregate(jacobian, losses)

    def _preempt(self, items: list[Tensor], scale: Tensor | None) -> BalanceStep | None:
        if self.mode == "features" and distributed.world_size() > 1:
            raise ConfigError(
                f"{type(self).__name__} aggregates per-sample feature gradients, which differ "
                "between ranks; under torch.distributed use mode='parameters'"
            )
        return None

    def _combine(self, jacobian: engine.FeatureRows, losses: Tensor) -> tuple[Tensor, BalanceStep]:
        # factors come where the engine's split pass spares the heads' products into Z
        rows = jacobian.dense() if isinstance(jacobian, engine.LinearHeadRows) else jacobian
        return self.direction(rows, losses), BalanceStep(weights=None)
