"""The report: one self-contained HTML page for train run and compare directories.

``write_report(["runs/x-compare"])`` writes ``runs/x-compare/report.html`` (the leaderboard,
the Pareto plot and hypervolumes, per-task learning curves, balancing weights over time and
task-affinity heat maps) and every figure as a PNG under ``runs/x-compare/plots/``. Several
train run directories in one call are compared with each other on one page. The figures need
matplotlib (``pip install 'manytask[plots]'``); it is imported only when a report is written.

Modules: :mod:`~manytask.evaluate.report.reading` (files in), :mod:`~.plots` (figures),
:mod:`~.html` (the page).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from manytask.errors import ManytaskError


class ReportUnavailableError(ManytaskError):
    """The report cannot be drawn here: matplotlib is not installed."""


def write_report(paths: Sequence[str | Path], output: str | Path | None = None) -> Path:
    """Write the HTML report of ``paths`` (train run and/or compare directories).

    Args:
        paths: directories to report; compare directories get a section each, and every train
            run directory goes into one section that compares them.
        output: the HTML file; default ``<dir>/report.html`` when one directory is given
            (required for several). Figures go to ``plots/`` beside it.

    Returns:
        The path of the page written.
    """
    try:
        import matplotlib  # noqa: F401 - only to say clearly when it is missing
    except ModuleNotFoundError:
        raise ReportUnavailableError(
            "the report needs matplotlib; install it with pip install 'manytask[plots]'"
        ) from None
    from manytask.evaluate.report.html import build_report

    return build_report(paths, output)


__all__ = ["ReportUnavailableError", "write_report"]
