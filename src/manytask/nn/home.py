r"""HoME: a hierarchy of multi-gate experts.

Wang, Cao, Fu, Gai and Zhou, "HoME: Hierarchy of Multi-Gate Experts for Multi-Task Learning at
Kuaishou", arXiv:2408.05430, 2024.

The tasks are split into groups (Kuaishou's "watch-time" and "interaction" categories); the
experts form a two-level hierarchy.

**Meta level** (reads the input ``x``): global meta experts :math:`G^1` and, per group ``c``,
group meta experts :math:`C^1_c`. Each meta expert reads its own feature-gated copy of the input
(*feature-gate*, :class:`~manytask.nn.gates.FeatureGate`:
:math:`x_e = x \odot 2\sigma(x A_e B_e)`). The *hierarchy mask* decides what each gate mixes:

.. math::

    m_c = \mathrm{gate}_c(x)^\top [G^1, C^1_c], \qquad
    m_s = \mathrm{gate}_s(x)^\top [C^1_1, …, C^1_K, G^1]

**Task level**: global experts :math:`G^2` read :math:`m_s`; group experts :math:`C^2_c` and the
experts :math:`T_t` of every task ``t`` in group ``c`` read :math:`m_c`:

.. math::

    z_t = \mathrm{gate}_t(m_c)^\top [G^2(m_s), C^2_c(m_c), T_t(m_c)], \qquad y_t = h_t(z_t)

Every gate is a :class:`~manytask.nn.gates.HierarchicalGate`: a softmax over the experts it sees
plus the *self-gate* — a sigmoid (one expert) or softmax (several) over the unit's own experts
(:math:`C^1_c` for :math:`m_c`, :math:`G^1` for :math:`m_s`, :math:`T_t` for :math:`z_t`), added
on top so that a unit always reads its own experts. *Expert normalisation & Swish*: each
expert's output is batch-normalised (per expert) and passed through Swish (SiLU) instead of
ReLU, so that all experts have comparable output distributions.

Simplifications and readings, named: the form of the self-gate (an additive term on the gate
weights, as above) and the gate inputs (``x`` at the meta level, :math:`m_c` at the task level)
are manytask's reading of the paper; feature gates are applied at the meta level only (the
level that reads the raw features); gates are linear (no hidden layer); initialisations are
PyTorch's defaults except the feature gates' (see :class:`~manytask.nn.gates.FeatureGate`). A
batch of one sample in training mode is normalised with the running statistics
(:class:`~manytask.nn.experts.ExpertNorm`).

**What is shared.** Everything at the meta level (every meta expert feeds :math:`m_s`, which
feeds every task), :math:`G^2`, and the group gate and group experts of a group with two or
more tasks. Task ``t`` owns :math:`T_t`, its gate and tower — and, when its group holds only
``t``, that group's gate and task-level experts. **Features.** The views hold :math:`G^2(m_s)`,
:math:`m_c` and :math:`C^2_c(m_c)` of each group with two or more tasks, and — for one-task
groups — the meta experts' outputs (and the input when the input layer has parameters),
packed into one tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from manytask import registry
from manytask.columns import Columns
from manytask.errors import ConfigError
from manytask.nn.experts import ExpertBank
from manytask.nn.gates import FeatureGate, HierarchicalGate, mix
from manytask.nn.heads import TaskHead
from manytask.nn.inputs import input_layer
from manytask.nn.staged import StagedModel, check_dropout, check_positive, check_widths
from manytask.task import TaskSet


def resolve_groups(tasks: TaskSet, groups: Sequence[Sequence[str]] | None) -> list[list[str]]:
    """The task groups, checked: every task in exactly one non-empty group (default: one group
    of all tasks)."""
    if groups is None:
        return [list(tasks.names)]
    resolved = [list(group) for group in groups]
    seen = [name for group in resolved for name in group]
    if any(not group for group in resolved):
        raise ConfigError("groups must not contain an empty group")
    unknown = sorted(set(seen) - set(tasks.names))
    if unknown:
        raise ConfigError(
            f"groups name unknown task(s) {', '.join(unknown)}; tasks are: {', '.join(tasks.names)}"
        )
    repeated = sorted({name for name in seen if seen.count(name) > 1})
    if repeated:
        raise ConfigError(f"groups list task(s) {', '.join(repeated)} more than once")
    missing = [name for name in tasks.names if name not in seen]
    if missing:
        raise ConfigError(f"groups leave out task(s) {', '.join(missing)}: put each in a group")
    return resolved


class _Bank(nn.Module):
    """Experts behind an optional feature gate."""

    def __init__(self, experts: ExpertBank, feature_gate: FeatureGate | None) -> None:
        super().__init__()
        self.experts = experts
        self.feature_gate = feature_gate

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.experts(x if self.feature_gate is None else self.feature_gate(x))
        return out


class HoME(StagedModel):
    """HoME; see the module docstring for the rule and the shared/task split.

    Args:
        tasks: the tasks.
        front: the input layer; ``width`` is the width of what it produces.
        groups: task names per group.
        meta_shared_experts, meta_group_experts: global and per-group experts of the meta level.
        shared_experts, group_experts, task_experts: global, per-group and per-task experts of
            the task level.
        expert_hidden, tower_hidden: widths of the experts and the towers.
        activation: the experts' activation (Swish = ``silu`` in HoME).
        expert_norm: batch-normalise each expert's output before its last activation.
        feature_gate_rank: rank of the meta experts' feature gates (0: no feature gates).
        self_gate: add the self-gate to every gate.
        dropout: of the experts.
    """

    def __init__(
        self,
        tasks: TaskSet,
        front: nn.Module,
        width: int,
        groups: Sequence[Sequence[str]],
        meta_shared_experts: int = 1,
        meta_group_experts: int = 1,
        shared_experts: int = 1,
        group_experts: int = 1,
        task_experts: int = 1,
        expert_hidden: Sequence[int] = (64,),
        tower_hidden: Sequence[int] = (),
        activation: str = "silu",
        expert_norm: bool = True,
        feature_gate_rank: int = 8,
        self_gate: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(tasks, front)
        for name, value in (
            ("meta_shared_experts", meta_shared_experts),
            ("meta_group_experts", meta_group_experts),
            ("shared_experts", shared_experts),
            ("group_experts", group_experts),
            ("task_experts", task_experts),
        ):
            check_positive(name, value)
        check_positive("feature_gate_rank", feature_gate_rank, minimum=0)
        check_widths("expert_hidden", expert_hidden, allow_empty=False)
        check_widths("tower_hidden", tower_hidden)
        check_dropout(dropout)
        self.groups = resolve_groups(tasks, groups)
        self.group_of = [
            next(c for c, group in enumerate(self.groups) if name in group) for name in tasks.names
        ]
        self.n_meta_shared = meta_shared_experts
        self.n_meta_group = meta_group_experts
        out = expert_hidden[-1]
        n_groups = len(self.groups)

        def bank(n: int, w: int, gated: bool) -> _Bank:
            experts = ExpertBank(n, w, expert_hidden, activation, dropout, norm=expert_norm)
            gate = FeatureGate(w, n, feature_gate_rank) if gated and feature_gate_rank else None
            return _Bank(experts, gate)

        # meta level
        self.meta_shared = bank(meta_shared_experts, width, True)
        self.meta_group = nn.ModuleList(
            bank(meta_group_experts, width, True) for _ in range(n_groups)
        )
        all_meta = meta_shared_experts + n_groups * meta_group_experts
        self.meta_shared_gate = HierarchicalGate(width, all_meta, meta_shared_experts, self_gate)
        self.meta_group_gates = nn.ModuleList(
            HierarchicalGate(
                width, meta_shared_experts + meta_group_experts, meta_group_experts, self_gate
            )
            for _ in range(n_groups)
        )
        # task level
        self.shared = bank(shared_experts, out, False)
        self.group = nn.ModuleList(bank(group_experts, out, False) for _ in range(n_groups))
        self.task = nn.ModuleList(bank(task_experts, out, False) for _ in tasks)
        seen = shared_experts + group_experts + task_experts
        self.task_gates = nn.ModuleList(
            HierarchicalGate(out, seen, task_experts, self_gate) for _ in tasks
        )
        self.towers = nn.ModuleList(
            TaskHead(out, task.output_dim, tower_hidden) for task in tasks.values()
        )
        #: groups of one task: their group-level gate and experts belong to that task
        self.single = [len(group) == 1 for group in self.groups]
        self.tasks_read_input = any(self.single)

    def _group_meta(self, c: int, h: Tensor, meta: Tensor) -> Tensor:
        """:math:`m_c` from the stacked meta experts ``[G¹, C¹_1, …, C¹_K]``."""
        start = self.n_meta_shared + c * self.n_meta_group
        seen = torch.cat(
            [meta[:, : self.n_meta_shared], meta[:, start : start + self.n_meta_group]], 1
        )
        return mix(self.meta_group_gates[c](h), seen)

    def shared_stage(self, h: Tensor) -> dict[str, Tensor]:
        shared = self.meta_shared(h)
        groups = [bank(h) for bank in self.meta_group]
        meta = torch.cat([shared, *groups], dim=1)  # [G¹, C¹_1, …, C¹_K]
        m_s = mix(self.meta_shared_gate(h), torch.cat([*groups, shared], dim=1))
        parts = {"shared": self.shared(m_s)}
        for c, single in enumerate(self.single):
            if not single:
                m_c = self._group_meta(c, h, meta)
                parts[f"meta{c}"] = m_c
                parts[f"group{c}"] = self.group[c](m_c)
        if any(self.single):
            parts["meta_experts"] = meta
        return parts

    def task_stage(self, index: int, h: Tensor, parts: Mapping[str, Tensor]) -> Tensor:
        c = self.group_of[index]
        if self.single[c]:
            m_c = self._group_meta(c, h, parts["meta_experts"])
            group = self.group[c](m_c)
        else:
            m_c, group = parts[f"meta{c}"], parts[f"group{c}"]
        own = self.task[index](m_c)
        experts = torch.cat([parts["shared"], group, own], dim=1)
        out: Tensor = self.towers[index](mix(self.task_gates[index](m_c), experts))
        return out

    def shared_modules(self) -> list[nn.Module]:
        modules: list[nn.Module] = [
            self.front,
            self.meta_shared,
            self.meta_group,
            self.meta_shared_gate,
            self.shared,
        ]
        for c, single in enumerate(self.single):
            if not single:
                modules += [self.meta_group_gates[c], self.group[c]]
        return modules

    def task_modules(self, index: int) -> list[nn.Module]:
        modules: list[nn.Module] = [self.task[index], self.task_gates[index], self.towers[index]]
        c = self.group_of[index]
        if self.single[c]:
            modules += [self.meta_group_gates[c], self.group[c]]
        return modules


@registry.register(
    "architecture",
    "home",
    "hierarchy of multi-gate experts: meta, group and task experts (Wang et al., 2024)",
)
def home(
    tasks: TaskSet,
    input_shape: Sequence[int],
    columns: Columns | None = None,
    groups: list[list[str]] | None = None,
    meta_shared_experts: int = 1,
    meta_group_experts: int = 1,
    shared_experts: int = 1,
    group_experts: int = 1,
    task_experts: int = 1,
    expert_hidden: list[int] = [64],  # noqa: B006 - read-only default, shown in `manytask list`
    tower_hidden: list[int] = [32],  # noqa: B006
    activation: str = "silu",
    expert_norm: bool = True,
    feature_gate_rank: int = 8,
    self_gate: bool = True,
    dropout: float = 0.0,
    embedding_dim: int = 8,
) -> HoME:
    r"""HoME: meta experts → group and task experts, hierarchical gates:
    :math:`y_t = h_t\big(\mathrm{gate}_t(m_c)^\top [G^2(m_s), C^2_c(m_c), T_t(m_c)]\big)` (full
    rule in :mod:`manytask.nn.home`).

    Wang, Cao, Fu, Gai and Zhou, "HoME: Hierarchy of Multi-Gate Experts for Multi-Task Learning
    at Kuaishou", arXiv:2408.05430, 2024. ``groups`` lists the task names of each group, e.g.
    ``[[click, like], [watch_time]]``; default: one group of all tasks.

    Defaults: Swish experts with batch normalisation, feature-gates and self-gates on: the
    paper's mechanisms; one expert of each kind, expert width ``[64]``, tower width ``[32]``,
    feature-gate rank 8: manytask's choices.
    """
    front, width = input_layer(input_shape, columns, embedding_dim)
    return HoME(
        tasks,
        front,
        width,
        resolve_groups(tasks, groups),
        meta_shared_experts,
        meta_group_experts,
        shared_experts,
        group_experts,
        task_experts,
        expert_hidden,
        tower_hidden,
        activation,
        expert_norm,
        feature_gate_rank,
        self_gate,
        dropout,
    )
