"""Helpers for the merge-rule tests: run a rule the way the engine does, on small tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

import manytask.merge.methods  # noqa: F401  (registers the rules)
from manytask.merge.rule import Merged, MergeRule


def t(*values: float) -> Tensor:
    """A float32 vector."""
    return torch.tensor(values, dtype=torch.float32)


def run(
    rule: MergeRule,
    base: Tensor | None,
    models: Sequence[Tensor],
    seed: int = 0,
    name: str = "w",
) -> Tensor | Merged:
    """One tensor through ``rule`` as the engine streams it: check, observe (two-pass), merge."""
    return run_many(rule, {name: (base, list(models))}, seed)[name]


def run_many(
    rule: MergeRule,
    tensors: Mapping[str, tuple[Tensor | None, Sequence[Tensor]]],
    seed: int = 0,
) -> dict[str, Tensor | Merged]:
    """Several tensor names through ``rule``; the generator is seeded per name from ``seed``."""
    for _, models in tensors.values():
        rule.check_models(len(models))
    if rule.two_pass:
        for name, (base, models) in tensors.items():
            rule.observe(name, _input(base, rule), [m.clone() for m in models])
    out: dict[str, Tensor | Merged] = {}
    for index, (name, (base, models)) in enumerate(tensors.items()):
        generator = torch.Generator().manual_seed(seed * 1000 + index)
        out[name] = rule.merge_tensor(
            name, _input(base, rule), [m.clone() for m in models], generator
        )
    return out


def _input(base: Tensor | None, rule: MergeRule) -> Tensor | None:
    return base.clone() if base is not None and rule.needs_base else None


def tensor_of(result: Tensor | Merged) -> Tensor:
    """The merged tensor, whether the rule returned a tensor or a :class:`Merged`."""
    return result.tensor if isinstance(result, Merged) else result


def close(actual: Tensor | Merged, expected: Sequence[float] | Tensor, tol: float = 1e-5) -> None:
    """Assert the merged tensor equals ``expected`` (float32, same shape) within ``tol``."""
    tensor = tensor_of(actual)
    want = torch.as_tensor(expected, dtype=torch.float32)
    assert tensor.dtype == torch.float32
    assert tensor.shape == want.shape, (tensor.shape, want.shape)
    torch.testing.assert_close(tensor, want, rtol=tol, atol=tol)
