"""Metric sinks beside ``metrics.jsonl``: TensorBoard and MLflow, chosen by ``run.loggers``.

``metrics.jsonl`` (:meth:`RunDirectory.append_metrics`) is always written; a sink receives the
same per-epoch record at the same moment, plus the test metrics of the selected model at the
end. A record is flattened into scalar names by joining nested keys with ``/``::

    {"epoch": 2, "step": 8, "train_loss": {"y1": 0.4}, "lr": [0.01],
     "val": {"y1": {"mae": 0.5, "loss": 0.4}}, "score": -0.5}
    -> epoch=2, train_loss/y1=0.4, lr/0=0.01, val/y1/mae=0.5, val/y1/loss=0.4, score=-0.5

``step`` is the x-axis (the global optimizer step), not a scalar of its own; strings and
``None`` are not scalars and are left out.

Sinks live on rank 0 only. Both packages are optional (``pip install 'manytask[loggers]'``) and
imported when a sink is built, so a config that names a logger whose package is missing fails
before any training, with the extra to install.

Resuming: the Trainer calls :meth:`MetricSink.start` with the global step of the checkpoint it
resumed from. TensorBoard opens a new event file with ``purge_step = step + 1``, so the events
logged after that checkpoint by the interrupted run are hidden, exactly as ``metrics.jsonl``
drops its lines written after the checkpoint. MLflow continues the run whose id the first start
stored in ``mlflow_run.json``; MLflow cannot delete metric values, so an epoch logged after the
checkpoint by the interrupted run (only possible when it stopped between writing that epoch's
metrics and its checkpoint) appears twice at the same step, with the same values on the CPU.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

from manytask import atomic
from manytask.config import Config
from manytask.errors import ManytaskError

EXTRA = "pip install 'manytask[loggers]'"
MLFLOW_RUN_FILE = "mlflow_run.json"
# MLflow's limits (mlflow.utils.validation): 6000 characters per parameter value, 100 parameters
# and 1000 metrics per log_batch call
_PARAM_VALUE_LENGTH = 6000
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
# characters MLflow accepts in a name on every platform (the colon is refused on Windows)
_INVALID_NAME_CHARACTERS = re.compile(r"[^0-9A-Za-z_\-. /]")


@runtime_checkable
class MetricSink(Protocol):
    """Where the Trainer sends its per-epoch records, beside ``metrics.jsonl``."""

    def start(self, step: int) -> None:
        """Open the sink; ``step`` is the global step training starts from (0, or the step of
        the checkpoint a resumed run continues)."""

    def log(self, record: Mapping[str, Any], step: int) -> None:
        """Record one (nested) record at global step ``step``."""

    def close(self, failed: bool = False) -> None:
        """Flush and release the sink; ``failed`` when training raised."""


def flatten_record(record: Mapping[str, Any], skip: Sequence[str] = ("step",)) -> dict[str, float]:
    """The numeric leaves of ``record`` by ``/``-joined path (list items by index); the top-level
    keys in ``skip`` are left out."""
    flat: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, (bool, int, float)):
            flat[prefix] = float(value)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(f"{prefix}/{index}", item)

    for key, value in record.items():
        if key not in skip:
            walk(str(key), value)
    return flat


def flatten_params(config: Mapping[str, Any]) -> dict[str, str]:
    """A config as MLflow parameters: ``.``-joined keys of its leaves, strings kept, every
    other value (numbers, lists, ``None``, empty mappings) written as JSON."""
    params: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
            return
        text = value if isinstance(value, str) else json.dumps(value, allow_nan=True)
        params[mlflow_name(prefix)] = text[:_PARAM_VALUE_LENGTH]

    walk("", config)
    return params


def mlflow_name(name: str) -> str:
    """``name`` made a valid MLflow metric or parameter name: characters outside letters,
    digits, ``_ - . /`` and space become ``_``, and empty, ``.`` or ``..`` path parts (which
    MLflow refuses, since a file store keeps a name as a path) become ``_``."""
    parts = _INVALID_NAME_CHARACTERS.sub("_", name).split("/")
    return "/".join("_" if part in ("", ".", "..") else part for part in parts)


def _require(module: str, logger: str) -> ModuleType:
    """Import an optional package, or say which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ManytaskError(
            f"the '{logger}' logger needs the '{module}' package, which is not installed "
            f"({exc}); install it with: {EXTRA}"
        ) from None


class TensorBoardSink:
    """Scalars to TensorBoard event files in ``logdir`` (``<run_dir>/tensorboard``), written
    with ``torch.utils.tensorboard.SummaryWriter`` and flushed after every record.

    View with ``tensorboard --logdir runs/<name>/tensorboard`` (or ``--logdir runs`` for all).
    """

    def __init__(self, logdir: str | Path) -> None:
        _require("tensorboard", "tensorboard")
        self._module = _require("torch.utils.tensorboard", "tensorboard")
        self.logdir = Path(logdir)
        self._writer: Any = None

    def start(self, step: int) -> None:
        # a resumed run hides what the interrupted one logged after its checkpoint
        purge_step = step + 1 if step > 0 else None
        self._writer = self._module.SummaryWriter(str(self.logdir), purge_step=purge_step)

    def log(self, record: Mapping[str, Any], step: int) -> None:
        if self._writer is None:
            raise ManytaskError("TensorBoardSink.log was called before start()")
        for tag, value in flatten_record(record).items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()

    def close(self, failed: bool = False) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class MLflowSink:
    """One MLflow run per manytask run: the flattened resolved config as parameters, every
    record's scalars as metrics at the global step, ended ``FINISHED`` or ``FAILED``.

    The tracking URI defaults to a local file store in the run directory
    (``file://<run_dir>/mlruns``). MLflow 3 keeps its file store in maintenance mode and refuses
    it unless ``MLFLOW_ALLOW_FILE_STORE`` is true; for a ``file:`` URI this sink sets that
    variable around its own MLflow calls when the environment does not set it (an explicit
    ``false`` is respected: then give ``run.mlflow_tracking_uri``, e.g. ``sqlite:///mlflow.db``
    with ``sqlalchemy`` and ``alembic`` installed, or a tracking server's ``http://`` address).

    The run id is stored in ``<run_dir>/mlflow_run.json``; a resumed manytask run continues
    that MLflow run when it is in the same tracking store, and starts a new one otherwise.
    Parameters already logged are not logged again (MLflow refuses to change a parameter).

    Args:
        run_dir: the run directory (holds ``mlflow_run.json`` and, by default, ``mlruns/``).
        experiment: the MLflow experiment name (created when missing).
        run_name: the MLflow run name.
        params: parameters to log (see :func:`flatten_params`).
        tracking_uri: where MLflow stores runs; None: ``file://<run_dir>/mlruns``.
        tags: extra run tags.
    """

    def __init__(
        self,
        run_dir: str | Path,
        experiment: str,
        run_name: str,
        params: Mapping[str, str] | None = None,
        tracking_uri: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        _require("mlflow", "mlflow")
        self._tracking = _require("mlflow.tracking", "mlflow")
        self._entities = _require("mlflow.entities", "mlflow")
        self.run_dir = Path(run_dir)
        self.tracking_uri = tracking_uri or (self.run_dir / "mlruns").resolve().as_uri()
        self.experiment = experiment
        self.run_name = run_name
        self.params = dict(params or {})
        self.tags = dict(tags or {})
        self.run_id: str | None = None
        self._client: Any = None

    @contextlib.contextmanager
    def _store_access(self) -> Iterator[None]:
        """MLflow calls, with its file store allowed (see the class docstring) and its errors
        named."""
        added = self.tracking_uri.startswith("file:") and "MLFLOW_ALLOW_FILE_STORE" not in (
            os.environ
        )
        if added:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        try:
            yield
        except ManytaskError:
            raise
        except Exception as exc:
            raise ManytaskError(
                f"MLflow failed with the tracking store '{self.tracking_uri}': {exc} "
                "(set run.mlflow_tracking_uri to a store that works here)"
            ) from exc
        finally:
            if added:
                os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)

    def _stored_run_id(self) -> str | None:
        path = self.run_dir / MLFLOW_RUN_FILE
        if not path.exists():
            return None
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("tracking_uri") != self.tracking_uri:
            return None
        run_id = stored.get("run_id")
        return run_id if isinstance(run_id, str) else None

    def start(self, step: int) -> None:
        with self._store_access():
            client = self._tracking.MlflowClient(tracking_uri=self.tracking_uri)
            run = None
            run_id = self._stored_run_id()
            if run_id is not None:
                with contextlib.suppress(Exception):  # deleted from the store: start afresh
                    run = client.get_run(run_id)
            if run is not None:
                client.update_run(run.info.run_id, status="RUNNING")
            else:
                found = client.get_experiment_by_name(self.experiment)
                experiment_id = (
                    found.experiment_id
                    if found is not None
                    else client.create_experiment(self.experiment)
                )
                run = client.create_run(experiment_id, run_name=self.run_name, tags=self.tags)
                atomic.write_json(
                    self.run_dir / MLFLOW_RUN_FILE,
                    {
                        "run_id": run.info.run_id,
                        "experiment_id": experiment_id,
                        "tracking_uri": self.tracking_uri,
                    },
                )
            self._client, self.run_id = client, run.info.run_id
            logged = set(run.data.params)
            new = [
                self._entities.Param(key, value)
                for key, value in self.params.items()
                if key not in logged
            ]
            for first in range(0, len(new), _PARAMS_PER_BATCH):
                client.log_batch(self.run_id, params=new[first : first + _PARAMS_PER_BATCH])

    def log(self, record: Mapping[str, Any], step: int) -> None:
        if self._client is None or self.run_id is None:
            raise ManytaskError("MLflowSink.log was called before start()")
        timestamp = int(time.time() * 1000)
        metrics = [
            self._entities.Metric(mlflow_name(key), value, timestamp, step)
            for key, value in flatten_record(record).items()
        ]
        with self._store_access():
            for first in range(0, len(metrics), _METRICS_PER_BATCH):
                chunk = metrics[first : first + _METRICS_PER_BATCH]
                self._client.log_batch(self.run_id, metrics=chunk)

    def close(self, failed: bool = False) -> None:
        if self._client is None or self.run_id is None:
            return
        with self._store_access():
            self._client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
        self._client = None


def build_sinks(config: Config, run_dir: str | Path) -> list[MetricSink]:
    """The sinks that ``config.run.loggers`` names, for the run directory ``run_dir``.

    Built before the run directory is written (they only import their package here), so a
    missing package stops the run before anything is created. The config has checked the
    names (``"tensorboard"`` or ``"mlflow"``); a name given twice gives one sink.
    """
    run_dir = Path(run_dir)
    sinks: list[MetricSink] = []
    for name in dict.fromkeys(config.run.loggers):
        if name == "tensorboard":
            sinks.append(TensorBoardSink(run_dir / "tensorboard"))
        else:  # "mlflow"
            sinks.append(
                MLflowSink(
                    run_dir,
                    experiment=config.name,
                    run_name=config.run_name,
                    params=flatten_params(config.to_dict()),
                    tracking_uri=config.run.mlflow_tracking_uri,
                    tags={
                        "manytask.run_dir": str(run_dir),
                        "manytask.balancer": config.balancer.name,
                        "manytask.architecture": config.model.name,
                        "manytask.seed": str(config.seed),
                    },
                )
            )
    return sinks
