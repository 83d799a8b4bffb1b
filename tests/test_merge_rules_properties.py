"""Properties every data-free merging rule keeps, checked on all of them with their defaults:
shape and dtype, the base when nothing changed, untouched inputs, reproducible randomness,
registry and documentation in step with the code."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch

from manytask import registry
from manytask.errors import ConfigError
from manytask.merge.rule import Merged, MergeRule
from tests.merge_rules import run, tensor_of

DOCS = Path(__file__).resolve().parents[1] / "docs" / "merge-rules.md"
PACKAGE = "manytask.merge.methods"
RULES = sorted(
    entry.name
    for entry in registry.entries("merge_rule")
    if entry.obj.__module__.startswith(PACKAGE)
)
#: the rules that draw from the engine's generator
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}


def build(name: str) -> MergeRule:
    rule = registry.get("merge_rule", name)()
    assert isinstance(rule, MergeRule)
    return rule


def inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and two task models near it (SLERP takes exactly two)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + 0.1 * torch.randn(shape, generator=generator) for _ in range(2)]


def test_at_least_18_data_free_rules_are_registered():
    assert len(RULES) >= 18, RULES


@pytest.mark.parametrize("name", RULES)
def test_rule_name_used_in_errors_is_the_registered_name(name):
    rule_name = getattr(registry.get("merge_rule", name), "rule_name", name)
    assert rule_name == name


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4), (2, 3, 4), (2, 0)])
def test_every_rule_returns_float32_of_the_input_shape(name, shape):
    base, models = inputs(shape)
    result = run(build(name), base, models)
    assert tensor_of(result).dtype == torch.float32
    assert tensor_of(result).shape == shape
    assert torch.isfinite(tensor_of(result)).all()
    if isinstance(result, Merged):
        assert result.extras, "a Merged result carries side outputs"
        for mask in result.extras.values():
            assert mask.shape == shape
            assert mask.dtype == torch.bool


@pytest.mark.parametrize("name", RULES)
def test_every_rule_returns_the_base_when_every_model_is_the_base(name):
    base, _ = inputs((4, 5))
    result = tensor_of(run(build(name), base, [base.clone(), base.clone()]))
    torch.testing.assert_close(result, base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", RULES)
def test_every_rule_leaves_its_input_tensors_unchanged(name):
    base, models = inputs((3, 8))
    kept_base, kept_models = base.clone(), [m.clone() for m in models]
    rule = build(name)
    rule.check_models(len(models))
    given_base = base if rule.needs_base else None
    if rule.two_pass:
        rule.observe("w", given_base, models)
    rule.merge_tensor("w", given_base, models, torch.Generator().manual_seed(0))
    assert torch.equal(base, kept_base)
    assert all(torch.equal(m, k) for m, k in zip(models, kept_models, strict=True))


@pytest.mark.parametrize("name", RULES)
def test_only_the_random_rules_depend_on_the_seed(name):
    base, models = inputs((16, 16))
    first = tensor_of(run(build(name), base, models, seed=0))
    again = tensor_of(run(build(name), base, models, seed=0))
    other = tensor_of(run(build(name), base, models, seed=1))
    assert torch.equal(first, again)
    assert torch.equal(first, other) == (name not in RANDOM)


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_random_rules_give_the_same_merge_on_any_number_of_threads(name):
    base, models = inputs((64, 64))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tensor_of(run(build(name), base, models, seed=4))
        torch.set_num_threads(2)
        two = tensor_of(run(build(name), base, models, seed=4))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("name", RULES)
def test_every_rule_module_cites_its_paper_and_its_defaults(name):
    module = sys.modules[registry.get("merge_rule", name).__module__]
    doc = module.__doc__ or ""
    assert "arXiv:" in doc or "Shoemake" in doc, name
    parameters = [p for p in inspect.signature(registry.get("merge_rule", name)).parameters]
    if parameters:
        assert "Defaults" in doc or "default" in doc, name


def _docs_row(name: str) -> str:
    table = DOCS.read_text(encoding="utf-8").split("## ", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith(f"| `{name}` |")]
    assert len(rows) == 1, f"add one row for `{name}` to the table in {DOCS.name}"
    return rows[0]


@pytest.mark.parametrize("name", RULES)
def test_docs_table_lists_every_rule_with_its_defaults(name):
    row = _docs_row(name)
    signature = inspect.signature(registry.get("merge_rule", name))
    for parameter in signature.parameters.values():
        if parameter.default is not None:
            assert f"`{parameter.name}={parameter.default!r}`" in row, (name, parameter.name)


def test_config_parameters_are_checked_against_the_rule_signature():
    rule = registry.call_with_params("merge_rule", "ties", {"density": 0.5, "weights": [1, 2]})
    assert rule.density == 0.5
    assert rule.weights == (1.0, 2.0)
    with pytest.raises(ConfigError, match="trim"):
        registry.call_with_params("merge_rule", "ties", {"trim": 0.5})
    with pytest.raises(ConfigError, match="density"):
        registry.call_with_params("merge_rule", "ties", {"density": "most"})
    with pytest.raises(ConfigError, match="multi_task"):
        registry.call_with_params("merge_rule", "tall_masks", {"multi_task": "sum"})
    masks = registry.call_with_params("merge_rule", "tall_masks", {"mask_lambda": [0.2, 0.5]})
    assert masks.mask_lambda == (0.2, 0.5)
