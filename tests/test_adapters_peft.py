"""manytask's adapters against PEFT's implementations of the same methods, on identical weights.

PEFT implements LoRA (for ``Linear`` and GPT-2's ``Conv1D``) and Polytropon with multi-head
routing (``PolyConfig``, ``n_splits`` heads). The weights of manytask's adapter are copied into
PEFT's modules and both models must give the same outputs to 1e-6. ``make test`` installs PEFT
with ``--no-deps``; without it these tests are skipped, saying why.
"""

from __future__ import annotations

import copy

import pytest
import torch

import manytask.adapters as ad

from .peers import require
from .test_adapters_models import bert, gpt2, randomize

transformers = pytest.importorskip("transformers")
IDS = torch.tensor([0, 2, 1, 1, 0])


def tokens(batch: int = 5, length: int = 6) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(3))


def hidden(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens(), **kwargs).last_hidden_state


@pytest.mark.parametrize(
    ("build", "targets", "fan_in_fan_out"),
    [(bert, ["query", "value"], False), (gpt2, ["c_attn", "c_fc"], True)],
    ids=["bert-linear", "gpt2-conv1d"],
)
def test_lora_equals_peft_lora_on_identical_weights(build, targets, fan_in_fan_out):
    peft = require("peft")
    base = build()
    ours = ad.inject(copy.deepcopy(base), "lora", targets, tasks=["t"], rank=4, alpha=8.0).eval()
    randomize(ours)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, fan_in_fan_out=fan_in_fan_out
    )
    theirs = peft.get_peft_model(base, config).eval()
    inner = theirs.base_model.model
    for name, layer in ours.adapter_layers().items():
        module = inner.get_submodule(name)
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(layer.down[0])  # (r, in)
            module.lora_B["default"].weight.copy_(layer.up[0])  # (out, r)
    assert torch.allclose(hidden(ours), hidden(theirs), atol=1e-6)
    assert not torch.allclose(hidden(ours), hidden(build()), atol=1e-3)  # the adapter acts


@pytest.mark.parametrize("heads", [1, 2], ids=["poly", "mhr"])
def test_poly_and_mhr_equal_peft_poly_on_identical_weights_with_a_mixed_task_batch(heads):
    peft = require("peft")
    base = bert()
    method, extra = ("poly", {}) if heads == 1 else ("mhr", {"heads": heads})
    ours = ad.inject(
        copy.deepcopy(base), method, ["query", "value"], ["a", "b", "c"], skills=3, rank=2, **extra
    ).eval()
    randomize(ours)
    config = peft.PolyConfig(
        r=2, target_modules=["query", "value"], n_tasks=3, n_skills=3, n_splits=heads
    )
    theirs = peft.get_peft_model(base, config).eval()
    inner = theirs.base_model.model
    for name, layer in ours.adapter_layers().items():
        module = inner.get_submodule(name)
        skills, rank, d_in = layer.down.shape
        d_out = layer.up.shape[1]
        # ours: A (skills, r, in), B (skills, out, r), logits (tasks, heads, skills)
        # PEFT: A (heads, skills, in/heads, r), B (heads, skills, r, out/heads), (tasks, h·s)
        a = layer.down.view(skills, rank, heads, d_in // heads).permute(2, 0, 3, 1)
        b = layer.up.view(skills, heads, d_out // heads, rank).permute(1, 0, 3, 2)
        with torch.no_grad():
            module.poly_lora_A["default"].copy_(a)
            module.poly_lora_B["default"].copy_(b)
            module.poly_router["default"].module_logits.copy_(layer.router.table.flatten(1))
    ours_out = hidden(ours, task_ids=IDS)
    # PolyModel (theirs.base_model) hands the task ids to its layers
    assert torch.allclose(ours_out, hidden(theirs.base_model, task_ids=IDS), atol=1e-6)
    assert not torch.allclose(ours_out, hidden(ours, task_ids=torch.zeros(5, dtype=torch.long)))
