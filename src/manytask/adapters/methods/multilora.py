r"""MultiLoRA: parallel LoRA modules with learnable scales.

Wang, Lin, Zeng and Zhang, "MultiLoRA: Democratizing LoRA for Better Multi-Task Learning",
arXiv:2311.11501.
"""

from __future__ import annotations

from manytask.adapters.spec import AdapterSpec, RouterSpec, lora_scaling
from manytask.registry import register


@register("adapter", "multilora")
def multilora(
    num_tasks: int,
    modules: int = 3,
    rank: int = 8,
    alpha: float = 16.0,
    per_feature: bool = False,
    dropout: float = 0.0,
) -> AdapterSpec:
    r"""MultiLoRA (Wang et al. 2023, arXiv:2311.11501): n parallel LoRAs with learned scales.

    .. math::

        h = W x + \frac{α}{r} \sum_{i=1}^{n} s_i\, B_i A_i x

    LoRA scaled horizontally: ``n`` modules of rank ``r`` whose outputs are summed, each times
    a learnable scale ``s_i`` shared by all tasks. The paper changes LoRA's initialisation to
    lessen the dependence on the top singular directions: ``A`` and ``B`` both start
    Kaiming-uniform and the scales start at ``s = 0`` (so the adapter still starts at zero), as
    in the MTL-LoRA authors' reimplementation (pUmpKin-Co/MTL-LoRA ``multilora.py``).
    ``per_feature=True`` learns one scale per output feature, ``s_i ∈ R^{d_out}`` (the
    reimplementation in the MTL-LoRA authors' code, ``lora_scaling`` of shape ``(n, d_out)``).

    The configuration: ``E = n`` experts; a task router with one learned row for every task and
    the identity transform (the gates are the scales).

    Defaults: ``rank = 8``, ``alpha = 16`` as :func:`~manytask.adapters.methods.lora.lora`;
    ``modules = 3``: manytask's choice (the paper varies the number of parallel modules).
    """
    return AdapterSpec(
        method="multilora",
        num_tasks=num_tasks,
        rank=rank,
        scaling=lora_scaling("multilora", alpha, rank),
        num_experts=modules,
        up_init="kaiming_uniform",
        dropout=dropout,
        router=RouterSpec(
            source="task",
            transform="identity",
            per_task=False,
            per_feature=per_feature,
            init="uniform",
            init_center=0.0,
            init_scale=0.0,
        ),
    )
