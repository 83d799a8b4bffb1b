r"""AdaMerging: learn task-arithmetic coefficients by minimising the prediction entropy on
unlabeled inputs of every task.

Yang, Wang, Shen, Liu, Guo, Wang and Tao, "AdaMerging: Adaptive Model Merging for Multi-Task
Learning", ICLR 2024, arXiv:2310.02575 (task-wise and layer-wise AdaMerging, §3):

.. math::

    \theta(\lambda) = \theta_0 + \sum_{k=1}^{K} \lambda_k \tau_k \ \text{(task-wise)}, \qquad
    \theta^l(\lambda) = \theta_0^l + \sum_{k=1}^{K} \lambda_k^l \tau_k^l \ \text{(layer-wise)},

    \min_\lambda \sum_{k=1}^{K} \frac{1}{|B_k|} \sum_{x \in B_k}
        H\big(\operatorname{softmax} f_k(x; \theta(\lambda))\big),
    \qquad H(p) = -\sum_c p_c \log p_c,

with :math:`\tau_k = \theta_k - \theta_0`, :math:`f_k` task ``k``'s model (its own head) and
:math:`B_k` a batch of task ``k``'s unlabeled inputs. Each step takes one batch of every task
(``data[k]`` is read again from the start when it runs out), sums the tasks' mean entropies and
takes one Adam step on λ. A "layer" is one merged tensor, as in the authors' code (one
coefficient per parameter tensor and task). The coefficients are clamped to [0, 1] wherever they
are used (the authors' code, ``torch.clamp(lambdas_raw, 0, 1)``), so the returned model and
:meth:`summary` use the clamped values. The base's coefficient is fixed at 1. Logits may be
``[batch, …, classes]``: the entropy is averaged over every leading position. Integer tensors
(counters) are taken from the base. The task models are built once; each step evaluates them with
:func:`torch.func.functional_call` on the merged tensors, never copying a model.

Defaults (the paper's experimental setup and the authors' code, github.com/EnnengYang/AdaMerging,
``src/main_task_wise_adamerging.py`` / ``main_layer_wise_adamerging.py``): ``init = 0.3``
(``prior = 0.3``), ``lr = 1e-3`` with Adam's betas (0.9, 0.999), ``steps = 500`` (``epochs =
500``). The batch size is the data's: the authors' loop takes two batches of 16 per task and
step and sums their mean entropies, which (Adam being blind to the factor 2) is one batch of 32
here. ``seed`` is unused: no random number is drawn, the data's order decides.

With ``cache=FOLDER`` the learned coefficients (and the entropy of every step) are stored by
:mod:`manytask.merge.fitted.cache`, keyed by the settings (``steps``, ``lr``, ``init``), the
base's and task models' tensors, the architecture the factory builds, and every batch the steps
read; a second merge of the same inputs reads them back instead of learning them again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from manytask.errors import ConfigError
from manytask.merge.fitted.base import Experts, FittedRule, logits_of, module_device
from manytask.merge.fitted.batches import Inputs, cycle
from manytask.merge.fitted.cache import (
    Statistics,
    StatisticsCache,
    cached,
    check_rereadable,
    states_fingerprint,
    unmerged_states,
)
from manytask.registry import register


def mean_entropy(logits: Tensor) -> Tensor:
    r"""Mean over all leading positions of :math:`-\sum_c p_c \log p_c`, classes last."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()


class AdaMerging(FittedRule):
    """Task arithmetic with coefficients learned by entropy minimisation (see the module
    docstring); :attr:`granularity` picks task-wise or layer-wise coefficients.

    Args:
        steps: Adam steps (≥ 0), each on one batch of every task.
        lr: Adam's learning rate (> 0).
        init: the initial value of every coefficient, in [0, 1].
    """

    needs_base: ClassVar[bool] = True
    caches_statistics: ClassVar[bool] = True
    #: the version of the learning procedure, part of the cache key: bump it when it changes
    statistic_version: ClassVar[int] = 1
    granularity: ClassVar[Literal["task", "layer"]] = "task"

    def __init__(self, steps: int = 500, lr: float = 1e-3, init: float = 0.3) -> None:
        if int(steps) != steps or steps < 0:
            raise ConfigError(f"{self.name}: steps must be an integer ≥ 0, got {steps!r}")
        if not lr > 0:
            raise ConfigError(f"{self.name}: lr must be > 0, got {lr!r}")
        if not 0.0 <= init <= 1.0:
            raise ConfigError(f"{self.name}: init must be in [0, 1], got {init!r}")
        self.steps = int(steps)
        self.lr = float(lr)
        self.init = float(init)
        #: the learned coefficients after :meth:`fit`: ``(K,)`` task-wise, ``(L, K)`` layer-wise
        #: with one row per tensor of :attr:`layers`
        self.coefficients: Tensor | None = None
        self.layers: tuple[str, ...] = ()
        self.entropy: list[float] = []

    def fit_experts(
        self, experts: Experts, cache: str | Path | None, seed: int
    ) -> dict[str, Tensor]:
        assert experts.base is not None  # checked by experts()
        first = experts.create(0)
        experts.check(0, first)
        device = module_device(first)
        own = first.state_dict()
        keys = [k for k in experts.keys if experts.base[k].is_floating_point()]
        if not keys:
            raise ConfigError(f"{self.name}: no floating-point tensor to merge")
        theta0 = {k: experts.base[k].to(device, own[k].dtype) for k in keys}
        vectors = {
            k: torch.stack([m[k].to(device, own[k].dtype) for m in experts.models]) - theta0[k]
            for k in keys
        }
        store = None if cache is None else StatisticsCache(cache, self.name)
        if store is not None:
            for source in experts.data:
                check_rereadable(source, self.name)
        modules = experts.build_shared(theta0, first)
        labelled = [
            ("base", experts.base),
            *((f"model{i}", m) for i, m in enumerate(experts.models)),
            *unmerged_states(modules, experts.keys),  # the heads the entropy is measured on
        ]
        models = "" if store is None else states_fingerprint(first, labelled)

        def read() -> Iterator[Inputs]:  # one batch of every task per step, in step order
            streams = [cycle(d, self.name, i) for i, d in enumerate(experts.data)]
            for _ in range(self.steps):
                for stream in streams:
                    yield next(stream)

        def learn(batches: Iterator[Inputs]) -> Statistics:
            shape = (experts.count,) if self.granularity == "task" else (len(keys), experts.count)
            raw = torch.full(shape, self.init, device=device, requires_grad=True)
            optimizer = torch.optim.Adam([raw], lr=self.lr, betas=(0.9, 0.999))
            entropy = []
            for _ in range(self.steps):
                merged = self._merge(raw.clamp(0.0, 1.0), theta0, vectors, keys)
                loss = torch.zeros((), device=device)
                for task, module in enumerate(modules):
                    inputs = next(batches).to(device)
                    logits = logits_of(inputs.call(module, merged), self.name, task)
                    loss = loss + mean_entropy(logits)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                entropy.append(float(loss.detach()))
            learned = raw.detach().clamp(0.0, 1.0).cpu()
            return Statistics({"coefficients": learned}, {"entropy": entropy, "tensors": keys})

        stats = cached(
            store,
            lambda digest: {
                "rule": self.name,
                "statistic": self.statistic_version,
                "settings": {"steps": self.steps, "lr": self.lr, "init": self.init},
                "models": models,
                "data": digest.hexdigest(),
                "examples": digest.count,
            },
            read,
            learn,
            f"{self.name}: the data",
        )
        coefficients = stats.tensors["coefficients"]
        self.coefficients = coefficients
        self.entropy = [float(v) for v in stats.extra.get("entropy", [])]
        self.layers = tuple(keys) if self.granularity == "layer" else ()
        with torch.no_grad():
            merged = self._merge(coefficients.to(device), theta0, vectors, keys)
        return {
            k: (merged[k] if k in merged else experts.base[k]).to(
                experts.models[0][k].device, experts.models[0][k].dtype
            )
            for k in experts.keys
        }

    def _merge(
        self,
        coefficients: Tensor,
        theta0: dict[str, Tensor],
        vectors: dict[str, Tensor],
        keys: list[str],
    ) -> dict[str, Tensor]:
        merged = {}
        for row, key in enumerate(keys):
            lam = coefficients if self.granularity == "task" else coefficients[row]
            merged[key] = theta0[key] + torch.tensordot(
                lam.to(vectors[key].dtype), vectors[key], dims=1
            )
        return merged

    def summary(self) -> dict[str, Any]:
        if self.coefficients is None:
            return {}
        out: dict[str, Any] = {"coefficients": self.coefficients.tolist(), "entropy": self.entropy}
        if self.layers:
            out["layers"] = list(self.layers)
        return out


@register(
    "merge_rule",
    "adamerging_task",
    "AdaMerging, one coefficient per task (Yang et al., ICLR 2024, arXiv:2310.02575)",
)
class TaskWiseAdaMerging(AdaMerging):
    """Task-wise AdaMerging: one coefficient λ_k per task model."""

    name: ClassVar[str] = "adamerging_task"
    granularity: ClassVar[Literal["task", "layer"]] = "task"


@register(
    "merge_rule",
    "adamerging_layer",
    "AdaMerging, one coefficient per tensor and task (Yang et al., ICLR 2024, arXiv:2310.02575)",
)
class LayerWiseAdaMerging(AdaMerging):
    """Layer-wise AdaMerging: one coefficient λ_k^l per merged tensor l and task model k."""

    name: ClassVar[str] = "adamerging_layer"
    granularity: ClassVar[Literal["task", "layer"]] = "layer"
