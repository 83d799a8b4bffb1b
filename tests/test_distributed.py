"""Under torchrun (2 processes, gloo, CPU) every rank applies the single-process update of the
union batch: parameters after a few steps match one process on the whole batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from .distributed.steps import METHODS

SCRIPT = Path(__file__).parent / "distributed" / "steps.py"


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_two_ranks_match_one_process_on_the_union_batch(tmp_path: Path):
    single = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert single.returncode == 0, single.stderr
    double = torchrun(str(SCRIPT), str(tmp_path))
    assert double.returncode == 0, double.stderr[-3000:]
    assert json.loads((tmp_path / "done-world2.json").read_text())
    tags = [name + "".join(f"-{k}={v}" for k, v in options.items()) for name, options in METHODS]
    for tag in [*tags, "router"]:  # "router": loss-free balancing's bias (run_router)
        one = load_file(str(tmp_path / f"{tag}-world1.safetensors"))
        two = load_file(str(tmp_path / f"{tag}-world2.safetensors"))
        for key in one:
            assert torch.allclose(one[key], two[key], atol=1e-5, rtol=1e-4), (
                tag,
                key,
                one[key] - two[key],
            )


@pytest.mark.parametrize("balancer", ["mgda"])
def test_the_cli_trains_under_torchrun_like_one_process(tmp_path: Path, balancer: str):
    config = {
        "name": "dist",
        "seed": 3,
        "data": {
            "name": "mmoe_synthetic",
            "n_train": 256,
            "n_val": 64,
            "n_test": 64,
            "input_dim": 6,
        },
        "model": {"name": "shared_bottom", "encoder": {"name": "mlp", "hidden": [8]}},
        "balancer": {"name": balancer},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "train": {"epochs": 2, "batch_size": 32, "checkpoint_every": 0, "progress": False},
        "run": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    one = subprocess.run(
        [sys.executable, "-m", "manytask.cli", "train", str(path), "--set", "run.name=one"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    two = torchrun("-m", "manytask.cli", "train", str(path), "--set", "run.name=two")
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "runs" / "one" / "summary.json").read_text())["test"]
    b = json.loads((tmp_path / "runs" / "two" / "summary.json").read_text())["test"]
    for task in a:
        for metric, value in a[task].items():
            assert b[task][metric] == pytest.approx(value, rel=1e-4, abs=1e-5), (task, metric)
