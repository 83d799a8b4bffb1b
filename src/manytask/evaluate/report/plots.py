"""The report's figures, drawn with matplotlib's object API (no pyplot, no global state).

Each function returns a :class:`~matplotlib.figure.Figure`, or ``None`` when its data is absent
(the page then says so instead of showing a plot). Colours follow the method (or run) label, the
same in every figure of a section; the single-task baselines are black.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from manytask import registry
from manytask.errors import UnknownNameError
from manytask.evaluate.leaderboard import BASELINE
from manytask.evaluate.report.reading import AFFINITY_KINDS, Affinity, Matrix, Run

DPI = 100
COLUMNS = 4  # panels per row before a figure wraps
AFFINITY_TITLES = {
    "lookahead": "lookahead affinity Z(i→j)",
    "cosine": "gradient cosine",
    "conflict": "conflict: share of cos < 0",
}
BASELINE_COLOR = "#000000"


def palette(labels: Sequence[str]) -> dict[str, str]:
    """A colour per label (matplotlib's tab10 cycle); the baseline is black."""
    cycle = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
    ]
    colors = {BASELINE: BASELINE_COLOR}
    others = [label for label in dict.fromkeys(labels) if label != BASELINE]
    for label, color in zip(others, itertools.cycle(cycle)):
        colors[label] = color
    return colors


def to_png(figure: Figure) -> bytes:
    """The figure as PNG bytes, without the software tag (so the bytes depend on the data)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def arrow(metric: str) -> str:
    """``↑`` or ``↓`` for a registered metric's direction, empty for an unknown one."""
    try:
        return "↑" if registry.get("metric", metric).higher_is_better else "↓"
    except UnknownNameError:
        return ""


def _grid(panels: int, width: float, height: float) -> tuple[Figure, list[Axes]]:
    cols = min(panels, COLUMNS)
    rows = math.ceil(panels / cols)
    figure = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = [figure.add_subplot(rows, cols, i + 1) for i in range(panels)]
    return figure, axes


def _legend(figure: Figure, colors: Mapping[str, str], labels: Sequence[str]) -> None:
    handles = [
        Line2D([], [], color=colors[label], linestyle="--" if label == BASELINE else "-")
        for label in labels
    ]
    figure.legend(
        handles, list(labels), loc="outside lower center", ncols=min(len(labels), 6), fontsize=8
    )


def _epoch_ticks(ax: Axes) -> None:
    """Whole epochs on the x axis, also when a run has one or two."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    low, high = ax.get_xlim()
    if high - low < 1:  # one epoch: centre it, with a whole-number tick
        middle = round((low + high) / 2)
        ax.set_xlim(middle - 1, middle + 1)


def learning_curves(runs: Sequence[Run], colors: Mapping[str, str]) -> Figure | None:
    """Per task: training loss (top) and validation primary metric (bottom) per epoch."""
    tasks = list(dict.fromkeys(t for run in runs if run.metrics for t in run.tasks))
    if not tasks:
        return None
    primary = {t: next((m for r in runs if (m := r.primary_metric(t))), None) for t in tasks}
    cols = min(len(tasks), COLUMNS)
    blocks = math.ceil(len(tasks) / cols)
    figure = Figure(figsize=(3.6 * cols, 5.0 * blocks), layout="constrained")
    shown: list[str] = []
    for index, task in enumerate(tasks):
        block, col = divmod(index, cols)
        top = figure.add_subplot(2 * blocks, cols, 2 * block * cols + col + 1)
        bottom = figure.add_subplot(2 * blocks, cols, (2 * block + 1) * cols + col + 1, sharex=top)
        metric = primary[task]
        for run in runs:
            if task not in run.tasks:
                continue
            style: dict[str, Any] = {
                "color": colors.get(run.label, BASELINE_COLOR),
                "linestyle": "--" if run.label == BASELINE else "-",
                "linewidth": 1.2,
                "alpha": 0.85,
                "marker": "o",  # a run of one epoch is one point
                "markersize": 3,
            }
            epochs = [r["epoch"] for r in run.metrics if task in r.get("train_loss", {})]
            losses = [r["train_loss"][task] for r in run.metrics if task in r.get("train_loss", {})]
            if epochs:
                top.plot(epochs, losses, **style)
            if metric is not None:
                pairs = [
                    (r["epoch"], r["val"][task][metric])
                    for r in run.metrics
                    if metric in r.get("val", {}).get(task, {})
                ]
                if pairs:
                    bottom.plot(*zip(*pairs, strict=True), **style)
            if run.label not in shown:
                shown.append(run.label)
        top.set_title(f"{task}: train loss", fontsize=9)
        bottom.set_title(f"{task}: val {metric or '(no metric)'} {arrow(metric or '')}", fontsize=9)
        bottom.set_xlabel("epoch", fontsize=8)
        for ax in (top, bottom):
            _epoch_ticks(ax)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    _legend(figure, colors, shown)
    return figure


def weights_over_time(runs: Sequence[Run]) -> Figure | None:
    """One panel per method (or run): each task's balancing weight per epoch, seeds overlaid."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if run.label != BASELINE and any(r.get("weights") for r in run.metrics):
            groups.setdefault(run.label, []).append(run)
    if not groups:
        return None
    figure, axes = _grid(len(groups), 3.6, 2.8)
    styles = ["-", "--", ":", "-."]
    for ax, (label, members) in zip(axes, groups.items(), strict=True):
        tasks = list(dict.fromkeys(t for run in members for r in run.metrics for t in r["weights"]))
        colors = palette(tasks)
        for seed_index, run in enumerate(members):
            for task in tasks:
                pairs = [
                    (r["epoch"], r["weights"][task])
                    for r in run.metrics
                    if task in (r.get("weights") or {}) and r["weights"][task] is not None
                ]
                if pairs:
                    ax.plot(
                        *zip(*pairs, strict=True),
                        color=colors[task],
                        linestyle=styles[seed_index % len(styles)],
                        linewidth=1.2,
                        marker="o",
                        markersize=3,
                        label=task if seed_index == 0 else None,
                    )
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("weight", fontsize=8)
        _epoch_ticks(ax)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return figure


def affinity_heatmaps(items: Sequence[tuple[str, Affinity]]) -> Figure | None:
    """Rows: methods (or runs); columns: the affinity matrices they measured."""
    items = [
        (label, a) for label, a in items if any(a.matrix(k) is not None for k in AFFINITY_KINDS)
    ]
    if not items:
        return None
    kinds = [k for k in AFFINITY_KINDS if any(a.matrix(k) is not None for _, a in items)]
    n = max(len(a.tasks) for _, a in items)
    side = 1.2 + 0.45 * n
    figure = Figure(figsize=(side * 1.25 * len(kinds), side * len(items)), layout="constrained")
    for row, (label, affinity) in enumerate(items):
        for col, kind in enumerate(kinds):
            ax = figure.add_subplot(len(items), len(kinds), row * len(kinds) + col + 1)
            matrix = affinity.matrix(kind)
            if matrix is None:
                ax.set_axis_off()
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", fontsize=8)
                continue
            if kind == "conflict":
                image = ax.imshow(matrix, cmap="Reds", vmin=0.0, vmax=1.0)
            else:
                finite = np.abs(matrix[np.isfinite(matrix)])
                bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
                image = ax.imshow(matrix, cmap="RdBu", vmin=-bound, vmax=bound)
            figure.colorbar(image, ax=ax, shrink=0.8)
            ticks = range(len(affinity.tasks))
            ax.set_xticks(ticks, affinity.tasks, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(ticks, affinity.tasks, fontsize=7)
            ax.set_xlabel("task j (affected)", fontsize=7)
            ax.set_ylabel("task i (source)", fontsize=7)
            ax.set_title(f"{label}: {AFFINITY_TITLES[kind]}", fontsize=8)
            if len(affinity.tasks) <= 8:
                _, high = image.get_clim()
                for (i, j), value in np.ndenumerate(matrix):
                    if math.isfinite(value):
                        # white on the deep colours: the far end of Reds, both ends of RdBu
                        deep = value if kind == "conflict" else abs(value)
                        dark = deep > 0.6 * high
                        ax.text(
                            j,
                            i,
                            f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.0e}",
                            ha="center",
                            va="center",
                            fontsize=6,
                            color="white" if dark else "black",
                        )
    return figure


def _staircase(points: Matrix, reference: Matrix, signs: Matrix) -> Matrix:
    """Boundary of the region two objectives' front dominates, closed at the reference."""
    oriented = points * signs  # higher is better on both axes
    oriented = oriented[np.argsort(oriented[:, 0])]
    r = reference * signs
    corners = [(r[0], oriented[0, 1])]
    for i, (x, y) in enumerate(oriented):
        corners.append((x, y))
        following = oriented[i + 1, 1] if i + 1 < len(oriented) else r[1]
        corners.append((x, following))
    corners.append((r[0], r[1]))
    stairs: Matrix = np.array(corners) * signs
    return stairs


def pareto_plot(front: Mapping[str, Any], colors: Mapping[str, str]) -> Figure | None:
    """Method means (large), seeds (small), the front (outlined) and the single-task baseline
    (star); pairwise panels up to four objectives, parallel coordinates beyond."""
    objectives = front["objectives"]
    if len(objectives) < 2 or not front["methods"]:
        return None
    if len(objectives) > 4:
        return _parallel_coordinates(front, colors)
    pairs = list(itertools.combinations(range(len(objectives)), 2))
    figure, axes = _grid(len(pairs), 4.4, 3.8)
    tasks = [o["task"] for o in objectives]
    signs = np.array([1.0 if o["direction"] == "higher" else -1.0 for o in objectives])
    for ax, (a, b) in zip(axes, pairs, strict=True):
        if len(objectives) == 2:
            members = [m["mean"] for m in front["methods"] if m["on_front"]]
            reference = np.array([front["reference"][t] for t in tasks])
            stairs = _staircase(
                np.array([[p[t] for t in tasks] for p in members]), reference, signs
            )
            ax.fill(stairs[:, 0], stairs[:, 1], color="#dddddd", zorder=0, label="hypervolume")
            ax.plot(stairs[:-1, 0], stairs[:-1, 1], color="#555555", linewidth=1, zorder=1)
        for seed in front["seeds"]:
            color = colors.get(seed["method"], "#777777")
            point = seed["point"]
            ax.scatter(point[tasks[a]], point[tasks[b]], s=14, color=color, alpha=0.4, zorder=2)
        for method in front["methods"]:
            mean = method["mean"]
            on = method["on_front"]
            ax.scatter(
                mean[tasks[a]],
                mean[tasks[b]],
                s=70 if on else 45,
                color=colors.get(method["method"], "#777777"),
                edgecolors="black" if on else "none",
                linewidths=1.5,
                marker="D" if on else "o",
                zorder=3,
            )
            ax.annotate(
                method["method"],
                (mean[tasks[a]], mean[tasks[b]]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=7,
            )
        if front.get("baseline"):
            base = front["baseline"]["mean"]
            ax.scatter(base[tasks[a]], base[tasks[b]], s=120, marker="*", color=BASELINE_COLOR)
            ax.annotate(
                BASELINE,
                (base[tasks[a]], base[tasks[b]]),
                textcoords="offset points",
                xytext=(5, -9),
                fontsize=7,
            )
        for setter, index in ((ax.set_xlabel, a), (ax.set_ylabel, b)):
            o = objectives[index]
            setter(f"{o['task']} {o['metric']} {arrow(o['metric'])}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    figure.suptitle(
        f"front: {', '.join(front['front'])}   hypervolume {front['hypervolume']:.3f}",
        fontsize=9,
    )
    return figure


def _parallel_coordinates(front: Mapping[str, Any], colors: Mapping[str, str]) -> Figure:
    objectives = front["objectives"]
    tasks = [o["task"] for o in objectives]
    scale = front["scale"]

    def scaled(point: Mapping[str, float]) -> list[float]:
        out = []
        for t in tasks:
            worst, best = scale[t]["worst"], scale[t]["best"]
            out.append(1.0 if best == worst else (point[t] - worst) / (best - worst))
        return out

    figure = Figure(figsize=(max(6.0, 0.9 * len(tasks)), 4.0), layout="constrained")
    ax = figure.add_subplot()
    x = list(range(len(tasks)))
    for method in front["methods"]:
        on = method["on_front"]
        ax.plot(
            x,
            scaled(method["mean"]),
            color=colors.get(method["method"], "#777777"),
            linewidth=2.4 if on else 1.0,
            marker="D" if on else "o",
            label=method["method"] + (" (front)" if on else ""),
        )
    if front.get("baseline"):
        ax.plot(x, scaled(front["baseline"]["mean"]), "k--", linewidth=1.2, label=BASELINE)
    ax.set_xticks(x, [f"{o['task']}\n{o['metric']}" for o in objectives], fontsize=7)
    ax.set_ylabel("0 = worst run, 1 = best run", fontsize=8)
    ax.set_title(f"hypervolume {front['hypervolume']:.3f}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return figure
