r"""Mixtures of LoRA experts routed per token: MoLoRA, HydraLoRA and SMoRA.

Their gates depend on each token's input, so a task's adapter is not a fixed matrix: these
methods cannot be merged into the base weights exactly (``export`` refuses them).
"""

from __future__ import annotations

from manytask.adapters.spec import AdapterSpec, RouterSpec, lora_scaling
from manytask.registry import register


@register("adapter", "molora")
def molora(
    num_tasks: int,
    experts: int = 10,
    rank: int = 4,
    alpha: float = 16.0,
    balance_weight: float = 0.0,
    dropout: float = 0.0,
) -> AdapterSpec:
    r"""MoLoRA (Zadouri et al. 2023, arXiv:2309.05444): soft mixture of LoRA experts per token.

    Zadouri, Üstün, Ahmadian, Ermiş, Locatelli and Hooker, "Pushing Mixture of Experts to the
    Limit: Extremely Parameter Efficient MoE for Instruction Tuning", arXiv:2309.05444.

    .. math::

        h = W x + \frac{α}{r} \sum_{e=1}^{E} g_e(x)\, B_e A_e x,\qquad
        g(x) = \mathrm{softmax}(W_g x)

    Every expert sees every token (soft merging); the router is a linear map without bias.
    The configuration: ``E`` experts and a softmax token router
    (:class:`~manytask.adapters.routers.SoftTokenRouter`).

    Defaults from the authors' code (for-ai/parameter-efficient-moe, ``configs/molora.gin``
    and ``src/molora.py``): ``E = 10``, ``rank = 4``, ``alpha = 16``, ``A ~ N(0, 0.02²)``,
    ``B = 0``, router weights ``N(0, 0.02²)``; no load-balancing loss (their router's
    ``load_balancing_loss`` is off), so ``balance_weight = 0`` (a positive value adds the
    importance loss of Shazeer et al. 2017).
    """
    return AdapterSpec(
        method="molora",
        num_tasks=num_tasks,
        rank=rank,
        scaling=lora_scaling("molora", alpha, rank),
        num_experts=experts,
        down_init="normal",
        down_std=0.02,
        dropout=dropout,
        router=RouterSpec(source="token", balance_weight=balance_weight, init_std=0.02),
    )


@register("adapter", "hydralora")
def hydralora(
    num_tasks: int,
    heads: int = 3,
    rank: int = 8,
    alpha: float = 16.0,
    balance_weight: float = 0.0,
    dropout: float = 0.0,
) -> AdapterSpec:
    r"""HydraLoRA (Tian et al. 2024, arXiv:2404.19245): one shared ``A``, routed ``B`` heads.

    Tian, Shi, Guo, Li and Xu, "HydraLoRA: An Asymmetric LoRA Architecture for Efficient
    Fine-Tuning", NeurIPS 2024, arXiv:2404.19245.

    .. math::

        h = W x + \frac{α}{r} \sum_{i=1}^{N} ω_i(x)\, B_i A x,\qquad
        ω(x) = \mathrm{softmax}(W_g x)

    An asymmetric LoRA: the down-projection ``A`` is shared (common knowledge), the ``N``
    up-projections ``B_i`` are experts (§3.1, eq. 2–4); a token router weighs them. The
    configuration: ``share_down``, ``E = N`` experts, a softmax token router.

    Defaults: ``N = 3`` heads and ``rank = 8`` — Table 2 (HydraLoRA with ``r = 8`` and three
    ``B`` matrices on average; §4.5 finds ``k = 3`` within 0.42% of the best ``k = 4``; the
    authors' released script uses ``r = 4``, ``alpha = 32``, four heads and dropout 0.05);
    ``alpha = 16`` as LoRA's defaults; the router is initialised like
    :class:`torch.nn.Linear` (the paper states no initialisation) and there is no
    load-balancing loss (the paper uses none).
    """
    return AdapterSpec(
        method="hydralora",
        num_tasks=num_tasks,
        rank=rank,
        scaling=lora_scaling("hydralora", alpha, rank),
        num_experts=heads,
        share_down=True,
        dropout=dropout,
        router=RouterSpec(source="token", balance_weight=balance_weight),
    )


@register("adapter", "smora")
def smora(
    num_tasks: int,
    rank: int = 64,
    top_k: int = 8,
    alpha: float = 128.0,
    bias_update_rate: float = 0.001,
    balance_weight: float = 0.0,
    dropout: float = 0.0,
) -> AdapterSpec:
    r"""SMoRA (Zhao et al. 2025, arXiv:2501.15103): each rank is an expert, top-k per token.

    Zhao, Zhou, Zhang, Zhu, Shen, Li, Yang, Wang, Su, Kuang, Wei, Wu and Cheng, "Each Rank
    Could be an Expert: Single-Ranked Mixture of Experts LoRA for Multi-Task Learning",
    arXiv:2501.15103.

    .. math::

        h = W x + \frac{α}{r} B\, G(x)\, A x,\qquad
        G(x) = \mathrm{diag}\big(\mathrm{softmax}(\mathrm{TopK}(W_g x))\big)

    A single LoRA of rank ``r`` whose ranks are ``r`` rank-1 experts; each token activates the
    ``k`` ranks with the highest router scores. Load balance comes from a routing bias updated
    without a loss (Wang et al. 2024, arXiv:2408.15664): ``b_i ← b_i + u·sign(\bar c − c_i)``,
    the bias only choosing the ranks. The configuration: ``E = r`` experts of rank 1 and a
    top-``k`` token router (:class:`~manytask.adapters.routers.TopKTokenRouter`).

    Defaults: ``rank = 64`` with ``top_k = 8`` — the paper's setting (8 of 64 ranks active);
    ``u = 0.001`` — the update rate of the loss-free balancing paper; ``alpha = 2·rank = 128``:
    manytask's choice (the common LoRA ratio ``α = 2r``); ``balance_weight = 0`` (no auxiliary
    loss; a positive value adds the Switch Transformer loss).
    """
    return AdapterSpec(
        method="smora",
        num_tasks=num_tasks,
        rank=1,
        scaling=lora_scaling("smora", alpha, rank),
        num_experts=rank,
        dropout=dropout,
        router=RouterSpec(
            source="token",
            top_k=top_k,
            bias_update_rate=bias_update_rate,
            balance_weight=balance_weight,
        ),
    )
