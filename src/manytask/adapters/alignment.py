r"""Align-LoRA's alignment loss between the tasks' low-rank projections.

Liu, Cheng, Chang and Wu, "Align, Don't Divide: Revisiting the LoRA Architecture in Multi-Task
Learning", arXiv:2508.05078. The down-projection ``z = A x`` of a shared LoRA is taken, for each
task ``t`` of the batch, as a diagonal Gaussian with per-coordinate mean ``μ_t`` and (unbiased)
variance ``σ²_t`` over the task's samples, separately at every token position ``l`` and rank
``k``. Pairs of tasks are pulled together by the symmetric KL divergence

.. math::

    D(t, u) = \tfrac12\left(\mathrm{KL}(t\,\|\,u) + \mathrm{KL}(u\,\|\,t)\right),\qquad
    \mathrm{KL}(t\,\|\,u) = \frac1L \sum_l \sum_k \frac12\left(
        \log\frac{σ^2_{u}}{σ^2_{t}} + \frac{σ^2_{t}}{σ^2_{u}}
        + \frac{(μ_u - μ_t)^2}{σ^2_{u}} - 1\right)

(``ε = 10⁻⁸`` added to every variance), averaged over the pairs ``t < u`` of tasks that have at
least two samples in the batch. The authors' code computes it over the samples of one gradient
accumulation cycle; here it is computed per forward pass on the batch at hand, with no Python
loop over tasks (statistics by a one-hot matrix product).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: added to the variances (the authors' code)
EPS = 1e-8


def alignment_loss(z: Tensor, task_ids: Tensor, num_tasks: int) -> Tensor | None:
    """Mean symmetric KL between the tasks' diagonal Gaussians; ``z`` is ``(N, L, r)``.

    Returns ``None`` when fewer than two tasks have two or more samples in the batch.
    """
    members = F.one_hot(task_ids, num_tasks).to(z.dtype)  # (N, T)
    counts = members.sum(0)
    mean = torch.einsum("nt,nlr->tlr", members, z) / counts.clamp_min(1.0)[:, None, None]
    centered = z - mean[task_ids]
    var = torch.einsum("nt,nlr->tlr", members, centered * centered)
    var = var / (counts - 1.0).clamp_min(1.0)[:, None, None] + EPS
    # kl[t, u] = KL(N_t || N_u), summed over the rank and averaged over positions
    log_ratio = var.log().unsqueeze(0) - var.log().unsqueeze(1)
    trace = var.unsqueeze(1) / var.unsqueeze(0)
    shift = (mean.unsqueeze(0) - mean.unsqueeze(1)) ** 2 / var.unsqueeze(0)
    kl = (0.5 * (log_ratio + trace + shift - 1.0)).sum(-1).mean(-1)
    symmetric = 0.5 * (kl + kl.t())
    usable = counts >= 2
    pairs = usable.unsqueeze(0) & usable.unsqueeze(1)
    pairs = torch.triu(pairs, diagonal=1)
    if not bool(pairs.any()):
        return None
    return symmetric[pairs].mean()
