"""Tasks, model and training for the merging quality benchmark (``merge_ladder.py``).

A proxy, on data available offline, of the 8-task CLIP protocol of task arithmetic
(Ilharco et al., arXiv:2212.04089) and AdaMerging (Yang et al., arXiv:2310.02575): one
pre-trained encoder, one fixed linear head per task, the encoder fine-tuned on each task alone
(the "experts") and the experts' encoders merged.

Data (Fashion-MNIST IDX files read with :func:`manytask.data.idx.read_idx`; scikit-learn's
bundled 8×8 digits). Fashion-MNIST's 60,000 training images are shuffled once (``DATA_SEED``):
the first ``pretext`` images pre-train the encoder, the rest are the pool that every Fashion
task draws its own training and validation images from. Fashion tasks test on the first
``n_test`` images of Fashion-MNIST's test split; the digit tasks split the 1,797 digits into
fixed train / validation / test parts. The eight tasks:

========================  ==============================================================
``fashion``               Fashion-MNIST as is (10 classes)
``fashion_inverted``      intensities inverted, ``1 − x`` (10 classes)
``fashion_rot90``         rotated a quarter turn counter-clockwise (10 classes)
``fashion_noisy``         plus Gaussian noise of standard deviation 0.5, clipped to [0, 1]
``fashion_small``         shrunk to 14×14 (2×2 mean) at a random place of the 28×28 frame
``fashion_pair``          two items overlaid as in Multi-Fashion; the class of the
                          bottom-right one (:func:`manytask.data.multi_fashion.overlay`)
``digits``                8×8 digits upsampled (bilinear) to 20×20, centred in 28×28
``digits_inverted``       the same digits with inverted intensities
========================  ==============================================================

Every random draw of the data (splits, noise, placements, partners) comes from ``DATA_SEED``,
so every model seed sees the same data. Inputs are standardised with the pixel mean and standard
deviation of the pretext images, for every task (one fixed preprocessing, as CLIP's).

Model: conv 5×5 ×32 → 2×2 max-pool → ReLU → conv 5×5 ×64 → 2×2 max-pool → ReLU → linear 256 →
L2 normalisation scaled to norm √256 (the encoder, 314,496 parameters, the merged part) and a
linear head per task. The features are normalised as CLIP's image embeddings are: without it a
merged model can lower its prediction entropy just by growing its features, which AdaMerging's
entropy objective then rewards whatever the accuracy (we saw it: AdaMerging fell 14 points below
the pre-trained model on un-normalised features).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from manytask.data.idx import read_idx
from manytask.data.multi_fashion import locate_fashion_mnist, overlay

DATA_SEED = 0
FEATURES = 256
NOISE_STD = 0.5
DIGIT_SPLIT = (1000, 200)  # train, validation; the remaining 597 digits are the test set
TASKS = (
    "fashion",
    "fashion_inverted",
    "fashion_rot90",
    "fashion_noisy",
    "fashion_small",
    "fashion_pair",
    "digits",
    "digits_inverted",
)
SHORT = {
    "fashion": "fash",
    "fashion_inverted": "f-inv",
    "fashion_rot90": "f-rot",
    "fashion_noisy": "f-noise",
    "fashion_small": "f-small",
    "fashion_pair": "f-pair",
    "digits": "dig",
    "digits_inverted": "d-inv",
}


@dataclass(frozen=True)
class Split:
    """Standardised inputs ``[n, 1, 28, 28]`` and class labels ``[n]``."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class TaskData:
    name: str
    classes: int
    train: Split
    val: Split
    test: Split


@dataclass(frozen=True)
class Suite:
    """The pretext split and the tasks, with the standardisation constants."""

    pretext: Split
    tasks: list[TaskData]
    pixel_mean: float
    pixel_std: float

    def sizes(self) -> dict[str, dict[str, int]]:
        return {
            t.name: {"train": len(t.train), "val": len(t.val), "test": len(t.test)}
            for t in self.tasks
        }


# ---------------------------------------------------------------------------------------------
# data


def _as_float(images: np.ndarray) -> Tensor:
    """uint8 ``[n, 28, 28]`` → float ``[n, 1, 28, 28]`` in [0, 1]."""
    return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)


def _noisy(x: Tensor, gen: torch.Generator) -> Tensor:
    return (x + NOISE_STD * torch.randn(x.shape, generator=gen)).clamp(0.0, 1.0)


def _small(x: Tensor, gen: torch.Generator) -> Tensor:
    shrunk = nn.functional.avg_pool2d(x, 2)
    out = torch.zeros_like(x)
    rows = torch.randint(0, 15, (len(x),), generator=gen)
    cols = torch.randint(0, 15, (len(x),), generator=gen)
    for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
        out[i, :, r : r + 14, c : c + 14] = shrunk[i]
    return out


def _pairs(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> Split:
    """Overlay each image with another of the same set; the label is the other's class."""
    n = len(images)
    partner = rng.integers(0, n - 1, size=n)
    partner += partner >= np.arange(n)  # never the image itself
    return Split(_as_float(overlay(images, images[partner])), torch.from_numpy(labels[partner]))


def _digits(n_test: int) -> tuple[Split, Split, Split]:
    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = nn.functional.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    x = nn.functional.pad(x.clamp(0.0, 1.0), (4, 4, 4, 4))
    y = torch.from_numpy(data.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(DATA_SEED).permutation(len(y)))
    n_train, n_val = DIGIT_SPLIT
    parts = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
    test = parts[2][:n_test]
    return Split(x[parts[0]], y[parts[0]]), Split(x[parts[1]], y[parts[1]]), Split(x[test], y[test])


def build_suite(pretext: int, n_train: int, n_val: int, n_test: int) -> Suite:
    """The pretext split and the eight tasks (see the module docstring).

    ``n_train`` / ``n_val`` are the training / validation sizes of each Fashion task (drawn
    from the pool left after the pretext images), ``n_test`` the test size of every task
    (at most 10,000 for Fashion tasks and 597 for digit tasks).
    """
    files = locate_fashion_mnist(None)
    train_images = read_idx(files["train_images"])
    train_labels = read_idx(files["train_labels"]).astype(np.int64)
    test_images = read_idx(files["test_images"])[:n_test]
    test_labels = read_idx(files["test_labels"]).astype(np.int64)[:n_test]
    rng = np.random.default_rng(DATA_SEED)
    gen = torch.Generator().manual_seed(DATA_SEED)
    order = rng.permutation(len(train_images))
    pool = order[pretext:]
    if pretext < 1 or n_train + n_val > len(pool):
        raise ValueError(
            f"pretext ({pretext}) + n_train ({n_train}) + n_val ({n_val}) must fit in "
            f"Fashion-MNIST's {len(train_images)} training images"
        )
    pre_x = _as_float(train_images[order[:pretext]])
    mean, std = float(pre_x.mean()), float(pre_x.std())

    def norm(split: Split) -> Split:
        return Split((split.x - mean) / std, split.y)

    def fashion_split(idx: np.ndarray | None, test: bool = False) -> tuple[np.ndarray, np.ndarray]:
        if test:
            return test_images, test_labels
        assert idx is not None
        return train_images[idx], train_labels[idx]

    def draw() -> tuple[np.ndarray, np.ndarray]:
        chosen = rng.choice(pool, size=n_train + n_val, replace=False)
        return chosen[:n_train], chosen[n_train:]

    transforms: dict[str, Callable[[Tensor], Tensor]] = {
        "fashion": lambda x: x,
        "fashion_inverted": lambda x: 1.0 - x,
        "fashion_rot90": lambda x: torch.rot90(x, 1, dims=(2, 3)).contiguous(),
        "fashion_noisy": lambda x: _noisy(x, gen),
        "fashion_small": lambda x: _small(x, gen),
    }
    tasks: list[TaskData] = []
    for name, transform in transforms.items():
        train_idx, val_idx = draw()
        splits = [fashion_split(train_idx), fashion_split(val_idx), fashion_split(None, True)]
        made = [Split(transform(_as_float(im)), torch.from_numpy(lab)) for im, lab in splits]
        tasks.append(TaskData(name, 10, *(norm(s) for s in made)))
    train_idx, val_idx = draw()
    pair_splits = [
        _pairs(*fashion_split(train_idx), rng),
        _pairs(*fashion_split(val_idx), rng),
        _pairs(*fashion_split(None, True), rng),
    ]
    tasks.append(TaskData("fashion_pair", 10, *(norm(s) for s in pair_splits)))
    digit_splits = _digits(n_test)
    tasks.append(TaskData("digits", 10, *(norm(s) for s in digit_splits)))
    inverted = [Split(1.0 - s.x, s.y) for s in digit_splits]
    tasks.append(TaskData("digits_inverted", 10, *(norm(s) for s in inverted)))
    assert tuple(t.name for t in tasks) == TASKS
    pretext_split = Split((pre_x - mean) / std, torch.from_numpy(train_labels[order[:pretext]]))
    return Suite(pretext_split, tasks, mean, std)


# ---------------------------------------------------------------------------------------------
# model


class Encoder(nn.Module):
    """The shared (merged) CNN encoder: 28×28 grayscale → 256 features of norm √256 = 16."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5)
        self.conv2 = nn.Conv2d(32, 64, 5)
        self.fc = nn.Linear(64 * 4 * 4, FEATURES)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(nn.functional.max_pool2d(self.conv1(x), 2))
        x = torch.relu(nn.functional.max_pool2d(self.conv2(x), 2))
        z = self.fc(x.flatten(1))
        return math.sqrt(FEATURES) * nn.functional.normalize(z, dim=-1)


class TaskModel(nn.Module):
    """Encoder + one task's linear head; ``model(x)`` returns that task's logits."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(FEATURES, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


def encoder_state(model: nn.Module) -> dict[str, Tensor]:
    """The encoder's tensors, named as in :class:`TaskModel` (``encoder.…``), detached copies."""
    return {
        k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("encoder.")
    }


# ---------------------------------------------------------------------------------------------
# training


def _batches(n: int, batch: int, gen: torch.Generator) -> list[Tensor]:
    order = torch.randperm(n, generator=gen)
    return [order[i : i + batch] for i in range(0, n, batch)]


def _cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps))
    )


def pretrain(data: Split, epochs: int, lr: float, batch: int, seed: int) -> dict[str, Tensor]:
    """Train encoder + a 10-class head on the pretext split; return the encoder's tensors."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TaskModel(10)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in _batches(len(data), batch, gen):
            loss = nn.functional.cross_entropy(model(data.x[idx]), data.y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return encoder_state(model)


@torch.no_grad()
def features(encoder: dict[str, Tensor], x: Tensor, batch: int = 2048) -> Tensor:
    model = TaskModel(1)
    model.load_state_dict(encoder, strict=False)
    model.eval()
    return torch.cat([model.encoder(x[i : i + batch]) for i in range(0, len(x), batch)])


def linear_probe(
    encoder: dict[str, Tensor], data: Split, classes: int, steps: int, seed: int
) -> dict[str, Tensor]:
    """The task's fixed head: a linear classifier on the frozen encoder's features of ``data``
    (Adam, lr 3e-3, weight decay 1e-4, ``steps`` steps on batches of 256)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    feats = features(encoder, data.x)
    head = nn.Linear(FEATURES, classes)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3, weight_decay=1e-4)
    order: list[Tensor] = []
    for _ in range(steps):
        if not order:
            order = _batches(len(data), 256, gen)[::-1]
        idx = order.pop()
        loss = nn.functional.cross_entropy(head(feats[idx]), data.y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {f"head.{k}": v.detach().clone() for k, v in head.state_dict().items()}


def finetune(
    encoder: dict[str, Tensor],
    heads: Sequence[dict[str, Tensor]],
    splits: Sequence[Split],
    steps: int,
    lr: float,
    batch: int,
    seed: int,
) -> dict[str, Tensor]:
    """Fine-tune the encoder with the heads frozen on the union of ``splits`` (one split: an
    expert; all: joint multi-task training). Each batch is drawn uniformly from the union, so
    a task's share of the steps is its share of the examples. Adam with a cosine decay to 0."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    models = [task_model(encoder, h) for h in heads]
    shared = models[0].encoder
    for m in models[1:]:
        m.encoder = shared  # one encoder, several frozen heads
    for m in models:
        m.head.requires_grad_(False)
        m.train()
    optimizer = torch.optim.Adam(shared.parameters(), lr=lr)
    schedule = _cosine(optimizer, steps)
    x = torch.cat([s.x for s in splits])
    y = torch.cat([s.y for s in splits])
    task = torch.cat([torch.full((len(s),), i) for i, s in enumerate(splits)])
    order: list[Tensor] = []
    for _ in range(steps):
        if not order:
            order = _batches(len(y), batch, gen)[::-1]
        idx = order.pop()
        feats = shared(x[idx])
        loss = torch.zeros(())
        for t in task[idx].unique().tolist():
            pick = task[idx] == t
            logits = models[t].head(feats[pick])
            loss = loss + nn.functional.cross_entropy(logits, y[idx][pick], reduction="sum")
        loss = loss / len(idx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return encoder_state(models[0])


@torch.no_grad()
def accuracy(predict: Callable[[Tensor], Tensor], data: Split, batch: int = 2048) -> float:
    """Top-1 accuracy of the logits ``predict(x)`` on ``data`` (a module is put in eval mode)."""
    if isinstance(predict, nn.Module):
        predict.eval()
    right = 0
    for i in range(0, len(data), batch):
        right += int((predict(data.x[i : i + batch]).argmax(-1) == data.y[i : i + batch]).sum())
    return right / len(data)


def task_model(encoder: dict[str, Tensor], head: dict[str, Tensor]) -> TaskModel:
    """A :class:`TaskModel` holding ``encoder`` (``encoder.…`` tensors) and ``head``."""
    model = TaskModel(int(head["head.weight"].shape[0]))
    model.load_state_dict({**encoder, **head})
    model.eval()
    return model


def task_accuracy(encoder: dict[str, Tensor], head: dict[str, Tensor], data: Split) -> float:
    return accuracy(task_model(encoder, head), data)
