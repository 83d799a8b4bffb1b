r"""Task mixing rates: the probability of drawing each task, from the sizes of the task datasets.

With :math:`n_t` examples in the dataset of task :math:`t` (:math:`t = 1 … T`):

* examples-proportional with a cap :math:`K` (Raffel et al., T5, arXiv:1910.10683, §3.5.2):
  :math:`p_t = \min(n_t, K) / \sum_s \min(n_s, K)`;
* temperature :math:`\tau` (same section): the capped rates raised to :math:`1/\tau` and
  renormalised, :math:`p_t \propto \min(n_t, K)^{1/\tau}`; :math:`\tau = 1` is
  examples-proportional, :math:`\tau \to \infty` uniform. The same family, written with the
  exponent :math:`\alpha = 1/\tau`, is the :math:`p_t \propto n_t^{\alpha}` sampling of mT5
  (Xue et al., arXiv:2010.11934, α = 0.3) and of BERT and PALs (Stickland and Murray,
  arXiv:1902.02671);
* annealed (BERT and PALs, section on task sampling): :math:`p_t \propto n_t^{\alpha_e}` in epoch
  :math:`e = 1 … E`, with :math:`\alpha_e = 1 - 0.8\,(e-1)/(E-1)`, i.e. from proportional
  (α = 1) in the first epoch to α = 0.2 in the last; written here as a straight line
  :math:`\alpha_e = \alpha_1 + (\alpha_E - \alpha_1)(e-1)/(E-1)` whose ends default to the
  paper's 1 and 0.2;
* uniform: :math:`p_t = 1/T` (T5's "equal mixing").

Everything is computed in float64 and in log space (:math:`p = \operatorname{softmax}(\alpha
\log \min(n, K))`), so sizes in the billions and small exponents lose no precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from manytask.errors import ConfigError


def check_sizes(sizes: Sequence[int], names: Sequence[str] | None = None) -> list[int]:
    """The dataset sizes as a list of ints ≥ 1; an empty list or an empty dataset is an error."""
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise ConfigError(f"sizes must be a list of dataset sizes, one int per task; got {sizes!r}")
    if len(sizes) == 0:
        raise ConfigError("mixing needs at least one task dataset; the list of sizes is empty")
    if names is not None and len(names) != len(sizes):
        raise ConfigError(f"{len(names)} task names for {len(sizes)} dataset sizes; give one each")
    checked = []
    for t, size in enumerate(sizes):
        label = f"'{names[t]}'" if names is not None else f"number {t}"
        if isinstance(size, bool) or not isinstance(size, int):
            raise ConfigError(f"the size of task {label} must be an int, got {size!r}")
        if size < 1:
            raise ConfigError(
                f"the dataset of task {label} has {size} examples; every task dataset needs at "
                "least one (leave an empty task out of the mixture)"
            )
        checked.append(size)
    return checked


def check_cap(cap: int | None) -> int | None:
    """``None`` (no cap) or an int ≥ 1."""
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ConfigError(f"cap must be an int ≥ 1 (or null for no cap), got {cap!r}")
    return cap


def size_power_rates(sizes: Sequence[int], exponent: float, cap: int | None = None) -> Tensor:
    r""":math:`p_t \propto \min(n_t, K)^{\alpha}` with :math:`\alpha` = ``exponent`` ≥ 0 and
    :math:`K` = ``cap`` (None: no cap), as a float64 tensor that sums to 1."""
    if not math.isfinite(exponent) or exponent < 0:
        raise ConfigError(
            f"the size exponent α must be a finite number ≥ 0 (1 = examples-proportional, "
            f"0 = uniform), got {exponent}"
        )
    counts = torch.tensor(check_sizes(sizes), dtype=torch.float64)
    cap = check_cap(cap)
    if cap is not None:
        counts = counts.clamp_max(float(cap))
    return torch.softmax(exponent * counts.log(), dim=0)


def proportional_rates(sizes: Sequence[int], cap: int | None = None) -> Tensor:
    r"""Examples-proportional mixing with a cap: :math:`p_t = \min(n_t, K)/\sum_s \min(n_s, K)`."""
    return size_power_rates(sizes, 1.0, cap)


def temperature_rates(sizes: Sequence[int], temperature: float, cap: int | None = None) -> Tensor:
    r"""Temperature-scaled mixing: :math:`p_t \propto \min(n_t, K)^{1/\tau}`, :math:`\tau > 0`."""
    if not math.isfinite(temperature) or temperature <= 0:
        raise ConfigError(
            f"temperature must be a finite number > 0 (1 = examples-proportional, larger = "
            f"closer to uniform), got {temperature}"
        )
    return size_power_rates(sizes, 1.0 / temperature, cap)


def uniform_rates(sizes: Sequence[int]) -> Tensor:
    """Equal mixing: :math:`p_t = 1/T`."""
    count = len(check_sizes(sizes))
    return torch.full((count,), 1.0 / count, dtype=torch.float64)


def annealed_exponent(epoch: int, epochs: int, start: float = 1.0, end: float = 0.2) -> float:
    r"""The exponent of epoch ``epoch`` (0-based, i.e. :math:`e - 1`) of ``epochs`` (:math:`E`):
    :math:`\alpha_e = \alpha_1 + (\alpha_E - \alpha_1)(e-1)/(E-1)`; with one epoch,
    :math:`\alpha_1`. Defaults 1 → 0.2: BERT and PALs (arXiv:1902.02671)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an int ≥ 1, got {epochs!r}")
    if not 0 <= epoch < epochs:
        raise ConfigError(
            f"epoch {epoch + 1} is outside the annealing schedule of {epochs} epochs; build the "
            f"sampler with epochs ≥ {epoch + 1} (the number of epochs you train)"
        )
    for label, value in (("start", start), ("end", end)):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"the annealing {label} exponent must be finite and ≥ 0, got {value}")
    if epochs == 1:
        return float(start)
    return float(start + (end - start) * epoch / (epochs - 1))
