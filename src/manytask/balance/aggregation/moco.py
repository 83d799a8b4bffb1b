r"""MoCo: track each task gradient with a moving estimate and descend along their min-norm mix.

Fernando, Shen, Liu, Chaudhury, Murugesan and Chen, "Mitigating Gradient Bias in
Multi-objective Learning: A Provably Convergent Approach", ICLR 2023, arXiv:2210.12624,
Algorithm 1. At step :math:`k = 1, 2, \dots`, with the task gradients :math:`h_i` of the step:

.. math::

    y_i \leftarrow y_i - \beta_k\,(y_i - h_i), \qquad
    \lambda \leftarrow \Pi_{\Delta}\big(\lambda - \gamma_k\,(Y Y^\top + \rho I)\,\lambda\big),
    \qquad d = Y^\top \lambda

where :math:`Y` stacks the tracking variables :math:`y_i` as rows, :math:`\Pi_\Delta` is the
Euclidean projection onto the probability simplex, and the step sizes decay as
:math:`\beta_k = \beta / k^{\sigma_\beta}` and :math:`\gamma_k = \gamma / k^{\sigma_\gamma}`.
:math:`y_i` starts at zero and :math:`\lambda` at the uniform point. The tracking variables
reduce the bias of the stochastic min-norm direction; :math:`\lambda` takes one projected
gradient step per training step on :math:`\tfrac12 \lambda^\top (YY^\top + \rho I)\lambda`.

Defaults: :math:`\beta = 0.5`, :math:`\sigma_\beta = 0.5`, :math:`\gamma = 0.1`,
:math:`\sigma_\gamma = 0.5`, :math:`\rho = 0`: the defaults of LibMTL's MoCo
(``MoCo_beta``, ``MoCo_beta_sigma``, ``MoCo_gamma``, ``MoCo_gamma_sigma``, ``MoCo_rho``,
median-research-group/LibMTL on GitHub), whose ``k = 1, 2, …`` step count manytask follows.

Deviations and choices:

- :math:`\lambda` is projected onto the simplex as in the paper (and in the first author's own
  code, ``heshandevaka/Trade-Off-MOL``); LibMTL replaces the projection by a softmax.
- LibMTL rescales every gradient to :math:`h_i = L_i\, g_i / \|g_i\|` before tracking; the
  paper tracks the raw gradients. ``normalize_gradients=True`` applies LibMTL's rescaling (a
  zero gradient stays zero); the default follows the paper.
- The projection of :math:`y_i` onto a bounded set that the paper's analysis uses is not
  applied, as in both codes.

The tracking variables are a ``(T, P)`` buffer allocated on the first step (its size depends on
``P``); ``state_dict()`` carries it and loading adopts its shape, so a resumed run continues
exactly; a step whose gradients are not finite (an AMP overflow, which the scaler then skips)
leaves the state unchanged. Because :math:`Y` is indexed by the coordinates of ``J``, which in
feature mode are the samples of the current batch, feature mode is refused. Exact under
``torch.distributed`` in parameter mode (``J`` is averaged over ranks first, so every rank
tracks the union-batch gradients). Shared parameters receive ``d``; task-specific parameters
their own task's gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import Balancer, JacobianAggregator, LossTransform, Mode
from manytask.balance.solvers.simplex import project_simplex
from manytask.errors import ConfigError


@registry.register(
    "balancer",
    "moco",
    "tracked task gradients and a projected-gradient min-norm mix "
    "(Fernando et al., ICLR 2023, arXiv:2210.12624)",
)
class MoCo(JacobianAggregator):
    """MoCo on the rows of ``J``.

    Args:
        tasks: task names.
        beta: step size β of the tracking variables, in (0, 1].
        beta_sigma: decay exponent of β (β_k = β / k^beta_sigma), ≥ 0.
        gamma: step size γ of the task weights λ (> 0).
        gamma_sigma: decay exponent of γ, ≥ 0.
        rho: ℓ2 regularisation ρ of the λ subproblem (≥ 0).
        normalize_gradients: track Lᵢ gᵢ/‖gᵢ‖ (LibMTL) instead of gᵢ (the paper).
    """

    tracking: Tensor
    task_weights: Tensor
    step: Tensor

    permutation_invariant = True

    def __init__(
        self,
        tasks: Sequence[str],
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        normalize_gradients: bool = False,
    ) -> None:
        super().__init__(tasks)
        if not 0.0 < beta <= 1.0:
            raise ConfigError(f"moco: beta must be in (0, 1], got {beta}")
        if gamma <= 0:
            raise ConfigError(f"moco: gamma must be > 0, got {gamma}")
        for name, value in (("beta_sigma", beta_sigma), ("gamma_sigma", gamma_sigma), ("rho", rho)):
            if value < 0:
                raise ConfigError(f"moco: {name} must be ≥ 0, got {value}")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.gamma = float(gamma)
        self.gamma_sigma = float(gamma_sigma)
        self.rho = float(rho)
        self.normalize_gradients = bool(normalize_gradients)
        t = self.num_tasks
        self.register_buffer("tracking", torch.zeros(0))  # (T, P) after the first step
        self.register_buffer("task_weights", torch.full((t,), 1.0 / t, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def configure(
        self, loss_transform: LossTransform = "none", mode: Mode = "parameters"
    ) -> Balancer:
        if mode == "features":
            raise ConfigError(
                "moco tracks each task gradient per coordinate of J across steps; in feature "
                "mode those coordinates are the samples of each batch, so use mode='parameters'"
            )
        return super().configure(loss_transform, mode)

    def _tracking_for(self, jacobian: Tensor) -> Tensor:
        shape = (self.num_tasks, jacobian.shape[1])
        if self.tracking.numel() == 0:
            self.tracking = jacobian.new_zeros(shape)
        elif tuple(self.tracking.shape) != shape:
            raise ConfigError(
                f"moco: the gradients have shape {tuple(jacobian.shape)} but its tracking "
                f"variables were built for {tuple(self.tracking.shape)}; the shared parameters "
                "must stay the same between steps"
            )
        return self.tracking

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        incoming = state_dict.get(prefix + "tracking")
        if isinstance(incoming, Tensor) and incoming.shape != self.tracking.shape:
            self.tracking = torch.empty_like(incoming, device=self.tracking.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        tracking = self._tracking_for(jacobian)
        h = jacobian.to(tracking.dtype)
        if self.normalize_gradients:
            norms = h.norm(dim=1, keepdim=True)
            safe = torch.where(norms > 0, norms, torch.ones_like(norms))
            h = h / safe * losses.to(h.dtype)[:, None]
        finite = torch.isfinite(h).all()  # an AMP overflow step leaves the state alone
        k = (self.step + 1).double()
        beta_k = (self.beta * k.pow(-self.beta_sigma)).to(h.dtype)
        gamma_k = self.gamma * k.pow(-self.gamma_sigma)
        y = tracking - beta_k * (tracking - h)
        gramian = (y @ y.T).double()
        gramian = torch.where(finite, gramian, torch.zeros_like(gramian))  # projectable
        lam = self.task_weights
        lam = project_simplex(lam - gamma_k * (gramian @ lam + self.rho * lam))
        direction = lam.to(jacobian.dtype) @ y.to(jacobian.dtype)
        tracking.copy_(torch.where(finite, y, tracking))
        self.task_weights.copy_(torch.where(finite, lam, self.task_weights))
        self.step.add_(finite.to(self.step.dtype))
        return direction
