r"""ScaLearn: transfer between tasks by learning to scale the task adapters' outputs.

Frohmann, Holtermann, Masoudian, Lauscher and Rekabsaz, "ScaLearn: Simple and Highly
Parameter-Efficient Task Transfer by Learning to Scale", arXiv:2310.01217.
"""

from __future__ import annotations

from manytask.adapters.spec import AdapterSpec, RouterSpec, lora_scaling
from manytask.registry import register

#: standard deviation of the scales' initial noise (the authors' code)
INIT_STD = 1e-3


@register("adapter", "scalearn")
def scalearn(
    num_tasks: int,
    rank: int = 8,
    alpha: float = 16.0,
    uniform: bool = False,
    init_scale: float = 1.0,
    train_experts: bool = False,
    dropout: float = 0.0,
) -> AdapterSpec:
    r"""ScaLearn (Frohmann et al. 2023, arXiv:2310.01217): learned scales of the tasks' adapters.

    .. math::

        h_t = W x + \frac{α}{r} \sum_{k=1}^{T} ω_{t,k} \odot B_k A_k x,\qquad
        ω_{t,k} \in \mathbb{R}^{d_{out}}\ (\text{or } \mathbb{R} \text{ with } uniform)

    Two-stage multi-task learning: first one adapter per task is trained alone (here:
    ``lora_per_task``); then, for each target task ``t``, the outputs of all the task adapters
    are combined with learned scaling vectors ``ω_{t,k}`` while the adapters stay frozen. The
    paper inserts bottleneck adapters; here the source adapters are LoRA experts, and the
    scaling acts on their outputs exactly as in the paper's equation. ``uniform=True`` learns
    one scalar per adapter (ScaLearnUniform).

    Usage: train ``lora_per_task`` on the tasks, inject ``scalearn`` on a fresh copy of the
    base model and call ``adapted.copy_experts_from(per_task_adapted)``; only ``ω`` (and the
    heads) then train. ``train_experts=True`` trains the experts jointly instead.

    The configuration: ``E = T`` experts, a task router with the identity transform and one
    gate per output feature (``per_feature``), experts frozen.

    Defaults: ``ω ~ N(init_scale/T, 0.001²)`` — the "avg" initialisation of the authors' code
    (CPJKU/ScaLearn, class ``ScaLearn``); ``init_scale = 1`` (the start is the plain average of
    the task adapters) is manytask's choice; ``rank = 8``, ``alpha = 16`` as
    :func:`~manytask.adapters.methods.lora.lora`.
    """
    return AdapterSpec(
        method="scalearn",
        num_tasks=num_tasks,
        rank=rank,
        scaling=lora_scaling("scalearn", alpha, rank),
        num_experts=num_tasks,
        dropout=dropout,
        train_experts=train_experts,
        router=RouterSpec(
            source="task",
            transform="identity",
            per_feature=not uniform,
            init="normal",
            init_center=init_scale / num_tasks,
            init_scale=INIT_STD,
        ),
    )
