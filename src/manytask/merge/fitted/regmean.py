r"""RegMean: merge each linear layer by the least-squares fit of every task model's outputs.

Jin, Ren, Preotiuc-Pietro and Cheng, "Dataless Knowledge Fusion by Merging Weights of Language
Models", ICLR 2023, arXiv:2212.09849 (the method section). For a linear layer :math:`h = W x`
with task ``i``'s inputs stacked as the rows of :math:`X_i`, the merged weight minimises
:math:`\sum_i \lVert X_i W^\top - X_i W_i^\top \rVert^2`, whose closed form in PyTorch's
``(out, in)`` layout is

.. math::

    W^* = \Big(\sum_i W_i \tilde G_i\Big) \Big(\sum_i \tilde G_i\Big)^{-1},
    \qquad G_i = X_i^\top X_i,
    \qquad \tilde G_i = \alpha\, G_i + (1 - \alpha)\, \operatorname{diag}(G_i),

where α scales the off-diagonal entries of each Gram matrix (α = 1 is the exact
regression, α = 0 a per-input-feature weighted average). Every other merged tensor (biases,
norms, embeddings, linear layers no input reached) is the plain average, as in the paper.

Each task's Gram is the mean over the :math:`n_i` rows of every input that reaches an
``nn.Linear`` whose ``<name>.weight`` is merged, :math:`G_i = X_i^\top X_i / n_i` (forward
hooks; a sequence input ``[batch, tokens, in]`` contributes every token, padding included), over
the first ``num_examples`` examples of each task, summed in float32 (float64 for float64
inputs). The paper writes the unnormalised :math:`X_i^\top X_i`; the authors' code
(``compute_grams`` keeps a running mean) and FusionBench divide by the rows, so that every task
model counts alike however many rows (examples, tokens) its data give; manytask follows the
code. The two agree when every task gives a layer as many rows. A task whose inputs never reach
a layer contributes :math:`G_i = 0` there. The inverse is a pseudo-inverse taken in float64
(eigenvalues below ``in · eps · λ_max`` are dropped), written as
:math:`W^* = \bar W + \big(\sum_i (W_i - \bar W)\tilde G_i\big)\big(\sum_i \tilde G_i\big)^+`:
it equals the formula when the sum is invertible, and keeps the average :math:`\bar W` along the
input directions no task's data reach (our choice, because the data say nothing there).
Linear layers whose ``forward`` is bypassed (``nn.MultiheadAttention`` calls its ``out_proj``
weights functionally) are averaged, and so are layers that are not ``nn.Linear``: the authors'
code also regresses ``nn.Conv1d`` and Hugging Face's ``Conv1D`` (GPT-2's projections, whose
weight is stored ``(in, out)``), which manytask averages.

Defaults: ``num_examples = 1000`` (ours: the authors' released configurations set
``gram_n_example: 1000`` in github.com/bloomberg/dataless-model-merging ``src/configs/exps``, but
their code counts batches there, of 16 examples, so they read up to 16,000 examples where a data
set has that many; FusionBench reads 256); ``alpha = 0.1`` (the value
of those configurations for the emotion-classification experiments with RoBERTa, T5 and
DeBERTa, ``regmean_reduce_nondiag: 0.1``; their GLUE configurations keep α = 1).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from manytask.errors import ConfigError
from manytask.merge.fitted.base import Experts, average, module_device
from manytask.merge.fitted.batches import Inputs
from manytask.merge.fitted.cache import Statistics
from manytask.merge.fitted.statistics import StatisticsRule
from manytask.registry import register


def regmean_weight(weights: Sequence[Tensor], grams: Sequence[Tensor], alpha: float) -> Tensor:
    r""":math:`\bar W + (\sum_i (W_i - \bar W) \tilde G_i)(\sum_i \tilde G_i)^+` for ``(out, in)``
    weights and ``(in, in)`` Grams, in float64, cast back to the weights' dtype."""
    first = weights[0]
    w = [t.to(first.device, torch.float64) for t in weights]
    tilde = []
    for gram in grams:
        g = gram.to(first.device, torch.float64)
        tilde.append(alpha * g + (1.0 - alpha) * torch.diag_embed(torch.diagonal(g)))
    mean = torch.stack(w).mean(dim=0)
    total = torch.stack(tilde).sum(dim=0)
    residual = torch.zeros_like(mean)
    for wi, gi in zip(w, tilde, strict=True):
        residual += (wi - mean) @ gi
    values, vectors = torch.linalg.eigh(total)
    cutoff = values.max().clamp_min(0) * total.shape[0] * torch.finfo(torch.float64).eps
    inverse = torch.where(values > cutoff, 1.0 / values, torch.zeros_like(values))
    pinv: Tensor = (vectors * inverse) @ vectors.T
    merged: Tensor = mean + residual @ pinv
    return merged.to(first.dtype)


def weight_name(layer: str) -> str:
    """The state-dict name of the weight of the submodule ``layer`` (``""`` is the root)."""
    return f"{layer}.weight" if layer else "weight"


def layer_name(key: str) -> str | None:
    """The submodule whose weight ``key`` is, or None when ``key`` names no weight."""
    if key == "weight":
        return ""
    return key[: -len(".weight")] if key.endswith(".weight") else None


@register("merge_rule", "regmean", "RegMean (Jin et al., ICLR 2023, arXiv:2212.09849)")
class RegMean(StatisticsRule):
    """Regression mean of the linear layers, plain mean of the rest.

    Args:
        alpha: α in [0, 1], the scale of the Gram matrices' off-diagonal entries.
        num_examples: examples of each task's data the Gram matrices are taken over (≥ 1).
    """

    name: ClassVar[str] = "regmean"

    def __init__(self, alpha: float = 0.1, num_examples: int = 1000) -> None:
        super().__init__(num_examples)
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"regmean: alpha must be in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)

    def statistic_settings(self, seed: int) -> dict[str, Any]:
        return {"num_examples": self.num_examples}  # the Grams depend on neither α nor the seed

    def compute(
        self,
        module: nn.Module,
        keys: tuple[str, ...],
        batches: Iterable[Inputs],
        generator: torch.Generator,
        task: int,
    ) -> Statistics:
        """:math:`X^\\top X` (float32) of every merged linear layer the inputs reach, keyed by
        the layer's name, and the number of rows summed (``extra["rows"]``, by which
        :meth:`fit_experts` divides it)."""
        merged = set(keys)
        layers = {
            name: layer
            for name, layer in module.named_modules()
            if isinstance(layer, nn.Linear) and weight_name(name) in merged
        }
        grams: dict[str, Tensor] = {}
        rows: dict[str, int] = {}

        def recorder(name: str) -> Any:
            def record(
                layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
            ) -> None:
                x = args[0] if args else kwargs["input"]
                flat = x.detach().reshape(-1, x.shape[-1])
                flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
                gram = flat.T @ flat
                grams[name] = grams[name] + gram if name in grams else gram
                rows[name] = rows.get(name, 0) + flat.shape[0]

            return record

        handles = [
            layer.register_forward_hook(recorder(name), with_kwargs=True)
            for name, layer in layers.items()
        ]
        device = module_device(module)
        count = 0
        try:
            with torch.no_grad():
                for inputs in batches:
                    inputs.to(device).call(module)
                    count += inputs.size
        finally:
            for handle in handles:
                handle.remove()
        return Statistics(grams, {"examples": count, "rows": rows})

    def fit_experts(
        self, experts: Experts, cache: str | Path | None, seed: int
    ) -> dict[str, Tensor]:
        grams = [  # each task's mean over its rows (module docstring)
            {name: gram / max(stats.extra["rows"][name], 1) for name, gram in stats.tensors.items()}
            for stats in self.statistics(experts, cache, seed)
        ]
        merged: dict[str, Tensor] = {}
        for key in experts.keys:
            tensors = [m[key] for m in experts.models]
            layer = layer_name(key)
            if layer is not None and any(layer in g for g in grams):
                present = next(g[layer] for g in grams if layer in g)
                if tensors[0].ndim != 2 or tensors[0].shape[1] != present.shape[0]:
                    raise ConfigError(
                        f"regmean: '{key}' has shape {tuple(tensors[0].shape)} but its layer's "
                        f"inputs have {present.shape[0]} features"
                    )
                task_grams = [g.get(layer, torch.zeros_like(present)) for g in grams]
                merged[key] = regmean_weight(tensors, task_grams, self.alpha)
            else:
                merged[key] = average(tensors)
        return merged
