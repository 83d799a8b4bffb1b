r"""MoDo: one projected gradient step per training step on the min-norm task weights.

Chen, Fernando, Ying and Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
Generalization and Conflict-Avoidance", NeurIPS 2023, arXiv:2305.20057 (MoDo, "multi-objective
gradient with double sampling"). The task weights :math:`\lambda` take one step of
projected gradient descent on :math:`\tfrac12\|J^\top\lambda\|^2 + \tfrac\rho2\|\lambda\|^2`
per training step, and the update uses the new weights:

.. math::

    \lambda \leftarrow \Pi_\Delta\big(\lambda - \gamma\,(G\lambda + \rho\,\lambda)\big),
    \qquad d = J^\top \lambda

with :math:`\lambda` starting at the uniform point and :math:`\Pi_\Delta` the Euclidean
projection onto the probability simplex. :math:`\lambda` tracks the MGDA weights slowly instead
of solving the min-norm problem at every step.

**Double sampling.** The paper forms :math:`G = J_1 J_2^\top` from two independent mini-batches
(an unbiased estimate of the full-batch Gramian) and applies :math:`\lambda` to a third batch
(or to the mean of the two). With one batch per step manytask uses :math:`G = JJ^\top` of the
step and applies :math:`\lambda` to the same ``J``, as torchjd's ``MoDoWeighting`` fed with a
Gramian. The Gramian is then biased (the paper's guarantees assume the independent batches),
but the method runs in feature mode, with ``update_every`` and exactly under
``torch.distributed``.

Defaults: :math:`\gamma = 0.1`, :math:`\rho = 0.1`, the defaults of the authors' code
(``heshandevaka/Trade-Off-MOL``, ``gamma_modo``/``rho_modo``) and of torchjd (LibMTL's
repository uses :math:`\gamma = 10^{-3}`). :math:`\gamma` acts on the raw Gramian, so the
right value depends on the gradients' scale (the rule is not homogeneous). :math:`\lambda` is a
buffer, so ``state_dict()`` resumes a run exactly; a step whose Gramian is not finite (an AMP
overflow, which the scaler then skips) leaves it unchanged. On a CPU the update runs in numpy
(its few operations on T numbers cost less there: 0.05 → 0.02 ms a step). Shared parameters
receive ``d``; task-specific parameters their own task's gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import GramianWeighting
from manytask.balance.solvers.backend import namespace
from manytask.balance.solvers.simplex import project_simplex
from manytask.errors import ConfigError


@registry.register(
    "balancer",
    "modo",
    "one projected step per batch on the min-norm weights "
    "(Chen et al., NeurIPS 2023, arXiv:2305.20057)",
)
class MoDo(GramianWeighting):
    """MoDo with one batch per step, as a Gramian weighting.

    Args:
        tasks: task names.
        gamma: step size γ of the weight update (> 0).
        rho: ℓ2 regularisation ρ of the weights (≥ 0).
    """

    task_weights: Tensor

    permutation_invariant = True

    def __init__(self, tasks: Sequence[str], gamma: float = 0.1, rho: float = 0.1) -> None:
        super().__init__(tasks)
        if gamma <= 0:
            raise ConfigError(f"modo: gamma must be > 0, got {gamma}")
        if rho < 0:
            raise ConfigError(f"modo: rho must be ≥ 0, got {rho}")
        self.gamma = float(gamma)
        self.rho = float(rho)
        t = self.num_tasks
        self.register_buffer("task_weights", torch.full((t,), 1.0 / t, dtype=torch.float64))

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        g: Any = gramian.double()
        previous: Any = self.task_weights
        if g.device.type == "cpu":  # a few numbers: numpy's operations cost less than torch's
            g, previous = g.detach().numpy(), previous.numpy()
        xp = namespace(g)
        finite = xp.isfinite(g).all()  # an AMP overflow step leaves the state alone
        g = xp.where(finite, g, xp.zeros_like(g))  # keeps the projection well defined
        lam = project_simplex(previous - self.gamma * (g @ previous + self.rho * previous))
        self.task_weights.copy_(torch.as_tensor(xp.where(finite, lam, previous)))
        return torch.as_tensor(lam).to(gramian.dtype)
