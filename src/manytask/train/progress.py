"""Console output of a training run: a progress bar with per-task losses, one line per epoch."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def format_losses(losses: Mapping[str, float]) -> str:
    return "  ".join(f"{name} {value:.4f}" for name, value in losses.items())


class ProgressDisplay:
    """A rich progress bar for the steps of each epoch (when ``enabled``) and one line per
    epoch (always)."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True, soft_wrap=True)
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> ProgressDisplay:
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[losses]}"),
                console=self.console,
                transient=True,
            )
            self._progress.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.__exit__(exc_type, exc, tb)
            self._progress = None

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int) -> None:
        if self._progress is None:
            return
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(
            f"epoch {epoch + 1}/{epochs}", total=total, completed=done, losses=""
        )

    def advance(self, steps: int, losses: Mapping[str, float] | None = None) -> None:
        if self._progress is None or self._task is None:
            return
        if losses is None:
            self._progress.update(self._task, advance=steps)
        else:
            self._progress.update(self._task, advance=steps, losses=format_losses(losses))

    def print(self, message: str) -> None:
        self.console.print(message, highlight=False)
