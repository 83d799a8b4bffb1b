"""Pareto fronts and exact hypervolumes against hand-computed values and a brute-force grid."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from manytask.errors import ConfigError
from manytask.evaluate import hypervolume, pareto_front

MAX2 = ["higher", "higher"]
MIN3 = ["lower", "lower", "lower"]


def grid_hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Minimisation hypervolume by summing the cells of the grid that every point's coordinates
    cut the box into; a cell counts when some point is ≤ its lower corner. Exact, slow, simple."""
    axes = [np.unique(np.append(points[:, k], reference[k])) for k in range(points.shape[1])]
    total = 0.0
    for cell in itertools.product(*(range(len(a) - 1) for a in axes)):
        lower = np.array([a[i] for a, i in zip(axes, cell, strict=True)])
        if (points <= lower).all(axis=1).any():
            total += float(np.prod([a[i + 1] - a[i] for a, i in zip(axes, cell, strict=True)]))
    return total


# hand-computed values -------------------------------------------------------------------
def test_two_objectives_staircase_by_hand():
    # boxes from (0, 0): [1,3] area 3, [2,2] adds 1·2 = 2, [3,1] adds 1·1 = 1 → 6
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [0, 0], MAX2) == pytest.approx(6.0)
    # lower is better, reference (4, 4): (1,3) box 3·1=3, (3,1) box 1·3=3, overlap 1·1 → 5
    assert hypervolume([[1, 3], [3, 1]], [4, 4], ["lower", "lower"]) == pytest.approx(5.0)
    # mixed directions: x higher from 0, y lower from 10; (2, 4): 2·6 = 12, (5, 8): 5·2 = 10,
    # overlap 2·2 = 4 → 18
    assert hypervolume([[2, 4], [5, 8]], [0, 10], ["higher", "lower"]) == pytest.approx(18.0)


def test_three_objectives_by_inclusion_exclusion():
    # boxes 3, 8, 9; pairwise overlaps 2, 1, 4; triple overlap 1 → 3+8+9-2-1-4+1 = 14
    points = [[1, 3, 1], [2, 2, 2], [3, 1, 3]]
    assert hypervolume(points, [0, 0, 0], ["higher"] * 3) == pytest.approx(14.0)
    # the same shapes mirrored for minimisation against (4, 4, 4)
    mirrored = [[4 - v for v in p] for p in points]
    assert hypervolume(mirrored, [4, 4, 4], MIN3) == pytest.approx(14.0)


def test_one_point_is_its_box_and_one_objective_is_the_best_distance():
    assert hypervolume([[0.5, 0.25, 2.0]], [0, 0, 0], ["higher"] * 3) == pytest.approx(0.25)
    assert hypervolume([[3.0], [1.0], [2.0]], [5.0], ["lower"]) == pytest.approx(4.0)
    assert hypervolume(np.zeros((0, 2)), [1, 1], MAX2) == 0.0


def test_four_objectives_by_hand():
    # two boxes from the origin: 1·1·1·2 = 2 and 2·1·1·1 = 2, overlapping in 1·1·1·1 → 3
    points = [[1, 1, 1, 2], [2, 1, 1, 1]]
    assert hypervolume(points, [0, 0, 0, 0], ["higher"] * 4) == pytest.approx(3.0)


def test_points_on_the_reference_add_nothing():
    assert hypervolume([[0, 5], [2, 2]], [0, 0], MAX2) == pytest.approx(4.0)


# properties -------------------------------------------------------------------------------
def test_dominated_and_duplicate_points_do_not_change_the_hypervolume():
    front = [[1, 3, 2], [2, 2, 2], [3, 1, 1]]
    extra = [[1, 1, 1], [2, 2, 2], [0.5, 2.5, 1.5]]  # each dominated by (or equal to) a front point
    base = hypervolume(front, [0, 0, 0], ["higher"] * 3)
    assert hypervolume(front + extra, [0, 0, 0], ["higher"] * 3) == pytest.approx(base)
    two = [[1, 3], [3, 1]]
    assert hypervolume([*two, [1, 1], [0.5, 2]], [0, 0], MAX2) == pytest.approx(
        hypervolume(two, [0, 0], MAX2)
    )


def test_a_constant_third_objective_scales_the_two_objective_volume():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1, (7, 2))
    flat = np.column_stack([xy, np.full(7, 0.25)])
    two = hypervolume(xy, [1, 1], ["lower", "lower"])
    assert hypervolume(flat, [1, 1, 1], MIN3) == pytest.approx(two * 0.75)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 4).flatmap(
        lambda k: st.lists(
            st.lists(st.integers(0, 5), min_size=k, max_size=k), min_size=1, max_size=6
        )
    ),
    st.randoms(use_true_random=False),
)
def test_hypervolume_equals_the_brute_force_grid_and_ignores_order(rows, rnd):
    points = np.array(rows, dtype=np.float64)
    reference = np.full(points.shape[1], 6.0)
    directions = ["lower"] * points.shape[1]
    expected = grid_hypervolume(points, reference)
    assert hypervolume(points, reference, directions) == pytest.approx(expected)
    order = list(range(len(points)))
    rnd.shuffle(order)
    assert hypervolume(points[order], reference, directions) == pytest.approx(expected)
    # negating every objective and flipping the directions changes nothing
    assert hypervolume(-points, -reference, ["higher"] * points.shape[1]) == pytest.approx(expected)


def test_pareto_front_marks_the_non_dominated_points():
    points = [[1, 3], [2, 2], [1, 1], [3, 1], [2, 2], [0, 4]]
    mask = pareto_front(points, MAX2)
    # only (1,1) is dominated (by (2,2), among others); the two equal (2,2) are both on the front
    assert mask.tolist() == [True, True, False, True, True, True]
    # with y lower-is-better, (3, 1) has the highest x and the lowest y: it dominates the rest
    lower_y = pareto_front(points, ["higher", "lower"])
    assert lower_y.tolist() == [False, False, False, True, False, False]


def test_pareto_front_accepts_tensors_and_reorders_with_the_points():
    points = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.4, 0.4], [0.1, 0.9]], dtype=torch.float32)
    mask = pareto_front(points, MAX2)
    assert mask.tolist() == [True, True, False, True]
    perm = [3, 0, 2, 1]
    assert pareto_front(points[perm], MAX2).tolist() == mask[perm].tolist()
    # staircase from the right: 0.9·0.1 + 0.5·(0.5 − 0.1) + 0.1·(0.9 − 0.5) = 0.33
    assert hypervolume(points, torch.zeros(2), MAX2) == pytest.approx(0.33, abs=1e-6)


# errors ----------------------------------------------------------------------------------
def test_bad_shapes_and_directions_are_explained():
    with pytest.raises(ConfigError, match=r"2-D array of shape \(runs, objectives\)"):
        pareto_front([1.0, 2.0], ["higher"])
    with pytest.raises(ConfigError, match="directions has 1 entries but the points have 2"):
        pareto_front([[1.0, 2.0]], ["higher"])
    with pytest.raises(ConfigError, match="unknown direction 'max'"):
        pareto_front([[1.0, 2.0]], ["higher", "max"])
    with pytest.raises(ConfigError, match="sequence with one 'higher' or 'lower'"):
        pareto_front([[1.0]], "higher")
    with pytest.raises(ConfigError, match="point 1 is not finite"):
        hypervolume([[1.0, 2.0], [np.nan, 1.0]], [0, 0], MAX2)
    with pytest.raises(ConfigError, match=r"reference must have shape \(2,\)"):
        hypervolume([[1.0, 2.0]], [0.0, 0.0, 0.0], MAX2)


def test_a_reference_that_does_not_bound_the_points_is_refused():
    with pytest.raises(ConfigError, match="point 1 has objective 0 = 0.5, worse than the ref"):
        hypervolume([[2.0, 2.0], [0.5, 3.0]], [1.0, 1.0], MAX2)
    with pytest.raises(ConfigError, match="must be ≥ every point"):
        hypervolume([[2.0, 9.0]], [3.0, 3.0], ["lower", "lower"])
