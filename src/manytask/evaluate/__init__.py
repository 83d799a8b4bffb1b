"""Measuring: per-task metrics, Δm against single-task baselines, leaderboards, Pareto fronts."""

from manytask.evaluate.delta_m import delta_m
from manytask.evaluate.leaderboard import Leaderboard, Stat, build_leaderboard
from manytask.evaluate.method_front import MethodFront, compare_front, method_front
from manytask.evaluate.metrics import Metric, register_metric, task_metrics
from manytask.evaluate.pareto import hypervolume, pareto_front

__all__ = [
    "Leaderboard",
    "MethodFront",
    "Metric",
    "Stat",
    "build_leaderboard",
    "compare_front",
    "delta_m",
    "hypervolume",
    "method_front",
    "pareto_front",
    "register_metric",
    "task_metrics",
]
