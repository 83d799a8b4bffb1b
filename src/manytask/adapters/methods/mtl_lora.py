r"""MTL-LoRA: a task-specific transform in the low-rank space and shared up-projections.

Yang, Muhtar, Shen, Zhan, Liu, Wang, Sun, Deng, Sun, Zhang, Chen and Tong, "MTL-LoRA: Low-Rank
Adaptation for Multi-Task Learning", AAAI 2025, arXiv:2410.09437.
"""

from __future__ import annotations

import math

from manytask.adapters.spec import AdapterSpec, RouterSpec, lora_scaling
from manytask.errors import ConfigError
from manytask.registry import register


@register("adapter", "mtl_lora")
def mtl_lora(
    num_tasks: int,
    rank: int = 8,
    alpha: float = 16.0,
    up_projections: int = 3,
    temperature: float = 0.1,
    diagonal: bool = True,
    dropout: float = 0.0,
) -> AdapterSpec:
    r"""MTL-LoRA (Yang et al. 2024, arXiv:2410.09437): per-task Λ_t, softmax-weighted shared B_i.

    .. math::

        h_t = W x + \frac{α}{r} \sum_{i=1}^{n}
              \frac{\exp(w_t^i/τ)}{\sum_{j} \exp(w_t^j/τ)}\, B_i\, Λ_t\, A x

    One down-projection ``A`` shared by all tasks, a task-specific ``r × r`` transform ``Λ_t``
    (diagonal by default, full with ``diagonal=False``), ``n`` up-projections ``B_i`` shared by
    all tasks and mixed with task-specific softmax weights of temperature ``τ``.

    The configuration: ``share_down``, ``E = n`` experts, a per-task mixer, and a task router
    with the softmax transform. Initialisation as in the authors' code
    (pUmpKin-Co/MTL-LoRA ``mlora.py``): ``A`` Kaiming-uniform, ``Λ_t = I``, ``B = 0``, the
    weights ``w`` Kaiming-uniform (``U(±1/√n)``).

    Defaults: ``rank = 8``, ``alpha = 16``, ``n = 3``, ``τ = 0.1`` — the authors' commonsense
    script (``llama2_7B_mlora_qkvo.sh 8 16``, ``--num_B 3 --temperature 0.1``); a diagonal
    ``Λ_t`` as the paper describes its task-specific transformation (the authors' code offers
    both forms); ``dropout = 0`` (ours; the authors' script uses 0.05).
    """
    if up_projections < 1:
        raise ConfigError(f"mtl_lora needs up_projections ≥ 1, got {up_projections}")
    return AdapterSpec(
        method="mtl_lora",
        num_tasks=num_tasks,
        rank=rank,
        scaling=lora_scaling("mtl_lora", alpha, rank),
        num_experts=up_projections,
        share_down=True,
        mixer="per_task",
        mixer_diagonal=diagonal,
        mixer_init="identity",
        dropout=dropout,
        router=RouterSpec(
            source="task",
            transform="softmax",
            temperature=temperature,
            init="uniform",
            init_scale=1.0 / math.sqrt(up_projections),
        ),
    )
