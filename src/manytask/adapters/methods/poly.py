r"""Polytropon and its descendants: task-to-skill allocations that mix LoRA parameters.

Poly (Ponti et al.), MHR (Caccia et al.: one allocation per block of features) and C-Poly
(Wang et al.: shared skills plus task-specific skills). The gates mix the experts' *parameters*
(``combine="weights"``): ``A_t = Σ_s z_{t,s} A_s``, ``B_t = Σ_s z_{t,s} B_s``, then
``h = W x + s B_t A_t x``. The allocation ``z`` is a relaxed Bernoulli (Gumbel-sigmoid) sample
in training and ``σ(logits)`` in evaluation, normalised to sum 1 over the skills; merging uses
the evaluation allocation.
"""

from __future__ import annotations

from manytask.adapters.spec import AdapterSpec, RouterSpec, lora_scaling
from manytask.registry import register

#: PEFT's and the authors' initial range of the allocation logits
LOGIT_RANGE = 1e-3


def _allocation(heads: int = 1, own: int = 0) -> RouterSpec:
    return RouterSpec(
        source="task",
        transform="relaxed_bernoulli",
        temperature=1.0,
        heads=heads,
        init="uniform",
        init_scale=LOGIT_RANGE,
        own_experts=own,
    )


@register("adapter", "poly")
def poly(
    num_tasks: int, skills: int = 4, rank: int = 8, alpha: float = 1.0, dropout: float = 0.0
) -> AdapterSpec:
    r"""Polytropon (Ponti et al. 2022, arXiv:2202.13914): tasks mix an inventory of LoRA skills.

    Ponti, Sordoni, Bengio and Reddy, "Combining Modular Skills in Multitask Learning",
    arXiv:2202.13914.

    .. math::

        z_t \sim \mathrm{RelaxedBernoulli}(τ, \text{logits}=Z_t),\qquad
        \hat z_{t,s} = \frac{z_{t,s}}{\sum_{s'} z_{t,s'} + ε},\qquad
        h = W x + \frac{α}{r} \Big(\sum_s \hat z_{t,s} B_s\Big)
            \Big(\sum_s \hat z_{t,s} A_s\Big) x

    A learned task–skill allocation matrix ``Z`` (``T × S`` logits) chooses, for each task, a
    soft subset of ``S`` LoRA skills whose parameters are averaged. In evaluation
    ``z = σ(Z_t)``. The configuration: ``E = S`` experts, ``combine="weights"``, a task router
    with the relaxed-Bernoulli transform.

    Defaults follow PEFT's ``PolyConfig`` (which implements this method, after the authors'
    ``mttl`` code): ``skills = 4``, ``rank = 8``, logits ``U(±10⁻³)``, temperature ``τ = 1``,
    ``ε = 10⁻¹²``, scaling ``1/r`` (``alpha = 1``), ``A`` Kaiming-uniform and ``B = 0``.
    """
    return AdapterSpec(
        method="poly",
        num_tasks=num_tasks,
        rank=rank,
        scaling=lora_scaling("poly", alpha, rank),
        num_experts=skills,
        combine="weights",
        dropout=dropout,
        router=_allocation(),
    )


@register("adapter", "mhr")
def mhr(
    num_tasks: int,
    heads: int = 4,
    skills: int = 4,
    rank: int = 8,
    alpha: float = 1.0,
    dropout: float = 0.0,
) -> AdapterSpec:
    r"""MHR (Caccia et al. 2022, arXiv:2211.03831): Polytropon routing per block of features.

    Caccia, Ponti, Su, Pereira, Le Roux and Sordoni, "Multi-Head Adapter Routing for
    Cross-Task Generalization", NeurIPS 2023, arXiv:2211.03831.

    .. math::

        A_t^{(k)} = \sum_s \hat z^{(k)}_{t,s} A_s^{(k)},\quad
        B_t^{(k)} = \sum_s \hat z^{(k)}_{t,s} B_s^{(k)},\quad
        A_t = [A_t^{(1)} \cdots A_t^{(H)}],\quad B_t = \begin{bmatrix}B_t^{(1)}\\ \vdots \\
        B_t^{(H)}\end{bmatrix}

    The input features of ``A`` and the output features of ``B`` are cut into ``H`` blocks
    (heads); every head has its own allocation ``\hat z^{(k)}`` (as in Polytropon), so tasks mix
    skills piece by piece. The layout is PEFT's (``n_splits``): block ``k`` of ``A`` reads input
    features ``[k·d_in/H, (k+1)·d_in/H)``. The configuration: :func:`poly` with ``heads = H``.

    Defaults: as :func:`poly`; ``heads = 4``: manytask's choice (the paper varies the number of
    heads; PEFT's default of 1 is plain Polytropon).
    """
    return AdapterSpec(
        method="mhr",
        num_tasks=num_tasks,
        rank=rank,
        scaling=lora_scaling("mhr", alpha, rank),
        num_experts=skills,
        combine="weights",
        dropout=dropout,
        router=_allocation(heads=heads),
    )


@register("adapter", "c_poly")
def c_poly(
    num_tasks: int,
    shared_skills: int = 4,
    task_skills: int = 1,
    rank: int = 8,
    alpha: float = 1.0,
    dropout: float = 0.0,
) -> AdapterSpec:
    r"""C-Poly (Wang et al. 2023, arXiv:2312.03248): shared skills plus each task's own skills.

    Wang, Sun, Jin, Wang, Fan, Xu, Du and Fan, "Customizable Combination of Parameter-Efficient
    Modules for Multi-Task Learning", ICLR 2024, arXiv:2312.03248.

    .. math::

        A_t = \sum_{i=1}^{S} \hat z_{t,i} A_i + \sum_{j=1}^{b} \hat y_{t,j} A_{t,j},\qquad
        B_t = \sum_{i=1}^{S} \hat z_{t,i} B_i + \sum_{j=1}^{b} \hat y_{t,j} B_{t,j},\qquad
        h = W x + \frac{α}{r} B_t A_t x

    ``S`` task-common skills allocated as in Polytropon (``\hat z``, normalised over the shared
    skills) and ``b`` task-specific skills that only task ``t`` uses (``\hat y``, normalised over
    the task's own skills: with ``b = 1`` it is exactly 1). With ``b = 0`` this is Polytropon.
    The configuration: ``E = S + T·b`` experts, the relaxed-Bernoulli task router with
    ``own_experts = b``.

    Defaults: ``task_skills = 1`` — the paper's experiments use one task-specific skill per
    task; ``shared_skills = 4``, ``rank = 8``, scaling ``1/r`` and the allocation as
    :func:`poly` (PEFT's Polytropon defaults).
    """
    return AdapterSpec(
        method="c_poly",
        num_tasks=num_tasks,
        rank=rank,
        scaling=lora_scaling("c_poly", alpha, rank),
        num_experts=shared_skills + num_tasks * task_skills,
        combine="weights",
        dropout=dropout,
        router=_allocation(own=task_skills),
    )
