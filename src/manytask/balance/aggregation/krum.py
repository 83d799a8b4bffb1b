r"""Krum and Multi-Krum: keep the gradients closest to their neighbours.

Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent", NeurIPS 2017 (preprint "Byzantine-Tolerant Machine Learning",
arXiv:1703.02757). Each gradient is scored by the sum of its squared distances to its
:math:`T - f - 2` nearest other gradients (``f`` = ``n_byzantine``), distances read from the
Gramian:

.. math::

    s(i) = \sum_{j \in N_i} \|g_i - g_j\|^2, \qquad
    \|g_i - g_j\|^2 = G_{ii} + G_{jj} - 2 G_{ij},

and Krum returns the gradient of lowest score; Multi-Krum (same paper) the average of the
``m`` (``n_selected``) lowest: :math:`w_i = 1/m` on the selected tasks, 0 elsewhere.

Defaults: ``n_byzantine = 0`` and ``n_selected = 1`` (plain Krum). The paper requires
:math:`T > 2f + 2`; manytask raises for ``n_byzantine > 0`` below that and, with
``n_byzantine = 0``, accepts ``T ≤ 2`` (no neighbour is scored, every task ties and the
direction is the mean gradient).

Deviations:

- ties: the paper does not say which of equal scores wins. manytask selects every task whose
  score is within ``1e-9·ΣᵢG_ii`` of the ``m``-th lowest and averages them (so more than ``m``
  tasks are averaged on a tie); ties are common — with ``T − f − 2 = 1`` the two mutually
  nearest gradients always tie — and averaging them keeps the rule independent of the task
  order. torchjd 0.18 keeps whichever ``topk`` returns;
- torchjd 0.18 sums the (non-squared) distances; manytask follows the paper's squared
  distances. The two select the same gradients whenever one neighbour is scored, and usually
  otherwise (``tests/test_method_krum.py``).

Properties: homogeneous and independent of the task order (ties averaged); not
non-conflicting. In multi-task learning "Byzantine" tasks are outlier tasks whose gradients
are far from the others'; Krum ignores them.

Shared parameters receive ``d``; task-specific parameters their own task's gradient. Exact under
``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import GramianWeighting
from manytask.errors import ConfigError

#: scores within this fraction of ΣᵢG_ii of the m-th lowest count as tied
TIE_TOLERANCE = 1e-9


def krum_weights(gramian: Tensor, n_byzantine: int, n_selected: int) -> Tensor:
    """Multi-Krum's weights (float64): ``1/k`` on the ``k ≥ m`` selected tasks, 0 elsewhere."""
    g = gramian.double()
    g = 0.5 * (g + g.T)
    t = g.shape[0]
    norms = g.diagonal()
    distances = (norms[:, None] + norms[None, :] - 2.0 * g).clamp_min(0.0)
    neighbours = max(t - n_byzantine - 2, 0)
    if neighbours > 0:
        others = distances + torch.diag(torch.full((t,), torch.inf, dtype=g.dtype, device=g.device))
        nearest, _ = torch.topk(others, neighbours, dim=1, largest=False)
        scores = nearest.sum(dim=1)
    else:
        scores = torch.zeros(t, dtype=g.dtype, device=g.device)
    threshold = torch.sort(scores).values[n_selected - 1]
    tolerance = TIE_TOLERANCE * norms.sum().clamp_min(0.0)
    selected = (scores <= threshold + tolerance).to(g.dtype)
    return selected / selected.sum()


@registry.register(
    "balancer",
    "krum",
    "keep the gradients nearest to their neighbours, Multi-Krum (Blanchard et al., NeurIPS 2017, "
    "arXiv:1703.02757)",
)
class Krum(GramianWeighting):
    """(Multi-)Krum weights from the Gramian.

    Args:
        tasks: task names.
        n_byzantine: ``f``, the number of outlier (Byzantine) tasks to tolerate.
        n_selected: ``m``, the number of gradients averaged (1: Krum).
    """

    permutation_invariant = True
    non_conflicting = False
    homogeneous = True

    def __init__(self, tasks: Sequence[str], n_byzantine: int = 0, n_selected: int = 1) -> None:
        super().__init__(tasks)
        t = self.num_tasks
        if n_byzantine < 0:
            raise ConfigError(f"krum: n_byzantine must be ≥ 0, got {n_byzantine}")
        if n_byzantine > 0 and t <= 2 * n_byzantine + 2:
            raise ConfigError(
                f"krum: n_byzantine={n_byzantine} needs more than 2·n_byzantine + 2 = "
                f"{2 * n_byzantine + 2} tasks, got {t}"
            )
        if not 1 <= n_selected <= t:
            raise ConfigError(
                f"krum: n_selected must be in [1, {t}] (the task count), got {n_selected}"
            )
        self.n_byzantine = n_byzantine
        self.n_selected = n_selected

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return krum_weights(gramian, self.n_byzantine, self.n_selected).to(gramian.dtype)
