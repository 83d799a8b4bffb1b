r"""Synthetic regression tasks of controlled correlation, as in the MMoE paper.

Ma, Zhao, Yi, Chen, Hong and Chi, "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts", KDD 2018, §3.2. For a nominal correlation :math:`p`:

1. draw orthogonal unit vectors :math:`u_1, u_2 \in \mathbb{R}^d`;
2. set :math:`w_1 = c\,u_1` and :math:`w_2 = c\,(p\,u_1 + \sqrt{1-p^2}\,u_2)`;
3. draw :math:`x \sim \mathcal{N}(0, I_d)`;
4. :math:`y_k = w_k^\top x + \sum_{i=1}^{m} \sin(\alpha_i w_k^\top x + \beta_i) + \epsilon_k`,
   :math:`\epsilon_k \sim \mathcal{N}(0, 0.01)`.

:math:`p` is the cosine of :math:`w_1, w_2`, not the correlation of the labels: the sine terms
make the measured Pearson correlation of :math:`y_1, y_2` differ from :math:`p`, so the dataset
reports both (``info["nominal_correlation"]``, ``info["label_correlation"]``).

Defaults: :math:`c = 1`, noise variance 0.01 (std 0.1) as in the paper. The paper leaves
:math:`d`, :math:`m`, :math:`\alpha_i, \beta_i` and the sample counts to the reader; manytask uses
:math:`d = 100`, :math:`m = 10`, :math:`\alpha_i, \beta_i \sim \mathcal{N}(0, 1)` drawn once per
``seed``, and 10,000 / 2,000 / 2,000 train / validation / test samples.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from manytask import registry
from manytask.data.batch import TensorMultiTaskDataset
from manytask.data.bundle import DatasetBundle
from manytask.errors import ConfigError
from manytask.task import Task, TaskSet


def correlated_regression(
    n: int,
    correlation: float,
    input_dim: int = 100,
    num_sines: int = 10,
    scale: float = 1.0,
    noise_std: float = 0.1,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` samples ``(x, y1, y2)`` of the MMoE construction (float64 arrays)."""
    if not -1.0 <= correlation <= 1.0:
        raise ConfigError(f"data.correlation must be in [-1, 1], got {correlation}")
    if input_dim < 2:
        raise ConfigError(f"data.input_dim must be ≥ 2, got {input_dim}")
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((input_dim, 2)))
    u1, u2 = basis[:, 0], basis[:, 1]
    w1 = scale * u1
    w2 = scale * (correlation * u1 + math.sqrt(1.0 - correlation**2) * u2)
    alpha = rng.standard_normal(num_sines)
    beta = rng.standard_normal(num_sines)
    x = rng.standard_normal((n, input_dim))

    def label(w: np.ndarray) -> np.ndarray:
        z = x @ w
        sines = np.sin(np.outer(z, alpha) + beta).sum(axis=1)
        noisy: np.ndarray = z + sines + noise_std * rng.standard_normal(n)
        return noisy

    return x, label(w1), label(w2)


@registry.register(
    "dataset", "mmoe_synthetic", "two regression tasks of controlled correlation (MMoE paper)"
)
def mmoe_synthetic(
    correlation: float = 0.5,
    n_train: int = 10_000,
    n_val: int = 2_000,
    n_test: int = 2_000,
    input_dim: int = 100,
    num_sines: int = 10,
    scale: float = 1.0,
    noise_std: float = 0.1,
    seed: int = 0,
) -> DatasetBundle:
    """Tasks ``y1`` and ``y2`` (MSE regression) with nominal correlation ``correlation``."""
    for key, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if value < 2:
            raise ConfigError(f"data.{key} must be ≥ 2, got {value}")
    total = n_train + n_val + n_test
    x, y1, y2 = correlated_regression(
        total, correlation, input_dim, num_sines, scale, noise_std, seed
    )
    measured = float(np.corrcoef(y1, y2)[0, 1])
    xt = torch.from_numpy(x.astype(np.float32))
    targets = {
        "y1": torch.from_numpy(y1.astype(np.float32)),
        "y2": torch.from_numpy(y2.astype(np.float32)),
    }
    full = TensorMultiTaskDataset(xt, targets)
    cuts = torch.arange(total)
    tasks = TaskSet([Task("y1", "mse"), Task("y2", "mse")])
    return DatasetBundle(
        train=full.subset(cuts[:n_train]),
        val=full.subset(cuts[n_train : n_train + n_val]),
        test=full.subset(cuts[n_train + n_val :]),
        tasks=tasks,
        input_shape=(input_dim,),
        info={
            "nominal_correlation": correlation,
            "label_correlation": measured,
            "sizes": {"train": n_train, "val": n_val, "test": n_test},
            "seed": seed,
        },
    )
