r"""SDMGrad: a min-norm direction pulled towards a preferred direction (the mean gradient).

Xiao, Ban and Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
Algorithms", NeurIPS 2023, arXiv:2305.18409. The weights solve the direction-oriented
subproblem :math:`\min_{w \in \Delta} \tfrac12 \|J^\top (w + \lambda \tilde w)\|^2` by projected
stochastic gradient steps warm-started from the previous training step, and the update mixes
them with the preference :math:`\tilde w` (uniform):

.. math::

    A = \frac{G}{s^2}, \quad s = \tfrac1T \sum_i \sqrt{G_{ii}}, \qquad
    v \leftarrow \mu v + A\,(w + \lambda \tilde w), \quad
    w \leftarrow \Pi_\Delta(w - \eta\, v) \quad (S \text{ times}),

.. math::

    d = J^\top \frac{w + \lambda \tilde w}{1 + \lambda}

with the momentum :math:`v` starting at zero at each training step (the first inner step is
plain), :math:`\Pi_\Delta` the projection onto the simplex, and :math:`w` starting at the
uniform point on the first training step.

**Double sampling.** The paper forms :math:`A` from two independent mini-batches,
:math:`J_\xi J_{\xi'}^\top`, so that the inner gradient is unbiased, and the update from a third
one. With one batch per step manytask uses the Gramian :math:`J J^\top` of the step and applies
the weights to the same ``J``: the design of torchjd's ``SDMGradWeighting`` fed with a Gramian.
The estimate is then biased (the convergence guarantee of the paper needs the two batches), but
the method runs in feature mode, with ``update_every`` and exactly under ``torch.distributed``.

Defaults, from the authors' code (``OptMN-Lab/sdmgrad``, ``methods/weight_methods.py``) and
experiments: :math:`\lambda = 0.3` (``experiments/nyuv2/run.sh``; LibMTL's ``SDMGrad_lamda``;
the class default there is 0.6), inner learning rate :math:`\eta = 10` with momentum
:math:`\mu = 0.5` and :math:`S = 20` iterations (LibMTL uses :math:`\eta = 5`).

Deviations: the code divides by :math:`\big(\tfrac1T\sum_i \sqrt{G_{ii} + 10^{-4}}\big)^2`;
manytask drops the :math:`10^{-4}` (guarding only a zero Gramian), which makes the weights
exactly scale-invariant and the rule homogeneous; the two differ noticeably only when squared
gradient norms are not large compared with 1e-4. The code also multiplies ``d`` by :math:`T`
and clips its norm at one; manytask returns the paper's ``d`` (as torchjd and LibMTL do).

The inner weights :math:`w` are a buffer, so ``state_dict()`` resumes a run exactly; a step
whose Gramian is not finite (an AMP overflow, which the scaler then skips) leaves them
unchanged. Shared parameters receive ``d``; task-specific parameters their own task's gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import GramianWeighting
from manytask.balance.solvers.backend import (
    concatenate,
    identity_like,
    namespace,
    on_host,
    working,
)
from manytask.balance.solvers.simplex import project_simplex
from manytask.errors import ConfigError

_TINY = float(np.finfo(np.float64).tiny)  # the smallest scale² the steps divide by


def sdmgrad_inner(
    gramian: Tensor, start: Tensor, lam: float, lr: float, momentum: float, iterations: int
) -> Tensor:
    """The inner weights ``w`` after ``iterations`` projected momentum steps from ``start``.

    The steps are a dozen operations on length-``T`` vectors each; on a CPU they run in numpy
    (0.17 against 0.53 ms for the default 20 steps at 2 tasks), with two tasks in Python floats
    (:func:`_pair_steps`), elsewhere in torch on the device.
    """
    g = working(gramian)
    w = working(start.to(gramian.device))
    return torch.as_tensor(_steps(g, w, lam, lr, momentum, iterations))


def _steps(g: Any, w: Any, lam: float, lr: float, momentum: float, iterations: int) -> Any:
    """:func:`sdmgrad_inner` on float64 numpy arrays (a CPU: two tasks in Python floats) or
    tensors."""
    if not isinstance(g, np.ndarray):
        return _inner_steps(g, w, lam, lr, momentum, iterations)
    if g.shape[0] == 2:
        return np.array(_pair_steps(g.tolist(), w.tolist(), lam, lr, momentum, iterations))
    with np.errstate(all="ignore"):  # a non-finite Gramian: as torch, silent
        return _inner_steps(g, w, lam, lr, momentum, iterations)


def _pair_steps(
    g: list[list[float]], w: list[float], lam: float, lr: float, momentum: float, iterations: int
) -> list[float]:
    """:func:`_inner_steps` for two tasks, in Python floats: the projection of ``u`` onto the
    2-simplex is ``wᵢ = clip((1 + uᵢ − uⱼ) / 2, 0, 1)`` (the sort-based projection's answer with
    two entries), and twenty steps of a few float operations take a fraction of the numpy
    calls' time (0.02 against 0.17 ms)."""
    (g11, g12), (g21, g22) = g
    scale = (math.sqrt(max(g11, 0.0)) + math.sqrt(max(g22, 0.0))) / 2
    square = max(scale * scale, _TINY)
    a11, a12, a21, a22 = g11 / square, g12 / square, g21 / square, g22 / square
    pull1, pull2 = (a11 + a12) * (lam / 2), (a21 + a22) * (lam / 2)
    w1, w2 = w
    v1 = v2 = 0.0  # the momentum starts at zero on every training step
    for _ in range(iterations):
        v1 = momentum * v1 + (a11 * w1 + a12 * w2) + pull1
        v2 = momentum * v2 + (a21 * w1 + a22 * w2) + pull2
        u1, u2 = w1 - lr * v1, w2 - lr * v2
        w1 = min(max((1.0 + u1 - u2) / 2, 0.0), 1.0)
        w2 = min(max((1.0 + u2 - u1) / 2, 0.0), 1.0)
    return [w1, w2]


def _squared_scale(g: Any) -> Any:
    """``s²`` (at least the smallest normal float), with ``s`` the mean of ``√Gᵢᵢ``: a Python
    float for a numpy array (``T`` square roots in Python cost less than numpy's calls, which
    are cold in a training step), a 0-d tensor for a tensor (no value read back)."""
    if isinstance(g, np.ndarray):
        roots = [math.sqrt(max(x, 0.0)) for x in g.diagonal().tolist()]  # NaN stays NaN
        scale = sum(roots) / len(roots)
        return max(scale * scale, _TINY)
    scale = (g.diagonal().clip(min=0) ** 0.5).mean()
    return (scale * scale).clip(min=_TINY)


def _workspace(like: Any, momentum: float) -> tuple[Any, Any, Any, Any]:
    """The arrays :func:`_inner_steps` writes into, of ``like``'s kind, dtype and device (``like``
    a ``T × T`` Gramian): the step matrix ``[· , −μI, ·]`` (its first block and last column are
    rewritten on every call), ``z = [w; y; 1]``, the identity and the ranks ``1 … T``."""
    xp = namespace(like)
    eye, column = identity_like(like), xp.zeros_like(like[:, :1])
    step = concatenate([xp.zeros_like(like), -momentum * eye, column], axis=1)
    z = concatenate([column[:, 0], column[:, 0], xp.ones_like(column[:1, 0])])
    return step, z, eye, xp.ones_like(column[:, 0]).cumsum(0)


def _inner_steps(
    g: Any,
    w: Any,
    lam: float,
    lr: float,
    momentum: float,
    iterations: int,
    workspace: tuple[Any, Any, Any, Any] | None = None,
) -> Any:
    """The projected momentum steps on a float64 tensor or numpy array.

    In terms of ``y = η v``, a step is ``u = (I − ηA) w − μ y' − ηA(λw̃)``, ``y = w − u``,
    ``w = Π(u)``: one product of ``[I − ηA, −μI, −ηAλw̃]`` with ``z = [w; y; 1]``, whose two
    halves are then written in place (three array operations besides the projection, instead of
    six; 0.18 → 0.15 ms for the default 20 steps at 10 tasks). The step matrix is written into
    a :func:`_workspace` (``workspace``, kept between training steps by :class:`SDMGrad`): half
    the operations of building it afresh, which in a training step, with cold caches, cost more
    than the twenty steps (0.15 ms at 10 tasks). The result is a view of the workspace.
    """
    t = g.shape[0]
    xp = namespace(g)
    step, z, eye, ranks = _workspace(g, momentum) if workspace is None else workspace
    block, pull = step[:, :t], step[:, 2 * t]
    xp.divide(g, _squared_scale(g), out=block)  # A
    block *= -lr
    xp.sum(block, 1, out=pull)
    pull *= lam / t  # −ηA (λ w̃) with the uniform preference w̃
    block += eye
    weights, scaled_velocity = z[:t], z[t : 2 * t]
    weights[:] = w
    scaled_velocity[:] = 0.0  # the momentum starts at zero
    for _ in range(iterations):
        u = step @ z
        xp.subtract(weights, u, out=scaled_velocity)
        project_simplex(u, ranks, out=weights)
    return weights


@registry.register(
    "balancer",
    "sdmgrad",
    "direction-oriented min-norm weights towards the mean gradient "
    "(Xiao et al., NeurIPS 2023, arXiv:2305.18409)",
)
class SDMGrad(GramianWeighting):
    """SDMGrad with one batch per step, as a Gramian weighting.

    Args:
        tasks: task names.
        lam: pull λ towards the mean gradient (≥ 0).
        lr: learning rate η of the inner projected steps (> 0).
        momentum: momentum μ of the inner steps, in [0, 1).
        iterations: inner steps S per training step (≥ 1).
    """

    inner_weights: Tensor

    permutation_invariant = True
    homogeneous = True

    def __init__(
        self,
        tasks: Sequence[str],
        lam: float = 0.3,
        lr: float = 10.0,
        momentum: float = 0.5,
        iterations: int = 20,
    ) -> None:
        super().__init__(tasks)
        if lam < 0:
            raise ConfigError(f"sdmgrad: lam must be ≥ 0, got {lam}")
        if lr <= 0:
            raise ConfigError(f"sdmgrad: lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"sdmgrad: momentum must be in [0, 1), got {momentum}")
        if iterations < 1:
            raise ConfigError(f"sdmgrad: iterations must be ≥ 1, got {iterations}")
        self.lam = float(lam)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.iterations = int(iterations)
        t = self.num_tasks
        self.register_buffer("inner_weights", torch.full((t,), 1.0 / t, dtype=torch.float64))
        # the arrays the steps write into on a CPU (:func:`_workspace`), made on the first step
        self._host_workspace: tuple[Any, Any, Any, Any] | None = None

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        if on_host(gramian, self.inner_weights):
            return self._host_weights(gramian)
        # on a device, without reading the finite test back: an AMP overflow step leaves the
        # state alone
        g = gramian.detach().double()
        all_finite = torch.isfinite(g).all()
        start = self.inner_weights.to(g)
        options = (self.lam, self.lr, self.momentum, self.iterations)
        w: Tensor = _inner_steps(torch.where(all_finite, g, torch.zeros_like(g)), start, *options)
        self.inner_weights.copy_(torch.where(all_finite, w, self.inner_weights))
        return ((w + self.lam / self.num_tasks) / (1.0 + self.lam)).to(gramian.dtype)

    def _host_weights(self, gramian: Tensor) -> Tensor:
        """:meth:`weights` on a CPU, where the finite test is a value to branch on. Two tasks
        run in Python floats from the Gramian to the result (:func:`_pair_steps`); more in
        numpy, in a :func:`_workspace` kept between training steps, with the bookkeeping
        around the steps in Python floats. In a training step, with cold caches, each numpy
        call on a few numbers costs several microseconds: this call in the benchmark's feature
        mode step took 0.16 → 0.10 ms at 2 tasks, 0.42 → 0.36 ms at 10."""
        t = self.num_tasks
        options = (self.lam, self.lr, self.momentum, self.iterations)
        w: list[float]
        if t == 2:
            pair = gramian.tolist()
            finite = all(map(math.isfinite, pair[0] + pair[1]))
            start = self.inner_weights.tolist()
            w = _pair_steps(pair if finite else [[0.0, 0.0], [0.0, 0.0]], start, *options)
        else:
            g = gramian.detach().double().numpy()
            if self._host_workspace is None:
                self._host_workspace = _workspace(g, self.momentum)
            finite = bool(np.isfinite(g).all())
            steps_on, begin = (g if finite else np.zeros_like(g)), self.inner_weights.numpy()
            w = _inner_steps(steps_on, begin, *options, workspace=self._host_workspace).tolist()
        if finite:  # an AMP overflow step leaves the state alone
            self.inner_weights.numpy()[:] = w
        mixed = [(x + self.lam / t) / (1.0 + self.lam) for x in w]
        return torch.tensor(mixed, dtype=gramian.dtype)
