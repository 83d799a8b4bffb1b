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

- ``beta = 0.5``: the default of LibMTL's β (``GradVac_beta`` on its GitHub, ``--beta`` in the
  1.1.5 release) and of torchjd's ``GradVac``.
- One group, the whole model (``GradVac_group_type=0`` on LibMTL's GitHub; the 1.1.5 release
  has only that); the paper's per-layer
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

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
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
    the others (it skips itself). ``targets`` is the ``(T, T)`` matrix of EMA targets. The
    ``T`` rounds are ~25 operations on length-``T`` vectors each; on a CPU they run in numpy,
    whose small operations cost a quarter of torch's (0.8 against 3.1 ms at 40 tasks), and with
    two tasks in Python floats (:func:`_pair_rounds`).
    """
    g = gramian.detach().double()
    phi_hat = targets.detach().to(g)
    if g.device.type == "cpu" and g.shape[0] == 2:  # each task has one partner: no order
        pair, updated_pair = _pair_rounds(g.tolist(), phi_hat.tolist(), beta)
        return torch.tensor(pair, dtype=gramian.dtype), torch.tensor(updated_pair).to(g)
    if g.device.type == "cpu":
        with np.errstate(all="ignore"):  # a non-finite Gramian (AMP overflow): as torch, silent
            weights, updated = _rounds(np, g.numpy(), phi_hat.numpy(), orders.numpy(), beta)
        weights, updated = torch.from_numpy(weights), torch.from_numpy(updated)
    else:
        weights, updated = _rounds(torch, g, phi_hat, orders, beta)
    return weights.to(gramian.dtype), updated


def _pair_rounds(
    g: list[list[float]], targets: list[list[float]], beta: float
) -> tuple[list[float], list[list[float]]]:
    """:func:`_rounds` for two tasks, in Python floats: each task visits its one partner with
    its own, uncorrected gradient, so both see the same cosine ``φ = G₁₂ / (‖g₁‖‖g₂‖)`` and
    ``d = (1 + c₂) g₁ + (1 + c₁) g₂`` with ``cᵢ`` the correction of task ``i``."""
    norms = [math.sqrt(max(g[0][0], 0.0)), math.sqrt(max(g[1][1], 0.0))]
    valid = norms[0] > 0 and norms[1] > 0
    phi = min(max(g[0][1] / (norms[0] * norms[1]), -1.0), 1.0) if valid else 0.0
    root_phi = math.sqrt(max(1.0 - phi * phi, 0.0))
    corrections = []
    for i, j in ((0, 1), (1, 0)):
        goal = targets[i][j]
        root_goal = math.sqrt(max(1.0 - goal * goal, 0.0))
        step = (norms[i] / norms[j]) * (goal * root_phi - phi * root_goal) if valid else 0.0
        corrections.append(step / max(root_goal, 1e-12) if valid and phi < goal else 0.0)
    updated = [row[:] for row in targets]
    updated[0][1] = (1.0 - beta) * targets[0][1] + beta * phi
    updated[1][0] = (1.0 - beta) * targets[1][0] + beta * phi
    return [1.0 + corrections[1], 1.0 + corrections[0]], updated


def _rounds(xp: Any, g: Any, targets: Any, orders: Any, beta: float) -> tuple[Any, Any]:
    r"""Algorithm 1 on the Gramian, for numpy arrays (``xp = numpy``) or tensors (``torch``).

    Round ``k`` moves every task ``i`` one step, towards its ``k``-th partner
    ``j = orders[i, k]``: :math:`g_i^{PC}` gains ``step`` times the original :math:`g_j`. The
    inner products of the :math:`g_i^{PC}` with every :math:`g_m` (``products``) and their
    squared norms (``square``) are updated in place rather than recomputed, everything that
    does not depend on the round's cosines is computed for all rounds beforehand (the
    partners' norms, the targets and :math:`\sqrt{1 - \hat\phi^2}`), and the steps are
    summed into the weights after the rounds; a round is then about 25 operations on
    length-``T`` vectors. Every pair is visited once per step, so the targets it reads are those
    at the start of the step, and the EMA is applied after the rounds.
    """
    t = g.shape[0]
    rows = xp.arange(t)
    diagonal = g[rows, rows]
    visited = (rows[:, None], orders)  # [i, k] -> the pair (i, orders[i, k])
    target = targets[visited]
    root_target = xp.sqrt((1.0 - target * target).clip(min=0))
    other = orders != rows[:, None]
    partner_norm = xp.sqrt(diagonal.clip(min=0))[orders]
    usable = other & (partner_norm > 0)
    # ‖g_j‖⁻¹ / √(1 − φ̂²) of every pair, the factor of a step that needs no cosine
    factor = 1.0 / (xp.where(usable, partner_norm, 1.0) * root_target.clip(min=1e-12))
    # per round k: row k of each (rounds first)
    partner_norm, usable, factor = partner_norm.T, usable.T, factor.T
    goals, root_goals, partners = target.T, root_target.T, orders.T
    partner_rows = xp.swapaxes(g[orders], 0, 1)  # [k, i]: inner products of g_j with every g_m
    partner_square = diagonal[orders].T
    products = 1.0 * g
    square = 1.0 * diagonal
    steps = xp.zeros_like(goals)
    phis = xp.zeros_like(goals)
    for k in range(t):
        dot = products[rows, partners[k]]
        norm_i = xp.sqrt(square.clip(min=0))
        valid = usable[k] & (norm_i > 0)
        norms = xp.where(valid, norm_i * partner_norm[k], 1.0)
        phi = xp.where(valid, dot / norms, 0.0).clip(-1.0, 1.0)
        # |φ| ≤ 1, so 1 − φ² ≥ 0 exactly
        gap = goals[k] * xp.sqrt(1.0 - phi * phi) - phi * root_goals[k]
        step = xp.where(valid & (phi < goals[k]), norm_i * factor[k] * gap, 0.0)
        products += step[:, None] * partner_rows[k]
        square += step * (2.0 * dot + step * partner_square[k])
        steps[k] = step
        phis[k] = phi
    updated = 1.0 * targets
    updated[visited] = xp.where(other, (1.0 - beta) * target + beta * phis.T, target)
    # the weights: 1 on each task's own gradient, plus every step on its partner's
    weights = xp.ones_like(diagonal)
    if xp is np:
        np.add.at(weights, partners.reshape(-1), steps.reshape(-1))
    else:
        weights = weights.index_add(0, partners.reshape(-1), steps.reshape(-1))
    return weights, updated


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
