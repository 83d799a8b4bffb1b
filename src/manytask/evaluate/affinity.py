r"""Task affinity: lookahead inter-task affinity (TAG) and gradient cosines, per batch and averaged.

**Lookahead affinity** (Fifty et al., "Efficiently Identifying Task Groupings for Multi-Task
Learning", NeurIPS 2021, arXiv 2109.04617, eq. 1–2). On one batch, take a plain SGD step of the
shared parameters :math:`\theta_s` along task :math:`i`'s gradient alone and see how task
:math:`j`'s loss changes:

.. math::

    \theta'_{s|i} = \theta_s - \eta \, \nabla_{\theta_s} L_i(\theta), \qquad
    Z_{i \to j} = 1 - \frac{L_j(\theta'_{s|i}, \theta_j)}{L_j(\theta_s, \theta_j)}

Task-specific parameters stay where they are. :math:`Z_{i \to j} > 0`: a step for task
:math:`i` lowers task :math:`j`'s loss (positive transfer); :math:`Z_{i \to j} < 0`: it raises it.
To first order :math:`Z_{i\to j} \approx \eta\, g_i \cdot g_j / L_j`, so for gradients of given
norms the affinity is largest when they point the same way. The paper averages :math:`Z^t` over
the training steps at which it is measured; :class:`AffinityAccumulator` does that. The step size
:math:`\eta` is the caller's; the training monitor uses the optimizer's current learning rate, as
the paper's SGD form suggests (for Adam-type optimizers that is a different, plain gradient step
than the one the optimizer takes; the paper states the SGD form).

**Gradient cosines**: :math:`\cos(g_i, g_j)` of the per-task gradients of the shared
parameters (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, arXiv
2001.06782, call a pair with :math:`\cos < 0` *conflicting*); the accumulator counts how often
each pair conflicts.

Cost of one measurement with :math:`K` tasks: one forward pass, :math:`K` backward passes (one
per task, ``torch.autograd.grad`` on the shared parameters) and, for the lookahead, :math:`K`
more forward passes; the cosines alone need only the forward and the :math:`K` backward passes.

Side effects: none. The forward passes run in the model's current mode (in the Trainer that is
training mode: dropout, batch statistics), with the global random stream reset to the same state
before each of them, so dropout draws the same masks at :math:`\theta` and at every lookahead
point and the ratio measures the parameter change alone; afterwards the parameters, the buffers
(e.g. BatchNorm running statistics) and the CPU and CUDA random generators are restored exactly
and no ``.grad`` is touched, so a training run continues bit for bit as it would without the
measurement.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from manytask.errors import ConfigError
from manytask.task import TaskSet

Matrix = list[list[float]]


@dataclass(frozen=True)
class AffinityMeasurement:
    """One batch's measurement; tensors are detached and on the model's device.

    Attributes:
        tasks: task names, the order of every axis.
        losses: ``(K,)`` task losses :math:`L_j(\\theta)` at the current parameters.
        lookahead_losses: ``(K, K)``, ``[i, j]`` = :math:`L_j(\\theta'_{s|i})` (None when not
            measured).
        lookahead: ``(K, K)``, ``[i, j]`` = :math:`Z_{i \\to j}`; NaN where :math:`L_j(\\theta)`
            is zero (e.g. a task with no label in the batch).
        cosine: ``(K, K)`` cosines of the per-task shared gradients (0 where a gradient is zero).
    """

    tasks: tuple[str, ...]
    losses: Tensor
    lookahead_losses: Tensor | None
    lookahead: Tensor | None
    cosine: Tensor | None


def task_jacobian(losses: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """``(K, P)`` per-task gradients of ``params``, flattened and concatenated in parameter order.

    One ``torch.autograd.grad`` per loss (the graph is kept until the last); a parameter a loss
    does not reach gets a zero gradient. ``.grad`` of the parameters is left untouched.
    """
    if not params:
        raise ConfigError("task affinity needs at least one shared parameter; the model has none")
    dtype = functools.reduce(torch.promote_types, (p.dtype for p in params))
    sizes = [p.numel() for p in params]
    jacobian = torch.zeros(len(losses), sum(sizes), dtype=dtype, device=params[0].device)
    for k, loss in enumerate(losses):
        if not loss.requires_grad:
            continue  # a loss that does not depend on any parameter: zero gradient
        grads = torch.autograd.grad(
            loss, list(params), retain_graph=k < len(losses) - 1, allow_unused=True
        )
        rows = [v.view_as(p) for v, p in zip(jacobian[k].split(sizes), params, strict=True)]
        present = [(row, g) for row, g in zip(rows, grads, strict=True) if g is not None]
        if present:
            torch._foreach_copy_([r for r, _ in present], [g for _, g in present])
    return jacobian


def cosine_matrix(jacobian: Tensor) -> Tensor:
    """``(K, K)`` cosines of the rows of ``jacobian`` from its Gramian ``J Jᵀ``; a zero row has
    cosine 0 with every row (itself included)."""
    gramian = jacobian @ jacobian.T
    norms = gramian.diagonal().clamp_min(0).sqrt()
    denominator = norms[:, None] * norms[None, :]
    tiny = torch.finfo(gramian.dtype).tiny
    return torch.where(denominator > tiny, gramian / denominator.clamp_min(tiny), 0.0)


def lookahead_ratio(losses: Tensor, lookahead_losses: Tensor) -> Tensor:
    """:math:`Z_{i\\to j} = 1 - L'_{ij} / L_j` in float64; NaN where :math:`L_j` or
    :math:`L_i` is zero or not finite (a task absent from the batch neither receives nor gives:
    its zero gradient would move nothing, and a 0 would be averaged in as a measurement)."""
    losses, lookahead_losses = losses.double(), lookahead_losses.double()
    valid = torch.isfinite(losses) & (losses != 0)
    safe = torch.where(valid, losses, torch.ones_like(losses))
    ratio = 1.0 - lookahead_losses / safe[None, :]
    both = valid[:, None] & valid[None, :]
    return torch.where(both, ratio, torch.full_like(ratio, math.nan))


@contextlib.contextmanager
def isolated_forward(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Run forward passes without side effects; yields ``replay()``, which resets the random
    generators to their state on entry (call it before each forward pass).

    On exit the buffers and the CPU and CUDA generators are as they were on entry.
    """
    buffers = [b for b in model.buffers()]
    saved = [b.detach().clone() for b in buffers]
    devices = sorted(
        {t.device.index or 0 for t in (*model.parameters(), *buffers) if t.device.type == "cuda"}
    )
    with torch.random.fork_rng(devices=devices):
        cpu_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in devices]

        def replay() -> None:
            torch.set_rng_state(cpu_state)
            for device, state in zip(devices, cuda_states, strict=True):
                torch.cuda.set_rng_state(state, device)

        try:
            yield replay
        finally:
            if buffers:
                with torch.no_grad():
                    torch._foreach_copy_(buffers, saved)


def _loss_vector(
    model: nn.Module, tasks: TaskSet, inputs: Any, targets: Mapping[str, Tensor]
) -> list[Tensor]:
    outputs = model(inputs)
    return [loss.reshape(()) for loss in tasks.losses(outputs, targets).values()]


def measure_affinity(
    model: nn.Module,
    tasks: TaskSet,
    inputs: Any,
    targets: Mapping[str, Tensor],
    lr: float,
    *,
    params: Sequence[nn.Parameter] | None = None,
    lookahead: bool = True,
    cosine: bool = True,
) -> AffinityMeasurement:
    """Lookahead affinity and/or gradient cosines of ``tasks`` on one batch.

    Args:
        model: returns ``dict[task, output]`` for ``inputs``.
        tasks: the tasks; ``tasks.losses`` gives the losses (with each task's static weight).
        inputs, targets: one batch (on the model's device).
        lr: the SGD step size :math:`\\eta` of the lookahead step (> 0).
        params: the shared parameters :math:`\\theta_s` (default ``model.shared_parameters()``).
        lookahead, cosine: what to measure.
    """
    if not (lookahead or cosine):
        raise ConfigError("measure_affinity needs lookahead=True or cosine=True (or both)")
    if lookahead and not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"the lookahead step size must be a positive number, got {lr}")
    if params is None:
        shared = getattr(model, "shared_parameters", None)
        if not callable(shared):
            raise ConfigError("pass params= or give the model a shared_parameters() method")
        params = list(shared())
    params = list(params)
    names = tuple(tasks.names)
    with isolated_forward(model) as replay:
        replay()
        with torch.enable_grad():
            losses = _loss_vector(model, tasks, inputs, targets)
            # float64: Z = 1 − L′/L is a small difference of two losses
            base = torch.stack([loss.detach().double() for loss in losses])
            jacobian = task_jacobian(losses, params)
        del losses
        cosines = cosine_matrix(jacobian) if cosine else None
        after: Tensor | None = None
        if lookahead:
            after = _lookahead_losses(model, tasks, inputs, targets, lr, params, jacobian, replay)
    return AffinityMeasurement(
        tasks=names,
        losses=base,
        lookahead_losses=after,
        lookahead=lookahead_ratio(base, after) if after is not None else None,
        cosine=cosines,
    )


@torch.no_grad()
def _lookahead_losses(
    model: nn.Module,
    tasks: TaskSet,
    inputs: Any,
    targets: Mapping[str, Tensor],
    lr: float,
    params: Sequence[nn.Parameter],
    jacobian: Tensor,
    replay: Callable[[], None],
) -> Tensor:
    """``[i, j]`` = :math:`L_j(\\theta_s - \\eta g_i)`; the parameters are restored exactly."""
    shared: list[Tensor] = list(params)
    sizes = [p.numel() for p in shared]
    flat = torch.cat([p.detach().reshape(-1) for p in shared])
    original = [v.view_as(p) for v, p in zip(flat.split(sizes), shared, strict=True)]
    rows = []
    try:
        for k in range(jacobian.shape[0]):
            pieces = zip(jacobian[k].split(sizes), shared, strict=True)
            step = [v.view_as(p).to(p.dtype) for v, p in pieces]
            torch._foreach_copy_(shared, original)
            torch._foreach_add_(shared, step, alpha=-lr)
            replay()
            losses = _loss_vector(model, tasks, inputs, targets)
            rows.append(torch.stack([v.double() for v in losses]))
    finally:
        torch._foreach_copy_(shared, original)
    return torch.stack(rows)


class AffinityAccumulator:
    """Means of the affinity and cosine matrices over measurements, and conflict frequencies.

    Entry-wise: a NaN entry of one measurement is left out of that entry's mean. ``conflict[i][j]``
    is the fraction of measurements (with a cosine) in which :math:`\\cos(g_i, g_j) < 0`.
    Sums are kept in float64 on the CPU.
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = tuple(tasks)
        k = len(self.tasks)
        if k == 0:
            raise ConfigError("an affinity accumulator needs at least one task")
        self.measurements = 0
        zeros = functools.partial(torch.zeros, k, k, dtype=torch.float64)
        self._lookahead_sum, self._lookahead_count = zeros(), zeros()
        self._cosine_sum, self._cosine_count, self._conflicts = zeros(), zeros(), zeros()

    def _matrix(self, value: Tensor | Sequence[Sequence[float]], what: str) -> Tensor:
        matrix = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
        k = len(self.tasks)
        if matrix.shape != (k, k):
            raise ConfigError(
                f"{what} matrix has shape {tuple(matrix.shape)}; expected ({k}, {k}) for tasks "
                f"{list(self.tasks)}"
            )
        return matrix

    def add(
        self,
        lookahead: Tensor | Sequence[Sequence[float]] | None = None,
        cosine: Tensor | Sequence[Sequence[float]] | None = None,
    ) -> None:
        """Add one measurement (either matrix may be None)."""
        if lookahead is None and cosine is None:
            raise ConfigError("an affinity measurement needs a lookahead or a cosine matrix")
        if lookahead is not None:
            z = self._matrix(lookahead, "lookahead")
            finite = torch.isfinite(z)
            self._lookahead_sum += torch.where(finite, z, 0.0)
            self._lookahead_count += finite
        if cosine is not None:
            c = self._matrix(cosine, "cosine")
            finite = torch.isfinite(c)
            self._cosine_sum += torch.where(finite, c, 0.0)
            self._cosine_count += finite
            self._conflicts += finite & (c < 0)
        self.measurements += 1

    @staticmethod
    def _mean(total: Tensor, count: Tensor) -> Matrix | None:
        if not bool((count > 0).any()):
            return None
        mean = torch.where(count > 0, total / count.clamp_min(1), math.nan)
        values: Matrix = mean.tolist()
        return values

    def summary(self) -> dict[str, Any]:
        """``{"tasks", "lookahead", "cosine", "conflict", "measurements"}`` (matrices as nested
        lists, None when never measured)."""
        return {
            "tasks": list(self.tasks),
            "lookahead": self._mean(self._lookahead_sum, self._lookahead_count),
            "cosine": self._mean(self._cosine_sum, self._cosine_count),
            "conflict": self._mean(self._conflicts, self._cosine_count),
            "measurements": self.measurements,
        }

    @classmethod
    def from_records(
        cls, tasks: Sequence[str], records: Sequence[Mapping[str, Any]]
    ) -> AffinityAccumulator:
        """Rebuild the accumulator from ``affinity.jsonl`` records (``lookahead``/``cosine``)."""
        accumulator = cls(tasks)
        for record in records:
            if list(record.get("tasks", tasks)) != list(tasks):
                raise ConfigError(
                    f"an affinity record is for tasks {record.get('tasks')}, expected {list(tasks)}"
                )
            accumulator.add(record.get("lookahead"), record.get("cosine"))
        return accumulator
