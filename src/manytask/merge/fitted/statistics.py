"""Rules that compute a statistic per task model on its data, then merge in closed form
(Fisher merging, RegMean), with the statistics cached by :mod:`manytask.merge.fitted.cache`.

With a cache folder, each task's statistic is looked up before the model runs
(:func:`~manytask.merge.fitted.cache.cached`): the data are read once to fingerprint them (so
they must be re-iterable: a list of batches or a ``DataLoader``, not a generator), and the model
is run only on a miss. The examples read while computing are fingerprinted again and the entry is
stored under what was actually used; when the two readings differ (a shuffling loader) a warning
says that such data can never hit the cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from manytask.errors import ConfigError
from manytask.merge.fitted.base import Experts, FittedRule
from manytask.merge.fitted.batches import Inputs, take
from manytask.merge.fitted.cache import (
    DataDigest,
    Statistics,
    StatisticsCache,
    cached,
    check_rereadable,
    module_fingerprint,
    names_fingerprint,
)


class StatisticsRule(FittedRule, ABC):
    """A fitted rule whose data enter only through a per-task statistic of ``num_examples``
    examples. Subclasses implement :meth:`compute` and :meth:`statistic_settings`."""

    caches_statistics: ClassVar[bool] = True
    #: the version of the statistic's definition: bump it when :meth:`compute` changes, so that
    #: old cache entries are no longer used
    statistic_version: ClassVar[int] = 1

    def __init__(self, num_examples: int) -> None:
        if int(num_examples) != num_examples or num_examples < 1:
            raise ConfigError(
                f"{self.name}: num_examples must be a positive integer, got {num_examples!r}"
            )
        self.num_examples = int(num_examples)

    @abstractmethod
    def statistic_settings(self, seed: int) -> dict[str, Any]:
        """The settings the statistic depends on (JSON values; part of the cache key)."""

    @abstractmethod
    def compute(
        self,
        module: nn.Module,
        keys: tuple[str, ...],
        batches: Iterable[Inputs],
        generator: torch.Generator,
        task: int,
    ) -> Statistics:
        """The statistic of ``module`` (task ``task``'s model holding its own tensors) on
        ``batches`` for the merged tensors ``keys``; ``generator`` drives any random draw."""

    def statistics(self, experts: Experts, cache: str | Path | None, seed: int) -> list[Statistics]:
        """Each task model's statistic, from the cache when a valid entry exists."""
        store = None if cache is None else StatisticsCache(cache, self.name)
        return [self._task_statistics(experts, task, store, seed) for task in range(experts.count)]

    def _fields(self, model: str, tensors: str, digest: DataDigest, seed: int) -> dict[str, Any]:
        return {
            "rule": self.name,
            "statistic": self.statistic_version,
            "settings": self.statistic_settings(seed),
            "model": model,
            "tensors": tensors,
            "data": digest.hexdigest(),
            "examples": digest.count,
        }

    def _task_statistics(
        self, experts: Experts, task: int, store: StatisticsCache | None, seed: int
    ) -> Statistics:
        module = experts.build(task)
        data = experts.data[task]
        model = "" if store is None else module_fingerprint(module)
        # the statistic covers the merged tensors only: another set is another entry
        tensors = "" if store is None else names_fingerprint(experts.keys)
        if store is not None:
            check_rereadable(data, self.name, f"the data of task {task}")

        def compute(batches: Iterable[Inputs]) -> Statistics:
            generator = torch.Generator().manual_seed(seed)
            return self.compute(module, experts.keys, batches, generator, task)

        return cached(
            store,
            lambda digest: self._fields(model, tensors, digest, seed),
            lambda: take(data, self.num_examples, self.name, task),
            compute,
            f"{self.name}: the data of task {task}",
        )
