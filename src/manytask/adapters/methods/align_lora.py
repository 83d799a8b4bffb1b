r"""Align-LoRA: one shared LoRA and a loss that aligns the tasks' low-rank representations.

Liu, Cheng, Chang and Wu, "Align, Don't Divide: Revisiting the LoRA Architecture in Multi-Task
Learning", arXiv:2508.05078.
"""

from __future__ import annotations

from manytask.adapters.spec import AdapterSpec, lora_scaling
from manytask.registry import register


@register("adapter", "align_lora")
def align_lora(
    num_tasks: int,
    rank: int = 8,
    alpha: float = 32.0,
    align_weight: float = 0.2,
    dropout: float = 0.1,
) -> AdapterSpec:
    r"""Align-LoRA (Liu et al. 2025, arXiv:2508.05078): shared LoRA + task-alignment loss.

    .. math::

        h = W x + \frac{α}{r} B A x,\qquad
        \mathcal{L} = \sum_t \mathcal{L}_t + λ\,
        \frac{1}{|\text{layers}|}\sum_{\text{layers}} \operatorname{mean}_{t<u} D(t, u)

    where ``D(t, u)`` is the symmetric KL divergence between diagonal Gaussians fitted to the
    codes ``A x`` of tasks ``t`` and ``u`` in the batch
    (:func:`manytask.adapters.alignment.alignment_loss`). The paper argues that multi-task
    LoRA should learn shared representations rather than isolate tasks, and aligns them
    explicitly. The term is the adapted model's ``auxiliary_loss()``, which the Trainer adds;
    the training forward needs the task ids. The configuration: :func:`lora` plus
    ``align_weight``.

    Defaults from the authors' training script (jinda-liu/Align-LoRA ``train.py`` with the KL
    trainer of ``custom.py``): ``rank = 8``, ``alpha = 32``, ``dropout = 0.1``, ``λ = 0.2``.
    That script adds the term once per cycle of 10 accumulated micro-batches, beside the mean of
    their 10 task losses, so its weight there is about ``λ/10 = 0.02`` per loss; manytask adds
    ``λ`` times the term at every training forward, about 10× the pressure at the same ``λ``
    (pass ``align_weight=0.02`` to match the authors' run).
    """
    return AdapterSpec(
        method="align_lora",
        num_tasks=num_tasks,
        rank=rank,
        scaling=lora_scaling("align_lora", alpha, rank),
        dropout=dropout,
        align_weight=align_weight,
    )
