r"""GradDrop: keep, coordinate by coordinate, the gradients of one randomly chosen sign.

Chen, Ngiam, Huang, Luong, Kretzschmar, Chai and Anguelov, "Just Pick a Sign: Optimizing Deep
Multitask Models with Gradient Sign Dropout", NeurIPS 2020, arXiv:2010.06808, Algorithm 1.
With the rows :math:`g_i` of ``J``, for every coordinate :math:`p`:

.. math::

    P_p = \tfrac12\Big(1 + \frac{\sum_i g_{ip}}{\sum_i |g_{ip}|}\Big), \qquad
    U_p \sim \mathcal U(0, 1),

.. math::

    M_{ip} = [P_p > U_p]\,[g_{ip} > 0] + [P_p < U_p]\,[g_{ip} < 0], \qquad
    d_p = \sum_i \big(\ell_i + (1 - \ell_i) M_{ip}\big)\, g_{ip}

:math:`P_p` is the positive sign purity: with probability :math:`P_p` only the positive
components of coordinate :math:`p` pass, otherwise only the negative ones; the leak
:math:`\ell_i` lets a fraction of task :math:`i`'s gradient through regardless. A coordinate
where every gradient is zero gets :math:`P_p = 1/2` (and a zero direction).

Where it runs: the paper applies GradDrop to the gradients at a layer's activations (the
shared representation), multiplying them by :math:`\operatorname{sign}(A)` and summing over the
batch before computing :math:`P`. manytask applies the rule to whatever ``J`` the engine gives:
the gradients of the shared parameters (default, where there is no activation sign and no batch
axis) or, with ``mode="features"``, the gradients at the shared representation flattened over
samples and features, each sample's feature being its own coordinate (no batch sum, no
activation sign). This is the coordinate-wise rule of torchjd's ``GradDrop``; LibMTL 1.1.5 runs
it only on representations, with the paper's sign-and-batch-sum step.

Defaults: ``leak = 0`` (the paper's plain GradDrop and LibMTL's default) for every task, or one
value per task; the monotone function :math:`f` of the paper is the identity (its default).
:math:`U` is drawn on the CPU from the balancer's own generator (``seed``, or drawn from the
global torch RNG) and copied to ``J``'s device (from pinned memory, without stalling the host),
so every rank draws the same numbers: exact under ``torch.distributed`` in parameter mode. Its
values are the midpoints :math:`(k + \tfrac12)/2^{16}` of :math:`2^{16}` equal cells of
:math:`(0, 1)`, from the 16-bit lanes of 64-bit words
(:func:`~manytask.balance.randomness.uniform_lanes`): half the time of ``torch.rand`` (whose
float32 draws lie on a grid of :math:`2^{-24}`) and half the bytes to copy. A sign is then kept
with the purity :math:`P` rounded to that grid, within :math:`2^{-17}` of it.

Shared parameters (or the representation) receive ``d``; task-specific parameters their own
task's gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import BalanceStep, JacobianAggregator
from manytask.balance.engine import FeatureRows, LinearHeadRows
from manytask.balance.randomness import (
    host_to_device,
    lanes_to_uniform,
    seeded_generator,
    uniform_lanes,
)
from manytask.errors import ConfigError


def graddrop_direction(jacobian: FeatureRows, uniform: Tensor, leak: Tensor | None) -> Tensor:
    """GradDrop's direction for ``(T, P)`` gradients, ``(P,)`` uniform draws and ``(T,)`` leaks
    (``None``: no leak).

    With ``t = Σᵢ (1 − ℓᵢ) gᵢ`` and ``a = Σᵢ (1 − ℓᵢ) |gᵢ|`` per coordinate, the positive
    entries sum to ``(t + a)/2`` and the negative ones to ``(t − a)/2``, so the rule's
    ``Σᵢ (ℓᵢ + (1 − ℓᵢ) Mᵢ) gᵢ`` is ``Σᵢ ℓᵢ gᵢ + (|s| t + s a)/2`` with ``s`` the sign of
    ``P − U``: ``(t + a)/2`` where ``P > U``, ``(t − a)/2`` where ``P < U``, nothing on a tie.
    ``P − U`` has the sign of ``Σᵢ gᵢ + Σᵢ |gᵢ| − 2U Σᵢ |gᵢ|``, which needs no division and is
    zero on a coordinate whose gradients are all zero (its direction is zero anyway). Computed
    that way the rule takes one pass over the Jacobian (or, for one-output linear heads —
    :class:`~manytask.balance.engine.LinearHeadRows` of width 1 — two products of its factors,
    see :func:`_half_sums`) and eight in place over its columns, whose memory is allocated three
    times.
    """
    if isinstance(jacobian, LinearHeadRows) and any(width != 1 for width in jacobian.widths):
        jacobian = jacobian.dense()  # |δ Mᵀ| factors only for one column per task
    if leak is None:
        total, magnitude = _half_sums(jacobian, None)
        kept_total, kept_magnitude = total, magnitude
    else:  # the plain, kept and leaked sums from one pass: weights 1, 1 − ℓ and ℓ
        weights = torch.stack([torch.ones_like(leak), 1.0 - leak, leak])
        totals, magnitudes = _half_sums(jacobian, weights)
        total, magnitude = totals[0], magnitudes[0]
        kept_total, kept_magnitude = totals[1], magnitudes[1]
    # halves of Σ gᵢ + Σ |gᵢ| − 2U Σ |gᵢ|: the sign of P − U
    side = total.add(magnitude).addcmul_(uniform.to(total), magnitude, value=-2.0).sign_()
    kept = kept_magnitude.mul_(side).add_(kept_total.mul_(side.abs_()))
    return kept if leak is None else kept.add_(totals[2], alpha=2.0)


def _half_sums(jacobian: FeatureRows, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """Halves of ``Σᵢ wᵢ gᵢ`` and of ``Σᵢ wᵢ |gᵢ|`` per coordinate: ``(P,)`` each for ``w = 1``
    (None), ``(m, P)`` for ``m`` rows of non-negative weights ``(m, T)``.

    For rows ``gᵢ = δᵢ mᵢᵀ`` of one-output linear heads, ``|gᵢ| = |δᵢ| |mᵢ|ᵀ``, so both sums are
    products of ``(B, T)`` and ``(T, D)`` matrices: ``Σ wᵢ gᵢ = (Δ diag w) Mᵀ`` and
    ``Σ wᵢ |gᵢ| = (|Δ| diag w) |M|ᵀ``; the halving goes into ``M``. Dense rows are read twice
    (as they are and as magnitudes) by matrix–vector products.
    """
    if isinstance(jacobian, LinearHeadRows):
        deltas, maps = jacobian.deltas, 0.5 * jacobian.maps
        scaled = deltas if weights is None else deltas * weights.to(deltas)[:, None, :]
        return (scaled @ maps.T).flatten(-2), (scaled.abs() @ maps.abs().T).flatten(-2)
    half = (
        jacobian.new_full((jacobian.shape[0],), 0.5)
        if weights is None
        else 0.5 * weights.to(jacobian)
    )
    return half @ jacobian, half @ jacobian.abs()


@registry.register(
    "balancer",
    "graddrop",
    "gradient sign dropout: keep one random sign per coordinate "
    "(Chen et al., NeurIPS 2020, arXiv:2010.06808)",
)
class GradDrop(JacobianAggregator):
    """GradDrop on the rows of ``J``.

    Args:
        tasks: task names.
        leak: fraction of each task's gradient that always passes, in [0, 1]: one value for
            every task, or one per task in task order.
        seed: seed of the uniform draws (None: from the global torch RNG).
    """

    # the draws depend on the coordinates only, the mask on signs and the purity ratio
    permutation_invariant = True
    homogeneous = True

    def __init__(
        self, tasks: Sequence[str], leak: float | list[float] = 0.0, seed: int | None = None
    ) -> None:
        super().__init__(tasks)
        leaks = [float(leak)] * self.num_tasks if isinstance(leak, (int, float)) else list(leak)
        if len(leaks) != self.num_tasks:
            raise ConfigError(
                f"graddrop: leak needs one value or one per task ({self.num_tasks}), "
                f"got {len(leaks)}"
            )
        if any(not 0.0 <= value <= 1.0 for value in leaks):
            raise ConfigError(f"graddrop: every leak must be in [0, 1], got {leaks}")
        self.leak = tuple(float(value) for value in leaks)
        self.generator = seeded_generator(seed)

    # in feature mode the rows of one-output linear heads come as factors (_half_sums)
    _reads_factors = True

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        return self._direction(jacobian)

    def _combine(self, jacobian: FeatureRows, losses: Tensor) -> tuple[Tensor, BalanceStep]:
        return self._direction(jacobian), BalanceStep(weights=None)

    def _direction(self, jacobian: FeatureRows) -> Tensor:
        if isinstance(jacobian, LinearHeadRows):
            dtype, device = jacobian.deltas.dtype, jacobian.deltas.device
            coordinates = jacobian.deltas.shape[0] * jacobian.maps.shape[0]
        else:
            dtype, device, coordinates = jacobian.dtype, jacobian.device, jacobian.shape[1]
        lanes = host_to_device(uniform_lanes(coordinates, self.generator), device)
        leak = None
        if any(self.leak):
            leak = host_to_device(torch.tensor(self.leak, dtype=dtype), device)
        return graddrop_direction(jacobian, lanes_to_uniform(lanes, dtype), leak)

    def get_extra_state(self) -> Any:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        self.generator.set_state(state["generator"])
