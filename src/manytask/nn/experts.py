"""A bank of E expert MLPs evaluated together: one batched product per layer.

Every mixture-of-experts architecture in manytask holds its experts in an :class:`ExpertBank`.
Layer ``l`` of expert ``e`` is ``h ↦ act(h W[e] + b[e])`` with ``W`` stacked as an
``(E, in, out)`` parameter, so the E experts of a layer cost one ``einsum`` (a matrix product
or a batched one), never a Python loop over the experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from manytask.errors import ConfigError
from manytask.nn.encoders import activation as make_activation


class ExpertNorm(nn.BatchNorm1d):
    """Batch normalisation of every expert's outputs (one set of statistics per expert and
    feature), for inputs ``(B, E, d)``.

    A batch of one sample in training mode has no batch statistics; such a batch is normalised
    with the running statistics instead (as in evaluation), so that batch size 1 works.
    """

    def __init__(self, num_experts: int, features: int) -> None:
        super().__init__(num_experts * features)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        batch_stats = self.training and x.shape[0] > 1
        momentum = 0.0 if self.momentum is None else self.momentum
        if batch_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        out = F.batch_norm(
            flat,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=batch_stats,
            momentum=momentum,
            eps=self.eps,
        )
        return out.view_as(x)


class ExpertBank(nn.Module):
    """``E`` experts, each an MLP with the same widths, held as stacked weights.

    Expert ``e`` maps ``x`` through ``Linear → activation (→ dropout)`` for every width in
    ``hidden`` (like :func:`manytask.nn.encoders.mlp_layers`); with ``norm=True`` the last
    linear output is batch-normalised per expert before its activation (HoME's expert
    normalisation). Each expert is initialised like a fresh :class:`torch.nn.Linear` per layer
    (weights and biases uniform in ``±1/√fan_in``), so the bank behaves like E separate MLPs.

    Args:
        num_experts: ``E ≥ 1``.
        in_features: width of each expert's input.
        hidden: layer widths of each expert; the last is ``out_features``.
        activation: one of relu, gelu, silu, tanh.
        dropout: dropout after each activation, in ``[0, 1)``.
        norm: batch-normalise the last layer's outputs (per expert) before the activation.

    Input ``(B, in)`` feeds the same vector to every expert; ``(B, E, in)`` gives each expert
    its own. Output ``(B, E, out_features)``.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        hidden: Sequence[int],
        activation: str = "relu",
        dropout: float = 0.0,
        norm: bool = False,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ConfigError(f"an expert bank needs num_experts ≥ 1, got {num_experts}")
        if not hidden:
            raise ConfigError("experts need at least one hidden width (expert_hidden)")
        if any(width < 1 for width in hidden):
            raise ConfigError(f"expert widths must be ≥ 1, got {list(hidden)}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = hidden[-1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        width = in_features
        for size in hidden:
            self.weights.append(nn.Parameter(torch.empty(num_experts, width, size)))
            self.biases.append(nn.Parameter(torch.empty(num_experts, size)))
            width = size
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.norm = ExpertNorm(num_experts, self.out_features) if norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in ``±1/√fan_in`` for weights and biases, as :class:`torch.nn.Linear`."""
        for weight, bias in zip(self.weights, self.biases, strict=True):
            bound = 1.0 / math.sqrt(weight.shape[1])
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)
        if self.norm is not None:
            self.norm.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            if x.shape[1] != self.in_features:
                raise ValueError(f"expected (B, {self.in_features}) inputs, got {tuple(x.shape)}")
        elif x.dim() != 3 or x.shape[1:] != (self.num_experts, self.in_features):
            raise ValueError(
                f"expected (B, {self.in_features}) or (B, {self.num_experts}, "
                f"{self.in_features}) inputs, got {tuple(x.shape)}"
            )
        h = x
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            if h.dim() == 2:  # one input for all experts: a single matrix product
                h = torch.einsum("bi,eio->beo", h, weight) + bias
            else:  # one input per expert: a batched matrix product over the experts
                h = torch.einsum("bei,eio->beo", h, weight) + bias
            if i == last and self.norm is not None:
                h = self.norm(h)
            h = self.dropout(self.act(h))
        return h

    def extra_repr(self) -> str:
        widths = [w.shape[2] for w in self.weights]
        return f"num_experts={self.num_experts}, in_features={self.in_features}, hidden={widths}"
