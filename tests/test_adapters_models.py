"""Every adapter method on tiny models built from configs (no download): BERT (Linear layers),
GPT-2 (``Conv1D`` layers) and a plain MLP.

What is shown for each method: a freshly injected adapter leaves the output unchanged; a batch
that mixes tasks gives each sample the output of a batch of its task alone; merge-and-export
gives the adapted model's outputs (task-routed methods) or refuses (token-routed ones); saving
and loading round-trips.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import manytask.adapters as ad
from manytask import registry
from manytask.errors import ConfigError, DataError, UnknownNameError

transformers = pytest.importorskip("transformers")
_ = transformers.BertModel, transformers.GPT2Model  # import the lazy modules once, up front

TASKS = ["a", "b", "c"]
IDS = torch.tensor([0, 1, 2, 2, 0, 1])
#: small settings per method, so that every test stays fast
SMALL: dict[str, dict] = {
    "lora": {"rank": 2},
    "lora_per_task": {"rank": 2},
    "multilora": {"rank": 2, "modules": 2},
    "mtl_lora": {"rank": 2},
    "moslora": {"rank": 2},
    "molora": {"rank": 2, "experts": 3},
    "hydralora": {"rank": 2, "heads": 2},
    "smora": {"rank": 4, "top_k": 2},
    "poly": {"rank": 2, "skills": 3},
    "mhr": {"rank": 2, "skills": 3, "heads": 2},
    "c_poly": {"rank": 2, "shared_skills": 2},
    "align_lora": {"rank": 2, "dropout": 0.0},
    "scalearn": {"rank": 2},
}
METHODS = sorted(SMALL)
MERGEABLE = [m for m in METHODS if m not in ("molora", "hydralora", "smora")]


def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
    )
    return transformers.BertModel(config).eval()


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=100,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2Model(config).eval()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    )


MODELS = {
    "bert": (bert, ["query", "value"]),
    "gpt2": (gpt2, ["c_attn", "mlp.c_fc"]),
    "mlp": (mlp, ["0", "2", "4"]),
}


def inputs_for(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        return {"input": torch.randn(len(IDS), 8, generator=g)}
    return {"input_ids": torch.randint(0, 100, (len(IDS), 5), generator=g)}


def run(model: nn.Module, inputs: dict[str, torch.Tensor], task_ids=None) -> torch.Tensor:
    extra = {} if task_ids is None else {"task_ids": task_ids}
    out = model(**inputs, **extra)
    return getattr(out, "last_hidden_state", out)


def adapt(kind: str, method: str, **params) -> ad.AdaptedModel:
    build, targets = MODELS[kind]
    adapted = ad.inject(
        build(), method, targets=targets, tasks=TASKS, **{**SMALL[method], **params}
    )
    return adapted.eval()


def randomize(adapted: ad.AdaptedModel, seed: int = 0) -> None:
    """Non-zero values in every adapter tensor, so that equalities below are not 0 = 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted.adapter_layers().values():
            for name, parameter in layer.named_parameters():
                if not name.startswith("base."):
                    parameter.copy_(0.3 * torch.randn(parameter.shape, generator=g))
            for name, buffer in layer.named_buffers():
                if name == "router.bias":  # SMoRA's balancing bias is state too
                    buffer.copy_(0.1 * torch.randn(buffer.shape, generator=g))


def subset(inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {key: value[mask] for key, value in inputs.items()}


# zero initialisation ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_a_fresh_adapter_leaves_the_output_unchanged(method, kind):
    build, targets = MODELS[kind]
    model = build()
    inputs = inputs_for(kind)
    with torch.no_grad():
        reference = run(model, inputs)
    adapted = ad.inject(model, method, targets=targets, tasks=TASKS, **SMALL[method]).eval()
    assert len(adapted.target_names) > 1
    with torch.no_grad():
        out = run(adapted, inputs, IDS)
    assert torch.allclose(out, reference, atol=1e-6)


# mixed-task batches ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_a_mixed_task_batch_gives_each_sample_the_output_of_its_task_alone(method, kind):
    adapted = adapt(kind, method)
    randomize(adapted)
    inputs = inputs_for(kind)
    with torch.no_grad():
        mixed = run(adapted, inputs, IDS)
        for task in range(len(TASKS)):
            mask = torch.eq(IDS, task)
            alone = run(adapted, subset(inputs, mask), task)
            assert torch.allclose(mixed[mask], alone, atol=1e-5), f"task {task}"
        as_a = run(adapted, inputs, 0)
        as_b = run(adapted, inputs, 1)
    # the task changes the output exactly when the method routes by task
    assert (not torch.allclose(as_a, as_b, atol=1e-5)) == adapted.spec.routes_by_task


def test_task_ids_may_be_names_or_indices_and_set_by_a_context():
    adapted = adapt("bert", "mtl_lora")
    randomize(adapted)
    inputs = inputs_for("bert")
    with torch.no_grad():
        by_index = run(adapted, inputs, IDS)
        by_name = run(adapted, inputs, [TASKS[i] for i in IDS.tolist()])
        with adapted.task_ids(IDS):
            by_context = run(adapted.model, inputs)
    assert torch.equal(by_index, by_name)
    assert torch.equal(by_index, by_context)


# merging and export ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_and_export_gives_the_adapted_models_outputs(method, kind):
    adapted = adapt(kind, method).double()  # float64: the comparison is tight
    randomize(adapted)
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs_for(kind).items()}
    for index, task in enumerate(TASKS):
        plain = adapted.export(task)
        assert not any(isinstance(m, ad.AdapterLayer) for m in plain.modules())
        with torch.no_grad():
            expected = run(adapted, inputs, index)
            got = run(plain, inputs)
        assert torch.allclose(got, expected, atol=1e-10), task
    # the plain model has the original parameter names and trainable flags back
    build, _ = MODELS[kind]
    names = [n for n, _ in build().named_parameters()]
    assert [n for n, _ in plain.named_parameters()] == names
    assert all(p.requires_grad for p in plain.parameters())


def test_export_in_place_reuses_the_base_model_and_spends_the_adapted_one():
    adapted = adapt("gpt2", "lora_per_task").double()
    randomize(adapted)
    inputs = inputs_for("gpt2")
    with torch.no_grad():
        expected = run(adapted, inputs, 1)
    base = adapted.model
    plain = adapted.export("b", inplace=True)
    assert plain is base
    with torch.no_grad():
        assert torch.allclose(run(plain, inputs), expected, atol=1e-10)
    with pytest.raises(ConfigError, match="exported in place"):
        run(adapted, inputs, 1)


@pytest.mark.parametrize("method", ["molora", "hydralora", "smora"])
def test_token_routed_methods_refuse_to_merge(method):
    adapted = adapt("bert", method)
    with pytest.raises(ConfigError, match="cannot be merged"):
        adapted.export("a")


def test_a_task_routed_method_needs_the_task_to_export():
    adapted = adapt("mlp", "poly")
    with pytest.raises(ConfigError, match="name the task"):
        adapted.export()
    with pytest.raises(ConfigError, match="unknown task 'z'"):
        adapted.export("z")


def test_a_shared_adapter_exports_without_a_task():
    adapted = adapt("mlp", "lora").double()
    randomize(adapted)
    inputs = {"input": inputs_for("mlp")["input"].double()}
    with torch.no_grad():
        assert torch.allclose(run(adapted.export(), inputs), run(adapted, inputs), atol=1e-10)


# save and load ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_round_trip(method, tmp_path: Path):
    adapted = adapt("bert", method)
    randomize(adapted, seed=4)
    path = ad.save_adapters(adapted, tmp_path, name=f"{method}-v1")
    meta = json.loads((tmp_path / f"{method}-v1.json").read_text())
    assert path.suffix == ".safetensors" and meta["spec"]["method"] == method
    saved = load_file(str(path))
    assert saved and not any(".base." in key for key in saved)  # frozen base weights stay out
    loaded = ad.load_adapters(bert(), tmp_path, name=f"{method}-v1").eval()
    inputs = inputs_for("bert")
    with torch.no_grad():
        assert torch.equal(run(loaded, inputs, IDS), run(adapted, inputs, IDS))
    assert loaded.spec == adapted.spec and loaded.task_names == adapted.task_names


def test_named_adapters_share_a_folder(tmp_path: Path):
    first, second = adapt("mlp", "lora"), adapt("mlp", "poly")
    randomize(first, 1)
    randomize(second, 2)
    ad.save_adapters(first, tmp_path, "first")
    ad.save_adapters(second, tmp_path, "second")
    assert ad.load_adapters(mlp(), tmp_path, "second").spec.method == "poly"
    assert ad.load_adapters(mlp(), tmp_path, "first").spec.method == "lora"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "first.json",
        "first.safetensors",
        "second.json",
        "second.safetensors",
    ]


def test_loading_checks_the_name_the_files_and_the_base_model(tmp_path: Path):
    adapted = adapt("bert", "lora")
    ad.save_adapters(adapted, tmp_path, "ok")
    with pytest.raises(DataError, match="no adapter 'missing'"):
        ad.load_adapters(bert(), tmp_path, "missing")
    with pytest.raises(ConfigError, match="adapter name"):
        ad.save_adapters(adapted, tmp_path, "../escape")
    with pytest.raises(ConfigError, match="does not fit this model"):
        ad.load_adapters(mlp(), tmp_path, "ok")
    wider = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=2
        )
    )
    with pytest.raises(ConfigError, match="saved for"):
        ad.load_adapters(wider, tmp_path, "ok")


def test_trainable_modules_train_and_are_saved_with_the_adapter(tmp_path: Path):
    adapted = ad.inject(bert(), "lora", ["query"], TASKS, trainable=["pooler.dense"], rank=2)
    pooler = adapted.model.pooler.dense
    assert all(p.requires_grad for p in pooler.parameters())
    assert "pooler.dense.weight" in adapted.adapter_state_dict()
    with torch.no_grad():
        pooler.weight.add_(1.0)
    ad.save_adapters(adapted, tmp_path)
    loaded = ad.load_adapters(bert(), tmp_path)
    assert torch.equal(loaded.model.pooler.dense.weight, pooler.weight)


# freezing and injection ------------------------------------------------------------------
def test_base_weights_are_frozen_and_only_the_adapters_get_gradients():
    adapted = adapt("bert", "mtl_lora")
    adapted.train()
    adapter = set(map(id, adapted.adapter_parameters()))
    assert adapter and all(p.requires_grad == (id(p) in adapter) for p in adapted.parameters())
    run(adapted, inputs_for("bert"), IDS).pow(2).sum().backward()
    assert all(p.grad is None for p in adapted.parameters() if id(p) not in adapter)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapted.adapter_parameters())


def test_a_regex_target_selects_whole_module_names():
    adapted = ad.inject(bert(), "lora", r".*attention\.self\.(query|key)", TASKS)
    assert adapted.target_names == [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.key",
        "encoder.layer.1.attention.self.query",
        "encoder.layer.1.attention.self.key",
    ]


def test_a_target_that_matches_nothing_lists_the_module_names():
    with pytest.raises(ConfigError, match="matches no module") as info:
        ad.inject(bert(), "lora", ["query", "qurey"], TASKS)
    assert "'qurey'" in str(info.value)
    assert "encoder.layer.0.attention.self.query" in str(info.value)


def test_a_target_that_matches_only_other_layers_says_what_adapters_wrap():
    with pytest.raises(ConfigError, match=r"LayerNorm.*Linear and transformers' Conv1D"):
        ad.inject(bert(), "lora", ["attention.output.LayerNorm"], TASKS)


def test_injecting_twice_is_an_error():
    adapted = adapt("mlp", "lora")
    with pytest.raises(ConfigError, match="already holds adapter layers"):
        ad.inject(adapted.model, "lora", ["0"], TASKS)


def test_unknown_methods_and_parameters_list_the_valid_ones():
    with pytest.raises(UnknownNameError, match="Did you mean 'molora'"):
        ad.inject(mlp(), "molra", ["0"], TASKS)
    with pytest.raises(ConfigError, match="rnak"):
        ad.inject(mlp(), "lora", ["0"], TASKS, rnak=4)
    with pytest.raises(ConfigError, match="rank must be ≥ 1"):
        ad.inject(mlp(), "lora", ["0"], TASKS, rank=0)
    with pytest.raises(ConfigError, match="top_k=9 is more than the 4 experts"):
        ad.inject(mlp(), "smora", ["0"], TASKS, rank=4, top_k=9)
    with pytest.raises(ConfigError, match="heads=3 must divide both"):
        ad.inject(mlp(), "mhr", ["2"], TASKS, heads=3)
    with pytest.raises(ConfigError, match="unique"):
        ad.inject(mlp(), "lora", ["0"], ["a", "a"])


def test_task_ids_are_checked():
    adapted = adapt("mlp", "poly")
    x = inputs_for("mlp")
    with pytest.raises(ConfigError, match="no task ids were set"):
        run(adapted, x)
    with pytest.raises(ConfigError, match="6 samples but 2 task ids"):
        run(adapted, x, [0, 1])
    with pytest.raises(ConfigError, match=r"must be in \[0, 3\)"):
        run(adapted, x, torch.full((6,), 3))
    with pytest.raises(ConfigError, match="unknown task 'z'"):
        run(adapted, x, "z")
    with pytest.raises(ConfigError, match="integer tensor"):
        run(adapted, x, torch.zeros(6))


def test_align_lora_training_needs_task_ids():
    adapted = adapt("mlp", "align_lora").train()
    with pytest.raises(ConfigError, match="alignment loss compares tasks"):
        run(adapted, inputs_for("mlp"))


# two-stage ScaLearn ----------------------------------------------------------------------
def test_scalearn_second_stage_reuses_trained_per_task_loras():
    per_task = adapt("bert", "lora_per_task")
    randomize(per_task, seed=7)
    scaled = adapt("bert", "scalearn")
    scaled.copy_experts_from(per_task)
    with torch.no_grad():
        for layer in scaled.adapter_layers().values():
            onehot = torch.eye(3)[:, None, :, None].expand_as(layer.router.table)
            layer.router.table.copy_(onehot)  # ω_{t,k} = [k = t]: each task uses its own LoRA
    inputs = inputs_for("bert")
    with torch.no_grad():
        assert torch.allclose(run(scaled, inputs, IDS), run(per_task, inputs, IDS), atol=1e-6)
    assert set(map(id, scaled.adapter_parameters())) == {
        id(layer.router.table) for layer in scaled.adapter_layers().values()
    }


def test_copying_experts_needs_the_same_layers_and_shapes():
    with pytest.raises(ConfigError, match="same rank"):
        adapt("mlp", "scalearn").copy_experts_from(adapt("mlp", "lora_per_task", rank=3))


# listing ---------------------------------------------------------------------------------
def test_every_registered_method_is_tested_here():
    assert sorted(registry.names("adapter")) == METHODS


def test_manytask_list_shows_at_least_twelve_adapter_methods(capsys):
    from manytask.cli import main

    assert main(["list", "adapters"]) == 0
    shown = capsys.readouterr().out
    assert f"adapters ({len(METHODS)})" in shown and len(METHODS) >= 12
    assert all(name in shown for name in METHODS)
