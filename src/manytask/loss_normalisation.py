r"""Per-task losses from token-level losses of a mixed-task batch, under three normalisations.

A sequence model scores each token: :math:`\ell_{ij}` is the loss of token :math:`j` of sample
:math:`i`, :math:`m_{ij} \in \{0, 1\}` says whether it counts (not padding, not an ignored
position) and :math:`\tau_i` is the task of sample :math:`i`. With :math:`S_t = \{i : \tau_i =
t\}`, :math:`N_i = \sum_j m_{ij}` tokens in sample :math:`i`, :math:`N_t = \sum_{i \in S_t} N_i`
tokens of task :math:`t` and :math:`N = \sum_t N_t` in the batch:

``"token"`` — every token of the task weighs the same:

.. math:: L_t = \frac{\sum_{i \in S_t} \sum_j m_{ij}\, \ell_{ij}}{N_t}

This is what a task's built-in ``cross_entropy`` gives on a mixed batch (its mean over the
labelled positions, the other tasks' rows being missing); long samples weigh more.

``"sample"`` — every sample of the task weighs the same, whatever its length:

.. math:: L_t = \frac{1}{|S_t^+|} \sum_{i \in S_t^+} \frac{\sum_j m_{ij}\, \ell_{ij}}{N_i},
   \qquad S_t^+ = \{i \in S_t : N_i > 0\}

``"task_weighted"`` — the token mean scaled by a weight per task,
:math:`L_t = w_t \cdot L_t^{\text{token}}`, with the given ``weights`` or, by default, the
task's share of the batch's tokens :math:`w_t = N_t / N`. With the share,
:math:`\sum_t L_t = \sum_{i,j} m_{ij}\ell_{ij} / N`, the single token-mean loss of the whole
mixed batch that plain (single-loss) multi-task fine-tuning minimises, as in T5
(arXiv:1910.10683) — so equal weighting of these per-task losses reproduces that training
exactly, while a balancer can still see and re-weight each task's part. This identity is the
reason for the default; it is not taken from a paper.

A task with no counted token in the batch gets a loss of 0 that still carries the graph (as the
built-in task losses do), so every balancer receives every task. Everything is computed with
``index_add_`` on the tensors' device: no boolean indexing, no device synchronisation. Masked
positions are replaced by 0 before summing; keep their losses finite (as ``cross_entropy`` with
``ignore_index`` does) so that their gradient is 0 rather than NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from manytask.errors import ConfigError

Mode = Literal["token", "sample", "task_weighted"]
MODES: tuple[str, ...] = get_args(Mode)


def per_task_token_losses(
    token_losses: Tensor,
    task_ids: Tensor,
    tasks: Sequence[str],
    mask: Tensor | None = None,
    mode: Mode = "token",
    weights: Mapping[str, float] | None = None,
) -> dict[str, Tensor]:
    """Each task's loss from the per-token losses of one (mixed-task) batch.

    Args:
        token_losses: ``(B, L)`` (or ``(B, …)``, flattened after the batch dimension) loss per
            token, e.g. ``F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")``.
        task_ids: ``(B,)`` integer task index of each sample, into ``tasks``.
        tasks: the task names, in task-index order; the result is keyed by them.
        mask: ``(B, L)`` boolean (or 0/1) mask of the tokens that count; None: all count.
        mode: ``"token"``, ``"sample"`` or ``"task_weighted"`` (see the module docstring).
        weights: for ``"task_weighted"``: a weight per task name (every task); None: each
            task's share of the batch's tokens.

    Returns:
        ``{task: scalar loss}`` in the order of ``tasks``.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown loss normalisation mode '{mode}'; valid modes: {MODES}")
    if weights is not None and mode != "task_weighted":
        raise ConfigError(
            f"weights apply only to mode 'task_weighted'; mode '{mode}' would ignore them"
        )
    names = list(tasks)
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"tasks must be distinct task names, at least one; got {names}")
    values, counted = _flatten(token_losses, task_ids, mask)
    dtype = torch.promote_types(values.dtype, torch.float32)
    values = torch.where(
        counted, values.to(dtype), torch.zeros((), dtype=dtype, device=values.device)
    )
    tokens = counted.to(dtype).sum(dim=1)  # N_i
    ids = task_ids.to(device=values.device, dtype=torch.int64)
    per_task = torch.zeros(len(names), dtype=dtype, device=values.device)

    def by_task(per_sample: Tensor) -> Tensor:
        return per_task.index_add(0, ids, per_sample)

    if mode == "sample":
        means = values.sum(dim=1) / tokens.clamp_min(1.0)  # 0 for a sample with no token
        losses = by_task(means) / by_task((tokens > 0).to(dtype)).clamp_min(1.0)
    else:
        task_tokens = by_task(tokens)  # N_t
        losses = by_task(values.sum(dim=1)) / task_tokens.clamp_min(1.0)
        if mode == "task_weighted":
            losses = losses * _task_weights(weights, names, task_tokens)
    return dict(zip(names, losses.unbind(), strict=True))


def _flatten(token_losses: Tensor, task_ids: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    if token_losses.dim() < 1 or task_ids.shape != token_losses.shape[:1]:
        raise ConfigError(
            f"token_losses must be (batch, …) and task_ids (batch,); got shapes "
            f"{tuple(token_losses.shape)} and {tuple(task_ids.shape)}"
        )
    if task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool:
        raise ConfigError(f"task_ids must be integer task indices, got dtype {task_ids.dtype}")
    values = token_losses.reshape(token_losses.shape[0], -1)
    if mask is None:
        return values, torch.ones_like(values, dtype=torch.bool)
    if mask.shape != token_losses.shape:
        raise ConfigError(
            f"mask must have the shape of token_losses {tuple(token_losses.shape)}, "
            f"got {tuple(mask.shape)}"
        )
    return values, mask.reshape(values.shape).to(device=values.device, dtype=torch.bool)


def _task_weights(weights: Mapping[str, float] | None, names: list[str], tokens: Tensor) -> Tensor:
    if weights is None:
        return tokens / tokens.sum().clamp_min(1.0)  # N_t / N
    missing = [name for name in names if name not in weights]
    unknown = [name for name in weights if name not in names]
    if missing or unknown:
        raise ConfigError(
            f"weights must name every task exactly: missing {missing}, unknown {unknown}; "
            f"tasks are {names}"
        )
    values = [float(weights[name]) for name in names]
    if not all(math.isfinite(value) for value in values):
        raise ConfigError(f"weights must be finite numbers, got {dict(weights)}")
    return torch.tensor(values, dtype=tokens.dtype, device=tokens.device)
