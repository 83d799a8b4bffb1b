"""A comparison small enough for report tests: synthetic data, a one-layer MLP, one epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CONFIG: dict[str, Any] = {
    "name": "tiny",
    "seed": 1,
    "data": {"name": "mmoe_synthetic", "n_train": 128, "n_val": 32, "n_test": 32, "input_dim": 8},
    "model": {"name": "shared_bottom", "encoder": {"name": "mlp", "hidden": [8]}},
    "balancer": {"name": "ew"},
    "optimizer": {"name": "adam", "lr": 0.01},
    "train": {"epochs": 1, "batch_size": 64, "checkpoint_every": 0},
}


def write_config(path: Path, runs: Path) -> Path:
    """Write :data:`CONFIG` with its run directory under ``runs`` to ``path``; return ``path``."""
    path.write_text(yaml.safe_dump({**CONFIG, "run": {"dir": str(runs)}}))
    return path
