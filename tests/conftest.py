"""Shared fixtures: small data sets made here, so tests need no download."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import manytask as mt
from manytask.data import TensorMultiTaskDataset
from manytask.data.bundle import DatasetBundle
from manytask.train import Trainer


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """Write ``array`` (uint8) in the IDX format."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape
    )
    raw = header + array.astype(np.uint8).tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


@pytest.fixture
def fake_fashion_root(tmp_path: Path) -> Path:
    """A Fashion-MNIST-shaped folder with 120 training and 40 test random images."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fashion"
    root.mkdir()
    write_idx(root / "train-images-idx3-ubyte", rng.integers(0, 256, (120, 28, 28)))
    write_idx(root / "train-labels-idx1-ubyte", rng.integers(0, 10, 120))
    write_idx(root / "t10k-images-idx3-ubyte", rng.integers(0, 256, (40, 28, 28)), compress=False)
    write_idx(root / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 40), compress=False)
    return root


def tiny_trainer(
    bundle: DatasetBundle,
    hidden: int = 16,
    optimizer: type[torch.optim.Optimizer] = torch.optim.Adam,
    lr: float = 1e-2,
    **kwargs: Any,
) -> Trainer:
    """An equal-weighting shared-bottom MLP (one hidden layer, seeded) on ``bundle``; other
    keyword arguments go to the Trainer (no progress bar unless asked)."""
    torch.manual_seed(0)
    model = mt.nn.SharedBottom(mt.nn.MLPEncoder(bundle.input_shape, [hidden]), bundle.tasks)
    balancer = mt.balance.get("ew", bundle.tasks.names)
    return Trainer(
        model,
        bundle.tasks,
        balancer,
        optimizer(model.parameters(), lr=lr),
        bundle.train,
        bundle.val,
        bundle.test,
        **{"progress": False, **kwargs},
    )


def tiny_regression_bundle(n: int = 256, seed: int = 0) -> DatasetBundle:
    """Two linear regression tasks and one 3-class task on 8 features, with some labels missing."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 3, generator=g)
    y = x @ w
    a = y[:, 0].clone()
    a[::7] = float("nan")
    c = (y[:, 2] > 0).long() + (y[:, 2] > 1).long()
    c[::5] = -1
    data = TensorMultiTaskDataset(x, {"a": a, "b": y[:, 1].clone(), "c": c})
    cut = torch.arange(n)
    tasks = mt.TaskSet(
        [mt.Task("a", "mse"), mt.Task("b", "l1"), mt.Task("c", "cross_entropy", output_dim=3)]
    )
    return DatasetBundle(
        train=data.subset(cut[: n // 2]),
        val=data.subset(cut[n // 2 : 3 * n // 4]),
        test=data.subset(cut[3 * n // 4 :]),
        tasks=tasks,
        input_shape=(8,),
    )


@pytest.fixture
def tiny_bundle() -> DatasetBundle:
    return tiny_regression_bundle()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
