"""Shared encoders: an MLP for vectors and a small CNN for images.

Each encoder maps a batch of inputs to ``(B, out_features)`` features and is registered by name
(``model.encoder.name`` in a config). Builders take the input shape of one sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from manytask import registry
from manytask.errors import ConfigError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation '{name}'; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def mlp_layers(
    in_features: int, hidden: Sequence[int], act: str = "relu", dropout: float = 0.0
) -> nn.Sequential:
    """Linear → activation (→ dropout) for each width in ``hidden``."""
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        if size < 1:
            raise ConfigError(f"layer widths must be ≥ 1, got {list(hidden)}")
        layers += [nn.Linear(width, size), activation(act)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """An encoder: ``forward(x) -> (B, out_features)``."""

    out_features: int


@registry.register("encoder", "mlp", "multi-layer perceptron on flattened inputs")
class MLPEncoder(Encoder):
    """Flatten the input, then ``Linear → activation`` layers.

    Args:
        input_shape: shape of one input sample.
        hidden: layer widths; the last is ``out_features``.
        activation: one of relu, gelu, silu, tanh.
        dropout: dropout after each activation.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        hidden: list[int] = [256, 128],  # noqa: B006 - read-only default, shown in `manytask list`
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not hidden:
            raise ConfigError("the mlp encoder needs at least one hidden width")
        self.layers = mlp_layers(math.prod(input_shape), hidden, activation, dropout)
        self.out_features = hidden[-1]

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.layers(x.flatten(1))
        return out


@registry.register("encoder", "cnn", "small CNN: conv-relu-maxpool blocks and a linear layer")
class CNNEncoder(Encoder):
    """``[conv k×k → ReLU → max-pool 2]`` per entry of ``channels``, then a linear layer.

    Args:
        input_shape: ``(C, H, W)`` of one image.
        channels: output channels of each convolution block.
        kernel_size: convolution kernel size (``same`` padding).
        hidden: width of the final linear layer (``out_features``).
        dropout: dropout before the final linear layer.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        channels: list[int] = [16, 32],  # noqa: B006
        kernel_size: int = 5,
        hidden: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(
                "the cnn encoder needs image inputs (C, H, W); "
                f"this dataset gives {tuple(input_shape)}"
            )
        if kernel_size % 2 == 0:
            raise ConfigError(f"cnn kernel_size must be odd, got {kernel_size}")
        c, h, w = input_shape
        blocks: list[nn.Module] = []
        for out in channels:
            blocks += [
                nn.Conv2d(c, out, kernel_size, padding=kernel_size // 2),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c, h, w = out, h // 2, w // 2
        if h < 1 or w < 1:
            raise ConfigError(
                f"too many cnn blocks ({len(channels)}) for {tuple(input_shape)} inputs"
            )
        self.conv = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Sequential(nn.Linear(c * h * w, hidden), nn.ReLU())
        self.out_features = hidden

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc(self.dropout(self.conv(x).flatten(1)))
        return out
