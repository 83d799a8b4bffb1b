r"""Model Stock: interpolate between the base and the average of the task models by a ratio
that the angle between their task vectors decides.

Jang, Yun and Han, "Model Stock: All we need is just a few fine-tuned models",
arXiv:2403.19522, Section 3. Per layer, with :math:`k` task models,
:math:`\cos\theta` their task vectors' cosine and :math:`\bar\theta` their average:

.. math::

    t = \frac{k \cos\theta}{1 + (k - 1)\cos\theta}, \qquad
    \theta_H = t\, \bar\theta + (1 - t)\, \theta_0 .

Granularity: per tensor (the paper's per-layer ratio). For :math:`k > 2` the paper assumes one
common angle; we use the mean of the :math:`k(k-1)/2` pairwise cosines. A pair with a zero task
vector has cosine 0, and the mean cosine is clamped at 0 (our choice: the derivation assumes
angles below 90°; a negative cosine would give :math:`t < 0` and :math:`\cos\theta =
-1/(k-1)` divides by zero), so :math:`t \in [0, 1]`. No parameters; at least two task models
and the base are needed (the paper's method is defined from two fine-tuned models up).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from manytask.merge.methods.task_vectors import TaskVectorRule
from manytask.registry import register


def mean_pairwise_cosine(vectors: Tensor) -> float:
    """Mean cosine over all pairs of rows of the ``(T, *shape)`` stack; a zero row counts 0."""
    flat = vectors.reshape(vectors.shape[0], -1)
    gram = (flat @ flat.T).double()
    norms = gram.diagonal().clamp_min(0.0).sqrt()
    scale = torch.outer(norms, norms)
    cosines = torch.where(scale > 0, gram / scale.clamp_min(1e-300), 0.0)
    count = vectors.shape[0]
    upper = torch.triu_indices(count, count, offset=1)
    return float(cosines[upper[0], upper[1]].mean())


@register(
    "merge_rule",
    "model_stock",
    "Model Stock: base-to-average interpolation from the task vectors' angle (Jang et al., "
    "2024, arXiv:2403.19522)",
)
class ModelStock(TaskVectorRule):
    """Model Stock (per-tensor interpolation ratio)."""

    min_models: ClassVar[int] = 2

    def __init__(self) -> None:
        self.ratios: dict[str, float] = {}

    def begin(self) -> None:
        self.ratios = {}

    def merge_vectors(
        self, name: str, base: Tensor, vectors: Tensor, generator: torch.Generator
    ) -> Tensor:
        count = len(vectors)
        cosine = max(0.0, mean_pairwise_cosine(vectors))
        ratio = count * cosine / (1.0 + (count - 1) * cosine)
        self.ratios[name] = ratio
        # t·mean(θ_t) + (1 - t)·θ_0 = θ_0 + t·mean(τ_t)
        return vectors.mean(dim=0).mul_(ratio).add_(base)

    def summary(self) -> dict[str, Any]:
        """The interpolation ratio t of every merged tensor, by tensor name."""
        return {"ratio": dict(self.ratios)}
