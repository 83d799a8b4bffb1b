"""The Pareto front of compared methods (pareto.json) and its mark in the leaderboard."""

from __future__ import annotations

import pytest

import manytask as mt
from manytask.errors import ConfigError
from manytask.evaluate import build_leaderboard, compare_front, method_front
from manytask.evaluate.method_front import Objective, objectives_for

HIGHER = [Objective("a", "accuracy", "higher"), Objective("b", "accuracy", "higher")]


def acc(a: float, b: float) -> dict[str, dict[str, float]]:
    return {"a": {"accuracy": a}, "b": {"accuracy": b}}


def example():
    # a: worst 0.4, best 0.9 (range 0.5); b: worst 0.2, best 0.6 (range 0.4), over every run
    methods = {
        "A": [(1, acc(0.8, 0.2)), (2, acc(0.6, 0.4))],  # mean (0.7, 0.3)
        "B": [(1, acc(0.5, 0.5))],
        "C": [(1, acc(0.4, 0.2))],  # dominated by A's mean
    }
    return method_front(HIGHER, methods, baseline=[acc(0.9, 0.6)])


def test_front_scale_reference_and_hypervolume_by_hand():
    front = example()
    assert front.members == ["A", "B"]
    assert front.scaled(front.mean("A")) == pytest.approx([0.6, 0.25])
    assert front.scaled(front.mean("B")) == pytest.approx([0.2, 0.75])
    # reference: 0.1 of the range beyond the worst run
    assert front.reference == pytest.approx([0.4 - 0.05, 0.2 - 0.04])
    # z + 0.1: A (0.7, 0.35), B (0.3, 0.85); union = 0.245 + 0.255 - 0.3·0.35
    assert front.hypervolume() == pytest.approx(0.245 + 0.255 - 0.105)
    assert front.method_hypervolume("A") == pytest.approx(0.245)
    assert front.method_hypervolume("C") == pytest.approx(0.01)


def test_pareto_json_lists_methods_seeds_and_the_baseline():
    data = example().to_dict()
    assert data["front"] == ["A", "B"]
    assert [m["on_front"] for m in data["methods"]] == [True, True, False]
    assert data["methods"][0]["mean"] == pytest.approx({"a": 0.7, "b": 0.3})
    # per-seed points: C (0.4, 0.2) is dominated by A's seed 2 (0.6, 0.4); the rest are not
    assert [(s["method"], s["seed"], s["on_front"]) for s in data["seeds"]] == [
        ("A", 1, True),
        ("A", 2, True),
        ("B", 1, True),
        ("C", 1, False),
    ]
    assert data["baseline"]["mean"] == {"a": 0.9, "b": 0.6}
    assert data["objectives"][0] == {"task": "a", "metric": "accuracy", "direction": "higher"}
    assert data["scale"]["a"] == pytest.approx({"worst": 0.4, "best": 0.9})
    assert "0.1 of the objective's range" in data["reference_rule"]


def test_lower_is_better_objectives_are_flipped_and_ties_scale_to_one():
    objectives = [Objective("r", "mae", "lower"), Objective("c", "accuracy", "higher")]
    runs = {
        "x": [(0, {"r": {"mae": 1.0}, "c": {"accuracy": 0.5}})],
        "y": [(0, {"r": {"mae": 3.0}, "c": {"accuracy": 0.5}})],
    }
    front = method_front(objectives, runs)
    assert front.members == ["x"]
    assert front.scaled(front.mean("x")) == [1.0, 1.0]  # best MAE; accuracy tied
    assert front.scaled(front.mean("y")) == [0.0, 1.0]
    assert front.reference == pytest.approx([3.0 + 0.2, 0.5])  # above the worst MAE
    assert front.hypervolume() == pytest.approx(1.1 * 1.1)


def test_objectives_take_their_direction_from_the_metric_registry():
    got = objectives_for({"t": "mae", "u": "accuracy"})
    assert [(o.task, o.direction) for o in got] == [("t", "lower"), ("u", "higher")]


def test_missing_or_non_finite_results_are_refused_with_the_run_named():
    with pytest.raises(ConfigError, match="method 'A', seed 3 has no test 'accuracy' for task 'b'"):
        method_front(HIGHER, {"A": [(3, {"a": {"accuracy": 0.5}})]})
    with pytest.raises(ConfigError, match="test 'accuracy' of task 'a' is nan"):
        method_front(HIGHER, {"A": [(1, acc(float("nan"), 0.5))]})
    with pytest.raises(ConfigError, match="at least one run of every method"):
        method_front(HIGHER, {"A": []})


def test_compare_front_and_the_leaderboard_mark_agree():
    tasks = mt.TaskSet(
        [mt.Task("a", "mse", metrics=("mae",)), mt.Task("b", "mse", metrics=("mae",))]
    )

    def mae(a: float, b: float) -> dict[str, dict[str, float]]:
        return {"a": {"mae": a}, "b": {"mae": b}}

    baselines = {"a": [mae(1.0, 9.0)], "b": [mae(9.0, 1.0)]}
    methods = {
        "good": [(mae(1.2, 1.5), 1.0)],
        "skewed": [(mae(1.1, 2.5), 1.0)],
        "bad": [(mae(1.3, 1.6), 1.0)],  # worse than "good" on both
    }
    front = compare_front(tasks, baselines, methods, [7])
    assert front.members == ["good", "skewed"]
    assert front.baseline == [[1.0, 1.0]]  # each task from its own single-task model
    assert front.seeds == {"good": [7], "skewed": [7], "bad": [7]}
    board = build_leaderboard(tasks, baselines, [1.0], methods, [7]).with_front(front.members)
    assert board.header()[-1] == "Pareto"
    marks = {cells[0]: cells[-1] for cells in board.cells()}
    assert marks == {"single-task": "", "good": "◆", "skewed": "◆", "bad": ""}
    assert {r["method"]: r["pareto_front"] for r in board.to_dict()["rows"]}["bad"] is False
    assert "◆: on the Pareto front" in board.to_markdown()
    # without a front the leaderboard keeps its old columns
    plain = build_leaderboard(tasks, baselines, [1.0], methods, [7])
    assert "Pareto" not in plain.header() and "pareto_front" not in plain.to_dict()["rows"][0]
