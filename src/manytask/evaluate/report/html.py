"""One self-contained HTML page for run and compare directories.

The page needs nothing but itself: figures are PNGs embedded as ``data:`` URIs, the style sheet
is inline, there is no JavaScript, and a Content-Security-Policy forbids every other source, so
it opens offline and from any folder. Every PNG is also saved under ``plots/`` beside the page.
A figure whose data is absent (no affinity measured, a single run for a Pareto plot …) is
replaced by a short note. Files are written atomically.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from manytask import atomic
from manytask.errors import ConfigError, ManytaskError
from manytask.evaluate.leaderboard import BASELINE, FRONT_MARK, Stat
from manytask.evaluate.method_front import method_front, objectives_for
from manytask.evaluate.report import plots
from manytask.evaluate.report.reading import (
    Affinity,
    CompareDir,
    Run,
    RunGroup,
    read_sources,
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { border-bottom: 2px solid #ccc; padding-bottom: 0.2rem; margin-top: 2.5rem; }
h3 { margin-top: 1.8rem; }
table { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.front td:first-child { font-weight: bold; }
figure { margin: 0.8rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .caption { font-size: 0.85rem; color: #555; }
p.note { background: #f7f7f7; border-left: 4px solid #bbb; padding: 0.4rem 0.8rem; }
code { font-size: 0.9em; }
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass
class Plot:
    """A rendered figure: its file stem under ``plots/``, PNG bytes and caption."""

    stem: str
    png: bytes
    alt: str
    caption: str


class Page:
    """Accumulates the HTML of the page and the figures it embeds."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.plots: list[Plot] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def heading(self, level: int, text: str) -> None:
        self.add(f"<h{level}>{html.escape(text)}</h{level}>")

    def note(self, text: str) -> None:
        self.add(f'<p class="note">{html.escape(text)}</p>')

    def figure(
        self, figure: Figure | None, stem: str, alt: str, caption: str, missing: str
    ) -> None:
        """Embed ``figure``, or say why there is none."""
        if figure is None:
            self.note(missing)
            return
        png = plots.to_png(figure)
        self.plots.append(Plot(stem, png, alt, caption))
        data = base64.b64encode(png).decode("ascii")
        self.add(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    def table(
        self, header: Sequence[str], rows: Sequence[Sequence[str]], marked: Sequence[bool] = ()
    ) -> None:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = []
        for i, cells in enumerate(rows):
            css = ' class="front"' if i < len(marked) and marked[i] else ""
            tds = "".join(
                f"<td>{html.escape(c)}</td>" if j == 0 else f'<td class="num">{html.escape(c)}</td>'
                for j, c in enumerate(cells)
            )
            body.append(f"<tr{css}>{tds}</tr>")
        self.add(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")

    def render(self, title: str) -> str:
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(self.parts)
            + "\n</body>\n</html>\n"
        )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def _stat(data: dict[str, Any], digits: int = 4, signed: bool = False) -> str:
    return Stat(float(data["mean"]), float(data["std"]), int(data["n"])).format(digits, signed)


def _leaderboard(page: Page, board: dict[str, Any]) -> None:
    tasks = [str(t) for t in board["tasks"]]
    primary = board["primary_metrics"]
    marked = any("pareto_front" in row for row in board["rows"])
    header = [
        "method",
        *(f"{t} {primary[t]} {plots.arrow(primary[t])}" for t in tasks),
        "Δm% ↑",
        "s/epoch",
        *(["Pareto"] if marked else []),
    ]
    rows = [
        [
            str(row["method"]),
            *(_stat(row["primary"][t]) for t in tasks),
            _stat(row["delta_m"], 2, signed=True),
            _stat(row["seconds_per_epoch"], 1),
            *([FRONT_MARK if row.get("pareto_front") else ""] if marked else []),
        ]
        for row in board["rows"]
    ]
    page.table(header, rows, [bool(row.get("pareto_front")) for row in board["rows"]])
    seeds = ", ".join(str(s) for s in board.get("seeds", []))
    page.add(
        '<p class="caption">'
        + html.escape(
            f"Test split, mean ± sample std over seeds {seeds}. Δm% against the single-task "
            f"baselines. {FRONT_MARK if marked else ''}"
            + (": on the Pareto front of the methods' mean primary metrics." if marked else "")
        )
        + "</p>"
    )


def _front_table(page: Page, front: dict[str, Any]) -> None:
    tasks = [o["task"] for o in front["objectives"]]
    header = [
        "method",
        *(f"{o['task']} {o['metric']} {plots.arrow(o['metric'])}" for o in front["objectives"]),
        "hypervolume",
        "front",
    ]
    rows = [
        [
            m["method"],
            *(f"{m['mean'][t]:.4f}" for t in tasks),
            f"{m['hypervolume']:.4f}",
            FRONT_MARK if m["on_front"] else "",
        ]
        for m in front["methods"]
    ]
    reference = ["reference", *(f"{front['reference'][t]:.4f}" for t in tasks), "", ""]
    page.table(header, [*rows, reference], [m["on_front"] for m in front["methods"]])
    page.add(
        '<p class="caption">'
        + html.escape(
            f"Hypervolume of the methods' front: {front['hypervolume']:.4f}. Objectives are "
            f"rescaled so that 0 is the worst run and 1 the best; the reference point is "
            f"{front.get('reference_rule', 'given above')}. A method's own hypervolume is the "
            "volume its mean point dominates alone."
        )
        + "</p>"
    )


def _pareto_section(
    page: Page, front: dict[str, Any] | None, why_not: str, colors: dict[str, str], prefix: str
) -> None:
    page.heading(3, "Pareto front")
    if front is None:
        page.note(why_not)
        return
    tasks = ", ".join(o["task"] for o in front["objectives"])
    figure = plots.pareto_plot(front, colors)
    page.figure(
        figure,
        f"{prefix}pareto",
        f"Pareto plot of {tasks}",
        "Large markers: mean over seeds; small: single seeds; outlined diamonds: on the front; "
        f"star: {BASELINE} baselines; grey: the hypervolume (two tasks).",
        "A Pareto plot needs two or more tasks.",
    )
    _front_table(page, front)


def _common_sections(
    page: Page,
    runs: Sequence[Run],
    affinity: Sequence[tuple[str, Affinity]],
    colors: dict[str, str],
    prefix: str,
) -> None:
    page.heading(3, "Learning curves")
    page.figure(
        plots.learning_curves(runs, colors),
        f"{prefix}learning-curves",
        "training loss and validation primary metric per epoch, per task",
        "Per task: training loss (top) and validation primary metric (bottom) per epoch "
        "(metrics.jsonl); one line per run, coloured by method.",
        "No per-epoch metrics (metrics.jsonl) in these runs.",
    )
    page.heading(3, "Balancing weights over time")
    page.figure(
        plots.weights_over_time(runs),
        f"{prefix}weights",
        "task weights per epoch",
        "Each task's weight at the end of every epoch (metrics.jsonl 'weights'); line styles "
        "tell the seeds apart.",
        "No balancing weights were logged in these runs.",
    )
    page.heading(3, "Task affinity")
    page.figure(
        plots.affinity_heatmaps(affinity),
        f"{prefix}affinity",
        "inter-task affinity heat maps",
        "Mean over measurements (and seeds). Lookahead Z(i→j) = 1 − L_j(θ − η∇L_i) / L_j(θ): "
        "positive when a step on task i lowers task j's loss. Cosine between the tasks' "
        "shared-parameter gradients, and the share of measurements where it was negative.",
        "No affinity was measured in these runs (no 'affinity' in summary.json and no "
        "affinity.jsonl).",
    )


def _compare_front(cd: CompareDir) -> tuple[dict[str, Any] | None, str]:
    if cd.pareto is not None:
        return cd.pareto, ""
    try:
        objectives = objectives_for(cd.leaderboard["primary_metrics"])
        methods = {
            m: [(r.seed or 0, r.summary["test"]) for r in cd.runs if r.label == m and r.summary]
            for m in cd.methods
        }
        baseline = []
        for seed in cd.leaderboard.get("seeds", []):
            parts = {
                r.baseline_task: r.summary["test"][r.baseline_task]
                for r in cd.runs
                if r.baseline_task and r.seed == seed and r.summary
            }
            if len(parts) == len(objectives):
                baseline.append(parts)
        return method_front(objectives, methods, baseline).to_dict(), ""
    except ManytaskError as exc:
        return None, f"No Pareto front: {exc}"


def _compare_section(page: Page, cd: CompareDir, prefix: str) -> None:
    page.add(f'<section id="{_slug(cd.path.name)}">')
    page.heading(2, f"{cd.name}: comparison")
    page.add(f'<p class="caption">{html.escape(str(cd.path))}</p>')
    page.heading(3, "Leaderboard")
    _leaderboard(page, cd.leaderboard)
    colors = plots.palette([BASELINE, *cd.methods])
    front, why = _compare_front(cd)
    if front is not None and len(front["objectives"]) < 2:
        front, why = None, "A Pareto front needs two or more tasks; this comparison has one."
    _pareto_section(page, front, why, colors, prefix)
    method_runs = [r for r in cd.runs if r.label != BASELINE]
    affinity = []
    for method in cd.methods:
        parts = [r.affinity for r in method_runs if r.label == method and r.affinity]
        pooled = Affinity.pooled(parts)
        if pooled is not None:
            affinity.append((method, pooled))
    _common_sections(page, cd.runs, affinity, colors, prefix)
    page.add("</section>")


def _group_front(runs: Sequence[Run]) -> tuple[dict[str, Any] | None, str]:
    done = [r for r in runs if r.summary and r.summary.get("test")]
    if len(done) < 2:
        return None, "A Pareto plot needs two or more finished runs (with test results)."
    tasks = [t for t in done[0].tasks if all(t in r.tasks for r in done)]
    primary = {t: done[0].primary_metric(t) for t in tasks}
    if any(m is None or any(r.primary_metric(t) != m for r in done) for t, m in primary.items()):
        return None, "These runs do not share a primary metric for every common task."
    if len(tasks) < 2:
        return None, "A Pareto plot needs two or more tasks common to the runs."
    try:
        objectives = objectives_for({t: str(m) for t, m in primary.items()})
        methods = {r.label: [(r.seed or 0, (r.summary or {})["test"])] for r in done}
        return method_front(objectives, methods).to_dict(), ""
    except ManytaskError as exc:
        return None, f"No Pareto front: {exc}"


def _group_section(page: Page, group: RunGroup, prefix: str) -> None:
    page.add('<section id="runs">')
    page.heading(2, "Runs" if len(group.runs) > 1 else f"Run {group.runs[0].label}")
    tasks = list(dict.fromkeys(t for r in group.runs for t in r.tasks))
    header = ["run", "balancer", "architecture", "seed", "best epoch"]
    metrics = {t: next((m for r in group.runs if (m := r.primary_metric(t))), "") for t in tasks}
    header += [f"{t} {metrics[t]} {plots.arrow(metrics[t])}" for t in tasks] + ["s/epoch"]
    rows = []
    for run in group.runs:
        s = run.summary or {}
        values = [run.test(t, metrics[t]) for t in tasks]
        seconds = s.get("seconds_per_epoch")
        rows.append(
            [
                run.label,
                str(s.get("balancer", "")),
                str(s.get("architecture", "")),
                "" if run.seed is None else str(run.seed),
                str(s.get("best_epoch", "")),
                *("" if v is None else f"{v:.4f}" for v in values),
                "" if seconds is None else f"{seconds:.1f}",
            ]
        )
    page.heading(3, "Test results")
    page.table(header, rows)
    page.add(
        '<p class="caption">Test split, primary metric of each task (summary.json); empty: '
        "the run has not finished.</p>"
    )
    colors = plots.palette([r.label for r in group.runs])
    front, why = _group_front(group.runs)
    _pareto_section(page, front, why, colors, prefix)
    affinity = [(r.label, r.affinity) for r in group.runs if r.affinity]
    _common_sections(page, group.runs, affinity, colors, prefix)
    page.add("</section>")


def default_output(paths: Sequence[str | Path]) -> Path:
    """``<dir>/report.html`` for one directory; several need an explicit output."""
    if len(paths) != 1:
        raise ConfigError(
            "report of several directories needs --output PATH (the HTML file to write)"
        )
    return Path(paths[0]) / "report.html"


def build_report(paths: Sequence[str | Path], output: str | Path | None = None) -> Path:
    """Write the report of ``paths`` to ``output`` (default ``<dir>/report.html``) and its
    figures to ``plots/`` beside it; return the page's path."""
    sources = read_sources(paths)
    target = Path(output) if output is not None else default_output(paths)
    if target.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(
            f"the report is an HTML file; give an output ending in .html, got '{target}'"
        )
    page = Page()
    names = [
        s.name if isinstance(s, CompareDir) else ", ".join(r.label for r in s.runs) for s in sources
    ]
    title = f"manytask report: {', '.join(names)}"
    page.heading(1, title)
    page.add(
        '<p class="caption">Sources: '
        + ", ".join(f"<code>{html.escape(str(p))}</code>" for p in paths)
        + "</p>"
    )
    for source in sources:
        prefix = "" if len(sources) == 1 else f"{_slug(_source_name(source))}-"
        if isinstance(source, CompareDir):
            _compare_section(page, source, prefix)
        else:
            _group_section(page, source, prefix)
    folder = target.parent / "plots"
    for plot in page.plots:
        atomic.write_with(folder / f"{plot.stem}.png", _bytes_writer(plot.png))
    atomic.write_text(target, page.render(title))
    return target


def _bytes_writer(data: bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_bytes(data)

    return write


def _source_name(source: CompareDir | RunGroup) -> str:
    return source.path.name if isinstance(source, CompareDir) else "runs"
