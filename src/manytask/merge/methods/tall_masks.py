r"""TALL masks and Consensus Merging: find where each task's information lives in the merged
task vector, and keep only the weights that matter to several tasks.

Wang, Dimitriadis, Ortiz-Jiménez, Fleuret and Frossard, "Localizing Task Information for
Improved Model Merging and Compression", arXiv:2405.07813, Sections 3–4. With the multi-task
vector :math:`\tau_{MTL}` (task arithmetic's :math:`\sum_t \tau_t`, or TIES's merged vector),
task :math:`t`'s TALL mask marks the entries where the task's own change outweighs what the
other tasks add there:

.. math::

    m_t = \mathbb 1\big[\,|\tau_t| > \lambda_t\, |\tau_{MTL} - \tau_t|\,\big].

- ``tall_masks`` (compression): returns :math:`\theta_0 + \tau_{MTL}` and the masks as side
  outputs ``mask/<t>`` (bool); task :math:`t`'s model is recovered as
  :math:`\theta_0 + m_t \odot \tau_{MTL}` (the paper evaluates it at coefficient 1).
- ``consensus_ta`` / ``consensus_ties`` (Consensus Merging): keep the entries relevant to at
  least :math:`k` tasks, removing "selfish" (one task) and "catastrophic" (no task) weights,
  :math:`\theta = \theta_0 + \alpha\, \mathbb 1[\sum_t m_t \ge k] \odot \tau_{MTL}`, with
  :math:`\tau_{MTL}` from task arithmetic or from TIES.

As in the authors' released code, the TIES multi-task vector keeps the top-20% of each task
vector, elects signs by total mass and takes the disjoint *sum* (``dis-sum``) of the agreeing
entries (:mod:`manytask.merge.methods.signs`), and the masks compare the untrimmed task
vectors with it; the comparison is strict (``>``), as in that code. Masks are per entry; the
TIES trim is per tensor here (the paper's code trims over the whole flattened model).

Defaults: ``k = 2`` (the paper's choice, and the released ``consensus.yaml``); ``mask_lambda``
:math:`\lambda_t = 0.4` for every task (our choice: the middle of the grid {0.2, …, 0.6} from
which the paper picks each :math:`\lambda_t` on validation data); ``density = 0.2`` for the
TIES vector (the released code's ``reset_thresh=20``); ``scale`` :math:`\alpha = 0.3` for
consensus merging (our choice, as for ``task_arithmetic``: the multi-task vector is a sum in
both variants, and the paper tunes :math:`\alpha` on validation data).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from manytask.errors import ConfigError
from manytask.merge.methods.combine import combine
from manytask.merge.methods.param_checks import (
    check_count,
    check_fraction,
    check_numbers,
    check_range,
)
from manytask.merge.methods.sparsify import top_magnitude_mask
from manytask.merge.methods.task_vectors import TaskVectorRule
from manytask.merge.rule import Merged
from manytask.registry import register

MultiTask = Literal["task_arithmetic", "ties"]


def multi_task_vector(vectors: Tensor, multi_task: MultiTask, density: float) -> Tensor:
    """:math:`\\tau_{MTL}`: the sum of the task vectors, or TIES's disjoint sum after trimming
    each to its top ``density`` magnitudes and electing signs by total mass."""
    if multi_task == "task_arithmetic":
        return combine(vectors, None, "sum")
    trimmed = vectors * top_magnitude_mask(vectors, density)
    return combine(trimmed, None, "ties_sum")


def tall_masks(vectors: Tensor, merged: Tensor, lambdas: Tensor) -> Tensor:
    """The ``(T, *shape)`` bool masks :math:`|\\tau_t| > \\lambda_t |\\tau_{MTL} - \\tau_t|`."""
    spread = lambdas.to(vectors.dtype).view(-1, *([1] * (vectors.dim() - 1)))
    other = (merged - vectors).abs_().mul_(spread)
    return vectors.abs() > other


class _MaskRule(TaskVectorRule):
    """Parameters shared by the TALL-mask rules: λ (one value or one per task model), and the
    multi-task vector with its masks."""

    rule_name: ClassVar[str] = ""
    #: how τ_MTL is built, and the fraction its TIES trim keeps
    multi_task: MultiTask
    density: float

    def __init__(self, mask_lambda: float | list[float]) -> None:
        values = [mask_lambda] if isinstance(mask_lambda, (int, float)) else mask_lambda
        self.mask_lambda = check_numbers(self.rule_name, "mask_lambda", values)
        for value in self.mask_lambda:
            check_range(self.rule_name, "mask_lambda", value, 0.0)

    def check_models(self, count: int) -> None:
        super().check_models(count)
        if len(self.mask_lambda) > 1:
            check_count(self.rule_name, "mask_lambda", self.mask_lambda, count)

    def lambdas(self, count: int) -> Tensor:
        """λ_t for each of ``count`` task models as a ``(T,)`` tensor."""
        self.check_models(count)
        values = self.mask_lambda * count if len(self.mask_lambda) == 1 else self.mask_lambda
        return torch.tensor(values, dtype=torch.float32)

    def vector_and_masks(self, vectors: Tensor) -> tuple[Tensor, Tensor]:
        """:math:`\\tau_{MTL}` of the ``(T, *shape)`` task vectors and their TALL masks."""
        merged = multi_task_vector(vectors, self.multi_task, self.density)
        return merged, tall_masks(vectors, merged, self.lambdas(len(vectors)))


def _check_multi_task(rule: str, multi_task: str) -> MultiTask:
    if multi_task == "task_arithmetic":
        return "task_arithmetic"
    if multi_task == "ties":
        return "ties"
    raise ConfigError(f"{rule}: multi_task must be 'task_arithmetic' or 'ties', got {multi_task!r}")


@register(
    "merge_rule",
    "tall_masks",
    "TALL masks: base + multi-task vector, with one mask per task as side outputs (Wang et "
    "al., 2024, arXiv:2405.07813)",
)
class TallMasks(_MaskRule):
    """TALL masks for compression: the multi-task model and per-task masks.

    Args:
        mask_lambda: λ_t ≥ 0, one value for every task or one per task model.
        multi_task: how τ_MTL is built: ``"task_arithmetic"`` (sum) or ``"ties"``.
        density: top-k fraction kept per task for the ``"ties"`` vector, in (0, 1].
    """

    rule_name = "tall_masks"

    def __init__(
        self,
        mask_lambda: float | list[float] = 0.4,
        multi_task: MultiTask = "task_arithmetic",
        density: float = 0.2,
    ) -> None:
        super().__init__(mask_lambda)
        self.multi_task = _check_multi_task(self.rule_name, multi_task)
        self.density = check_fraction(self.rule_name, "density", density)

    def merge_vectors(
        self, name: str, base: Tensor, vectors: Tensor, generator: torch.Generator
    ) -> Merged:
        merged, masks = self.vector_and_masks(vectors)
        extras = {f"mask/{task}": masks[task] for task in range(len(vectors))}
        return Merged(tensor=merged.add_(base), extras=extras)


class _Consensus(_MaskRule):
    """Consensus Merging on a multi-task vector built by :attr:`multi_task`."""

    multi_task: MultiTask = "task_arithmetic"

    def __init__(
        self, k: int, mask_lambda: float | list[float], density: float, scale: float
    ) -> None:
        super().__init__(mask_lambda)
        if isinstance(k, bool) or int(k) != k or k < 0:
            raise ConfigError(f"{self.rule_name}: k must be an integer ≥ 0, got {k!r}")
        self.k = int(k)
        self.density = check_fraction(self.rule_name, "density", density)
        self.scale = check_range(self.rule_name, "scale", scale, 0.0)

    def merge_vectors(
        self, name: str, base: Tensor, vectors: Tensor, generator: torch.Generator
    ) -> Tensor:
        merged, masks = self.vector_and_masks(vectors)
        return merged.mul_(masks.sum(dim=0) >= self.k).mul_(self.scale).add_(base)


@register(
    "merge_rule",
    "consensus_ta",
    "Consensus task arithmetic: keep weights that TALL masks mark for ≥ k tasks (Wang et al., "
    "2024, arXiv:2405.07813)",
)
class ConsensusTaskArithmetic(_Consensus):
    """Consensus Merging on the task-arithmetic sum.

    Args:
        k: keep entries relevant to at least k tasks (integer ≥ 0; 0 keeps all, as task
            arithmetic).
        mask_lambda: λ_t ≥ 0 of the TALL masks, one value or one per task model.
        scale: α, the coefficient on the masked multi-task vector, ≥ 0.
    """

    rule_name = "consensus_ta"
    multi_task = "task_arithmetic"

    def __init__(
        self, k: int = 2, mask_lambda: float | list[float] = 0.4, scale: float = 0.3
    ) -> None:
        super().__init__(k, mask_lambda, 1.0, scale)


@register(
    "merge_rule",
    "consensus_ties",
    "Consensus TIES: keep weights of the TIES vector that TALL masks mark for ≥ k tasks (Wang "
    "et al., 2024, arXiv:2405.07813)",
)
class ConsensusTies(_Consensus):
    """Consensus Merging on TIES's multi-task vector (top-k trim, elect, disjoint sum).

    Args:
        k: keep entries relevant to at least k tasks (integer ≥ 0).
        mask_lambda: λ_t ≥ 0 of the TALL masks, one value or one per task model.
        density: fraction of each task vector kept by TIES's trim, in (0, 1].
        scale: α, the coefficient on the masked multi-task vector, ≥ 0.
    """

    rule_name = "consensus_ties"
    multi_task = "ties"

    def __init__(
        self,
        k: int = 2,
        mask_lambda: float | list[float] = 0.4,
        density: float = 0.2,
        scale: float = 0.3,
    ) -> None:
        super().__init__(k, mask_lambda, density, scale)
