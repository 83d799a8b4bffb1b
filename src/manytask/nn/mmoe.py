r"""Mixtures of shared experts: one-gate MoE, MMoE and DSelect-k MoE.

All three share one :class:`~manytask.nn.experts.ExpertBank` of ``E`` experts
:math:`f_1 … f_E` between the tasks, and give each task ``t`` a tower :math:`h_t`. They differ
in the gates:

- one-gate MoE: :math:`y_t = h_t\big(\sum_e g(x)_e f_e(x)\big)`, one gate for all tasks;
- MMoE: :math:`y_t = h_t\big(\sum_e g_t(x)_e f_e(x)\big)`, a gate per task;
- DSelect-k MoE: MMoE with a DSelect-k gate per task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from torch import Tensor, nn

from manytask import registry
from manytask.columns import Columns
from manytask.errors import ConfigError
from manytask.nn.experts import ExpertBank
from manytask.nn.gates import DSelectKGate, Gate, NoisyTopKGate, SoftmaxGate, mix
from manytask.nn.heads import TaskHead
from manytask.nn.inputs import input_layer
from manytask.nn.staged import StagedModel, check_dropout, check_positive, check_widths
from manytask.task import TaskSet

GateKind = Literal["softmax", "topk"]


class OneGateMoE(StagedModel):
    """Shared experts mixed by one gate shared by all tasks, then a tower per task.

    Shared: the input layer, the experts and the gate. Each task owns its tower. The features
    (views) are the mixture :math:`z = \\sum_e g(x)_e f_e(x)`, ``(B, d)``.
    """

    tasks_read_input = False

    def __init__(
        self,
        tasks: TaskSet,
        front: nn.Module,
        experts: ExpertBank,
        gate: Gate,
        tower_hidden: Sequence[int] = (),
    ) -> None:
        super().__init__(tasks, front)
        self.experts = experts
        self.gate = gate
        self.towers = nn.ModuleList(
            TaskHead(experts.out_features, task.output_dim, tower_hidden) for task in tasks.values()
        )

    def shared_stage(self, h: Tensor) -> dict[str, Tensor]:
        return {"mixture": mix(self.gate(h), self.experts(h))}

    def task_stage(self, index: int, h: Tensor, parts: Mapping[str, Tensor]) -> Tensor:
        out: Tensor = self.towers[index](parts["mixture"])
        return out

    def shared_modules(self) -> list[nn.Module]:
        return [self.front, self.experts, self.gate]

    def task_modules(self, index: int) -> list[nn.Module]:
        return [self.towers[index]]


class MultiGateMoE(StagedModel):
    """Shared experts, a gate and a tower per task (MMoE; DSelect-k MoE with DSelect-k gates).

    Shared: the input layer and the experts. Each task owns its gate and its tower. The
    features (views) are the stacked expert outputs ``(B, E, d)`` — each task's gate mixes its
    own view — together with the input when the input layer has parameters and the gates read
    it.
    """

    def __init__(
        self,
        tasks: TaskSet,
        front: nn.Module,
        experts: ExpertBank,
        gates: Sequence[Gate],
        tower_hidden: Sequence[int] = (),
    ) -> None:
        super().__init__(tasks, front)
        if len(gates) != len(tasks):
            raise ValueError(f"one gate per task: {len(tasks)} tasks, {len(gates)} gates")
        self.experts = experts
        self.gates = nn.ModuleList(gates)
        self.towers = nn.ModuleList(
            TaskHead(experts.out_features, task.output_dim, tower_hidden) for task in tasks.values()
        )
        self.tasks_read_input = any(g.reads_input for g in gates)

    def shared_stage(self, h: Tensor) -> dict[str, Tensor]:
        return {"experts": self.experts(h)}

    def task_stage(self, index: int, h: Tensor, parts: Mapping[str, Tensor]) -> Tensor:
        z = mix(self.gates[index](h), parts["experts"])
        out: Tensor = self.towers[index](z)
        return out

    def shared_modules(self) -> list[nn.Module]:
        return [self.front, self.experts]

    def task_modules(self, index: int) -> list[nn.Module]:
        return [self.gates[index], self.towers[index]]


def _check_common(
    num_experts: int, expert_hidden: Sequence[int], tower_hidden: Sequence[int], dropout: float
) -> None:
    check_positive("num_experts", num_experts)
    check_widths("expert_hidden", expert_hidden, allow_empty=False)
    check_widths("tower_hidden", tower_hidden)
    check_dropout(dropout)


def _gate(kind: str, width: int, num_experts: int, top_k: int) -> Gate:
    if kind == "softmax":
        return SoftmaxGate(width, num_experts)
    if kind == "topk":
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        return NoisyTopKGate(width, num_experts, k=top_k)
    raise ConfigError(f"gate must be 'softmax' or 'topk', got '{kind}'")


@registry.register(
    "architecture", "moe", "one-gate mixture of experts, the OMoE baseline (Ma et al., KDD 2018)"
)
def moe(
    tasks: TaskSet,
    input_shape: Sequence[int],
    columns: Columns | None = None,
    num_experts: int = 8,
    expert_hidden: list[int] = [64],  # noqa: B006 - read-only default, shown in `manytask list`
    tower_hidden: list[int] = [32],  # noqa: B006
    gate: GateKind = "softmax",
    top_k: int = 2,
    activation: str = "relu",
    dropout: float = 0.0,
    embedding_dim: int = 8,
) -> OneGateMoE:
    r"""One-gate mixture of experts: :math:`y_t = h_t\big(\sum_{e=1}^{E} g(x)_e f_e(x)\big)`.

    The one-gate MoE baseline ("OMoE") of Ma, Zhao, Yi, Chen, Hong and Chi, "Modeling Task
    Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018: the
    experts and a single gate are shared by every task; each task has its own tower.

    ``gate``: ``softmax`` (:math:`g(x) = \mathrm{softmax}(Wx)`, as in the paper) or ``topk``
    (the noisy top-k gate of Shazeer et al., ICLR 2017, with ``top_k`` experts per sample and
    its load-balancing loss in ``model.auxiliary_loss()``).

    Defaults: 8 experts, the number in the MMoE paper's synthetic experiments; expert width
    ``[64]``, tower width ``[32]``, ReLU experts, ``top_k = 2``: manytask's choices. Tabular
    inputs have their categorical columns embedded with ``embedding_dim`` columns each.
    """
    _check_common(num_experts, expert_hidden, tower_hidden, dropout)
    front, width = input_layer(input_shape, columns, embedding_dim)
    experts = ExpertBank(num_experts, width, expert_hidden, activation, dropout)
    return OneGateMoE(tasks, front, experts, _gate(gate, width, num_experts, top_k), tower_hidden)


@registry.register(
    "architecture", "mmoe", "multi-gate mixture of experts: a gate per task (Ma et al., KDD 2018)"
)
def mmoe(
    tasks: TaskSet,
    input_shape: Sequence[int],
    columns: Columns | None = None,
    num_experts: int = 8,
    expert_hidden: list[int] = [64],  # noqa: B006
    tower_hidden: list[int] = [32],  # noqa: B006
    gate: GateKind = "softmax",
    top_k: int = 2,
    activation: str = "relu",
    dropout: float = 0.0,
    embedding_dim: int = 8,
) -> MultiGateMoE:
    r"""Multi-gate mixture of experts: :math:`y_t = h_t\big(\sum_{e=1}^{E} g_t(x)_e f_e(x)\big)`,
    :math:`g_t(x) = \mathrm{softmax}(W_t x)`.

    Ma, Zhao, Yi, Chen, Hong and Chi, "Modeling Task Relationships in Multi-task Learning with
    Multi-gate Mixture-of-Experts", KDD 2018. The experts are shared; each task owns its gate
    and its tower. ``gate: topk`` replaces every softmax gate by a noisy top-k gate (Shazeer et
    al., ICLR 2017, arXiv:1701.06538) that keeps ``top_k`` experts per sample; their
    load-balancing losses add up in ``model.auxiliary_loss()``.

    Defaults: 8 experts, the number in the paper's synthetic experiments; expert width
    ``[64]``, tower width ``[32]``, ReLU experts, ``top_k = 2``: manytask's choices.
    """
    _check_common(num_experts, expert_hidden, tower_hidden, dropout)
    front, width = input_layer(input_shape, columns, embedding_dim)
    experts = ExpertBank(num_experts, width, expert_hidden, activation, dropout)
    gates = [_gate(gate, width, num_experts, top_k) for _ in tasks]
    return MultiGateMoE(tasks, front, experts, gates, tower_hidden)


@registry.register(
    "architecture",
    "dselect_k",
    "mixture of experts with a DSelect-k gate per task (Hazimeh et al., NeurIPS 2021)",
)
def dselect_k(
    tasks: TaskSet,
    input_shape: Sequence[int],
    columns: Columns | None = None,
    num_experts: int = 8,
    k: int = 2,
    gamma: float = 1.0,
    entropy_weight: float = 1e-6,
    per_sample: bool = True,
    expert_hidden: list[int] = [64],  # noqa: B006
    tower_hidden: list[int] = [32],  # noqa: B006
    activation: str = "relu",
    dropout: float = 0.0,
    embedding_dim: int = 8,
) -> MultiGateMoE:
    r"""Multi-gate MoE whose gates are DSelect-k gates:
    :math:`y_t = h_t\big(\sum_e w_t(x)_e f_e(x)\big)`,
    :math:`w_t = \sum_{i=1}^{k} \mathrm{softmax}(\alpha_t)_i\, r(z_t^{(i)})`.

    Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong and Chi, "DSelect-k:
    Differentiable Selection in the Mixture of Experts with Applications to Multi-Task
    Learning", NeurIPS 2021, arXiv:2106.03760 (see :class:`~manytask.nn.gates.DSelectKGate`).
    Each gate converges to at most ``k`` experts; ``γ`` (``gamma``) is the width of the
    smooth-step's cubic region. ``per_sample=True``: the selectors are functions of the input
    (the paper's per-example gate); ``False``: one static selection per task. The entropy
    regulariser (``entropy_weight``) is in ``model.auxiliary_loss()``.

    Defaults: ``γ = 1`` and ``entropy_weight = 1e-6`` from the authors' reference implementation
    (google-research/dselect_k_moe); 8 experts as in the MMoE paper's synthetic experiments;
    ``k = 2``, expert width ``[64]``, tower width ``[32]``: manytask's choices.
    """
    _check_common(num_experts, expert_hidden, tower_hidden, dropout)  # the gate checks the rest
    front, width = input_layer(input_shape, columns, embedding_dim)
    experts = ExpertBank(num_experts, width, expert_hidden, activation, dropout)
    gates: list[Gate] = [
        DSelectKGate(num_experts, k, width if per_sample else None, gamma, entropy_weight)
        for _ in tasks
    ]
    return MultiGateMoE(tasks, front, experts, gates, tower_hidden)
