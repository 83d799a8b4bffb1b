r"""MoSLoRA: LoRA with a learnable mixer between its subspaces.

Wu, Wang, Zhao and Wong, "Mixture-of-Subspaces in Low-Rank Adaptation",
arXiv:2406.11909.
"""

from __future__ import annotations

from manytask.adapters.spec import AdapterSpec, lora_scaling
from manytask.registry import register


@register("adapter", "moslora")
def moslora(
    num_tasks: int, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0
) -> AdapterSpec:
    r"""MoSLoRA (Wu et al. 2024, arXiv:2406.11909): LoRA with a learned r×r mixer, Wx + (α/r)BMAx.

    .. math::

        h = W x + \frac{α}{r} B\, M\, A\, x,\qquad M \in \mathbb{R}^{r×r}

    Splitting LoRA into rank-1 subspaces ``B_{:,i} A_{i,:}`` and fusing every pair with a
    learnable mixer ``M`` (LoRA is ``M = I``). The configuration: one expert, no router, a mixer
    shared by all tasks. ``A`` and ``M`` start Kaiming-uniform and ``B = 0``, as in the authors'
    code (wutaiqiang/MoSLoRA, ``lora_AB`` initialised with ``kaiming_uniform_(a=√5)``).

    Defaults: ``rank = 16``, ``alpha = 32`` — the authors' commonsense-reasoning script
    (``train_moslora.sh``).
    """
    return AdapterSpec(
        method="moslora",
        num_tasks=num_tasks,
        rank=rank,
        scaling=lora_scaling("moslora", alpha, rank),
        mixer="shared",
        mixer_init="kaiming_uniform",
        dropout=dropout,
    )
