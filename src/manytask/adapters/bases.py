"""The frozen layers an adapter can wrap: :class:`torch.nn.Linear` and GPT-2-style ``Conv1D``.

A ``Linear`` stores its weight as ``(out, in)`` and computes ``x Wᵀ + b``; the ``Conv1D`` of
Hugging Face transformers (GPT-2, GPT-J's ancestors, …) stores it as ``(in, out)`` and computes
``x W + b``. The adapter works with ``(out, in)`` deltas; this module hides the difference, and
recognises ``Conv1D`` by its shape and attributes so that transformers stays optional.
"""

from __future__ import annotations

from torch import Tensor, nn

SUPPORTED = "torch.nn.Linear and transformers' Conv1D"


def is_conv1d(module: nn.Module) -> bool:
    """True for a transformers ``Conv1D`` (weight ``(in, out)``, attribute ``nf`` = out)."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, Tensor)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def kind_of(module: nn.Module) -> str:
    """``"Linear"`` or ``"Conv1D"``: the name saved with an adapter to check it on load."""
    return "Conv1D" if is_conv1d(module) else "Linear"


def features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an adaptable layer."""
    weight = module.weight
    assert isinstance(weight, Tensor)
    if is_conv1d(module):
        return int(weight.shape[0]), int(weight.shape[1])
    return int(weight.shape[1]), int(weight.shape[0])


def add_delta_(module: nn.Module, delta: Tensor) -> None:
    """``W ← W + ΔW`` in place, for a delta given as ``(out, in)``."""
    weight = module.weight
    assert isinstance(weight, Tensor)
    oriented = delta.t() if is_conv1d(module) else delta
    weight.data.add_(oriented.to(dtype=weight.dtype, device=weight.device))
