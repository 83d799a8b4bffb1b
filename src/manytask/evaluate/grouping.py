r"""Task grouping: which tasks to train together, given an inter-task affinity matrix and a budget.

The objective is TAG's network selection (Fifty et al., "Efficiently Identifying Task Groupings
for Multi-Task Learning", NeurIPS 2021, arXiv 2109.04617, §3.3). A group :math:`G` (a set of
tasks trained in one model) gives each of its members :math:`j` the mean affinity of the other
members onto it,

.. math::

    s(G, j) = \frac{1}{|G| - 1} \sum_{i \in G,\, i \ne j} Z_{i \to j}
    \qquad (|G| \ge 2),

and a selection :math:`\mathcal{G}` of at most :math:`N` groups (the budget of models) that
covers every task scores

.. math::

    S(\mathcal{G}) = \sum_j \max_{G \in \mathcal{G},\, j \in G} s(G, j):

each task is *served* by the group, among those that contain it, that helps it most. As in TAG,
groups may overlap (a task may be trained in several models and served by one of them;
``overlap=True``); ``overlap=False`` asks for a partition (every task in exactly one model).

A group of one task has no other member, so :math:`s` is undefined there. The paper leaves it
open; a public implementation of its network selection gives a singleton −10⁶ when overlap is
allowed (no task is ever served alone) and, for partitions, the mean of the task's affinities to
and from the others. manytask uses ``singleton_score`` = 0 by default: a task trained alone gets
neither help nor harm from other tasks, which is what :math:`Z = 0` means, so a task joins a
group only when the group's members help it on average. Any other value can be passed.

**Exact search** (default for :math:`k \le 10` tasks): the best selection assigns every task to
one serving group, so it is a partition of the tasks into at most :math:`N` blocks :math:`C`,
each block served by the group :math:`G \supseteq C` that is best for it,
:math:`v(C) = \max_{G \supseteq C} \sum_{j \in C} s(G, j)` (:math:`v(C) = \sum_{j\in C} s(C, j)`
for partitions). A dynamic programme over subsets maximises :math:`\sum v(C)` over the set
partitions with at most :math:`N` blocks: :math:`O(3^k)` work for the block values and
:math:`O(N 3^k)` for the programme, exact for both variants, e.g. 10 tasks in well under a
second.

**Heuristic** (default beyond 10 tasks): agglomerative merging from singletons (the merge with
the largest gain; forced while there are more than :math:`N` blocks), then local search by moving
one task to another block or swapping two, from that start and from ``restarts`` random
partitions; for overlapping groups it continues from the best partition by adding a task to a
group, removing one, or opening a new two-task group while the budget allows, until no move
improves :math:`S`.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from manytask.errors import ConfigError

Method = Literal["auto", "exact", "heuristic"]

#: the largest number of tasks searched exactly by default (and the most the exact search takes)
EXACT_LIMIT = 10
EXACT_MAX = 14
_EPS = 1e-12


def format_score(value: float) -> str:
    """Affinities taken with a small step are small (≈ η gᵢ·gⱼ / Lⱼ): three significant digits."""
    return f"{value:+.2e}"


@dataclass(frozen=True)
class Grouping:
    """A selection of task groups.

    Attributes:
        tasks: the task names, in the affinity matrix's order.
        groups: the groups (tasks in task order), each serving at least one task.
        serving: task → the group that serves it.
        task_scores: task → :math:`s(\\text{serving group}, j)`.
        score: :math:`S`, the sum of ``task_scores``.
        overlap: whether groups could overlap.
        method: ``"exact"`` or ``"heuristic"``, the search that ran.
        models: the budget :math:`N` (``len(groups) ≤ models``).
        singleton_score: the score of a task served alone.
    """

    tasks: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]
    serving: dict[str, tuple[str, ...]]
    task_scores: dict[str, float]
    score: float
    overlap: bool
    method: str
    models: int
    singleton_score: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "models": self.models,
            "overlap": self.overlap,
            "method": self.method,
            "singleton_score": self.singleton_score,
            "score": self.score,
            "groups": [list(g) for g in self.groups],
            "serving": {t: list(g) for t, g in self.serving.items()},
            "task_scores": dict(self.task_scores),
        }

    def to_markdown(self) -> str:
        lines = ["| group | serves | score onto each served task |", "|---|---|---|"]
        for group in self.groups:
            served = [t for t in self.tasks if self.serving[t] == group]
            scores = ", ".join(f"{t} {format_score(self.task_scores[t])}" for t in served)
            lines.append(f"| {' + '.join(group)} | {', '.join(served)} | {scores} |")
        kind = "overlapping groups allowed" if self.overlap else "a partition"
        lines.append("")
        lines.append(
            f"Total score S = {format_score(self.score)} with at most {self.models} model(s), "
            f"{kind}, {self.method} search; a task served alone scores {self.singleton_score:g}."
        )
        return "\n".join(lines) + "\n"


def _as_matrix(affinity: Tensor | Sequence[Sequence[float]], k: int) -> np.ndarray:
    z = torch.as_tensor(affinity, dtype=torch.float64).detach().cpu().numpy()
    if z.shape != (k, k):
        raise ConfigError(f"the affinity matrix has shape {z.shape}; expected ({k}, {k})")
    bad = np.argwhere(~np.isfinite(z))
    if len(bad):
        i, j = (int(v) for v in bad[0])
        raise ConfigError(
            f"the affinity matrix has a non-finite entry at [{i}][{j}] ({z[i, j]}); grouping "
            "needs every off-diagonal entry measured (were the tasks' losses zero?)"
        )
    return z


def group_scores(z: np.ndarray, members: Sequence[int], singleton_score: float) -> dict[int, float]:
    """:math:`s(G, j)` for every member ``j`` of the group ``members``."""
    members = list(members)
    if len(members) == 1:
        return {members[0]: singleton_score}
    sub = z[np.ix_(members, members)]
    others = (sub.sum(axis=0) - np.diag(sub)) / (len(members) - 1)
    return {j: float(v) for j, v in zip(members, others, strict=True)}


def selection_score(
    z: np.ndarray, groups: Sequence[Sequence[int]], singleton_score: float
) -> tuple[float, list[float], list[int]]:
    """:math:`S` of ``groups`` (index lists), each task's best score and the index of the group
    serving it (−inf and −1 for a task no group covers; ties go to the first group)."""
    k = z.shape[0]
    best = [-math.inf] * k
    server = [-1] * k
    for g, members in enumerate(groups):
        for j, value in group_scores(z, members, singleton_score).items():
            if value > best[j] + _EPS or server[j] < 0:
                best[j], server[j] = value, g
    return sum(best), best, server


# exact search ----------------------------------------------------------------------------------
def _membership(k: int) -> Tensor:
    masks = torch.arange(1 << k)
    return ((masks[:, None] >> torch.arange(k)) & 1).bool()  # (2^k, k)


def _subset_scores(z: np.ndarray, singleton_score: float) -> tuple[Tensor, Tensor]:
    """``(2^k, k)`` :math:`s(G, j)` for every subset ``G`` (bit mask), 0 where ``j ∉ G``, and
    the membership matrix."""
    k = z.shape[0]
    zt = torch.from_numpy(z)
    member = _membership(k)
    size = member.sum(1, keepdim=True).double()
    colsum = member.double() @ zt  # [G, j] = Σ_{i∈G} Z[i, j]
    others = colsum - member.double() * zt.diagonal()[None, :]
    mean = torch.where(size > 1, others / (size - 1).clamp_min(1), singleton_score)
    return torch.where(member, mean, 0.0), member


def _block_values(
    z: np.ndarray, overlap: bool, singleton_score: float
) -> tuple[list[float], list[int]]:
    """For every block ``C`` (bit mask): its value :math:`v(C)` and the group serving it."""
    scores, member = _subset_scores(z, singleton_score)
    n = scores.shape[0]
    if not overlap:
        values = scores.sum(1)
        values[0] = -math.inf
        return values.tolist(), list(range(n))
    masks = torch.arange(n)
    best = torch.full((n,), -math.inf, dtype=torch.float64)
    server = torch.zeros(n, dtype=torch.long)
    chunk = max(1, (1 << 22) // n)  # bound the (chunk, 2^k) table to ~4M entries
    for start in range(1, n, chunk):
        blocks = masks[start : start + chunk]
        table = member[blocks].double() @ scores.T  # [C, G] = Σ_{j∈C} s(G, j)
        inside = (blocks[:, None] & ~masks[None, :]) == 0  # C ⊆ G
        table = torch.where(inside, table, -math.inf)
        value, index = table.max(dim=1)
        best[start : start + chunk], server[start : start + chunk] = value, index
    return best.tolist(), server.tolist()


def _best_partition(values: list[float], k: int, blocks: int) -> list[int]:
    """The set partition of ``k`` items into at most ``blocks`` blocks maximising the summed
    ``values`` of its blocks (bit masks); dynamic programme over subsets."""
    full = (1 << k) - 1
    size = 1 << k
    previous = [-math.inf] * size
    previous[0] = 0.0
    choices: list[list[int]] = []
    for _ in range(blocks):
        current = [-math.inf] * size
        current[0] = 0.0
        choice = [0] * size
        for mask in range(1, size):
            low = mask & -mask
            rest = mask ^ low
            sub = rest
            best, pick = -math.inf, 0
            while True:
                block = sub | low
                total = values[block] + previous[mask ^ block]
                if total > best + _EPS:
                    best, pick = total, block
                if sub == 0:
                    break
                sub = (sub - 1) & rest
            current[mask], choice[mask] = best, pick
        choices.append(choice)
        previous = current
    result, mask = [], full
    for level in range(blocks - 1, -1, -1):
        if mask == 0:
            break
        block = choices[level][mask]
        result.append(block)
        mask ^= block
    return result


def _exact(z: np.ndarray, models: int, overlap: bool, singleton_score: float) -> list[list[int]]:
    k = z.shape[0]
    values, server = _block_values(z, overlap, singleton_score)
    blocks = _best_partition(values, k, min(models, k))
    groups: list[list[int]] = []
    for block in blocks:
        members = [j for j in range(k) if server[block] >> j & 1]
        if members not in groups:
            groups.append(members)
    return groups


# heuristic search ------------------------------------------------------------------------------
def _partition_value(z: np.ndarray, blocks: Sequence[Sequence[int]], singleton: float) -> float:
    return sum(sum(group_scores(z, b, singleton).values()) for b in blocks if b)


def _improve_partition(
    z: np.ndarray, blocks: list[list[int]], models: int, singleton: float
) -> list[list[int]]:
    """Best-improvement local search: move one task to another (or a new) block, or swap two."""
    blocks = [sorted(b) for b in blocks if b]
    current = _partition_value(z, blocks, singleton)
    while True:
        best_value, best_blocks = current, None
        for a, block in enumerate(blocks):
            for task in block:
                targets = list(range(len(blocks))) + ([-1] if len(blocks) < models else [])
                for b in targets:
                    if b == a or (b == -1 and len(block) == 1):
                        continue
                    trial = [list(x) for x in blocks]
                    trial[a].remove(task)
                    if b == -1:
                        trial.append([task])
                    else:
                        trial[b] = sorted([*trial[b], task])
                    trial = [x for x in trial if x]
                    value = _partition_value(z, trial, singleton)
                    if value > best_value + _EPS:
                        best_value, best_blocks = value, trial
        for a, b in itertools.combinations(range(len(blocks)), 2):
            for t in blocks[a]:
                for u in blocks[b]:
                    trial = [list(x) for x in blocks]
                    trial[a] = sorted([u, *(x for x in blocks[a] if x != t)])
                    trial[b] = sorted([t, *(x for x in blocks[b] if x != u)])
                    value = _partition_value(z, trial, singleton)
                    if value > best_value + _EPS:
                        best_value, best_blocks = value, trial
        if best_blocks is None:
            return blocks
        blocks, current = best_blocks, best_value


def _agglomerate(z: np.ndarray, models: int, singleton: float) -> list[list[int]]:
    blocks = [[j] for j in range(z.shape[0])]
    while len(blocks) > 1:
        best_gain, pair = -math.inf, (0, 1)
        for a, b in itertools.combinations(range(len(blocks)), 2):
            merged = sorted(blocks[a] + blocks[b])
            gain = _partition_value(z, [merged], singleton) - _partition_value(
                z, [blocks[a], blocks[b]], singleton
            )
            if gain > best_gain + _EPS:
                best_gain, pair = gain, (a, b)
        if len(blocks) <= models and best_gain <= _EPS:
            break
        a, b = pair
        blocks = [x for i, x in enumerate(blocks) if i not in pair] + [
            sorted(blocks[a] + blocks[b])
        ]
    return blocks


def _heuristic_partition(
    z: np.ndarray, models: int, singleton: float, restarts: int, seed: int
) -> list[list[int]]:
    k = z.shape[0]
    best = _improve_partition(z, _agglomerate(z, models, singleton), models, singleton)
    best_value = _partition_value(z, best, singleton)
    rng = random.Random(seed)
    for _ in range(restarts):
        labels = [rng.randrange(models) for _ in range(k)]
        start = [[j for j in range(k) if labels[j] == b] for b in range(models)]
        found = _improve_partition(z, [b for b in start if b], models, singleton)
        value = _partition_value(z, found, singleton)
        if value > best_value + _EPS:
            best, best_value = found, value
    return best


def _improve_overlap(
    z: np.ndarray, groups: list[list[int]], models: int, singleton: float
) -> list[list[int]]:
    """Best-improvement local search on overlapping groups: add a task to a group, remove one,
    or open a new two-task group while fewer than ``models`` groups are in use."""
    k = z.shape[0]
    current = selection_score(z, groups, singleton)[0]
    while True:
        best_value, best_groups = current, None
        candidates: list[list[list[int]]] = []
        for g, group in enumerate(groups):
            for task in range(k):
                if task in group and len(group) > 1:
                    changed = [x for x in group if x != task]
                elif task not in group:
                    changed = sorted([*group, task])
                else:
                    continue
                if changed not in groups:
                    candidates.append([*groups[:g], changed, *groups[g + 1 :]])
        if len(groups) < models:
            for pair in itertools.combinations(range(k), 2):
                if list(pair) not in groups:
                    candidates.append([*groups, list(pair)])
        for trial in candidates:
            value = selection_score(z, trial, singleton)[0]
            if value > best_value + _EPS:
                best_value, best_groups = value, trial
        if best_groups is None:
            return groups
        groups, current = best_groups, best_value


# public API ------------------------------------------------------------------------------------
def choose_groups(
    affinity: Tensor | Sequence[Sequence[float]],
    tasks: Sequence[str],
    models: int,
    *,
    overlap: bool = True,
    method: Method = "auto",
    singleton_score: float = 0.0,
    exact_limit: int = EXACT_LIMIT,
    restarts: int = 8,
    seed: int = 0,
) -> Grouping:
    """Choose at most ``models`` groups of ``tasks`` maximising TAG's total affinity :math:`S`.

    Args:
        affinity: ``(k, k)`` matrix, ``[i][j]`` = :math:`Z_{i\\to j}` (affinity of task ``i``
            onto task ``j``); the diagonal is not used.
        tasks: the task names, in the matrix's order.
        models: the budget :math:`N` ≥ 1 of models (groups).
        overlap: allow a task in several groups (TAG); False asks for a partition.
        method: ``"exact"``, ``"heuristic"`` or ``"auto"`` (exact for ``k ≤ exact_limit``).
        singleton_score: the score of a task served by a group of its own (default 0, see the
            module docstring).
        exact_limit: the largest ``k`` that ``"auto"`` searches exactly.
        restarts, seed: random restarts of the heuristic and their seed.
    """
    names = tuple(tasks)
    k = len(names)
    if k == 0 or len(set(names)) != k:
        raise ConfigError(f"grouping needs distinct task names, got {list(names)}")
    if isinstance(models, bool) or not isinstance(models, int) or models < 1:
        raise ConfigError(f"the number of models must be an integer ≥ 1, got {models!r}")
    if method not in ("auto", "exact", "heuristic"):
        raise ConfigError(f"method must be 'auto', 'exact' or 'heuristic', got '{method}'")
    if not math.isfinite(singleton_score):
        raise ConfigError(f"singleton_score must be a finite number, got {singleton_score}")
    z = _as_matrix(affinity, k)
    budget = min(models, k)
    used = method if method != "auto" else ("exact" if k <= exact_limit else "heuristic")
    if used == "exact":
        if k > EXACT_MAX:
            raise ConfigError(
                f"exact grouping of {k} tasks would enumerate 3^{k} subsets; use "
                f"method='heuristic' (exact search takes at most {EXACT_MAX} tasks)"
            )
        found = _exact(z, budget, overlap, singleton_score)
    else:
        found = _heuristic_partition(z, budget, singleton_score, restarts, seed)
        if overlap:
            found = _improve_overlap(z, found, budget, singleton_score)
    return _grouping(z, names, found, overlap, used, models, singleton_score)


def _grouping(
    z: np.ndarray,
    names: tuple[str, ...],
    found: list[list[int]],
    overlap: bool,
    method: str,
    models: int,
    singleton_score: float,
) -> Grouping:
    total, best, server = selection_score(z, found, singleton_score)
    serving_groups = sorted({server[j] for j in range(len(names))}, key=lambda g: min(found[g]))
    groups = tuple(tuple(names[j] for j in sorted(found[g])) for g in serving_groups)
    serving = {
        names[j]: tuple(names[i] for i in sorted(found[server[j]])) for j in range(len(names))
    }
    return Grouping(
        tasks=names,
        groups=groups,
        serving=serving,
        task_scores={names[j]: best[j] for j in range(len(names))},
        score=total,
        overlap=overlap,
        method=method,
        models=models,
        singleton_score=singleton_score,
    )


def evaluate_groups(
    affinity: Tensor | Sequence[Sequence[float]],
    tasks: Sequence[str],
    groups: Sequence[Sequence[str]],
    *,
    singleton_score: float = 0.0,
) -> Grouping:
    """Score a given selection of groups (e.g. all tasks in one model) with the same objective."""
    names = tuple(tasks)
    z = _as_matrix(affinity, len(names))
    index = {name: i for i, name in enumerate(names)}
    unknown = [t for g in groups for t in g if t not in index]
    if unknown or not groups or any(not g for g in groups):
        raise ConfigError(
            f"groups must be non-empty lists of the tasks {list(names)}; got {list(groups)}"
        )
    found = [sorted({index[t] for t in g}) for g in groups]
    uncovered = [n for n in names if not any(index[n] in g for g in found)]
    if uncovered:
        raise ConfigError(f"the groups leave task(s) {', '.join(uncovered)} uncovered")
    disjoint = sum(len(g) for g in found) == len(names)
    return _grouping(z, names, found, not disjoint, "given", len(found), singleton_score)
