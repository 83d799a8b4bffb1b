r"""GradNorm: learn loss weights so that the weighted gradient norms follow the training rates.

Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
Balancing in Deep Multitask Networks", ICML 2018, arXiv:1711.02257, Algorithm 1. With weights
:math:`w_i`, gradient norms :math:`n_i = \|\nabla_W L_i\|`, and initial losses
:math:`L_i(0)`:

.. math::

    G_i = w_i n_i, \quad \bar G = \tfrac1T \sum_i G_i, \quad
    \tilde L_i = \frac{L_i}{L_i(0)}, \quad r_i = \frac{\tilde L_i}{\tfrac1T\sum_j \tilde L_j},
    \quad L_{\text{grad}} = \sum_i \big|G_i - \bar G\, r_i^{\alpha}\big|

The update of the step is :math:`d = \sum_i w_i g_i` with the current weights; then the
weights take one gradient step on :math:`L_{\text{grad}}` with the targets
:math:`\bar G r_i^\alpha` held constant (as the paper prescribes), whose gradient is in closed
form, and are renormalised to sum to :math:`T`:

.. math::

    w_i \leftarrow w_i - \eta\, \operatorname{sign}\big(G_i - \bar G r_i^\alpha\big)\, n_i,
    \qquad w \leftarrow T\, w / \textstyle\sum_j w_j

So no extra backward pass through the model is needed: the norms are the square roots of the
Gramian's diagonal. Tasks that train slowly (large :math:`r_i`) are pushed towards larger
gradient norms; :math:`\alpha` sets the strength of that pull.

Defaults and choices:

- :math:`\alpha = 1.5`: LibMTL's default ``alpha``.
- ``lr`` :math:`\eta = 0.025` is manytask's choice, not a value from the paper; the step is in
  units of gradient norm, so tune it with the gradients' scale.
- The weights start at one and :math:`L_i(0)` is the loss of the first step (LibMTL instead
  trains the first epoch with equal weights and takes that epoch's mean loss, and parametrises
  :math:`w = T \operatorname{softmax}(s)`, updating :math:`s` with the model's optimiser).
- The paper takes :math:`W` to be the last shared layer; manytask uses all shared parameters
  (``J`` of the engine) or, with ``mode="features"``, the shared representation.
- Safeguards: weights are clamped at zero before the renormalisation (back to equal weights if
  all vanish); :math:`\tilde L_i = 1` when :math:`L_i(0) = 0` and negative ratios are clamped at
  zero, since GradNorm assumes positive losses (``loss_transform="log"`` gives negative values
  for losses below one and is not meaningful here).

The weights, the initial losses and whether they were recorded are buffers, so ``state_dict()``
resumes a run exactly; a step whose Gramian or losses are not finite (an AMP overflow, which the
scaler then skips) leaves them unchanged. On a CPU the weights' update runs in Python floats
(a few operations on each of ``T`` numbers, where even numpy's calls cost more than the
arithmetic); elsewhere in torch, on the device, without reading the finite test back. Exact under
``torch.distributed`` (``J`` and the loss values are averaged over ranks first). Shared
parameters receive ``d``; task-specific parameters their own task's (unweighted) gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import GramianWeighting
from manytask.balance.solvers.backend import on_host
from manytask.errors import ConfigError


def gradnorm_weight_gradient(
    norms: Tensor, weights: Tensor, losses: Tensor, initial_losses: Tensor, alpha: float
) -> Tensor:
    """``∂L_grad/∂w`` with the targets held constant: ``sign(wᵢnᵢ − Ḡ rᵢ^α) nᵢ`` (float64
    tensors; :meth:`GradNorm._host_step` is the same rule in Python floats)."""
    scaled = weights * norms
    recorded = initial_losses != 0
    ratio = torch.where(recorded, losses / torch.where(recorded, initial_losses, 1.0), 1.0)
    ratio = ratio.clip(min=0)
    mean_ratio = ratio.mean()
    positive = mean_ratio > 0
    relative = torch.where(positive, ratio / torch.where(positive, mean_ratio, 1.0), 1.0)
    target = scaled.mean() * relative**alpha
    return torch.sign(scaled - target) * norms


@registry.register(
    "balancer",
    "gradnorm",
    "learned weights that equalise gradient norms by training rate "
    "(Chen et al., ICML 2018, arXiv:1711.02257)",
)
class GradNorm(GramianWeighting):
    """GradNorm as a Gramian weighting with its own weight update.

    Args:
        tasks: task names.
        alpha: strength α of the pull towards equal training rates (≥ 0).
        lr: learning rate η of the weights' gradient step (> 0).
    """

    task_weights: Tensor
    initial_losses: Tensor
    started: Tensor

    permutation_invariant = True

    def __init__(self, tasks: Sequence[str], alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__(tasks)
        if alpha < 0:
            raise ConfigError(f"gradnorm: alpha must be ≥ 0, got {alpha}")
        if lr <= 0:
            raise ConfigError(f"gradnorm: lr must be > 0, got {lr}")
        self.alpha = float(alpha)
        self.lr = float(lr)
        t = self.num_tasks
        self.register_buffer("task_weights", torch.ones(t, dtype=torch.float64))
        self.register_buffer("initial_losses", torch.zeros(t, dtype=torch.float64))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        if on_host(gramian, losses, self.task_weights):  # T numbers: Python floats
            return torch.tensor(self._host_step(gramian, losses), dtype=gramian.dtype)
        current = self.task_weights.clone()
        values = losses.to(current)
        # an AMP overflow step (non-finite gradients or losses) leaves the state alone
        finite = torch.isfinite(gramian).all() & torch.isfinite(values).all()
        initial = torch.where(self.started, self.initial_losses, values)
        self.initial_losses.copy_(torch.where(finite, initial, self.initial_losses))
        self.started.logical_or_(finite)
        norms = gramian.to(current).diagonal().clamp_min(0).sqrt()
        gradient = gradnorm_weight_gradient(norms, current, values, initial, self.alpha)
        stepped = (current - self.lr * gradient).clamp_min(0)
        total = stepped.sum()
        renormalised = torch.where(
            total > 0,
            self.num_tasks * stepped / total.clamp_min(torch.finfo(total.dtype).tiny),
            torch.ones_like(stepped),
        )
        self.task_weights.copy_(torch.where(finite, renormalised, current))
        return current.to(gramian.dtype)

    def _host_step(self, gramian: Tensor, losses: Tensor) -> list[float]:
        """:meth:`weights` on a CPU, in Python floats: the finite test is a value to branch
        on, and a few dozen float operations on ``T`` numbers take less than the numpy calls
        they replace, whose cost in a training step (cold caches) is several times a
        benchmark loop's (this call in the benchmark's feature mode step: 0.23–0.30 → 0.10–0.19 ms
        at 2 to 40 tasks)."""
        current: list[float] = self.task_weights.tolist()
        values: list[float] = losses.tolist()
        squares: list[float] = gramian.diagonal().tolist()
        # the diagonal is finite exactly when every entry is (|Gᵢⱼ| ≤ √(GᵢᵢGⱼⱼ)): an AMP
        # overflow step leaves the state alone
        if not all(map(math.isfinite, squares + values)):
            return current
        if not self.started.item():
            self.initial_losses.copy_(losses)
            self.started.fill_(True)
        initial: list[float] = self.initial_losses.tolist()
        t = len(current)
        norms = [math.sqrt(max(x, 0.0)) for x in squares]
        scaled = [w * n for w, n in zip(current, norms, strict=True)]
        ratio = [max(v / i, 0.0) if i != 0 else 1.0 for v, i in zip(values, initial, strict=True)]
        mean_ratio, mean_scaled = sum(ratio) / t, sum(scaled) / t
        stepped = []
        for w, n, s, r in zip(current, norms, scaled, ratio, strict=True):
            target = mean_scaled * (r / mean_ratio if mean_ratio > 0 else 1.0) ** self.alpha
            sign = (s > target) - (s < target)  # ∂L_grad/∂wᵢ = sign(Gᵢ − Ḡ rᵢ^α) nᵢ
            stepped.append(max(w - self.lr * sign * n, 0.0))
        total = sum(stepped)
        renormalised = [t * x / total for x in stepped] if total > 0 else [1.0] * t
        self.task_weights.numpy()[:] = renormalised
        return current
