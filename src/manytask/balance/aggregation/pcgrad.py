r"""PCGrad: project each task gradient off the gradients it conflicts with.

Yu, Kumar, Gupta, Levine, Hausman and Finn, "Gradient Surgery for Multi-Task Learning",
NeurIPS 2020, arXiv:2001.06782, Algorithm 1. For each task :math:`i`, in a random order of the
other tasks :math:`j`:

.. math::

    g_i^{PC} \leftarrow g_i^{PC} - \frac{\min(0,\, g_i^{PC\top} g_j)}{\|g_j\|^2}\, g_j,
    \qquad d = \sum_i g_i^{PC}

(projections are against the original :math:`g_j`). Every :math:`g_i^{PC}` stays a linear
combination of the original gradients, so manytask tracks the coefficients with the Gramian
alone and returns ``d = Jᵀ w`` (as torchjd's ``PCGradWeighting``); the ``T`` projection
sequences run in parallel, ``T − 1`` vectorised rounds. The random orders come from the
balancer's own generator (seed ``seed``, or drawn from the global torch RNG), so runs are
reproducible and every rank draws the same order under ``torch.distributed`` (exact there).

Defaults: the sum of the projected gradients, as the paper. Shared parameters receive ``d``;
task-specific parameters their own task's gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import GramianWeighting
from manytask.balance.randomness import host_to_device, seeded_generator
from manytask.balance.solvers.backend import namespace


def pcgrad_weights(gramian: Tensor, orders: Tensor) -> Tensor:
    """PCGrad's weights on the original gradients, given each task's order of the others.

    ``orders[i]`` is a permutation of all task indices; task ``i`` skips itself. The ``T``
    rounds run in numpy on a CPU (each is a few operations on ``T × T`` numbers, where torch's
    dispatch costs more than the arithmetic: 40 tasks took 1.2 ms in torch), two tasks there
    in closed form (:func:`_pair_weights`), in torch on the Gramian's device elsewhere.
    """
    t = gramian.shape[0]
    if gramian.device.type == "cpu":
        g = gramian.detach().double().numpy()
        if t == 2:  # one partner each, so the order drops out: Python floats
            return torch.tensor(_pair_weights(g.tolist()), dtype=gramian.dtype)
        coeff = _projections(g, orders.numpy(), np.eye(t), np.arange(t))
        return torch.from_numpy(coeff.sum(axis=0)).to(gramian.dtype)
    g64 = gramian.double()
    identity = torch.eye(t, dtype=g64.dtype, device=g64.device)
    projected: Tensor = _projections(g64, orders, identity, torch.arange(t, device=g64.device))
    return projected.sum(dim=0).to(gramian.dtype)


def _pair_weights(g: list[list[float]]) -> list[float]:
    """:func:`_projections` summed, for two tasks: ``wᵢ = 1 − min(0, G_ji)/G_ii``, the
    coefficient of ``gᵢ`` in the other task's projected gradient (with the same floor of
    ``1e-20`` on ``G_ii`` and the same reading of a NaN: no conflict)."""
    (g11, g12), (g21, g22) = g
    w1 = 1.0 - (g21 / (g11 if g11 > 1e-20 else 1e-20) if g21 < 0 else 0.0)
    w2 = 1.0 - (g12 / (g22 if g22 > 1e-20 else 1e-20) if g12 < 0 else 0.0)
    return [w1, w2]


def _projections(g: Any, orders: Any, coeff: Any, rows: Any) -> Any:
    """Row ``i``: :math:`g_i^{PC}` in the basis of the original gradients, starting from the
    identity ``coeff`` (numpy arrays or tensors alike; ``rows`` is ``0 … T−1``)."""
    xp = namespace(g)
    for k in range(g.shape[0]):
        j = orders[:, k]
        dot = (coeff @ g)[rows, j]  # g_i^PCᵀ g_j
        conflict = (dot < 0) & (j != rows)
        squared = g[j, j]
        step = xp.where(conflict, dot / xp.where(squared > 1e-20, squared, 1e-20), 0.0)
        coeff[rows, j] -= step
    return coeff


@registry.register(
    "balancer",
    "pcgrad",
    "gradient surgery: project away conflicts (Yu et al., NeurIPS 2020, arXiv:2001.06782)",
)
class PCGrad(GramianWeighting):
    """PCGrad as a Gramian weighting.

    Args:
        tasks: task names.
        seed: seed of the projection orders (None: from the global torch RNG).
    """

    def __init__(self, tasks: Sequence[str], seed: int | None = None) -> None:
        super().__init__(tasks)
        self.generator = seeded_generator(seed)

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        t = self.num_tasks
        orders = host_to_device(
            torch.rand(t, t, generator=self.generator).argsort(dim=1), gramian.device
        )
        return pcgrad_weights(gramian, orders)

    def get_extra_state(self) -> Any:
        return {**super().get_extra_state(), "generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self.generator.set_state(state["generator"])
