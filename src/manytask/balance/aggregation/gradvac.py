r"""GradVac (Gradient Vaccine): pull each pair of task gradients towards a moving target cosine.

Wang, Tsvetkov, Firat and Cao, "Gradient Vaccine: Investigating and Improving Multi-task
Optimization in Massively Multilingual Models", ICLR 2021, arXiv:2010.05874, Algorithm 1.
For each task :math:`i` (starting from :math:`g_i^{PC} = g_i`) and each other task :math:`j` in
a random order:

.. math::

    \phi_{ij} = \frac{g_i^{PC\top} g_j}{\|g_i^{PC}\|\,\|g_j\|}, \qquad
    \text{if } \phi_{ij} < \hat\phi_{ij}: \quad
    g_i^{PC} \leftarrow g_i^{PC} + \frac{\|g_i^{PC}\| \big(\hat\phi_{ij}\sqrt{1-\phi_{ij}^2}
        - \phi_{ij}\sqrt{1-\hat\phi_{ij}^2}\big)}{\|g_j\|\sqrt{1-\hat\phi_{ij}^2}}\, g_j,

.. math::

    \hat\phi_{ij} \leftarrow (1-\beta)\,\hat\phi_{ij} + \beta\,\phi_{ij}, \qquad
    d = \sum_i g_i^{PC}

with targets :math:`\hat\phi_{ij} = 0` at the start. The correction sets the cosine of
:math:`g_i^{PC}` and :math:`g_j` to exactly :math:`\hat\phi_{ij}`; with :math:`\hat\phi = 0`
it is PCGrad's projection.

Every :math:`g_i^{PC}` stays a linear combination of the original gradients, so manytask tracks
its coefficients with the Gramian alone (norms and inner products of combinations are quadratic
forms of ``G``) and returns ``d = Jᵀ w``; the ``T`` sequences run in parallel, ``T`` vectorised
rounds. The random orders come from the balancer's own generator (``seed``, or drawn from the
global torch RNG), so every rank draws the same order: exact under ``torch.distributed``.
The targets are a ``(T, T)`` buffer, so ``state_dict()`` resumes a run exactly; a step
whose Gramian is not finite (an AMP overflow, which the scaler then skips) leaves them unchanged.

Defaults and choices:

- ``beta = 0.5``: the default of LibMTL's ``GradVac_beta`` (and of torchjd's ``GradVac``).
- One group, the whole model (LibMTL's ``GradVac_group_type=0``); the paper's per-layer
  granularity is not offered, because a Gramian method sees only whole-vector inner products.
- As in the paper's Algorithm 1 the EMA is updated for every visited pair at every step. LibMTL
  (1.1.5 and later) updates it only when a correction is applied, so its targets never rise
  above zero; its directions agree with the paper's on the first step only.
- An undefined cosine (a zero gradient) counts as :math:`\phi = 0` for the EMA (as torchjd) and
  triggers no correction; :math:`\sqrt{1-\hat\phi^2}` is clamped at 1e-12 so a target of
  exactly one cannot divide by zero. Both guards are scale-free: the rule is homogeneous.

Shared parameters receive ``d``; task-specific parameters their own task's gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import GramianWeighting
from manytask.balance.randomness import host_to_device, seeded_generator
from manytask.errors import ConfigError


def gradvac_weights(
    gramian: Tensor, targets: Tensor, orders: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """GradVac's weights on the original gradients and the updated targets.

    ``orders[i]`` is a permutation of all task indices: the order in which task ``i`` visits
    the others (it skips itself). ``targets`` is the ``(T, T)`` matrix of EMA targets.
    """
    g = gramian.double()
    t = g.shape[0]
    phi_hat = targets.to(g).clone()
    coeff = torch.eye(t, dtype=g.dtype, device=g.device)  # row i: g_i^PC in the basis of g_m
    rows = torch.arange(t, device=g.device)
    norms = g.diagonal().clamp_min(0).sqrt()
    for k in range(t):
        j = orders[:, k]
        other = j != rows
        products = coeff @ g  # row i: inner products of g_i^PC with every g_m
        dot = products[rows, j]
        norm_i = (products * coeff).sum(dim=1).clamp_min(0).sqrt()
        norm_j = norms[j]
        valid = other & (norm_i > 0) & (norm_j > 0)
        safe_norm_j = torch.where(valid, norm_j, torch.ones_like(norm_j))
        safe_norm_i = torch.where(valid, norm_i, torch.ones_like(norm_i))
        phi = torch.where(valid, dot / (safe_norm_i * safe_norm_j), torch.zeros_like(dot))
        phi = phi.clamp(-1.0, 1.0)
        target = phi_hat[rows, j]
        root_phi = (1.0 - phi * phi).clamp_min(0).sqrt()
        root_target = (1.0 - target * target).clamp_min(0).sqrt()
        step = (norm_i / safe_norm_j) * (target * root_phi - phi * root_target)
        step = step / root_target.clamp_min(1e-12)
        correct = valid & (phi < target)
        coeff[rows, j] += torch.where(correct, step, torch.zeros_like(step))
        phi_hat[rows, j] = torch.where(other, (1.0 - beta) * target + beta * phi, target)
    return coeff.sum(dim=0).to(gramian.dtype), phi_hat


@registry.register(
    "balancer",
    "gradvac",
    "gradient vaccine: align task gradients to EMA target cosines "
    "(Wang et al., ICLR 2021, arXiv:2010.05874)",
)
class GradVac(GramianWeighting):
    """GradVac as a Gramian weighting.

    Args:
        tasks: task names.
        beta: EMA rate of the target cosines, in [0, 1].
        seed: seed of the visiting orders (None: from the global torch RNG).
    """

    targets: Tensor

    homogeneous = True

    def __init__(self, tasks: Sequence[str], beta: float = 0.5, seed: int | None = None) -> None:
        super().__init__(tasks)
        if not 0.0 <= beta <= 1.0:
            raise ConfigError(f"gradvac: beta must be in [0, 1], got {beta}")
        self.beta = float(beta)
        self.generator = seeded_generator(seed)
        t = self.num_tasks
        self.register_buffer("targets", torch.zeros(t, t, dtype=torch.float64))

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        t = self.num_tasks
        orders = torch.rand(t, t, generator=self.generator).argsort(dim=1)
        orders = host_to_device(orders, gramian.device)
        weights, targets = gradvac_weights(gramian, self.targets, orders, self.beta)
        finite = torch.isfinite(gramian).all()  # an AMP overflow step leaves the state alone
        self.targets.copy_(torch.where(finite, targets, self.targets))
        return weights

    def get_extra_state(self) -> Any:
        return {**super().get_extra_state(), "generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self.generator.set_state(state["generator"])
