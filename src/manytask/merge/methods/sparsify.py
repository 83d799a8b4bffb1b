r"""Sparsification of task vectors, shared by the data-free rules.

Every function takes the ``(T, *shape)`` stack of one tensor name's task vectors and works on
each task's row separately (:func:`block_top_mask` takes one flattened tensor). Masks are bool
tensors; random functions draw only from the ``generator`` they are given (the engine seeds it
per tensor name), so results never depend on threads or on the order tensors are merged.

- :func:`top_magnitude_mask`: keep the ``density`` fraction of largest magnitudes (TIES trim).
- :func:`magnitude_band_mask`: drop the ``gamma`` fraction of largest magnitudes, keep the next
  ``density`` fraction (Model Breadcrumbs).
- :func:`drop_and_rescale`: drop each entry with probability :math:`1 - d`, rescale the rest by
  :math:`1/d` (DARE).
- :func:`magnitude_sampled_drop`: keep probabilities that grow with the magnitude rank inside a
  row, rescale by their inverse (DELLA's MagPrune).
- :func:`block_top_mask`: keep the ``n`` largest of every ``m`` consecutive entries (CABS's
  balanced n:m sparsification).

Counts are rounded to the nearest integer (:func:`keep_count`), so a rule's density means the
same thing on every tensor size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def keep_count(fraction: float, size: int) -> int:
    """Entries kept out of ``size`` at ``fraction``: the nearest integer, at least one (for a
    non-empty tensor), at most ``size``."""
    return min(size, max(1, math.floor(fraction * size + 0.5)))


def uniform_like(x: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform draws in [0, 1) of ``x``'s shape and dtype, from ``generator`` only."""
    draws = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=generator.device)
    return draws.to(x.device)


def entrywise_uniform(vectors: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform draws for the ``(T, *shape)`` stack ``vectors``, drawn entry by entry in storage
    order with the ``T`` draws of an entry together: the draws of a block of rows are then a
    contiguous stretch of the generator's stream, whatever the blocks."""
    draws = torch.rand(
        (*vectors.shape[1:], vectors.shape[0]),
        generator=generator,
        dtype=vectors.dtype,
        device=generator.device,
    )
    return draws.movedim(-1, 0).to(vectors.device)


def _rows(vectors: Tensor) -> Tensor:
    """``(T, *shape)`` as ``(T, numel)``: each task's tensor flattened."""
    return vectors.reshape(vectors.shape[0], -1)


def top_magnitude_mask(vectors: Tensor, density: float) -> Tensor:
    """Per task, True at the ``keep_count(density, numel)`` entries of largest magnitude."""
    if density >= 1.0:
        return torch.ones_like(vectors, dtype=torch.bool)
    flat = _rows(vectors)
    keep = keep_count(density, flat.shape[1])
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, flat.abs().topk(keep, dim=1).indices, True)
    return mask.view_as(vectors)


def magnitude_band_mask(vectors: Tensor, density: float, gamma: float) -> Tensor:
    """Per task, drop the ``round(gamma * numel)`` largest magnitudes and keep the next
    ``keep_count(density, numel)`` (fewer when the tensor runs out); the rest is dropped."""
    flat = _rows(vectors)
    size = flat.shape[1]
    top = min(size, math.floor(gamma * size + 0.5))
    keep = min(size - top, keep_count(density, size))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep > 0:
        ranked = flat.abs().topk(top + keep, dim=1, sorted=True).indices
        mask.scatter_(1, ranked[:, top:], True)
    return mask.view_as(vectors)


def drop_and_rescale(vectors: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: keep each entry with probability ``density`` and divide the kept ones by it, so
    every entry keeps its expected value. ``density = 1`` returns ``vectors`` itself."""
    if density >= 1.0:
        return vectors
    keep = entrywise_uniform(vectors, generator) < density
    return torch.where(keep, vectors, 0.0).div_(density)


def row_view(vectors: Tensor) -> Tensor:
    """``(T, *shape)`` as ``(T * rows, columns)``: a matrix keeps its rows, a higher-order
    tensor is cut along its first axis, a vector or scalar is one row."""
    shape = vectors.shape[1:]
    rows = shape[0] if len(shape) >= 2 else 1
    return vectors.reshape(vectors.shape[0] * rows, -1)


def magnitude_sampled_drop(
    vectors: Tensor, density: float, epsilon: float, generator: torch.Generator
) -> Tensor:
    r"""DELLA's MagPrune on every row of every task (:func:`row_view`).

    In a row of :math:`n` entries ranked :math:`r = 0, \dots, n-1` by increasing magnitude,
    entry :math:`r` is kept with probability
    :math:`q_r = d - \epsilon/2 + \epsilon\, r/(n-1)` (:math:`q = d` when :math:`n = 1`) and a
    kept entry is divided by :math:`q_r`, so its expected value is unchanged. Ties in magnitude
    are ranked in index order.
    """
    rows = row_view(vectors)
    size = rows.shape[1]
    if size > 1:
        order = rows.abs().argsort(dim=1, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(size).expand_as(order))
        del order
        keep_prob = ranks.to(rows.dtype).mul_(epsilon / (size - 1)).add_(density - epsilon / 2)
        del ranks
    else:
        keep_prob = torch.full_like(rows, density)
    keep = uniform_like(rows, generator) < keep_prob
    kept = torch.where(keep, rows, 0.0).div_(keep_prob)
    return kept.view_as(vectors)


def block_top_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Balanced n:m sparsification of a flattened tensor: True at the ``n`` largest ``scores``
    of every block of ``m`` consecutive entries. A trailing block of ``r < m`` entries keeps
    its ``round(n * r / m)`` largest."""
    size = scores.numel()
    full = size // m * m
    mask = torch.zeros(size, dtype=torch.bool, device=scores.device)
    if full:
        blocks = scores[:full].view(-1, m)
        mask[:full].view(-1, m).scatter_(1, blocks.topk(n, dim=1).indices, True)
    rest = size - full
    tail = min(rest, math.floor(n * rest / m + 0.5))
    if tail:
        mask[full:].scatter_(0, scores[full:].topk(tail).indices, True)
    return mask
