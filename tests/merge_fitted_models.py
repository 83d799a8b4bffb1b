"""Tiny task models and data for the tests of the fitted merging rules."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


class Net(nn.Module):
    """A shared encoder (the merged part) and one task's head; counts its forward calls."""

    calls = 0

    def __init__(self, classes: int = 3, features: int = 4, hidden: int = 5) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, hidden)
        )
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        Net.calls += 1
        return self.head(self.encoder(x))


@dataclass
class Setup:
    base: dict[str, Tensor]
    models: list[dict[str, Tensor]]
    heads: list[dict[str, Tensor]]
    data: list[list[Tensor]]

    def factory(self, task: int) -> Net:
        net = Net(classes=self.heads[task]["weight"].shape[0])
        net.head.load_state_dict(self.heads[task])
        return net


def encoder_state(net: Net) -> dict[str, Tensor]:
    return {f"encoder.{k}": v.detach().clone() for k, v in net.encoder.state_dict().items()}


def setup(tasks: int = 2, seed: int = 0, batches: int = 3, batch: int = 4) -> Setup:
    """A random base encoder, ``tasks`` fine-tuned encoders near it, heads and data, all drawn
    from one seeded generator (the global RNG is left alone)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in encoder_state(Net()).items()}
    base = {k: 0.5 * torch.randn(shape, generator=g) for k, shape in shapes.items()}
    models = [
        {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        for _ in range(tasks)
    ]
    heads = [
        {"weight": torch.randn(3 + t, 5, generator=g), "bias": torch.randn(3 + t, generator=g)}
        for t in range(tasks)
    ]
    data = [[torch.randn(batch, 4, generator=g) for _ in range(batches)] for _ in range(tasks)]
    return Setup(base, models, heads, data)


# named as `module:function` by the merge configs of tests/test_merge_fitted_cli.py
CLI_SETUP = setup(tasks=2, seed=0)


def cli_factory(task: int) -> Net:
    return CLI_SETUP.factory(task)


def cli_data() -> list[list[Tensor]]:
    return CLI_SETUP.data


def cli_data_for_one_model() -> list[list[Tensor]]:
    return CLI_SETUP.data[:1]
