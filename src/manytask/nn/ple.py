r"""Customized Gate Control (CGC) and Progressive Layered Extraction (PLE).

Tang, Liu, Zhao and Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning
(MTL) Model for Personalized Recommendations", RecSys 2020.

Each extraction level ``l`` has shared experts :math:`S^l` and, for each task ``t``, task
experts :math:`E^l_t`. Task ``t``'s gate at level ``l`` mixes its own experts and the shared
ones; a shared gate mixes every expert of the level:

.. math::

    u^l_t &= \mathrm{softmax}(W^l_t\, u^{l-1}_t)^\top
             \big[E^l_t(u^{l-1}_t),\; S^l(u^{l-1}_s)\big] \\
    u^l_s &= \mathrm{softmax}(W^l_s\, u^{l-1}_s)^\top
             \big[E^l_1(u^{l-1}_1), …, E^l_T(u^{l-1}_T),\; S^l(u^{l-1}_s)\big]

with :math:`u^0_t = u^0_s = x`, and :math:`y_t = h_t(u^L_t)`. The last level has no shared gate.
CGC is PLE with a single level.

**What is shared.** At a level below the last, a task's experts feed the shared gate, and so
every task: they are shared parameters. Only the last level's task experts and gates, the gate
of the level before (it feeds only its task's last-level experts and gate) and the tower belong
to a task. **Features.** The views hold exactly what those task parts read: the task gates'
inputs at level ``L − 1`` (when shared parameters produced them), the expert outputs of level
``L − 1`` and the shared expert outputs of level ``L``, packed into one tensor.
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


class PLE(StagedModel):
    """Progressive Layered Extraction with ``num_levels`` levels (CGC when 1); see the module
    docstring for the rule and the shared/task split.

    Args:
        tasks: the tasks.
        front: the input layer; ``width`` is the width of what it produces.
        num_levels: number of extraction levels ``L ≥ 1``.
        shared_experts: shared experts per level.
        task_experts: experts per task per level.
        expert_hidden: widths of each expert MLP.
        tower_hidden: widths of each task tower.
        activation, dropout: of the experts.
    """

    def __init__(
        self,
        tasks: TaskSet,
        front: nn.Module,
        width: int,
        num_levels: int = 2,
        shared_experts: int = 1,
        task_experts: int = 1,
        expert_hidden: Sequence[int] = (64,),
        tower_hidden: Sequence[int] = (),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(tasks, front)
        check_positive("num_levels", num_levels)
        check_positive("shared_experts", shared_experts)
        check_positive("task_experts", task_experts)
        check_widths("expert_hidden", expert_hidden, allow_empty=False)
        check_widths("tower_hidden", tower_hidden)
        check_dropout(dropout)
        self.num_levels = num_levels
        self.task_experts_per_task = task_experts
        n_tasks = len(tasks)
        out = expert_hidden[-1]
        self.task_experts = nn.ModuleList()
        self.shared_experts = nn.ModuleList()
        self.task_gates = nn.ModuleList()
        self.shared_gates = nn.ModuleList()
        for level in range(num_levels):
            w = width if level == 0 else out
            self.task_experts.append(
                nn.ModuleList(
                    ExpertBank(task_experts, w, expert_hidden, activation, dropout)
                    for _ in range(n_tasks)
                )
            )
            self.shared_experts.append(
                ExpertBank(shared_experts, w, expert_hidden, activation, dropout)
            )
            self.task_gates.append(
                nn.ModuleList(SoftmaxGate(w, task_experts + shared_experts) for _ in range(n_tasks))
            )
            if level < num_levels - 1:
                self.shared_gates.append(SoftmaxGate(w, n_tasks * task_experts + shared_experts))
        self.towers = nn.ModuleList(
            TaskHead(out, task.output_dim, tower_hidden) for task in tasks.values()
        )
        # the task parts read h only through the gates (and experts) of the first level
        self.tasks_read_input = num_levels <= 2

    def shared_stage(self, h: Tensor) -> dict[str, Tensor]:
        last = self.num_levels - 1
        n_tasks = len(self.task_names)
        task_in = [h] * n_tasks
        shared_in = h
        parts: dict[str, Tensor] = {}
        for level in range(last):
            outs = [row(self.task_experts, level)[t](task_in[t]) for t in range(n_tasks)]
            shared = self.shared_experts[level](shared_in)
            if level == last - 1:  # the task gates of this level belong to the tasks
                if level > 0:
                    parts["gate_in"] = torch.stack(task_in, dim=1)
                parts["task_experts"] = torch.stack(outs, dim=1)
                parts["shared_prev"] = shared
            else:
                task_in = [
                    mix(row(self.task_gates, level)[t](task_in[t]), torch.cat([outs[t], shared], 1))
                    for t in range(n_tasks)
                ]
            shared_in = mix(self.shared_gates[level](shared_in), torch.cat([*outs, shared], 1))
        parts["shared_last"] = self.shared_experts[last](shared_in)
        return parts

    def task_stage(self, index: int, h: Tensor, parts: Mapping[str, Tensor]) -> Tensor:
        last = self.num_levels - 1
        if last >= 1:
            gate_in = parts["gate_in"][:, index] if last >= 2 else h
            experts = torch.cat([parts["task_experts"][:, index], parts["shared_prev"]], dim=1)
            rep = mix(row(self.task_gates, last - 1)[index](gate_in), experts)
        else:
            rep = h
        own = row(self.task_experts, last)[index](rep)
        z = mix(row(self.task_gates, last)[index](rep), torch.cat([own, parts["shared_last"]], 1))
        out: Tensor = self.towers[index](z)
        return out

    def shared_modules(self) -> list[nn.Module]:
        last = self.num_levels - 1
        modules: list[nn.Module] = [self.front, *self.shared_experts, *self.shared_gates]
        modules += [self.task_experts[level] for level in range(last)]
        modules += [self.task_gates[level] for level in range(last - 1)]
        return modules

    def task_modules(self, index: int) -> list[nn.Module]:
        last = self.num_levels - 1
        modules: list[nn.Module] = [
            row(self.task_experts, last)[index],
            row(self.task_gates, last)[index],
            self.towers[index],
        ]
        if last >= 1:
            modules.append(row(self.task_gates, last - 1)[index])
        return modules


@registry.register(
    "architecture",
    "ple",
    "progressive layered extraction: levels of shared and task experts (Tang et al., RecSys 2020)",
)
def ple(
    tasks: TaskSet,
    input_shape: Sequence[int],
    columns: Columns | None = None,
    num_levels: int = 2,
    shared_experts: int = 1,
    task_experts: int = 1,
    expert_hidden: list[int] = [64],  # noqa: B006 - read-only default, shown in `manytask list`
    tower_hidden: list[int] = [32],  # noqa: B006
    activation: str = "relu",
    dropout: float = 0.0,
    embedding_dim: int = 8,
) -> PLE:
    r"""Progressive Layered Extraction:
    :math:`u^l_t = \mathrm{softmax}(W^l_t u^{l-1}_t)^\top [E^l_t(u^{l-1}_t), S^l(u^{l-1}_s)]`,
    :math:`y_t = h_t(u^L_t)` (full rule in :mod:`manytask.nn.ple`).

    Tang, Liu, Zhao and Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task
    Learning (MTL) Model for Personalized Recommendations", RecSys 2020.

    Defaults: 2 extraction levels (the smallest multi-level PLE; the paper compares CGC with
    multi-level PLE), 1 shared and 1 task expert per level, expert width ``[64]``, tower width
    ``[32]``, ReLU: manytask's choices.
    """
    front, width = input_layer(input_shape, columns, embedding_dim)
    return PLE(
        tasks,
        front,
        width,
        num_levels,
        shared_experts,
        task_experts,
        expert_hidden,
        tower_hidden,
        activation,
        dropout,
    )


@registry.register(
    "architecture",
    "cgc",
    "customized gate control: one level of shared and task experts (Tang et al., RecSys 2020)",
)
def cgc(
    tasks: TaskSet,
    input_shape: Sequence[int],
    columns: Columns | None = None,
    shared_experts: int = 1,
    task_experts: int = 1,
    expert_hidden: list[int] = [64],  # noqa: B006
    tower_hidden: list[int] = [32],  # noqa: B006
    activation: str = "relu",
    dropout: float = 0.0,
    embedding_dim: int = 8,
) -> PLE:
    r"""Customized Gate Control:
    :math:`y_t = h_t\big(\mathrm{softmax}(W_t x)^\top [E_t(x), S(x)]\big)`.

    Tang, Liu, Zhao and Gong, "Progressive Layered Extraction (PLE)", RecSys 2020, the
    single-level building block of PLE: each task's gate mixes its own experts and the shared
    experts. Shared: the input layer and the shared experts; each task owns its experts, gate
    and tower. Features: the shared experts' outputs (and the input when the input layer has
    parameters).

    Defaults: 1 shared and 1 task expert, expert width ``[64]``, tower width ``[32]``, ReLU:
    manytask's choices.
    """
    front, width = input_layer(input_shape, columns, embedding_dim)
    return PLE(
        tasks,
        front,
        width,
        1,
        shared_experts,
        task_experts,
        expert_hidden,
        tower_hidden,
        activation,
        dropout,
    )
