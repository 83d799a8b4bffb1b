r"""ExcessMTL: weight the tasks by how far each still is from convergence (its excess risk).

He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi and Zhao, "Robust Multi-Task Learning with Excess
Risks", ICML 2024, arXiv:2402.02009. The excess risk of task :math:`i` is estimated by a
second-order Taylor expansion with a diagonal (AdaGrad-style, empirical-Fisher) Hessian
accumulated over the steps, and the weights follow an exponentiated-gradient ascent on the
estimates:

.. math::

    S_i \leftarrow S_i + g_i \odot g_i, \qquad
    \hat E_i = \sum_p \frac{g_{ip}^2}{\sqrt{S_{ip} + 10^{-7}}}, \qquad
    \alpha_i \leftarrow \frac{T\, \alpha_i \exp(\eta\, \hat E_i / E_i^0)}
        {\sum_j \alpha_j \exp(\eta\, \hat E_j / E_j^0)}, \qquad
    d = \sum_i \alpha_i g_i

starting from :math:`\alpha_i = 1`. :math:`E^0_i` is the mean estimate over the first
``warmup_steps`` steps (the paper's scale normalisation, which makes the tasks' excess risks
comparable), during which the weights stay at one; the update then runs at every later step,
before the direction is formed.

Defaults and choices, from the authors' code (``yifei-he/ExcessMTL``, a LibMTL weighting, also
in LibMTL's repository):

- ``robust_step_size`` :math:`\eta = 10^{-2}` (the code's default; torchjd's ``ExcessMTL``
  defaults to 1).
- ``warmup_steps = 1``: the code takes the first step's estimates as :math:`E^0` and leaves the
  weights at one on that step. A longer warm-up averages :math:`E^0` over more steps (torchjd's
  ``n_warmup_steps``, which cites the paper's Appendix C.1 for three epochs of statistics).
- The weights sum to :math:`T` as in the code (equal weighting's scale); the paper writes them
  on the simplex, which only rescales ``d`` by :math:`1/T`.
- :math:`\hat E / (E^0 + 10^{-7})` (torchjd's guard; the code divides without one) and the
  update in log space.

**Absent tasks.** A loss of exactly zero is a task absent from the batch (a mixed-task batch, or
no label for it); its gradient and estimate are zero. The rule assumes every task in every step:
a task absent from the warm-up got a zero baseline, whose ratio then took all the weight, so the
method stopped whenever that task was absent again. manytask averages :math:`E^0_i` over the
warm-up steps where task :math:`i` is present; a task absent from all of them (or whose estimates
there were zero) takes its first non-zero estimate after the warm-up as its baseline, and its
weight moves from the next step on; a task absent from a step keeps its weight on that step.
With every task present this is the rule above.

The accumulator :math:`S` is a ``(T, P)`` buffer allocated on the first step (its size depends
on ``P``); ``state_dict()`` carries it and loading adopts its shape, so a resumed run continues
exactly; a step whose gradients are not finite (an AMP overflow, which the scaler then skips)
leaves the state unchanged. Because :math:`S` is indexed by the coordinates of ``J``, which in
feature mode are the samples of the current batch, feature mode is refused. Exact under
``torch.distributed`` in parameter mode (``J`` is averaged over ranks first). Shared parameters
receive ``d``; task-specific parameters their own task's gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import (
    Balancer,
    JacobianAggregator,
    LossTransform,
    Mode,
    present_tasks,
)
from manytask.errors import ConfigError


@registry.register(
    "balancer",
    "excess_mtl",
    "exponentiated weights from estimated excess risks (He et al., ICML 2024, arXiv:2402.02009)",
)
class ExcessMTL(JacobianAggregator):
    """ExcessMTL on the rows of ``J``.

    Args:
        tasks: task names.
        robust_step_size: step size η of the exponentiated weight update (> 0).
        warmup_steps: steps whose mean excess-risk estimate is the baseline E⁰ (≥ 1); the
            weights stay at one meanwhile.
    """

    squared_sum: Tensor
    task_weights: Tensor
    baseline: Tensor
    warmup_sum: Tensor
    warmup_count: Tensor
    step: Tensor

    permutation_invariant = True

    def __init__(
        self, tasks: Sequence[str], robust_step_size: float = 1e-2, warmup_steps: int = 1
    ) -> None:
        super().__init__(tasks)
        if robust_step_size <= 0:
            raise ConfigError(f"excess_mtl: robust_step_size must be > 0, got {robust_step_size}")
        if warmup_steps < 1:
            raise ConfigError(f"excess_mtl: warmup_steps must be ≥ 1, got {warmup_steps}")
        self.robust_step_size = float(robust_step_size)
        self.warmup_steps = int(warmup_steps)
        t = self.num_tasks
        self.register_buffer("squared_sum", torch.zeros(0))  # (T, P) after the first step
        self.register_buffer("task_weights", torch.ones(t, dtype=torch.float64))
        self.register_buffer("baseline", torch.zeros(t, dtype=torch.float64))
        self.register_buffer("warmup_sum", torch.zeros(t, dtype=torch.float64))
        self.register_buffer("warmup_count", torch.zeros(t, dtype=torch.float64))  # steps present
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def configure(
        self, loss_transform: LossTransform = "none", mode: Mode = "parameters"
    ) -> Balancer:
        if mode == "features":
            raise ConfigError(
                "excess_mtl accumulates squared gradients per coordinate of J across steps; in "
                "feature mode those coordinates are the samples of each batch, so use "
                "mode='parameters'"
            )
        return super().configure(loss_transform, mode)

    def _accumulator(self, jacobian: Tensor) -> Tensor:
        shape = (self.num_tasks, jacobian.shape[1])
        if self.squared_sum.numel() == 0:
            self.squared_sum = jacobian.new_zeros(shape)
        elif tuple(self.squared_sum.shape) != shape:
            raise ConfigError(
                f"excess_mtl: the gradients have shape {tuple(jacobian.shape)} but its "
                f"accumulator was built for {tuple(self.squared_sum.shape)}; the shared "
                "parameters must stay the same between steps"
            )
        return self.squared_sum

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        incoming = state_dict.get(prefix + "squared_sum")
        if isinstance(incoming, Tensor) and incoming.shape != self.squared_sum.shape:
            self.squared_sum = torch.empty_like(incoming, device=self.squared_sum.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        accumulator = self._accumulator(jacobian)
        squares = jacobian.to(accumulator.dtype).square()
        finite = torch.isfinite(squares).all()  # an AMP overflow step leaves the state alone
        summed = accumulator + squares
        excess = (squares / (summed + 1e-7).sqrt()).sum(dim=1).double()
        accumulator.copy_(torch.where(finite, summed, accumulator))
        present = present_tasks(losses)
        warming = self.step < self.warmup_steps
        warmup_sum = self.warmup_sum + torch.where(warming, excess, torch.zeros_like(excess))
        counted = warming & present
        warmup_count = self.warmup_count + counted.to(self.warmup_count.dtype)
        last_warmup = self.step == self.warmup_steps - 1
        mean = warmup_sum / warmup_count.clamp_min(1.0)
        baseline = torch.where(last_warmup, mean, self.baseline)
        # after the warm-up, a task without a baseline (absent all along) takes its first
        # non-zero estimate as its baseline, and its weight moves from the next step on
        known = baseline > 0
        late = ~warming & ~known & present & (excess > 0)
        ratio = torch.where(known & present, excess / (baseline + 1e-7), 0.0)
        logits = self.task_weights.log() + self.robust_step_size * ratio
        baseline = torch.where(late, excess, baseline)
        updated = self.num_tasks * torch.softmax(logits, dim=0)
        weights = torch.where(warming, self.task_weights, updated)
        direction = weights.to(jacobian.dtype) @ jacobian
        self.warmup_sum.copy_(torch.where(finite, warmup_sum, self.warmup_sum))
        self.warmup_count.copy_(torch.where(finite, warmup_count, self.warmup_count))
        self.baseline.copy_(torch.where(finite, baseline, self.baseline))
        self.task_weights.copy_(torch.where(finite, weights, self.task_weights))
        self.step.add_(finite.to(self.step.dtype))
        return direction
