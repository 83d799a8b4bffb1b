"""Errors that manytask raises for bad input.

Every user-facing error derives from :class:`ManytaskError`. The CLI prints such an error as one
short message (no traceback) and exits with status 2; library callers can catch it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ManytaskError(Exception):
    """Base class of errors caused by input the user can fix."""


class ConfigError(ManytaskError, ValueError):
    """A configuration key, value or type is wrong."""


class UnknownNameError(ManytaskError, KeyError):
    """A name (method, architecture, dataset, metric …) is not registered."""

    def __init__(self, kind: str, name: str, choices: Iterable[str]) -> None:
        self.kind = kind
        self.name = name
        self.choices = sorted(choices)
        super().__init__(self.message)

    @property
    def message(self) -> str:
        close = difflib.get_close_matches(self.name, self.choices, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return (
            f"unknown {self.kind} '{self.name}'.{hint} "
            f"Valid choices: {', '.join(self.choices) or '(none registered)'}"
        )

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return self.message


class DataError(ManytaskError, FileNotFoundError):
    """Data could not be found or read."""


class NonFiniteLossError(ManytaskError, FloatingPointError):
    """A task loss became NaN or infinite."""

    def __init__(self, task: str, step: int, value: float) -> None:
        self.task = task
        self.step = step
        self.value = value
        super().__init__(
            f"loss of task '{task}' is {value} at step {step}; training stopped "
            "(the last checkpoint written before this step is kept). Try a lower learning rate, "
            "gradient clipping (train.grad_clip) or check the targets of this task."
        )


class RunExistsError(ManytaskError, FileExistsError):
    """A run directory already holds a run and overwriting was not requested."""
