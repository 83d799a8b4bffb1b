"""Task heads: a small MLP per task on top of the shared features."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from manytask.nn.encoders import mlp_layers


class TaskHead(nn.Module):
    """``hidden`` layers then a linear output of ``output_dim``; a width-1 output is squeezed
    to ``(B,)`` so that it lines up with a vector of targets."""

    def __init__(self, in_features: int, output_dim: int, hidden: Sequence[int] = ()) -> None:
        super().__init__()
        self.body = mlp_layers(in_features, hidden)
        self.out = nn.Linear(hidden[-1] if hidden else in_features, output_dim)
        self.output_dim = output_dim

    def forward(self, features: Tensor) -> Tensor:
        out: Tensor = self.out(self.body(features))
        return out.squeeze(-1) if self.output_dim == 1 else out
