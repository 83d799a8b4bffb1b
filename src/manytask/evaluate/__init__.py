"""Measuring: per-task metrics, Δm against single-task baselines, leaderboards."""

from manytask.evaluate.delta_m import delta_m
from manytask.evaluate.leaderboard import Leaderboard, Stat, build_leaderboard
from manytask.evaluate.metrics import Metric, register_metric, task_metrics

__all__ = [
    "Leaderboard",
    "Metric",
    "Stat",
    "build_leaderboard",
    "delta_m",
    "register_metric",
    "task_metrics",
]
