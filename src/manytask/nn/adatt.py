r"""AdaTT: adaptive task-to-task fusion.

Li, Zhang, Yuan, Gao, Zhang, Yang, Liu and Yang, "AdaTT: Adaptive Task-to-Task Fusion Network
for Multitask Learning in Recommendations", KDD 2023, arXiv:2304.04959 (code:
facebookresearch/AdaTT, ``mtl_lib.py``).

Each fusion level ``l`` has ``m`` task-specific experts per task, :math:`E^l_t`, and optionally
``m_s`` shared experts :math:`E^l_s` (the general AdaTT, the authors' ``AdaTTWSharedExps``;
without them it is the paper's AdaTT-sp, ``AdaTTSp``). Every level's expert outputs are
stacked into :math:`\mathbf{E}^l = [E^l_1, …, E^l_T, E^l_s]` and each fusion unit combines all
of them with a gate, plus a linear combination of its own ("native") experts:

.. math::

    f^l_t = \mathrm{softmax}(W^l_t\, f^{l-1}_t)^\top \mathbf{E}^l + (v^l_t)^\top E^l_t(f^{l-1}_t),
    \qquad
    f^l_s = \mathrm{softmax}(W^l_s\, f^{l-1}_s)^\top \mathbf{E}^l + (v^l_s)^\top E^l_s(f^{l-1}_s)
    \quad (l < L)

where task ``t``'s experts read :math:`f^{l-1}_t`, the shared experts read :math:`f^{l-1}_s`,
:math:`f^0_t = f^0_s = x`, and :math:`y_t = h_t(f^L_t)`; the last level has no shared unit.
A unit with one expert of its own has :math:`v = 1` fixed (a plain residual of that expert); with
several, :math:`v` is learned and starts at :math:`1/m` (manytask's choice; the authors draw it
from :math:`U(\pm\sqrt{1/m})`). The authors' code also learns :math:`v` for units with one
expert as soon as any unit has several, and its gates have a bias; manytask's have none.

**What is shared.** Every expert — a task's own included — feeds every task's fusion gate, so
all experts are shared, and so is every fusion unit below the last. Task ``t`` owns its
last-level gate :math:`W^L_t`, its :math:`v^L_t` and its tower. **Features.** The views hold
the last level's expert outputs :math:`\mathbf{E}^L` ``(B, M, d)`` and the last-level gate
inputs :math:`f^{L-1}_t` (when shared parameters produced them), packed into one tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from manytask import registry
from manytask.columns import Columns
from manytask.nn.experts import ExpertBank
from manytask.nn.gates import SoftmaxGate, mix
from manytask.nn.heads import TaskHead
from manytask.nn.inputs import input_layer
from manytask.nn.staged import (
    StagedModel,
    check_dropout,
    check_positive,
    check_widths,
    row,
)
from manytask.task import TaskSet


class NativeCombination(nn.Module):
    """The linear combination ``vᵀ E_t`` of a task's own experts (``v = 1`` fixed for one
    expert)."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.weight = (
            nn.Parameter(torch.full((num_experts,), 1.0 / num_experts)) if num_experts > 1 else None
        )

    def forward(self, experts: Tensor) -> Tensor:
        if self.weight is None:
            return experts[:, 0]
        return torch.einsum("e,bed->bd", self.weight, experts)


class AdaTT(StagedModel):
    """AdaTT with ``num_levels`` fusion levels; see the module docstring for the rule and the
    shared/task split.

    Args:
        tasks: the tasks.
        front: the input layer; ``width`` is the width of what it produces.
        num_levels: number of fusion levels ``L ≥ 1``.
        task_experts: experts per task per level (``m ≥ 1``).
        shared_experts: shared experts per level (``m_s ≥ 0``; 0 is AdaTT without shared
            experts).
        expert_hidden, tower_hidden, activation, dropout: the MLPs.
    """

    def __init__(
        self,
        tasks: TaskSet,
        front: nn.Module,
        width: int,
        num_levels: int = 2,
        task_experts: int = 1,
        shared_experts: int = 1,
        expert_hidden: Sequence[int] = (64,),
        tower_hidden: Sequence[int] = (),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(tasks, front)
        check_positive("num_levels", num_levels)
        check_positive("task_experts", task_experts)
        check_positive("shared_experts", shared_experts, minimum=0)
        check_widths("expert_hidden", expert_hidden, allow_empty=False)
        check_widths("tower_hidden", tower_hidden)
        check_dropout(dropout)
        self.num_levels = num_levels
        self.m = task_experts
        self.m_shared = shared_experts
        n_tasks = len(tasks)
        total = n_tasks * task_experts + shared_experts
        out = expert_hidden[-1]
        self.task_experts = nn.ModuleList()
        self.shared_experts = nn.ModuleList()
        self.task_gates = nn.ModuleList()
        self.natives = nn.ModuleList()
        self.shared_gates = nn.ModuleList()
        self.shared_natives = nn.ModuleList()
        for level in range(num_levels):
            w = width if level == 0 else out
            self.task_experts.append(
                nn.ModuleList(
                    ExpertBank(task_experts, w, expert_hidden, activation, dropout)
                    for _ in range(n_tasks)
                )
            )
            if shared_experts:
                self.shared_experts.append(
                    ExpertBank(shared_experts, w, expert_hidden, activation, dropout)
                )
                if level < num_levels - 1:
                    self.shared_gates.append(SoftmaxGate(w, total))
                    self.shared_natives.append(NativeCombination(shared_experts))
            self.task_gates.append(nn.ModuleList(SoftmaxGate(w, total) for _ in range(n_tasks)))
            self.natives.append(
                nn.ModuleList(NativeCombination(task_experts) for _ in range(n_tasks))
            )
        self.towers = nn.ModuleList(
            TaskHead(out, task.output_dim, tower_hidden) for task in tasks.values()
        )
        self.tasks_read_input = num_levels == 1

    def _experts(self, level: int, task_in: Sequence[Tensor], shared_in: Tensor) -> Tensor:
        outs = [bank(x) for bank, x in zip(row(self.task_experts, level), task_in, strict=True)]
        if self.m_shared:
            outs.append(self.shared_experts[level](shared_in))
        return torch.cat(outs, dim=1)

    def _native(self, level: int, index: int, experts: Tensor) -> Tensor:
        own = experts[:, index * self.m : (index + 1) * self.m]
        out: Tensor = row(self.natives, level)[index](own)
        return out

    def shared_stage(self, h: Tensor) -> dict[str, Tensor]:
        last = self.num_levels - 1
        n_tasks = len(self.task_names)
        task_in = [h] * n_tasks
        shared_in = h
        for level in range(last):
            experts = self._experts(level, task_in, shared_in)
            task_in = [
                mix(row(self.task_gates, level)[t](task_in[t]), experts)
                + self._native(level, t, experts)
                for t in range(n_tasks)
            ]
            if self.m_shared:
                gate = self.shared_gates[level](shared_in)
                own = self.shared_natives[level](experts[:, n_tasks * self.m :])
                shared_in = mix(gate, experts) + own
        parts = {"experts": self._experts(last, task_in, shared_in)}
        if last >= 1:
            parts["gate_in"] = torch.stack(task_in, dim=1)
        return parts

    def task_stage(self, index: int, h: Tensor, parts: Mapping[str, Tensor]) -> Tensor:
        last = self.num_levels - 1
        gate_in = parts["gate_in"][:, index] if last >= 1 else h
        experts = parts["experts"]
        z = mix(row(self.task_gates, last)[index](gate_in), experts) + self._native(
            last, index, experts
        )
        out: Tensor = self.towers[index](z)
        return out

    def shared_modules(self) -> list[nn.Module]:
        last = self.num_levels - 1
        modules: list[nn.Module] = [
            self.front,
            self.task_experts,
            self.shared_experts,
            self.shared_gates,
            self.shared_natives,
        ]
        modules += [self.task_gates[level] for level in range(last)]
        modules += [self.natives[level] for level in range(last)]
        return modules

    def task_modules(self, index: int) -> list[nn.Module]:
        last = self.num_levels - 1
        return [
            row(self.task_gates, last)[index],
            row(self.natives, last)[index],
            self.towers[index],
        ]


@registry.register(
    "architecture",
    "adatt",
    "adaptive task-to-task fusion of task and shared experts (Li et al., KDD 2023)",
)
def adatt(
    tasks: TaskSet,
    input_shape: Sequence[int],
    columns: Columns | None = None,
    num_levels: int = 2,
    task_experts: int = 1,
    shared_experts: int = 1,
    expert_hidden: list[int] = [64],  # noqa: B006 - read-only default, shown in `manytask list`
    tower_hidden: list[int] = [32],  # noqa: B006
    activation: str = "relu",
    dropout: float = 0.0,
    embedding_dim: int = 8,
) -> AdaTT:
    r"""AdaTT: :math:`f^l_t = \mathrm{softmax}(W^l_t f^{l-1}_t)^\top \mathbf{E}^l +
    (v^l_t)^\top E^l_t`, :math:`y_t = h_t(f^L_t)` (full rule in :mod:`manytask.nn.adatt`).

    Li, Zhang, Yuan, Gao, Zhang, Yang, Liu and Yang, "AdaTT: Adaptive Task-to-Task Fusion
    Network for Multitask Learning in Recommendations", KDD 2023, arXiv:2304.04959.
    ``shared_experts > 0`` is the general AdaTT (task-specific and shared fusion units); 0 is
    the paper's AdaTT-sp (task-specific units only).

    Defaults: 2 fusion levels, 1 task expert and 1 shared expert per level, expert width
    ``[64]``, tower width ``[32]``, ReLU: manytask's choices (the paper tunes them per data
    set).
    """
    front, width = input_layer(input_shape, columns, embedding_dim)
    return AdaTT(
        tasks,
        front,
        width,
        num_levels,
        task_experts,
        shared_experts,
        expert_hidden,
        tower_hidden,
        activation,
        dropout,
    )
