r"""LoRA, shared by all tasks or one per task.

Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang and Chen, "LoRA: Low-Rank Adaptation of Large
Language Models", ICLR 2022, arXiv:2106.09685.
"""

from __future__ import annotations

from manytask.adapters.spec import AdapterSpec, RouterSpec, lora_scaling
from manytask.registry import register


@register("adapter", "lora")
def lora(num_tasks: int, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> AdapterSpec:
    r"""LoRA (Hu et al. 2021, arXiv:2106.09685): one low-rank update shared by every task.

    .. math::

        h = W x + \frac{α}{r} B A x,\qquad A \in \mathbb{R}^{r×d_{in}},\;
        B \in \mathbb{R}^{d_{out}×r}

    ``A`` starts ``U(±1/√d_in)`` (the Kaiming-uniform start of :class:`torch.nn.Linear`, as in
    the authors' ``loralib`` and PEFT; the paper says "random Gaussian") and ``B = 0``, so the
    adapted model starts equal to the base model (paper §4.1). Dropout acts on the adapter's
    input. The configuration: no router, one expert.

    Defaults: ``rank = 8``, ``alpha = 16`` — the authors' RoBERTa-base GLUE scripts
    (microsoft/LoRA ``examples/NLU``, ``--lora_r 8 --lora_alpha 16``); the paper adapts the
    attention's query and value projections (§7.1), i.e. ``targets=["query", "value"]`` on BERT.
    """
    return AdapterSpec(
        method="lora",
        num_tasks=num_tasks,
        rank=rank,
        scaling=lora_scaling("lora", alpha, rank),
        dropout=dropout,
    )


@register("adapter", "lora_per_task")
def lora_per_task(
    num_tasks: int, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0
) -> AdapterSpec:
    r"""One LoRA per task (Hu et al. 2021, arXiv:2106.09685), chosen by each sample's task.

    .. math::

        h = W x + \frac{α}{r} B_t A_t x \quad\text{for a sample of task } t

    The configuration: ``E = T`` experts and a fixed one-hot task router
    (``g_e = [e = t]``), so a mixed batch trains every task's LoRA on its own samples in one
    pass and merging task ``t`` folds exactly ``B_t A_t``. Defaults as :func:`lora`.
    """
    return AdapterSpec(
        method="lora_per_task",
        num_tasks=num_tasks,
        rank=rank,
        scaling=lora_scaling("lora_per_task", alpha, rank),
        num_experts=num_tasks,
        dropout=dropout,
        router=RouterSpec(source="task", transform="fixed", init="onehot"),
    )
