r"""Scale-invariant baseline (SI): equal weighting of the log-losses.

.. math::

    \mathcal{L} = \sum_{i=1}^{T} \log L_i, \qquad
    \nabla \mathcal{L} = \sum_{i=1}^{T} \frac{1}{L_i} \nabla L_i, \qquad w_i = \frac{1}{L_i}

Used as the "SI" baseline by Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik and Fetaya,
"Multi-Task Learning as a Bargaining Game", ICML 2022, arXiv:2202.01017 (their code's
``ScaleInvariantLinearScalarization``: ``sum(log(losses))``). Multiplying a loss by a constant
does not change the update, hence the name. No parameters.

**Implementation choice.** The log is not taken by the engine (``loss_transform="log"``);
instead :meth:`weights` returns :math:`1/L_i` for the raw losses, whose gradient
:math:`\sum_i \nabla L_i / L_i` is that of :math:`\sum_i \log L_i`. Two reasons: the
reported weights then say how much each raw loss counts, and under ``torch.distributed``
:math:`1/\bar L_i` uses the rank-averaged loss, so the update is exactly
:math:`\nabla \sum_i \log \bar L_i` of the union batch, whereas averaging per-rank gradients
of :math:`\log L_i^{(r)}` would not be. A zero loss would make the log's gradient infinite; the
value is floored at the smallest normal float32 (:math:`1.2\times10^{-38}`), so weights stay
finite. Combined with ``loss_transform="log"`` the method balances :math:`\log\log L_i`, which
requires every :math:`L_i > 1`; that combination is rarely what one wants.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import LossWeighting

_FLOOR = torch.finfo(torch.float32).tiny


@registry.register(
    "balancer",
    "si",
    "scale-invariant baseline: sum of log losses, w_i = 1/L_i "
    "(Navon et al., ICML 2022, arXiv:2202.01017)",
)
class ScaleInvariant(LossWeighting):
    """Equal weighting of the log-losses: ``w_i = 1 / L_i`` on the raw losses."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)

    def weights(self, losses: Tensor) -> Tensor:
        return losses.clamp_min(_FLOOR).reciprocal()
