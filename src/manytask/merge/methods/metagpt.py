r"""MetaGPT: task arithmetic with coefficients proportional to each task vector's squared norm.

Zhou et al., "MetaGPT: Merging Large Language Models Using Model Exclusive Task Arithmetic",
arXiv:2406.11385, Section 3. Over the whole model:

.. math::

    \lambda_t = \frac{\lVert \tau_t \rVert^2}{\sum_j \lVert \tau_j \rVert^2}, \qquad
    \theta = \theta_0 + \sum_t \lambda_t \tau_t .

The norms are model-wide, so the rule is two-pass: the engine streams every tensor through
:meth:`MetaGPT.observe` (accumulating :math:`\lVert \tau_t \rVert^2`) before the first
:meth:`MetaGPT.merge_tensor`. When every task vector is zero the coefficients are
:math:`1/T` (any choice gives the base). No parameters: the coefficients are the method.
:meth:`MetaGPT.summary` reports the coefficients and the squared norms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from manytask.merge.methods.task_vectors import TaskVectorRule, base_and_vectors, weighted_sum
from manytask.registry import register


@register(
    "merge_rule",
    "metagpt",
    "MetaGPT: task arithmetic with λ_t = |τ_t|² / Σ|τ_j|² over the whole model (Zhou et al., "
    "2024, arXiv:2406.11385)",
)
class MetaGPT(TaskVectorRule):
    """MetaGPT (two-pass)."""

    two_pass: ClassVar[bool] = True

    def __init__(self) -> None:
        self.squared_norms: Tensor | None = None

    def begin(self) -> None:
        self.squared_norms = None

    def observe(self, name: str, base: Tensor | None, models: Sequence[Tensor]) -> None:
        _, vectors = base_and_vectors(base, models)
        flat = vectors.reshape(len(models), -1)
        norms = flat.square().sum(dim=1, dtype=torch.float64)
        self.squared_norms = norms if self.squared_norms is None else self.squared_norms + norms

    def coefficients(self) -> Tensor:
        """:math:`\\lambda_t` (float64) from the norms observed so far."""
        if self.squared_norms is None:
            raise RuntimeError(
                "metagpt is two-pass: observe() must see every tensor before merge_tensor()"
            )
        total = self.squared_norms.sum()
        if total <= 0:
            return torch.full_like(self.squared_norms, 1.0 / len(self.squared_norms))
        return self.squared_norms / total

    def merge_vectors(
        self, name: str, base: Tensor, vectors: Tensor, generator: torch.Generator
    ) -> Tensor:
        coefficients = self.coefficients().to(torch.float32)
        return weighted_sum(vectors, coefficients).add_(base)

    def summary(self) -> dict[str, Any]:
        """The coefficients λ_t and the squared norms ‖τ_t‖², in task order."""
        if self.squared_norms is None:
            return {}
        return {
            "coefficients": self.coefficients().tolist(),
            "squared_norms": self.squared_norms.tolist(),
        }
