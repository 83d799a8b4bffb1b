r"""EMR-Merging: one unified task vector plus, per task, a mask and a rescaler.

Huang, Ye, Chen, He, Yue and Ouyang, "EMR-Merging: Tuning-Free High-Performance Model
Merging", arXiv:2405.17461, Section 3 (Elect, Mask, Rescale):

.. math::

    \gamma = \operatorname{sgn}\Big(\sum_t \tau_t\Big), \qquad
    \epsilon = \max_{t:\ \operatorname{sgn}(\tau_t) = \gamma} |\tau_t|, \qquad
    \tau_{uni} = \gamma \odot \epsilon,

.. math::

    M_t = \mathbb 1[\tau_t \odot \tau_{uni} > 0], \qquad
    \lambda_t = \frac{\sum |\tau_t|}{\sum |M_t \odot \tau_{uni}|},

where the sums of :math:`\lambda_t` run over every entry of the model. Task :math:`t`'s model
is recovered as :math:`\theta_0 + \lambda_t M_t \odot \tau_{uni}`.

Outputs: the merged tensor is :math:`\theta_0 + \tau_{uni}`, the masks are side outputs
``mask/<t>`` (bool, one per task), and the rescalers :math:`\lambda_t` are model-wide, so the
rule is two-pass (the engine streams every tensor through :meth:`Emr.observe` first) and
reports them in :meth:`Emr.summary` as ``rescalers``. A task whose mask selects nothing gets
:math:`\lambda_t = 1` (its recovered model is the base whatever the value).

The sums follow the paper's formula; the authors' code adds each tensor's *mean* absolute
value instead, which weighs small tensors (biases, norms) as much as large ones. Where the
elected sign is 0 (the task vectors cancel exactly) :math:`\tau_{uni} = 0`; the authors' code
takes such entries as negative. No parameters (the method is tuning-free).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from manytask.merge.methods.signs import agreement_mask, elect_sign
from manytask.merge.methods.task_vectors import TaskVectorRule, base_and_vectors
from manytask.merge.rule import Merged
from manytask.registry import register


def unified_vector(vectors: Tensor) -> Tensor:
    """:math:`\\tau_{uni} = \\gamma \\odot \\max_{t: \\operatorname{sgn}(\\tau_t) = \\gamma}
    |\\tau_t|` for the ``(T, *shape)`` stack."""
    sign = elect_sign(vectors)
    agreeing = torch.where(agreement_mask(vectors, sign), vectors.abs(), 0.0)
    return agreeing.amax(dim=0).mul_(sign)


def task_masks(vectors: Tensor, unified: Tensor) -> Tensor:
    """:math:`M_t = \\mathbb 1[\\tau_t \\odot \\tau_{uni} > 0]` as a ``(T, *shape)`` bool."""
    return (vectors * unified) > 0


@register(
    "merge_rule",
    "emr",
    "EMR: elected unified task vector, per-task masks (side outputs) and rescalers (Huang et "
    "al., 2024, arXiv:2405.17461)",
)
class Emr(TaskVectorRule):
    """EMR-Merging (two-pass; masks as side outputs ``mask/<t>``, rescalers in the summary)."""

    two_pass: ClassVar[bool] = True

    def __init__(self) -> None:
        self.task_mass: Tensor | None = None
        self.masked_mass: Tensor | None = None

    def begin(self) -> None:
        self.task_mass = self.masked_mass = None

    def observe(self, name: str, base: Tensor | None, models: Sequence[Tensor]) -> None:
        _, vectors = base_and_vectors(base, models)
        unified = unified_vector(vectors)
        masks = task_masks(vectors, unified)
        count = len(models)
        task_mass = vectors.abs_().reshape(count, -1).sum(dim=1, dtype=torch.float64)
        masked = torch.where(masks, unified.abs(), 0.0).reshape(count, -1)
        masked_mass = masked.sum(dim=1, dtype=torch.float64)
        if self.task_mass is None or self.masked_mass is None:
            self.task_mass, self.masked_mass = task_mass, masked_mass
        else:
            self.task_mass = self.task_mass + task_mass
            self.masked_mass = self.masked_mass + masked_mass

    def rescalers(self) -> Tensor:
        """:math:`\\lambda_t = \\sum|\\tau_t| / \\sum|M_t \\odot \\tau_{uni}|` (float64; 1 when
        the mask selects nothing)."""
        if self.task_mass is None or self.masked_mass is None:
            raise RuntimeError(
                "emr is two-pass: observe() must see every tensor before merge_tensor()"
            )
        selected = self.masked_mass > 0
        ratio = self.task_mass / torch.where(selected, self.masked_mass, 1.0)
        return torch.where(selected, ratio, 1.0)

    def merge_vectors(
        self, name: str, base: Tensor, vectors: Tensor, generator: torch.Generator
    ) -> Merged:
        self.rescalers()  # raises before the first pass: the rescalers would be lost
        unified = unified_vector(vectors)
        masks = task_masks(vectors, unified)
        extras = {f"mask/{task}": masks[task] for task in range(len(vectors))}
        return Merged(tensor=unified.add_(base), extras=extras)

    def summary(self) -> dict[str, Any]:
        """The rescalers λ_t in task order."""
        if self.task_mass is None:
            return {}
        return {"rescalers": self.rescalers().tolist()}
