r"""MGDA: the min-norm point of the convex hull of the task gradients.

Sener and Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
arXiv:1810.04650 (the multiple-gradient descent algorithm of Désidéri, 2012):

.. math::

    w = \arg\min_{w \in \Delta_T} \Big\| \sum_i w_i \, \tilde g_i \Big\|^2, \qquad
    d = \sum_i w_i \, \tilde g_i, \qquad \tilde g_i = g_i / n_i

where :math:`\Delta_T` is the probability simplex and :math:`n_i` a gradient normalisation of
the paper's code: ``"none"`` (:math:`n_i = 1`), ``"l2"`` (:math:`\|g_i\|`), ``"loss"``
(:math:`L_i`) or ``"loss+"`` (:math:`L_i \|g_i\|`). The direction is a descent direction for
every task (:math:`g_i^\top d \ge \|d\|^2 \ge 0`) and is zero at a Pareto-stationary point.

**Absent tasks.** A loss of exactly zero is a task absent from the batch (a mixed-task batch, or
no label for it); its gradient is zero, and a zero gradient is the min-norm point, so the rule
as written takes no step on any batch that lacks a task. manytask takes the min-norm point of
the tasks present instead: an absent task's row and column of the Gramian are those of the first
task present (a copy of a gradient leaves the convex hull, and so its min-norm point, as it is),
and the weight the solver gives the copy goes back to that task. With every task present nothing
changes.

Solver: closed form for two tasks; accelerated projected gradient otherwise
(:func:`~manytask.balance.solvers.simplex.min_norm_weights`; more accurate than the paper's
Frank–Wolfe at a fixed iteration count). Defaults: ``normalization="none"`` (LibMTL's default
``mgda_gn``), 300 iterations. Shared parameters receive ``d``; task-specific parameters their
own task's gradient. Exact under ``torch.distributed`` (``J`` is averaged over ranks first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import GramianWeighting, present_tasks
from manytask.balance.solvers.simplex import min_norm_weights
from manytask.errors import ConfigError

Normalization = Literal["none", "l2", "loss", "loss+"]


def present_min_norm(gramian: Tensor, present: Tensor, iterations: int) -> Tensor:
    """The min-norm weights of the tasks marked ``present`` (zeros for the others), without a
    host synchronisation: an absent task stands in as a copy of the first task present, and the
    weight the solver gives the copy goes back to that task (module docstring)."""
    tasks = torch.arange(len(present), device=present.device)
    index = torch.where(present, tasks, present.to(torch.int64).argmax())
    solved = min_norm_weights(gramian[index][:, index], iterations)
    return torch.zeros_like(solved).index_add_(0, index, solved)


@registry.register(
    "balancer",
    "mgda",
    "min-norm point of the task gradients (Sener & Koltun, NeurIPS 2018, arXiv:1810.04650)",
)
class MGDA(GramianWeighting):
    """MGDA weights from the Gramian.

    Args:
        tasks: task names.
        normalization: gradient normalisation before the min-norm problem.
        iterations: solver iterations (more than two tasks).
    """

    permutation_invariant = True
    non_conflicting = True
    homogeneous = True

    def __init__(
        self, tasks: Sequence[str], normalization: Normalization = "none", iterations: int = 300
    ) -> None:
        super().__init__(tasks)
        if normalization not in ("none", "l2", "loss", "loss+"):
            raise ConfigError(
                f"mgda: normalization must be none, l2, loss or loss+, got '{normalization}'"
            )
        if iterations < 1:
            raise ConfigError(f"mgda: iterations must be ≥ 1, got {iterations}")
        self.normalization = normalization
        self.iterations = iterations

    def scales(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """The normalisers ``nᵢ`` of the gradients."""
        norms = gramian.diagonal().clamp_min(0).sqrt()
        ones = torch.ones_like(norms)
        scale = {
            "none": ones,
            "l2": norms,
            "loss": losses.to(norms.dtype),
            "loss+": losses.to(norms.dtype) * norms,
        }[self.normalization]
        return scale.clamp_min(1e-12)

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        n = self.scales(gramian, losses)
        normalised = gramian / (n[:, None] * n[None, :])
        present = present_tasks(losses)
        if present.device.type == "cpu" and bool(present.all()):  # a CPU read costs no sync
            w = min_norm_weights(normalised, self.iterations)
        else:
            w = present_min_norm(normalised, present, self.iterations)
        return w / n  # d = Σ wᵢ gᵢ/nᵢ as weights on the raw gradients
