"""The run directory: config, metrics, summary, checkpoints. Atomic writes, no pickle.

Layout of ``runs/<name>/``::

    config.yaml                 the resolved config of the run
    metrics.jsonl               one JSON line per evaluation
    summary.json                final results (written when the run ends)
    checkpoints/
        step-00000500.safetensors   every tensor of the training state
        step-00000500.json          the rest of the state, referring to those tensors
        latest.json                 which step to resume from (written last)
        best.safetensors            model weights selected on the validation split
        best.json                   when and why they were selected

A checkpoint becomes visible only when ``latest.json`` is replaced, after both of its files are
complete, so a crash at any moment leaves a loadable checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor

from manytask import atomic
from manytask.errors import ManytaskError, RunExistsError

CHECKPOINTS = "checkpoints"


class RunDirectory:
    """One run's folder. Use :meth:`create` to start or resume a run safely."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDirectory('{self.path}')"

    @classmethod
    def create(
        cls, path: str | Path, overwrite: bool = False, resume: bool = False
    ) -> RunDirectory:
        """Open ``path`` for a new run (refusing to replace one) or for resuming one."""
        run = cls(path)
        occupied = run.path.exists() and any(run.path.iterdir())
        if resume:
            if run.latest_step() is None:
                raise ManytaskError(
                    f"nothing to resume in '{run.path}': it holds no checkpoint "
                    "(start the run without --resume)"
                )
            return run
        if occupied:
            if not overwrite:
                raise RunExistsError(
                    f"run directory '{run.path}' already exists; pass --overwrite to replace it, "
                    "--resume to continue it, or choose another run.name"
                )
            shutil.rmtree(run.path)
        run.path.mkdir(parents=True, exist_ok=True)
        return run

    # files ---------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def write_config(self, config: dict[str, Any]) -> None:
        atomic.write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        data = yaml.safe_load((self.path / "config.yaml").read_text(encoding="utf-8"))
        return dict(data or {})

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one line to ``metrics.jsonl`` (flushed and fsynced)."""
        line = json.dumps(record, allow_nan=True) + "\n"
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(line)

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def truncate_metrics(self, lines: int) -> None:
        """Keep the first ``lines`` records: those written before the checkpoint resumed from."""
        kept = self.read_metrics()[:lines]
        atomic.write_text(
            self.path / "metrics.jsonl", "".join(json.dumps(r, allow_nan=True) + "\n" for r in kept)
        )

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic.write_json(self.path / "summary.json", summary)

    def read_summary(self) -> dict[str, Any] | None:
        path = self.path / "summary.json"
        if not path.exists():
            return None
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return data

    # checkpoints ---------------------------------------------------------------------
    def save_checkpoint(
        self, step: int, tensors: dict[str, Tensor], meta: dict[str, Any], keep: int
    ) -> None:
        """Write checkpoint ``step`` and point ``latest.json`` at it; keep the newest ``keep``."""
        stem = f"step-{step:08d}"
        atomic.write_with(
            self.checkpoints / f"{stem}.safetensors", lambda p: save_file(tensors, str(p))
        )
        atomic.write_json(self.checkpoints / f"{stem}.json", meta)
        atomic.write_json(self.checkpoints / "latest.json", {"step": step, "stem": stem})
        steps = sorted(self._checkpoint_steps())
        for old in steps[:-keep]:
            for suffix in (".safetensors", ".json"):
                (self.checkpoints / f"step-{old:08d}{suffix}").unlink(missing_ok=True)

    def _checkpoint_steps(self) -> list[int]:
        if not self.checkpoints.exists():
            return []
        return [
            int(p.stem.split("-")[1])
            for p in self.checkpoints.glob("step-*.json")
            if p.stem.split("-")[1].isdigit()
        ]

    def latest_step(self) -> int | None:
        pointer = self.checkpoints / "latest.json"
        if not pointer.exists():
            return None
        step: int = json.loads(pointer.read_text(encoding="utf-8"))["step"]
        return step

    def load_checkpoint(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and metadata of the latest checkpoint."""
        step = self.latest_step()
        if step is None:
            raise ManytaskError(f"no checkpoint in '{self.checkpoints}'")
        stem = self.checkpoints / f"step-{step:08d}"
        meta: dict[str, Any] = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
        return load_file(str(stem.with_suffix(".safetensors"))), meta

    def save_best(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        atomic.write_with(
            self.checkpoints / "best.safetensors", lambda p: save_file(tensors, str(p))
        )
        atomic.write_json(self.checkpoints / "best.json", meta)

    def load_best(self) -> dict[str, Tensor] | None:
        path = self.checkpoints / "best.safetensors"
        return load_file(str(path)) if path.exists() else None
