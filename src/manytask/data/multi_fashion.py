"""Multi-Fashion: two overlapping Fashion-MNIST items, one classification task each.

The construction follows MultiMNIST as built by Sener and Koltun, "Multi-Task Learning as
Multi-Objective Optimization", NeurIPS 2018, arXiv:1810.04650 (their data loader), applied to
Fashion-MNIST. (Lin et al., "Pareto Multi-Task Learning", NeurIPS 2019, named the Fashion
version, but their released data keep the 36×36 canvases unresized, 120,000 training and
20,000 test images, so their tables are not comparable with these.)

1. each image of a split is the top-left item; a second image drawn at random from the *same*
   split is the bottom-right item;
2. on a 36×36 canvas the first is placed at offset (0, 0) and the second at (6, 6), and where
   they overlap the pixel is the maximum of the two;
3. the canvas is resized to 28×28 by nearest-neighbour sampling (source pixel
   ``floor((i + ½)·36/28)``);
4. task ``left`` is the class of the top-left item, task ``right`` the class of the other.

Splits: Fashion-MNIST's 60,000 training images are divided (with ``seed``) into the training
and validation sources *before* pairing, so no item appears in two splits; the 10,000 test
images form the test split. Inputs are scaled to [0, 1] and standardised with the mean and
standard deviation of the composed training images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from manytask import registry
from manytask.data.batch import TensorMultiTaskDataset
from manytask.data.bundle import DatasetBundle
from manytask.data.idx import read_idx
from manytask.errors import ConfigError, DataError
from manytask.task import Task, TaskSet

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CANVAS = 36
OFFSET = 6
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def locate_fashion_mnist(root: str | Path | None) -> dict[str, Path]:
    """The four IDX files in ``root`` (default: where Debian's package installs them)."""
    folder = Path(root) if root is not None else DEBIAN_FASHION_MNIST
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, stem in FILES.items():
        candidates = [folder / f"{stem}.gz", folder / stem]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            missing.append(stem + "[.gz]")
        else:
            found[key] = path
    if missing:
        how = (
            "install Debian's package (apt-get install dataset-fashion-mnist) or set "
            "data.root to a folder that holds them"
            if root is None
            else "set data.root to a folder that holds the Fashion-MNIST IDX files"
        )
        raise DataError(f"Fashion-MNIST not found: '{folder}' lacks {', '.join(missing)}; {how}")
    return found


def overlay(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Compose pairs of 28×28 images on a 36×36 canvas (max on overlap), resize to 28×28."""
    n, h, w = left.shape
    canvas = np.zeros((n, CANVAS, CANVAS), dtype=left.dtype)
    canvas[:, :h, :w] = left
    region = canvas[:, OFFSET : OFFSET + h, OFFSET : OFFSET + w]
    np.maximum(region, right, out=region)
    rows = ((np.arange(h) + 0.5) * CANVAS / h).astype(np.int64)
    cols = ((np.arange(w) + 0.5) * CANVAS / w).astype(np.int64)
    return canvas[:, rows][:, :, cols]


def pair_split(
    images: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair every image with another random image of the same split (never itself)."""
    n = len(images)
    partner = rng.integers(0, n - 1, size=n)
    partner += partner >= np.arange(n)  # skip the image itself, keeping the draw uniform
    return overlay(images, images[partner]), labels, labels[partner]


def _dataset(
    images: np.ndarray, left: np.ndarray, right: np.ndarray, mean: float, std: float
) -> TensorMultiTaskDataset:
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - mean) / std
    return TensorMultiTaskDataset(
        x,
        {
            "left": torch.from_numpy(left.astype(np.int64)),
            "right": torch.from_numpy(right.astype(np.int64)),
        },
    )


@registry.register(
    "dataset", "multi_fashion", "Multi-Fashion (Fashion-MNIST pairs, 2 × 10 classes)"
)
def multi_fashion(
    root: str | None = None,
    val_size: int = 10_000,
    n_train: int | None = None,
    seed: int = 0,
) -> DatasetBundle:
    """Multi-Fashion with tasks ``left`` and ``right`` (10 classes each).

    Args:
        root: folder with Fashion-MNIST's IDX files (default: Debian's install location).
        val_size: number of the 60,000 training images held out for validation.
        n_train: use only the first ``n_train`` composed training samples (all if None).
        seed: seed of the split and of the pairing.
    """
    files = locate_fashion_mnist(root)
    train_images, train_labels = read_idx(files["train_images"]), read_idx(files["train_labels"])
    test_images, test_labels = read_idx(files["test_images"]), read_idx(files["test_labels"])
    if train_images.shape[1:] != (28, 28) or len(train_images) != len(train_labels):
        raise DataError(
            f"unexpected Fashion-MNIST training files in '{files['train_images'].parent}'"
        )
    if not 0 < val_size < len(train_images) - 1:
        raise ConfigError(
            f"data.val_size must be between 1 and {len(train_images) - 2}, got {val_size}"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_images))
    val_idx, train_idx = order[:val_size], order[val_size:]
    tr = pair_split(train_images[train_idx], train_labels[train_idx], rng)
    va = pair_split(train_images[val_idx], train_labels[val_idx], rng)
    te = pair_split(test_images, test_labels, rng)
    if n_train is not None:
        if n_train < 1:
            raise ConfigError(f"data.n_train must be ≥ 1, got {n_train}")
        tr = (tr[0][:n_train], tr[1][:n_train], tr[2][:n_train])
    scaled = tr[0].astype(np.float64) / 255.0
    mean, std = float(scaled.mean()), float(scaled.std())
    tasks = TaskSet([
        Task("left", "cross_entropy", output_dim=10),
        Task("right", "cross_entropy", output_dim=10),
    ])  # fmt: skip
    return DatasetBundle(
        train=_dataset(*tr, mean, std),
        val=_dataset(*va, mean, std),
        test=_dataset(*te, mean, std),
        tasks=tasks,
        input_shape=(1, 28, 28),
        info={
            "source": str(files["train_images"].parent),
            "sizes": {"train": len(tr[0]), "val": len(va[0]), "test": len(te[0])},
            "seed": seed,
            "pixel_mean": mean,
            "pixel_std": std,
        },
    )
