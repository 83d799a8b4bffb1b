"""What a built-in dataset provides: three splits, the task definitions and facts about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from manytask.columns import Columns
from manytask.data.batch import MultiTaskDataset
from manytask.task import TaskSet


@dataclass
class DatasetBundle:
    """Train/validation/test splits plus the tasks they label.

    ``input_shape`` is the shape of one input sample (models are sized from it); ``columns``
    describes a tabular input (numeric and categorical columns) and is None for other data;
    ``info`` holds facts worth reporting (sizes, seeds, measured label correlations …) and goes
    into the run's ``summary.json``.
    """

    train: MultiTaskDataset
    val: MultiTaskDataset
    test: MultiTaskDataset
    tasks: TaskSet
    input_shape: tuple[int, ...]
    info: dict[str, Any] = field(default_factory=dict)
    columns: Columns | None = None

    def describe(self) -> str:
        """One line: split sizes, tasks and the facts in ``info`` (a long fact is only named:
        the run's ``summary.json`` holds it)."""
        parts = [
            f"train {len(self.train)}, val {len(self.val)}, test {len(self.test)}",
            f"tasks {', '.join(self.tasks.names)}",
        ]
        for key, value in self.info.items():
            if key == "sizes":
                continue
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            parts.append(f"{key} {text}" if len(text) <= 80 else f"{key} (in summary.json)")
        return "; ".join(parts)
