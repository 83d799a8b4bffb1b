r"""STCH: smooth Tchebycheff scalarization.

Lin, Zhang, Yang, Liu, Wang and Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective
Optimization", ICML 2024, arXiv:2402.19078. The paper smooths the Tchebycheff scalarization
:math:`\max_i \lambda_i (f_i - z_i^*)` with a log-sum-exp,

.. math::

    g_\mu(x \mid \lambda) = \mu \log \sum_{i=1}^{T}
    \exp\Big(\frac{\lambda_i (f_i(x) - z_i^*)}{\mu}\Big),

with a preference :math:`\lambda` on the simplex, an ideal point :math:`z^*` and a smoothing
:math:`\mu > 0`. manytask minimises, with :math:`\tilde\lambda = T\lambda` (mean one),

.. math::

    \mathcal{L} = T \mu \log \sum_{i=1}^{T} \exp\Big(\frac{\tilde\lambda_i f_i}{\mu}\Big)
    = T^2\, g_{\mu/T}(x \mid \lambda), \qquad
    \frac{\partial \mathcal{L}}{\partial f_i} = T\,\tilde\lambda_i\, p_i, \quad
    p = \operatorname{softmax}(\tilde\lambda \odot f / \mu)

i.e. the paper's scalarization with smoothing :math:`\mu/T`, scaled by :math:`T^2`. This is the
parametrisation of the authors' multi-task code (``Xi-L/STCH``, ``STCH_MTL``, copied by LibMTL's
newer ``STCH``), which uses :math:`\lambda_i = 1` and multiplies by :math:`T`: with a uniform
preference manytask's weights are exactly the code's, ``mu`` means the code's ``STCH_mu``, and the
weights on the :math:`f_i` sum to :math:`T` like ``ew``'s. (The paper's theory is stated for
:math:`g_\mu`; a positive factor and a rescaled :math:`\mu` give the same minimisers.)

**What** :math:`f_i` **is** (``normalization``):

- ``"log_nadir"`` (default, the authors' multi-task code): the first ``warmup_epochs`` epochs
  train on :math:`\sum_i \log L_i` (weights :math:`1/L_i`); the mean loss :math:`n_i` of the last
  warm-up epoch is kept as a nadir point, and afterwards :math:`f_i = \log(L_i / n_i + 10^{-20})`.
  In log space dividing by the nadir is a shift, so :math:`\log n_i` plays the role of
  :math:`z^*` and no separate ideal point is used (as in the code). The raw losses then receive
  :math:`w_i = T\tilde\lambda_i p_i / (L_i + 10^{-20} n_i)`.
- ``"none"``: the paper's formula on the raw losses, :math:`f_i = L_i - z_i^*` with ``ideal``
  :math:`z^*` (default 0, a valid ideal point for non-negative losses), after the optional
  ``warmup_epochs`` epochs of :math:`\sum_i \log L_i`.

Defaults: ``mu = 1.0`` and 5 warm-up epochs are the authors' multi-task code (``STCH_mu=1.0``,
``STCH_warmup_epoch=4``: the code trains epochs 0–4 on the log-losses and takes the nadir from
epoch 4, i.e. five epochs, which is ``warmup_epochs=5`` here); the paper reports
:math:`\mu \in \{0.01, 0.1, 0.5, 1\}` with no single best value. ``preference`` defaults to
uniform. The paper's Appendix B.1 subtracts the maximum before the exponential; here the weights
are computed with ``softmax``, which is stable for any :math:`f/\mu`.

The Trainer calls :meth:`end_epoch`; a custom loop must call it at the end of each epoch or the
method stays in its warm-up. The warm-up sums, the nadir and the epoch and step counters are in
``state_dict()`` (buffers and extra state), so a run resumes exactly, mid-epoch included. The
weights use only rank-averaged losses, and the nadir is an average of them, so the update is
that of the union batch under ``torch.distributed``. With ``loss_transform="log"`` the method is
applied to :math:`\log L_i`, which must then be positive (:math:`L_i > 1`) for the log-nadir
form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import LossWeighting
from manytask.errors import ConfigError

_TINY = 1e-20  # the official code's constant inside log(L + 1e-20) and log(L / n + 1e-20)


def _task_vector(name: str, values: list[float], count: int) -> list[float]:
    floats = [float(v) for v in values]
    if len(floats) != count:
        raise ConfigError(f"stch: {name} must hold one value per task ({count}), got {len(floats)}")
    if not all(math.isfinite(v) for v in floats):
        raise ConfigError(f"stch: {name} must be finite, got {floats}")
    return floats


@registry.register(
    "balancer",
    "stch",
    "smooth Tchebycheff scalarization with log-nadir warm-up "
    "(Lin et al., ICML 2024, arXiv:2402.19078)",
)
class SmoothTchebycheff(LossWeighting):
    """Smooth Tchebycheff scalarization (the authors' multi-task form by default).

    Args:
        tasks: task names.
        mu: smoothing μ (> 0); smaller is closer to the maximum.
        preference: preference λ, one non-negative value per task (normalised to the simplex);
            None is uniform.
        warmup_epochs: epochs trained on the sum of log-losses first (≥ 1 for ``"log_nadir"``,
            whose nadir is the mean loss of the last of them).
        normalization: ``"log_nadir"`` (the authors' code) or ``"none"`` (the paper's formula on
            the raw losses).
        ideal: the ideal point z* for ``normalization="none"`` (default zeros).
    """

    preference_weights: Tensor
    ideal_point: Tensor
    nadir_sum: Tensor
    nadir: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        mu: float = 1.0,
        preference: list[float] | None = None,
        warmup_epochs: int = 5,
        normalization: Literal["log_nadir", "none"] = "log_nadir",
        ideal: list[float] | None = None,
    ) -> None:
        super().__init__(tasks)
        k = self.num_tasks
        if not (math.isfinite(mu) and mu > 0):
            raise ConfigError(f"stch: mu must be > 0, got {mu}")
        if normalization not in ("log_nadir", "none"):
            raise ConfigError(
                f"stch: normalization must be 'log_nadir' or 'none', got {normalization!r}"
            )
        if warmup_epochs < 0:
            raise ConfigError(f"stch: warmup_epochs must be ≥ 0, got {warmup_epochs}")
        if normalization == "log_nadir" and warmup_epochs < 1:
            raise ConfigError(
                "stch: normalization='log_nadir' takes its nadir from the warm-up, so "
                f"warmup_epochs must be ≥ 1, got {warmup_epochs}"
            )
        if normalization == "log_nadir" and ideal is not None:
            raise ConfigError(
                "stch: ideal applies to normalization='none'; the log-nadir form uses the "
                "warm-up nadir instead"
            )
        pref = [1.0] * k if preference is None else _task_vector("preference", preference, k)
        if any(v < 0 for v in pref) or sum(pref) <= 0:
            raise ConfigError(f"stch: preference must be ≥ 0 with a positive sum, got {pref}")
        z = [0.0] * k if ideal is None else _task_vector("ideal", ideal, k)
        self.mu = float(mu)
        self.warmup_epochs = int(warmup_epochs)
        self.normalization = normalization
        total = sum(pref)
        # λ̃ = T λ / Σλ: mean one, so a uniform preference is all ones (the authors' code)
        self.register_buffer(
            "preference_weights", torch.tensor([k * v / total for v in pref]), persistent=False
        )
        self.register_buffer("ideal_point", torch.tensor(z), persistent=False)
        self.register_buffer("nadir_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("nadir", torch.ones(k))
        self._epochs = 0  # completed epochs
        self._epoch_steps = 0  # steps in the current epoch

    @property
    def in_warmup(self) -> bool:
        """True while the method trains on the sum of log-losses."""
        return self._epochs < self.warmup_epochs

    def weights(self, losses: Tensor) -> Tensor:
        values = losses.detach()
        self._epoch_steps += 1
        if self.in_warmup:
            if self.normalization == "log_nadir" and self._epochs == self.warmup_epochs - 1:
                self.nadir_sum += values.to(self.nadir_sum.dtype)
            return (values + _TINY).reciprocal()
        lam = self.preference_weights.to(values.dtype)
        if self.normalization == "log_nadir":
            nadir = self.nadir.to(values.dtype)
            ratio = values / nadir + _TINY
            p = torch.softmax(lam * torch.log(ratio) / self.mu, dim=0)
            return self.num_tasks * lam * p / (nadir * ratio)
        shifted = values - self.ideal_point.to(values.dtype)
        p = torch.softmax(lam * shifted / self.mu, dim=0)
        return self.num_tasks * lam * p

    def end_epoch(self) -> None:
        if self._epoch_steps == 0:
            return
        if self.normalization == "log_nadir" and self._epochs == self.warmup_epochs - 1:
            self.nadir.copy_(self.nadir_sum / self._epoch_steps)
        self._epochs += 1
        self._epoch_steps = 0

    def get_extra_state(self) -> Any:
        return {"epochs": self._epochs, "epoch_steps": self._epoch_steps}

    def set_extra_state(self, state: Any) -> None:
        self._epochs = int(state["epochs"])
        self._epoch_steps = int(state["epoch_steps"])

    def extra_repr(self) -> str:
        return (
            f"tasks={list(self.tasks)}, mu={self.mu}, warmup_epochs={self.warmup_epochs}, "
            f"normalization={self.normalization!r}"
        )
