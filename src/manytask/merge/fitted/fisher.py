r"""Fisher merging: a per-parameter average weighted by each model's diagonal Fisher information.

Matena and Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022,
arXiv:2111.09832 (the Fisher-weighted average with the diagonal Fisher of §2):

.. math::

    \theta^* = \frac{\sum_i \lambda_i \hat F_i \odot \theta_i}{\sum_i \lambda_i \hat F_i},
    \qquad \hat F_i = \max(F_i, \varepsilon),
    \qquad F_i = \frac1N \sum_{n=1}^{N} \mathbb{E}_{y \sim p_{\theta_i}(y \mid x_n)}
        \big(\nabla_{\theta} \log p_{\theta_i}(y \mid x_n)\big)^2

over the ``N`` first examples of task ``i``'s data, with the model's *own* predictive
distribution :math:`p_\theta(y|x) = \operatorname{softmax}(\text{logits})` — the Fisher, not the
"empirical Fisher" of the true labels (no labels are read). ``labels="exact"`` sums the
expectation over every class, :math:`\sum_c p_c (\nabla \log p_c)^2`, as the authors' reference
implementation does (one per-example backward pass per class); ``labels="sampled"`` draws one
:math:`y \sim p_\theta(\cdot|x_n)` per example (one backward pass per example; an unbiased
estimate). Squared gradients are per example (``torch.func.vmap``), never of a batch mean.

Only the merged tensors that are parameters of the factory's model are Fisher-weighted; merged
buffers (BatchNorm statistics) are averaged with the weights :math:`\lambda_i`. The logits must be
``[batch, classes]``; the model runs in eval mode.

Defaults: ``num_examples = 4096`` (the reference implementation's ``--n_examples``,
github.com/mmatena/model_merging, ``scripts/compute_fisher.py``); ``floor`` ε ``= 1e-6`` (its
``--fisher_floor``, ``scripts/merge_and_evaluate.py``; it keeps the quotient defined where every
model's Fisher vanishes, which then falls back to the plain weighted average). The floor applies
to every model's Fisher, as the reference does with ``--favor_target_model=False``; its default
floors only the first model's, so that where every Fisher vanishes it keeps that model's value,
a choice for merging into one target model rather than a symmetric merge; equal weights
:math:`\lambda_i` (the formula is invariant to their scale); ``normalize = False`` (the formula as
written; ``True`` divides each :math:`\lambda_i` by the L2 norm of model ``i``'s whole Fisher, the
reference implementation's ``--normalize_fishers``); ``labels = "exact"`` (the reference
implementation's ``expectation_wrt_logits``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from manytask.errors import ConfigError
from manytask.merge.fitted.base import Experts, StateDict, average, logits_of, module_device
from manytask.merge.fitted.batches import Inputs
from manytask.merge.fitted.cache import Statistics
from manytask.merge.fitted.statistics import StatisticsRule
from manytask.registry import register


def fisher_average(
    params: Sequence[Tensor], fishers: Sequence[Tensor], weights: Sequence[float], floor: float
) -> Tensor:
    r""":math:`\sum_i \lambda_i \max(F_i, \varepsilon) \theta_i / \sum_i \lambda_i
    \max(F_i, \varepsilon)` in float32, cast back to the parameters' dtype."""
    numerator = torch.zeros(params[0].shape, dtype=torch.float32, device=params[0].device)
    denominator = torch.zeros_like(numerator)
    for theta, fisher, weight in zip(params, fishers, weights, strict=True):
        scaled = weight * fisher.to(numerator.device, torch.float32).clamp_min(floor)
        numerator += scaled * theta.to(numerator.device, torch.float32)
        denominator += scaled
    return (numerator / denominator).to(params[0].dtype)


def merge_fishers(
    models: Sequence[StateDict],
    fishers: Sequence[StateDict],
    weights: Sequence[float],
    floor: float,
    normalize: bool,
) -> dict[str, Tensor]:
    r"""The Fisher-weighted average for every tensor of ``models`` that has a Fisher, the
    λ-weighted average for the rest; with ``normalize``, :math:`\lambda_i / \lVert F_i \rVert_2`
    (the norm over all of model ``i``'s Fisher entries) replaces :math:`\lambda_i`."""
    scaled = list(weights)
    if normalize:
        for i, fisher in enumerate(fishers):
            norm = math.sqrt(sum(float((f.double() ** 2).sum()) for f in fisher.values()))
            scaled[i] = weights[i] / norm if norm > 0 else weights[i]
    merged: dict[str, Tensor] = {}
    for key in models[0]:
        tensors = [m[key] for m in models]
        if key in fishers[0]:
            merged[key] = fisher_average(tensors, [f[key] for f in fishers], scaled, floor)
        else:
            merged[key] = average(tensors, weights)
    return merged


def per_example_log_prob_grads(
    module: nn.Module,
    params: dict[str, Tensor],
    inputs: Inputs,
    targets: Tensor,
    rule: str,
    task: int,
) -> dict[str, Tensor]:
    r"""Per-example gradients :math:`\nabla_\theta\, t_n^\top \log p_\theta(\cdot \mid x_n)` for
    a ``[batch, classes]`` weighting ``targets`` (a one-hot row picks one class's log-probability);
    each returned tensor has the batch on its first axis."""

    def log_prob(
        p: dict[str, Tensor], args: tuple[Tensor, ...], kwargs: dict[str, Tensor], t: Tensor
    ) -> Tensor:
        single_args = tuple(a.unsqueeze(0) for a in args)
        single_kwargs = {k: v.unsqueeze(0) for k, v in kwargs.items()}
        out = logits_of(functional_call(module, p, single_args, single_kwargs), rule, task, ndim=2)
        return (torch.log_softmax(out[0].float(), dim=-1) * t).sum()

    per_example: Callable[..., dict[str, Tensor]] = vmap(grad(log_prob), in_dims=(None, 0, 0, 0))
    return per_example(params, inputs.args, inputs.kwargs, targets)


@register(
    "merge_rule", "fisher", "Fisher merging (Matena & Raffel, NeurIPS 2022, arXiv:2111.09832)"
)
class FisherMerging(StatisticsRule):
    """Fisher-weighted averaging of the task models' parameters.

    Args:
        num_examples: examples of each task's data the Fisher is averaged over (≥ 1).
        labels: ``"exact"`` (expectation over all classes) or ``"sampled"`` (one label drawn
            from the model per example, with the ``seed`` of :meth:`fit`).
        floor: ε, the lower bound applied to every Fisher entry (> 0).
        weights: λ, one non-negative weight per task model (not all zero); None = equal.
        normalize: divide each λ_i by the L2 norm of model i's Fisher over all parameters.
    """

    name: ClassVar[str] = "fisher"

    def __init__(
        self,
        num_examples: int = 4096,
        labels: Literal["exact", "sampled"] = "exact",
        floor: float = 1e-6,
        weights: Sequence[float] | None = None,
        normalize: bool = False,
    ) -> None:
        super().__init__(num_examples)
        if labels not in ("exact", "sampled"):
            raise ConfigError(f"fisher: labels must be 'exact' or 'sampled', got {labels!r}")
        if not floor > 0:
            raise ConfigError(f"fisher: floor must be > 0, got {floor!r}")
        if weights is not None and (any(not w >= 0 for w in weights) or not sum(weights) > 0):
            raise ConfigError(
                f"fisher: weights must be non-negative and not all zero, got {list(weights)!r}"
            )
        self.labels = labels
        self.floor = float(floor)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.normalize = bool(normalize)

    def statistic_settings(self, seed: int) -> dict[str, Any]:
        settings: dict[str, Any] = {"labels": self.labels, "num_examples": self.num_examples}
        if self.labels == "sampled":
            settings["seed"] = seed
        return settings

    def compute(
        self,
        module: nn.Module,
        keys: tuple[str, ...],
        batches: Iterable[Inputs],
        generator: torch.Generator,
        task: int,
    ) -> Statistics:
        """The diagonal Fisher of every merged parameter (float32), averaged over the examples."""
        own = dict(module.named_parameters())
        names = [k for k in keys if k in own and own[k].is_floating_point()]
        if not names:
            raise ConfigError(
                "fisher: none of the merged tensors is a parameter of the factory's model, so "
                "there is nothing to Fisher-weight"
            )
        device = module_device(module)
        params = {k: own[k].detach() for k in names}
        sums = {
            k: torch.zeros(p.shape, dtype=torch.float32, device=device) for k, p in params.items()
        }
        count = 0
        for inputs in batches:
            inputs = inputs.to(device)
            with torch.no_grad():
                logits = logits_of(inputs.call(module, params), self.name, task, ndim=2)
            probs = torch.softmax(logits.float(), dim=-1)
            classes = probs.shape[-1]
            if self.labels == "exact":
                eye = torch.eye(classes, device=device)
                for c in range(classes):
                    targets = eye[c].expand(inputs.size, classes)
                    grads = per_example_log_prob_grads(
                        module, params, inputs, targets, self.name, task
                    )
                    for k in names:
                        sums[k] += torch.tensordot(probs[:, c], grads[k].float() ** 2, dims=1)
            else:
                drawn = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1)
                targets = nn.functional.one_hot(drawn, classes).to(device, torch.float32)
                grads = per_example_log_prob_grads(module, params, inputs, targets, self.name, task)
                for k in names:
                    sums[k] += (grads[k].float() ** 2).sum(dim=0)
            count += inputs.size
        return Statistics({k: v / count for k, v in sums.items()}, {"examples": count})

    def fit_experts(
        self, experts: Experts, cache: str | Path | None, seed: int
    ) -> dict[str, Tensor]:
        weights = self.weights or [1.0] * experts.count
        if len(weights) != experts.count:
            raise ConfigError(
                f"fisher: weights needs one value per task model ({experts.count}), "
                f"got {len(weights)}"
            )
        fishers = [s.tensors for s in self.statistics(experts, cache, seed)]
        return merge_fishers(experts.models, fishers, weights, self.floor, self.normalize)
