"""The ``manytask`` command line: train, compare, group, merge, report, list.

Errors caused by input (an unknown key, method or path, a value of the wrong type …) are printed
as one short message without a traceback, and the command exits with status 2. A run that
stops on a NaN loss exits with status 1.

Each command imports what it needs when it runs: ``manytask merge`` never loads the training
stack, and ``manytask --help`` loads neither.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from manytask import __version__, distributed, registry
from manytask.errors import ManytaskError, NonFiniteLossError

if TYPE_CHECKING:
    from rich.console import Console

    from manytask.config import Config
    from manytask.evaluate.leaderboard import Leaderboard
    from manytask.merge.config import MergeConfig

LIST_KINDS = {
    "balancers": "balancer",
    "architectures": "architecture",
    "encoders": "encoder",
    "datasets": "dataset",
    "metrics": "metric",
    "merge_rules": "merge_rule",
    "adapters": "adapter",
    "samplers": "sampler",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="manytask", description="Multi-task learning: train, balance, compare, merge."
    )
    parser.add_argument("--version", action="version", version=f"manytask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_arguments(p: argparse.ArgumentParser, example: str) -> None:
        p.add_argument("config", help="YAML config file")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"override a config value, e.g. --set {example} (repeatable)",
        )

    def common(p: argparse.ArgumentParser) -> None:
        config_arguments(p, "train.epochs=3")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    train = sub.add_parser("train", help="train one model from a config")
    common(train)

    compare = sub.add_parser(
        "compare", help="single-task baselines and several balancers, with a leaderboard"
    )
    common(compare)
    compare.add_argument(
        "--methods",
        required=True,
        help="comma-separated balancer names, e.g. ew,uw,dwa,rlw, or 'all'",
    )
    compare.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    compare.add_argument(
        "--models",
        default="",
        help="comma-separated architectures to run every method on, e.g. shared_bottom,mmoe,ple "
        "(default: the config's model); baselines use the config's model",
    )

    merging = sub.add_parser(
        "merge", help="merge task models into one checkpoint, streamed tensor by tensor"
    )
    config_arguments(merging, "params.density=0.3")
    merging.add_argument(
        "--dry-run",
        action="store_true",
        help="check the inputs, print the plan and a memory estimate; write nothing",
    )
    merging.add_argument("--overwrite", action="store_true", help="replace an existing output")
    merging.add_argument("--quiet", action="store_true", help="no progress bar")

    report = sub.add_parser(
        "report", help="one self-contained HTML page for run and compare directories"
    )
    report.add_argument(
        "dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="train run or compare directories; several train runs are compared on one page",
    )
    report.add_argument(
        "--output",
        default=None,
        metavar="PATH",
        help="the HTML file (default RUN_DIR/report.html; required for several directories)",
    )

    grouping = sub.add_parser(
        "group", help="measure task affinity, propose task groups for N models, train them"
    )
    common(grouping)
    grouping.add_argument(
        "--models", type=int, required=True, metavar="N", help="at most N models (task groups)"
    )
    grouping.add_argument(
        "--train", action="store_true", help="train each group and compare with all tasks"
    )
    grouping.add_argument("--seeds", type=int, default=1, help="number of seeds (default 1)")
    grouping.add_argument(
        "--partition", action="store_true", help="disjoint groups (default: groups may overlap)"
    )

    listing = sub.add_parser("list", help="registered methods, architectures, datasets, metrics")
    listing.add_argument("kind", nargs="?", choices=sorted(LIST_KINDS), help="only this kind")
    return parser


def _print_leaderboard(console: Console, board: Leaderboard, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for i, column in enumerate(board.header()):
        table.add_column(column, justify="left" if i == 0 else "right")
    for cells in board.cells():
        table.add_row(*cells)
    console.print(table)


def _print_table(console: Console, title: str, header: list[str], rows: list[list[str]]) -> None:
    """A table of plain text (square brackets are not read as rich markup)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title))
    for i, column in enumerate(header):
        table.add_column(escape(column), justify="left" if i == 0 else "right")
    for cells in rows:
        table.add_row(*(escape(c) for c in cells))
    console.print(table)


def _group(console: Console, errors: Console, args: argparse.Namespace, config: Config) -> int:
    from manytask.train.grouping import group

    result = group(
        config,
        args.models,
        train=args.train,
        seeds=args.seeds,
        overlap=not args.partition,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=False if args.quiet else None,
        announce=lambda message: errors.print(message, highlight=False),
    )
    _print_table(console, *result.affinity_table())
    _print_table(console, *result.groups_table())
    if result.comparison is not None:
        _print_table(console, *result.comparison.table())
    console.print(f"written to {result.root}", highlight=False)
    return 0


def _list(console: Console, kind: str | None) -> None:
    from rich.table import Table

    for label, registry_kind in LIST_KINDS.items():
        if kind is not None and label != kind:
            continue
        table = Table(title=f"{label} ({len(registry.names(registry_kind))})", title_justify="left")
        table.add_column("name", style="bold")
        table.add_column("description")
        for entry in registry.entries(registry_kind):
            table.add_row(entry.name, entry.summary)
        console.print(table)


def _fitted_merge(args: argparse.Namespace, config: MergeConfig) -> int:
    from manytask.merge.fitted.from_config import build_fitted, fitted_merge

    if args.dry_run:
        build_fitted(config)  # the rule's parameters and the imports are checked
        assert config.fitted is not None
        print(
            f"fitted merge: rule '{config.rule}' over {len(config.models)} task model(s) "
            f"({', '.join(e.name for e in config.models)}), read whole; factory "
            f"{config.fitted.factory}, data {config.fitted.data}; output {config.output_dir}"
        )
        return 0
    with contextlib.ExitStack() as shown:
        if not args.quiet:
            from rich.console import Console

            shown.enter_context(Console(stderr=True).status(f"fitting {config.rule}"))
        result = fitted_merge(config, overwrite=args.overwrite)
    print(
        f"merged {result.summary['tensors']} tensors ({result.summary['parameters']:,} "
        f"parameters) with {config.rule} in {result.summary['seconds']:.1f} s"
    )
    print(f"output: {result.output}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    """``manytask merge``: its results are plain lines on stdout (rich draws only the progress
    bar, and is not imported with ``--quiet``)."""
    from manytask import merge

    config = merge.load_merge_config(args.config, args.overrides)
    if merge.is_fitted(config.rule):
        return _fitted_merge(args, config)
    if config.fitted is not None:
        raise ManytaskError(
            f"the config has a 'fitted' section but rule '{config.rule}' is data-free; remove "
            "the section, or choose a fitted rule (fisher, regmean, adamerging_task, "
            "adamerging_layer)"
        )
    if args.dry_run:
        plan = merge.plan(**config.merge_kwargs())
        print(plan.to_text())
        return 0
    with contextlib.ExitStack() as shown:
        on_tensor = None
        if not args.quiet:  # rich's progress bar is imported only to be shown
            from rich.progress import Progress

            progress = shown.enter_context(Progress(transient=True))
            bar = progress.add_task(f"merging with {config.rule}", total=None)

            def on_tensor(done: int, total: int) -> None:
                progress.update(bar, completed=done, total=total)

        try:
            result = merge.merge(
                **config.merge_kwargs(),
                overwrite=args.overwrite,
                on_tensor=on_tensor,
                config=config.to_dict(),
            )
        except KeyboardInterrupt:
            shown.close()  # the bar goes before the message
            print("interrupted; no output was written", file=sys.stderr)
            return 130
    summary = result.summary
    print(
        f"merged {summary['merged_tensors']} tensors ({summary['parameters']:,} parameters, "
        f"{summary['copied_tensors']} copied) with {summary['rule']} in "
        f"{summary['seconds']['total_seconds']:.1f} s"
    )
    print(f"output: {result.output} (report: {result.output / 'report.md'})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit status; under ``torchrun`` the process ends here."""
    code = _run(argv)
    if distributed.world_size() > 1:
        distributed.exit_process(code)  # leaves the group; see exit_process for why
    return code


def _run(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)

    def fail(message: str, status: int) -> int:
        print(f"error: {message}", file=sys.stderr)  # plain print: never wrapped or styled
        return status

    try:
        if args.command == "merge":
            return _merge(args)
        from rich.console import Console

        console = Console()
        errors = Console(stderr=True, soft_wrap=True)
        if args.command == "list":
            _list(console, args.kind)
            return 0
        if args.command == "report":
            from manytask.evaluate.report import write_report

            path = write_report(args.dirs, args.output)
            console.print(
                f"report written to {path} (figures in {path.parent / 'plots'})",
                highlight=False,
            )
            return 0
        if args.overwrite and args.resume:
            raise ManytaskError("--overwrite and --resume exclude each other; choose one")
        from manytask.config import load_config

        config = load_config(args.config, args.overrides)
        progress = False if args.quiet else None
        if args.command == "group":
            return _group(console, errors, args, config)
        if args.command == "train":
            from manytask.train.build import run_training

            summary = run_training(
                config, overwrite=args.overwrite, resume=args.resume, progress=progress
            )
            test = summary.get("test", {})
            for task, metrics in test.items():
                values = "  ".join(f"{m} {v:.4f}" for m, v in metrics.items())
                console.print(f"test  {task}: {values}", highlight=False)
            console.print(f"run directory: {config.run.dir / config.run_name}", highlight=False)
            return 0
        from manytask.train.compare import compare, compare_dir

        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if methods == ["all"]:
            methods = registry.names("balancer")
        if args.seeds < 1:
            raise ManytaskError(f"--seeds must be ≥ 1, got {args.seeds}")
        board = compare(
            config,
            methods,
            seeds=args.seeds,
            overwrite=args.overwrite,
            resume=args.resume,
            progress=progress,
            announce=lambda message: errors.print(message, highlight=False),
            models=[m.strip() for m in args.models.split(",") if m.strip()],
        )
        _print_leaderboard(console, board, f"{config.name}: test split, {args.seeds} seed(s)")
        console.print(
            f"leaderboard written to {compare_dir(config)}/leaderboard.{{md,json}}", highlight=False
        )
        return 0
    except NonFiniteLossError as exc:
        return fail(str(exc), 1)
    except ManytaskError as exc:
        return fail(str(exc), 2)
    except KeyboardInterrupt:
        print("interrupted; continue later with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
