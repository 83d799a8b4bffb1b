"""The affinity monitor: lookahead task affinity and gradient conflicts logged during training.

``AffinityMonitor(every=10)`` is a Trainer callback. Every ``every`` optimizer steps it measures,
on that step's batch (:mod:`manytask.evaluate.affinity`):

- the lookahead affinity :math:`Z_{i\\to j}` (TAG, arXiv 2109.04617) with an SGD step of size
  ``lr`` (default: the optimizer's current learning rate of the shared parameters). It is
  measured *after* the step's update, at the parameters the optimizer just produced, on the
  batch that produced them (callbacks run after the update; the paper measures before the
  update on the batch of the step, a difference of one step's parameters);
- the cosines of the per-task gradients of the shared parameters. When the balancer formed them
  anyway (Gramian methods in parameter mode fill ``trainer.last_step.cosines``), they are reused
  at no cost: they are then the cosines at the parameters *before* the update, of the gradients
  that made it (of the whole batch under ``torch.distributed``); otherwise they come from the
  per-task gradients computed for the lookahead, or are computed (one forward and one backward
  pass per task).

Each measurement is appended to ``affinity.jsonl`` in the run directory as one line
``{"step", "epoch", "tasks", "lookahead", "cosine"}`` (``epoch`` counts from 1, as in
``metrics.jsonl``; ``lookahead[i][j]`` = :math:`Z_{i\\to j}`; a matrix not measured is null), and
averaged by an :class:`~manytask.evaluate.affinity.AffinityAccumulator`; :meth:`finish` returns
the run summary's ``"affinity"`` entry: mean matrices, conflict frequencies (fraction of
measurements with cosine < 0) and the number of measurements.

Resuming: the file is the monitor's state. On its first call in a resumed run, the monitor drops
the lines written after the checkpoint it resumed from and rebuilds its averages from the rest,
so the resumed run ends with the same file and summary as an uninterrupted one. (The Trainer
calls callbacks after writing a step checkpoint, so a run killed *during* the measurement of a
checkpoint step resumes after it without that one measurement.)

Cost: a measurement takes one forward pass, one backward pass per task and, for the lookahead,
one more forward pass per task, on one batch; at ``every=10`` with :math:`K` tasks that adds about
:math:`K/10` of a training step's backward work per step. It changes nothing in the training
run: parameters, buffers and random generators are restored, so a run with the monitor trains
bit for bit like one without.

Under ``torch.distributed`` only rank 0 measures (on its share of the batch) and writes; the
other ranks skip the measurement.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from manytask import atomic
from manytask.errors import ConfigError, ManytaskError
from manytask.evaluate.affinity import AffinityAccumulator, measure_affinity

if TYPE_CHECKING:
    from manytask.config import MonitorConfig
    from manytask.train.rundir import RunDirectory
    from manytask.train.trainer import Trainer

AFFINITY_FILE = "affinity.jsonl"


def read_affinity_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of an ``affinity.jsonl`` file ([] when it does not exist). A last line cut
    short by a crash is ignored; a bad line elsewhere is an error."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ManytaskError(f"line {number} of '{path}' is not valid JSON") from None
    return records


class AffinityMonitor:
    """Trainer callback that measures task affinity every ``every`` steps.

    Args:
        every: steps between measurements (≥ 1); the first is at step ``every``.
        lookahead: measure the lookahead affinity.
        cosine: measure the gradient cosines (and conflicts).
        lr: the lookahead step size (default: the optimizer's current learning rate of the
            param group holding the first shared parameter).
    """

    def __init__(
        self, every: int, lookahead: bool = True, cosine: bool = True, lr: float | None = None
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"the affinity interval must be an integer ≥ 1 step, got {every!r}")
        if not (lookahead or cosine):
            raise ConfigError("the affinity monitor needs lookahead or cosine (or both) on")
        if lr is not None and not lr > 0:
            raise ConfigError(f"the lookahead step size must be > 0, got {lr}")
        self.every = every
        self.lookahead = lookahead
        self.cosine = cosine
        self.lr = lr
        self.accumulator: AffinityAccumulator | None = None
        self._synced = False

    @classmethod
    def from_config(cls, config: MonitorConfig) -> AffinityMonitor:
        return cls(config.affinity_every, config.lookahead, config.cosine, config.lookahead_lr)

    # the callback -------------------------------------------------------------------------
    def __call__(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        step = trainer.state.global_step
        if not self._synced:
            self._sync(trainer, keep_through=step - 1)
        if step % self.every != 0:
            return
        batch = trainer.last_batch
        if batch is None:
            return
        cosine = self._balancer_cosines(trainer)
        lookahead = None
        if self.lookahead or (self.cosine and cosine is None):
            measurement = measure_affinity(
                trainer.model,
                trainer.tasks,
                batch.inputs,
                batch.targets,
                self._step_size(trainer),
                params=list(trainer.model.shared_parameters()),
                lookahead=self.lookahead,
                cosine=self.cosine and cosine is None,
            )
            lookahead = measurement.lookahead
            cosine = cosine if cosine is not None else measurement.cosine
        # one device-to-host copy per matrix
        z = lookahead.double().cpu().tolist() if lookahead is not None else None
        c = cosine.double().cpu().tolist() if cosine is not None else None
        record = {
            "step": step,
            "epoch": trainer.state.epoch + 1,
            "tasks": list(trainer.tasks.names),
            "lookahead": z,
            "cosine": c,
        }
        if trainer.run_dir is not None:
            _append_line(trainer.run_dir.path / AFFINITY_FILE, record)
        self._accumulator(trainer).add(z, c)

    def finish(self, trainer: Trainer) -> dict[str, Any]:
        """The run summary's ``"affinity"`` entry (reads the file of a resumed run that had no
        step left to train)."""
        if trainer.is_main and not self._synced:
            self._sync(trainer, keep_through=trainer.state.global_step)
        return self._accumulator(trainer).summary()

    # helpers ----------------------------------------------------------------------------
    def _accumulator(self, trainer: Trainer) -> AffinityAccumulator:
        if self.accumulator is None:
            self.accumulator = AffinityAccumulator(trainer.tasks.names)
        return self.accumulator

    def _sync(self, trainer: Trainer, keep_through: int) -> None:
        """Keep the file's records of steps ≤ ``keep_through`` and average them."""
        self._synced = True
        run_dir: RunDirectory | None = trainer.run_dir
        if run_dir is None:
            return
        path = run_dir.path / AFFINITY_FILE
        records = read_affinity_records(path)
        kept = [r for r in records if int(r["step"]) <= keep_through]
        if path.exists():  # also drops a last line cut short by a crash
            atomic.write_text(path, "".join(_line(r) for r in kept))
        self.accumulator = AffinityAccumulator.from_records(trainer.tasks.names, kept)

    def _balancer_cosines(self, trainer: Trainer) -> Tensor | None:
        """The balancer's cosines when it formed them from the shared parameters' gradients."""
        step = trainer.last_step
        if not self.cosine or step is None or step.cosines is None:
            return None
        if getattr(trainer.balancer, "mode", "parameters") != "parameters":
            return None  # feature mode: cosines of representation gradients, another quantity
        k = len(trainer.tasks)
        return step.cosines if tuple(step.cosines.shape) == (k, k) else None

    def _step_size(self, trainer: Trainer) -> float:
        if self.lr is not None:
            return self.lr
        groups = trainer.optimizer.param_groups
        shared = {id(p) for p in trainer.model.shared_parameters()}
        for group in groups:
            if any(id(p) in shared for p in group["params"]):
                return float(group["lr"])
        return float(groups[0]["lr"])


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, allow_nan=True) + "\n"


def _append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one line in one write, flushed and fsynced (a crash leaves at most a cut last
    line, which :func:`read_affinity_records` ignores)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(_line(record))
        handle.flush()
        os.fsync(handle.fileno())


def mean_affinity(summaries: Sequence[dict[str, Any]], key: str = "lookahead") -> list[list[float]]:
    """The measurement-weighted mean of the ``key`` matrices of several run summaries'
    ``"affinity"`` entries (e.g. one per seed)."""
    usable = [s for s in summaries if s.get(key) is not None and s.get("measurements", 0) > 0]
    if not usable:
        raise ManytaskError(f"no run measured the '{key}' affinity; nothing to average")
    tasks = usable[0]["tasks"]
    if any(s["tasks"] != tasks for s in usable):
        raise ManytaskError("the affinity summaries are for different tasks")
    total = sum(s["measurements"] for s in usable)
    k = len(tasks)
    return [
        [sum(s[key][i][j] * s["measurements"] for s in usable) / total for j in range(k)]
        for i in range(k)
    ]
