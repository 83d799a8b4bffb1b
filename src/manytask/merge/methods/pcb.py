r"""PCB-Merging: weight every entry of every task vector by its importance within the task and
its agreement with the other tasks, drop the low scores, and take the weighted mean.

Du, Lee, Li, Jiang, Guo, Yu, Liu, Goh, Tang, He and Zhang, "Parameter Competition Balancing
for Model Merging", arXiv:2410.02396, Section 3 (intra-balancing, inter-balancing, drop and
rescale). The paper writes :math:`\beta_{intra,t} = \operatorname{Softmax}(T \cdot
\operatorname{Norm}(\tau_t \odot \tau_t))` and :math:`\beta_{inter,t} = \sum_j
\operatorname{Softmax}(\operatorname{Norm}(\tau_t \odot \tau_j))`; we follow the authors'
released implementation of these steps (``pcb-merging.py``, which the README names as the
method's reference), on the :math:`d` entries of one tensor with :math:`T` task models:

1. Clip outliers: :math:`a_t = \operatorname{clamp}(|\tau_t|, q_{c}(|\tau_t|),
   q_{1-c}(|\tau_t|))` with :math:`q` the quantiles of task :math:`t`'s entries, and
   :math:`\tilde\tau_t = \operatorname{sgn}(\tau_t)\, a_t` (the values that are merged).
2. Intra-balancing: :math:`\beta^{intra}_t = \exp(T \cdot \operatorname{mm}(a_t)^2)`, where
   :math:`\operatorname{mm}` scales a task's entries to [0, 1] by its min and max (the
   Softmax's normaliser is a positive constant per task, which step 4 cancels).
3. Inter-balancing: :math:`\beta^{inter}_t = \tanh(\tau_t \odot \sum_j \tau_j)`, positive
   where the task agrees with the others' sum; :math:`\beta_t = \beta^{intra}_t \odot
   \beta^{inter}_t`.
4. Drop and rescale: with :math:`c_t` the :math:`(K+1)`-th largest :math:`\beta_t`,
   :math:`K = \lfloor r d \rceil`, :math:`s_t = (\beta_t - c_t)_+ / (\max \beta_t - c_t)`, so
   the :math:`K` top-scored entries get weights in (0, 1] and the others 0 (with
   :math:`K = d`, :math:`c_t = \min \beta_t`). Then
   :math:`\tau_m = \sum_t s_t \odot \tilde\tau_t / \sum_t s_t` (0 where no task is kept) and
   :math:`\theta = \theta_0 + \lambda \tau_m`.

A task whose scores are all equal (e.g. a zero task vector, or a one-entry tensor) gets weight
0 in that tensor. Granularity: per tensor; the released code flattens the whole model into one
vector. Its index arithmetic keeps one entry fewer than :math:`r d` and clips one more than the
quantile; we keep exactly :math:`K` and clip at the quantiles.

Defaults: ``ratio`` :math:`r = 0.1` and ``clip`` :math:`c = 10^{-4}` (the defaults of the
released ``PCB_merge``; its scripts use :math:`r \in \{0.05, 0.1, 0.2\}`, and its language-model
experiments, ``task_para_att_merge``, clip at :math:`0.01`); ``scale``
:math:`\lambda = 1` (our choice: :math:`\tau_m` is a weighted mean, as in TIES; the released
code searches per-task :math:`\lambda` in [0.8, 1.3] starting from 1 on validation data).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from manytask.merge.methods.param_checks import check_fraction, check_range
from manytask.merge.methods.sparsify import keep_count
from manytask.merge.methods.task_vectors import TaskVectorRule
from manytask.registry import register


def _min_max(values: Tensor) -> Tensor:
    """Scale each row to [0, 1] by its min and max; a constant row becomes 0."""
    low = values.amin(dim=1, keepdim=True)
    span = values.amax(dim=1, keepdim=True) - low
    scaled = (values - low).div_(span.clamp_min(torch.finfo(values.dtype).tiny))
    return torch.where(span > 0, scaled, 0.0)


def clip_magnitudes(rows: Tensor, clip: float) -> Tensor:
    """Each row's magnitudes clamped to its ``clip`` and ``1 - clip`` quantiles: the order
    statistics ``floor(c d) + 1`` and ``d - floor(c d)`` of the ``d`` entries."""
    magnitudes = rows.abs()
    size = rows.shape[1]
    if clip <= 0.0 or size == 0:
        return magnitudes
    tail = math.floor(clip * size)
    low = magnitudes.kthvalue(tail + 1, dim=1, keepdim=True).values
    high = magnitudes.kthvalue(size - tail, dim=1, keepdim=True).values
    return torch.minimum(torch.maximum(magnitudes, low), high)


def balance_scores(rows: Tensor, clipped: Tensor) -> Tensor:
    """:math:`\\beta_t = \\exp(T\\,\\operatorname{mm}(a_t)^2) \\odot \\tanh(\\tau_t \\odot
    \\sum_j \\tau_j)` for the ``(T, d)`` task vectors and their clipped magnitudes."""
    intra = _min_max(clipped).square_().mul_(rows.shape[0]).exp_()
    inter = (rows * rows.sum(dim=0)).tanh_()
    return intra.mul_(inter)


def keep_weights(scores: Tensor, ratio: float) -> Tensor:
    """:math:`s_t = (\\beta_t - c_t)_+ / (\\max\\beta_t - c_t)` with :math:`c_t` the
    (K+1)-th largest score (the smallest when K = d), K = nearest integer to ``ratio * d``."""
    size = scores.shape[1]
    keep = keep_count(ratio, size)
    if keep >= size:
        floor = scores.amin(dim=1, keepdim=True)
    else:
        floor = scores.topk(keep + 1, dim=1).values[:, -1:]
    span = scores.amax(dim=1, keepdim=True) - floor
    weights = (scores - floor).clamp_min_(0.0).div_(span.clamp_min(torch.finfo(span.dtype).tiny))
    return torch.where(span > 0, weights, 0.0)


@register(
    "merge_rule",
    "pcb",
    "PCB: intra- and inter-task balancing scores, drop low scores, weighted mean (Du et al., "
    "2024, arXiv:2410.02396)",
)
class ParameterCompetitionBalancing(TaskVectorRule):
    """PCB-Merging.

    Args:
        ratio: fraction r of each task's entries kept by score, in (0, 1].
        clip: quantile c at which magnitudes are clipped on both sides, in [0, 0.5).
        scale: λ, the coefficient on the merged task vector, ≥ 0.
    """

    def __init__(self, ratio: float = 0.1, clip: float = 1e-4, scale: float = 1.0) -> None:
        self.ratio = check_fraction("pcb", "ratio", ratio)
        self.clip = check_range("pcb", "clip", clip, 0.0, 0.5, high_open=True)
        self.scale = check_range("pcb", "scale", scale, 0.0)

    def merge_vectors(
        self, name: str, base: Tensor, vectors: Tensor, generator: torch.Generator
    ) -> Tensor:
        if base.numel() == 0:
            return base.clone()
        rows = vectors.reshape(vectors.shape[0], -1)
        clipped = clip_magnitudes(rows, self.clip)
        weights = keep_weights(balance_scores(rows, clipped), self.ratio)
        merged_values = clipped.mul_(rows.sign()).mul_(weights).sum(dim=0)
        total = weights.sum(dim=0)
        merged = torch.where(total > 0, merged_values / total.clamp_min(1e-12), 0.0)
        return merged.view_as(base).mul_(self.scale).add_(base)
