"""Task grouping: TAG's objective, exact search against brute force, and the heuristic."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from manytask.errors import ConfigError
from manytask.evaluate.grouping import choose_groups, evaluate_groups

# A, B help each other; C, D help each other; across the pairs they hurt
CLUSTERS = [
    [0.0, 0.5, -0.3, -0.3],
    [0.5, 0.0, -0.3, -0.3],
    [-0.3, -0.3, 0.0, 0.4],
    [-0.3, -0.3, 0.4, 0.0],
]
# H helps A (0.6) and B (0.5); A and B hurt each other; A and B help H a little
HELPER = [
    [0.0, -0.5, 0.1],
    [-0.5, 0.0, 0.1],
    [0.6, 0.5, 0.0],
]


@pytest.mark.parametrize("method", ["exact", "heuristic"])
@pytest.mark.parametrize("overlap", [True, False])
def test_two_clusters_are_found_by_both_searches(method, overlap):
    result = choose_groups(CLUSTERS, "ABCD", 2, method=method, overlap=overlap)
    assert result.groups == (("A", "B"), ("C", "D"))
    assert result.score == pytest.approx(0.5 + 0.5 + 0.4 + 0.4)
    assert result.serving["C"] == ("C", "D") and result.method == method


@pytest.mark.parametrize("method", ["exact", "heuristic"])
def test_a_helper_task_is_shared_by_two_groups_only_when_overlap_is_allowed(method):
    names = ["A", "B", "H"]
    shared = choose_groups(HELPER, names, 2, method=method, overlap=True)
    assert shared.groups == (("A", "H"), ("B", "H"))
    # A from H: 0.6; B from H: 0.5; H from A or B: 0.1 (ties go to the first group)
    assert shared.task_scores == pytest.approx({"A": 0.6, "B": 0.5, "H": 0.1})
    assert shared.score == pytest.approx(1.2)
    split = choose_groups(HELPER, names, 2, method=method, overlap=False)
    assert split.groups == (("A", "H"), ("B",))  # B alone scores the singleton 0
    assert split.score == pytest.approx(0.6 + 0.1 + 0.0)


def test_one_model_holds_every_task_and_scores_the_mean_of_the_others():
    result = choose_groups(CLUSTERS, "ABCD", 1)
    assert result.groups == (("A", "B", "C", "D"),)
    expected = {"A": (0.5 - 0.6) / 3, "B": (0.5 - 0.6) / 3, "C": (0.4 - 0.6) / 3}
    expected["D"] = expected["C"]
    assert result.task_scores == pytest.approx(expected)


def test_the_singleton_score_decides_whether_hurtful_tasks_train_alone():
    hurt = [[0.0, -0.2, -0.1], [-0.3, 0.0, -0.2], [-0.1, -0.4, 0.0]]
    alone = choose_groups(hurt, "abc", 3)
    assert alone.groups == (("a",), ("b",), ("c",)) and alone.score == 0
    together = choose_groups(hurt, "abc", 3, singleton_score=-1.0)
    assert all(len(g) > 1 for g in together.groups)


def _brute_force(z: np.ndarray, models: int, overlap: bool) -> float:
    """Every selection of at most ``models`` subsets that covers the tasks, scored directly."""
    k = len(z)
    subsets = [s for r in range(1, k + 1) for s in itertools.combinations(range(k), r)]

    def s(group, j):
        others = [i for i in group if i != j]
        return sum(z[i][j] for i in others) / len(others) if others else 0.0

    best = -math.inf
    for n in range(1, models + 1):
        for chosen in itertools.combinations(subsets, n):
            members = [j for g in chosen for j in g]
            if set(members) != set(range(k)) or (not overlap and len(members) != k):
                continue
            total = sum(max(s(g, j) for g in chosen if j in g) for j in range(k))
            best = max(best, total)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("models", [1, 2, 3])
@pytest.mark.parametrize("overlap", [True, False])
def test_exact_search_equals_brute_force_and_bounds_the_heuristic(seed, models, overlap):
    rng = np.random.default_rng(seed)
    k = 5
    z = rng.normal(size=(k, k)).round(3)
    names = [f"t{i}" for i in range(k)]
    exact = choose_groups(z, names, models, overlap=overlap, method="exact")
    assert exact.score == pytest.approx(_brute_force(z, models, overlap))
    assert len(exact.groups) <= models
    heuristic = choose_groups(z, names, models, overlap=overlap, method="heuristic")
    assert heuristic.score <= exact.score + 1e-9
    for result in (exact, heuristic):
        again = evaluate_groups(z, names, result.groups)  # the reported score is the objective
        assert again.score == pytest.approx(result.score)
        if not overlap:
            assert sorted(t for g in result.groups for t in g) == names


def test_auto_uses_the_heuristic_beyond_ten_tasks_and_recovers_planted_clusters():
    rng = np.random.default_rng(0)
    labels = [0, 1, 2] * 4  # 12 tasks, three interleaved clusters
    z = np.array([[0.4 if a == b else -0.4 for b in labels] for a in labels])
    z += rng.normal(scale=0.05, size=z.shape)
    names = [f"t{i:02d}" for i in range(12)]
    result = choose_groups(z, names, 3)
    assert result.method == "heuristic"
    planted = {tuple(n for n, lab in zip(names, labels, strict=True) if lab == c) for c in range(3)}
    assert set(result.groups) == planted
    assert choose_groups(z, names, 3, method="exact").score == pytest.approx(result.score)


def test_bad_input_is_refused_with_a_message():
    with pytest.raises(ConfigError, match="non-finite entry at \\[0\\]\\[1\\]"):
        choose_groups([[0.0, math.nan], [0.1, 0.0]], "ab", 1)
    with pytest.raises(ConfigError, match=r"expected \(3, 3\)"):
        choose_groups([[0.0, 0.1], [0.1, 0.0]], "abc", 1)
    with pytest.raises(ConfigError, match="≥ 1"):
        choose_groups(CLUSTERS, "ABCD", 0)
    with pytest.raises(ConfigError, match="heuristic"):
        choose_groups(np.zeros((15, 15)), [str(i) for i in range(15)], 2, method="exact")
    with pytest.raises(ConfigError, match="uncovered"):
        evaluate_groups(CLUSTERS, "ABCD", [["A", "B"]])


def test_the_result_serialises_and_renders():
    result = choose_groups(HELPER, ["A", "B", "H"], 2)
    data = result.to_dict()
    assert data["groups"] == [["A", "H"], ["B", "H"]]
    assert data["serving"]["B"] == ["B", "H"] and data["overlap"] is True
    text = result.to_markdown()
    assert "| A + H | A, H |" in text and "at most 2 model(s)" in text
