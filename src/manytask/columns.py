"""The column layout of a tabular input tensor, shared by the data that makes it and the models
that read it.

A tabular sample is one float vector: the numeric columns first (already normalised), then one
code per categorical column, stored as a float. Code ``c`` of a column with ``n`` categories is
in ``0 … n``: ``0 … n − 1`` are the categories seen in the training split and ``n`` stands for a
missing or unseen value, so every column has ``n + 1`` embedding rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from manytask.errors import ConfigError


@dataclass(frozen=True)
class Columns:
    """Names of the numeric columns, and ``(name, number of categories)`` of the categorical
    ones, in the order they appear in the input vector."""

    numeric: tuple[str, ...] = ()
    categorical: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        names = [*self.numeric, *(name for name, _ in self.categorical)]
        if not names:
            raise ConfigError("a tabular input needs at least one numeric or categorical column")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"column names must be unique; repeated: {', '.join(repeated)}")
        for name, size in self.categorical:
            if size < 1:
                raise ConfigError(f"categorical column '{name}' needs ≥ 1 category, got {size}")

    @property
    def width(self) -> int:
        """Length of the input vector."""
        return len(self.numeric) + len(self.categorical)
