r"""Pareto fronts and the hypervolume indicator of a set of runs.

Each run is a point :math:`p \in \mathbb{R}^K` (one objective per task, e.g. its test primary
metric), and each objective has a direction: ``"higher"`` or ``"lower"`` is better. Point
:math:`a` *dominates* :math:`b` when it is at least as good in every objective and strictly
better in one; the *Pareto front* is the set of points no other point dominates (two equal
points are both on it).

The *hypervolume* of a set :math:`P` against a reference point :math:`r` that every point is at
least as good as is the Lebesgue measure of the region the points dominate and that dominates
:math:`r` (Zitzler & Thiele, "Multiobjective Optimization Using Evolutionary Algorithms — A
Comparative Case Study", PPSN V, 1998; no arXiv version):

.. math::

    \mathrm{HV}(P, r) = \lambda\Big(\bigcup_{p \in P} [p, r]\Big)

written for minimisation (a ``"higher"`` objective is negated first). Dominated points add
nothing, so the value depends only on the front, and not on the order of the points.

Computation, exact in every dimension:

- one objective: :math:`r - \min_p p`;
- two objectives: a sweep. Sorted by the first objective, the running minimum of the second
  traces the staircase, and :math:`\mathrm{HV} = \sum_i (x_{i+1} - x_i)(r_y - \min_{j \le i}
  y_j)` with :math:`x_{n+1} = r_x`; one sort and vectorised sums, dominated points included;
- three or more: WFG (While, Bradstreet & Barone, "A Fast Way of Calculating Exact
  Hypervolumes", IEEE Trans. Evolutionary Computation 16(1), 2012, DOI 10.1109/TEVC.2010.2077298;
  no arXiv version). The exclusive volume of point :math:`p_i` with respect to the points after
  it equals its box minus the hypervolume of those points *limited* by :math:`p_i`
  (:math:`\max(p_j, p_i)` elementwise), so

  .. math::

      \mathrm{HV}(P) = \sum_i \Big[\prod_k (r_k - p_{ik})
          - \mathrm{HV}\big(\mathrm{nd}(\max(P_{>i}, p_i))\big)\Big]

  where nd keeps the non-dominated points, recursing on the limited sets (all objectives kept)
  until a set holds at most one point. Its worst case grows exponentially with the number of
  objectives, which is no concern for the tens of runs of a comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from manytask.errors import ConfigError

Direction = Literal["higher", "lower"]
DIRECTIONS: tuple[Direction, ...] = ("higher", "lower")

Points = npt.ArrayLike | torch.Tensor
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


def _as_array(values: Points, what: str) -> FloatArray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} must be numbers, got {values!r} ({exc})") from None
    return array


def _check_points(points: Points, directions: Sequence[str]) -> FloatArray:
    """The points as a float64 ``(n, K)`` array, negated where higher is better (minimisation)."""
    array = _as_array(points, "points")
    if array.ndim != 2:
        raise ConfigError(
            f"points must be a 2-D array of shape (runs, objectives), got shape {array.shape}; "
            "for one objective use shape (runs, 1)"
        )
    if isinstance(directions, str):
        raise ConfigError(
            f"directions must be a sequence with one 'higher' or 'lower' per objective, "
            f"got the string {directions!r}"
        )
    if len(directions) != array.shape[1]:
        raise ConfigError(
            f"directions has {len(directions)} entries but the points have {array.shape[1]} "
            "objectives; give one 'higher' or 'lower' per objective (column)"
        )
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad:
        raise ConfigError(f"unknown direction {bad[0]!r}; each direction is 'higher' or 'lower'")
    if array.shape[1] == 0:
        raise ConfigError("points need at least one objective (column)")
    if not np.isfinite(array).all():
        row = int(np.nonzero(~np.isfinite(array).all(axis=1))[0][0])
        raise ConfigError(
            f"point {row} is not finite ({array[row].tolist()}); every objective value must be "
            "a finite number"
        )
    signs = np.array([-1.0 if d == "higher" else 1.0 for d in directions])
    minimised: FloatArray = array * signs
    return minimised


def _non_dominated(points: FloatArray) -> BoolArray:
    """Mask of the points (minimisation) that no other point dominates; O(n² K), vectorised."""
    if len(points) == 0:
        return np.zeros(0, dtype=bool)
    no_worse = (points[:, None, :] <= points[None, :, :]).all(axis=-1)  # [j, i]: j ≤ i everywhere
    better = (points[:, None, :] < points[None, :, :]).any(axis=-1)  # [j, i]: j < i somewhere
    dominated: BoolArray = np.any(no_worse & better, axis=0)
    return np.logical_not(dominated)


def pareto_front(points: Points, directions: Sequence[str]) -> BoolArray:
    """Mask of the non-dominated points.

    Args:
        points: ``(n, K)`` objective values, one row per run (array, nested lists or tensor).
        directions: one ``"higher"`` or ``"lower"`` per objective (column).

    Returns:
        A boolean array of length ``n``: ``True`` where no other point dominates the row.
    """
    return _non_dominated(_check_points(points, directions))


def hypervolume(points: Points, reference: Points, directions: Sequence[str]) -> float:
    """Exact hypervolume dominated by ``points`` and bounded by ``reference``.

    Args:
        points: ``(n, K)`` objective values, one row per run; ``n`` may be 0.
        reference: ``(K,)`` reference point, at least as bad as every point in every objective
            (≤ the points where higher is better, ≥ where lower is better).
        directions: one ``"higher"`` or ``"lower"`` per objective.

    Raises:
        ConfigError: for a wrong shape, an unknown direction, a non-finite value, or a
            reference point that some point is worse than.
    """
    p = _check_points(points, directions)
    ref = _as_array(reference, "reference")
    if ref.shape != (p.shape[1],):
        raise ConfigError(
            f"reference must have shape ({p.shape[1]},), one value per objective, "
            f"got shape {ref.shape}"
        )
    if not np.isfinite(ref).all():
        raise ConfigError(f"reference must be finite, got {ref.tolist()}")
    signs = np.array([-1.0 if d == "higher" else 1.0 for d in directions])
    r: FloatArray = ref * signs
    outside = p > r
    if outside.any():
        row, col = (int(i[0]) for i in np.nonzero(outside))
        value = float(p[row, col] * signs[col])
        relation = "≤" if directions[col] == "higher" else "≥"
        raise ConfigError(
            f"reference point does not bound the points: point {row} has objective {col} = "
            f"{value}, worse than the reference {float(ref[col])} ({directions[col]} is better, "
            f"so the reference must be {relation} every point's value there)"
        )
    return _hypervolume(p, r)


def _hypervolume(points: FloatArray, reference: FloatArray) -> float:
    """Hypervolume for minimisation; every point is ≤ ``reference``."""
    n, k = points.shape
    if n == 0:
        return 0.0
    if k == 1:
        return float(reference[0] - points[:, 0].min())
    if k == 2:
        return _sweep_2d(points, reference)
    return _wfg(points[_non_dominated(points)], reference)


def _sweep_2d(points: FloatArray, reference: FloatArray) -> float:
    order = np.lexsort((points[:, 1], points[:, 0]))  # by x, ties by y
    x, y = points[order, 0], points[order, 1]
    widths = np.diff(np.append(x, reference[0]))
    heights = reference[1] - np.minimum.accumulate(y)
    return float((widths * heights).sum())


def _wfg(points: FloatArray, reference: FloatArray) -> float:
    """WFG on a non-dominated set; the limited sets shrink fastest when the points are processed
    from the worst in the last objective (the paper's ordering)."""
    if points.shape[1] == 2 or len(points) <= 1:
        return _hypervolume_small(points, reference)
    points = points[np.argsort(-points[:, -1], kind="stable")]
    boxes = np.prod(reference - points, axis=1)
    total = 0.0
    for i in range(len(points)):
        rest = points[i + 1 :]
        if len(rest) == 0:
            total += float(boxes[i])
            continue
        limited = np.maximum(rest, points[i])
        limited = np.unique(limited[_non_dominated(limited)], axis=0)  # speed only
        total += float(boxes[i]) - _wfg(limited, reference)
    return total


def _hypervolume_small(points: FloatArray, reference: FloatArray) -> float:
    if len(points) == 0:
        return 0.0
    if len(points) == 1:
        return float(np.prod(reference - points[0]))
    return _sweep_2d(points, reference)
