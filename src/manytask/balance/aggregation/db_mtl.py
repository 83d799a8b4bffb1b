r"""DB-MTL (dual balancing): balance loss scales with a log transform and gradient magnitudes by
scaling every task's averaged gradient up to the largest.

Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Tsang and Kwok, "Dual-Balancing for Multi-Task
Learning", arXiv:2308.12029 (2023; its v3 of 2025 is accepted by Neural Networks). With the
gradients of the log losses :math:`g_i = \nabla \log(L_i + \epsilon) = \nabla L_i / (L_i +
\epsilon)` at step :math:`k = 1, 2, \dots`:

.. math::

    \hat g_i \leftarrow \beta_k\, \hat g_i + (1 - \beta_k)\, g_i, \qquad
    \beta_k = \beta / k^{\sigma}, \qquad
    d = \max_j \|\hat g_j\| \sum_i \frac{\hat g_i}{\|\hat g_i\|}

(:math:`\hat g_i` starts at zero). Loss-scale balancing: the log makes every task's loss
scale-free. Gradient-magnitude balancing: each averaged gradient is rescaled to the largest
norm among them, :math:`\alpha_i = \max_j \|\hat g_j\| / \|\hat g_i\|`, so no task dominates
and none is shrunk. A task whose averaged gradient is zero contributes nothing.

Defaults: :math:`\beta = 0.9`, :math:`\sigma = 0` (a constant rate), :math:`\epsilon =
10^{-8}`: LibMTL's ``DB_beta``, ``DB_beta_sigma`` and its ``DB_MTL`` weighting (the authors'
code, median-research-group/LibMTL on GitHub), whose ``k = 1, 2, …`` step count and zero
start manytask follows. The direction is written as :math:`\max_j\|\hat g_j\|` times a sum of
unit vectors: the code's :math:`\sum_i \alpha_i \hat g_i` without the 1e-8 the code adds to the
norms (a zero average is skipped instead), so the rule is exactly homogeneous.

The log transform is part of the method, for every parameter: the engine differentiates
:math:`\log(L_i + \epsilon)` (the loss transform of :mod:`manytask.balance.base` with
:attr:`~manytask.balance.base.Balancer.log_eps` set to ε), so the rows of ``J`` are the
:math:`g_i` above and each task head is trained on its log loss, as the authors' code does (it
runs every task's backward pass on ``log(L + 1e-8)``). ``loss_transform`` is therefore always
``"log"`` for this method, whatever is passed.

The averaged gradients are a ``(T, P)`` buffer allocated on the first step (its size depends on
``P``); ``state_dict()`` carries it and loading adopts its shape, so a resumed run continues
exactly; a step whose gradients are not finite (an AMP overflow, which the scaler then skips)
leaves the state unchanged. Because the buffer is indexed by the coordinates of ``J``, which in
feature mode are the samples of the current batch, feature mode is refused. Exact under
``torch.distributed`` in parameter mode (the loss transform gives every rank
:math:`\nabla L_{i,r} / (\bar L_i + \epsilon)`, whose mean over ranks is
:math:`\nabla \log(\bar L_i + \epsilon)`, and ``J`` is averaged over ranks). Shared parameters
receive ``d``; task-specific parameters the gradient of their own task's log loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import Balancer, JacobianAggregator, LossTransform, Mode
from manytask.errors import ConfigError


@registry.register(
    "balancer",
    "db_mtl",
    "dual balancing: log losses and EMA gradients scaled to the largest norm "
    "(Lin et al., Neural Networks, arXiv:2308.12029)",
)
class DBMTL(JacobianAggregator):
    """DB-MTL on the rows of ``J``.

    Args:
        tasks: task names.
        beta: EMA rate β of the averaged gradients, in [0, 1).
        beta_sigma: decay exponent σ of β (β_k = β / k^σ), ≥ 0.
        eps: ε of log(L + ε) (> 0), the loss transform every parameter is trained on.
    """

    averages: Tensor
    step: Tensor

    permutation_invariant = True
    homogeneous = True

    def __init__(
        self, tasks: Sequence[str], beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8
    ) -> None:
        super().__init__(tasks)
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"db_mtl: beta must be in [0, 1), got {beta}")
        if beta_sigma < 0:
            raise ConfigError(f"db_mtl: beta_sigma must be ≥ 0, got {beta_sigma}")
        if eps <= 0:
            raise ConfigError(f"db_mtl: eps must be > 0, got {eps}")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.eps = float(eps)
        self.log_eps = self.eps
        self.loss_transform = "log"
        self.register_buffer("averages", torch.zeros(0))  # (T, P) after the first step
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def configure(
        self, loss_transform: LossTransform = "none", mode: Mode = "parameters"
    ) -> Balancer:
        if mode == "features":
            raise ConfigError(
                "db_mtl averages each task gradient per coordinate of J across steps; in "
                "feature mode those coordinates are the samples of each batch, so use "
                "mode='parameters'"
            )
        super().configure(loss_transform, mode)
        self.loss_transform = "log"  # the method's own transform (module docstring)
        return self

    def _averages_for(self, jacobian: Tensor) -> Tensor:
        shape = (self.num_tasks, jacobian.shape[1])
        if self.averages.numel() == 0:
            self.averages = jacobian.new_zeros(shape)
        elif tuple(self.averages.shape) != shape:
            raise ConfigError(
                f"db_mtl: the gradients have shape {tuple(jacobian.shape)} but its averages "
                f"were built for {tuple(self.averages.shape)}; the shared parameters must stay "
                "the same between steps"
            )
        return self.averages

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        incoming = state_dict.get(prefix + "averages")
        if isinstance(incoming, Tensor) and incoming.shape != self.averages.shape:
            self.averages = torch.empty_like(incoming, device=self.averages.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        averages = self._averages_for(jacobian)
        g = jacobian.to(averages.dtype)  # gradients of log(Lᵢ + ε) (module docstring)
        finite = torch.isfinite(g).all()  # an AMP overflow step leaves the state alone
        k = (self.step + 1).double()
        beta_k = (self.beta * k.pow(-self.beta_sigma)).to(g.dtype)
        updated = g + beta_k * (averages - g)
        norms = updated.norm(dim=1, keepdim=True)
        safe = norms.clamp_min(torch.finfo(g.dtype).tiny)
        units = torch.where(norms > 0, updated / safe, torch.zeros_like(updated))
        direction: Tensor = norms.max() * units.sum(dim=0)
        averages.copy_(torch.where(finite, updated, averages))
        self.step.add_(finite.to(self.step.dtype))
        return direction.to(jacobian.dtype)
