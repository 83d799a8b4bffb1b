"""Checkpoint I/O for merging: lazy readers, LoRA deltas, pickle refusal, atomic sharded writes."""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from manytask.errors import ConfigError, DataError, ManytaskError, RunExistsError
from manytask.merge.config import parse_size
from manytask.merge.io import (
    AdaptedModelSource,
    LoraAdapterSource,
    SafetensorsSource,
    ShardedSource,
    ShardWriter,
    StateDictSource,
    convert_pickle_checkpoint,
    default_model_name,
    load_pickle_weights,
    open_checkpoint,
    shard_sizes,
    staged_directory,
    write_checkpoint,
)


def tensors() -> dict[str, torch.Tensor]:
    return {
        "z.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a.bias": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "m.count": torch.tensor(7, dtype=torch.int64),
    }


def test_safetensors_source_gives_names_shapes_and_dtypes_from_the_header(tmp_path):
    save_file(tensors(), str(tmp_path / "m.safetensors"))
    with SafetensorsSource(tmp_path / "m.safetensors") as source:
        assert set(source.keys()) == set(tensors())
        info = source.info("z.weight")
        assert info.shape == (2, 3) and info.dtype == torch.float32 and info.nbytes == 24
        assert source.info("a.bias").dtype == torch.bfloat16
        assert source.info("m.count").shape == () and not source.info("m.count").is_floating
        for name, tensor in tensors().items():
            assert torch.equal(source.get(name), tensor)
        with pytest.raises(DataError, match="tensor 'nope' is not in"):
            source.get("nope")


def test_a_file_that_is_not_safetensors_is_a_data_error_naming_it(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="bad.safetensors' is not a readable safetensors file"):
        SafetensorsSource(bad)


def write_sharded(folder: Path) -> dict[str, torch.Tensor]:
    full = tensors()
    save_file({"z.weight": full["z.weight"]}, str(folder / "s-1.safetensors"))
    save_file({k: full[k] for k in ("a.bias", "m.count")}, str(folder / "s-2.safetensors"))
    weight_map = {"z.weight": "s-1.safetensors", "a.bias": "s-2.safetensors"}
    weight_map["m.count"] = "s-2.safetensors"
    (folder / "m.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return full


def test_safetensors_reads_are_fresh_buffers_in_every_dtype_and_shape(tmp_path):
    stored = {
        "bf": torch.randn(3, 5).to(torch.bfloat16),
        "half": torch.randn(4).half(),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
        "u8": torch.arange(7, dtype=torch.uint8),
    }
    save_file(stored, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    with SafetensorsSource(tmp_path / "m.safetensors") as source:
        for name, tensor in stored.items():
            read = source.get(name)
            assert read.dtype == tensor.dtype and read.shape == tensor.shape
            assert torch.equal(read, tensor)
        first = source.get("bf")
        first.zero_()  # the reader hands out its own buffer: a later read is unaffected
        assert torch.equal(source.get("bf"), stored["bf"])
        buffer = torch.empty(64, dtype=torch.uint8)
        read = source.read_into("bf", buffer)  # a view of the caller's buffer
        assert torch.equal(read, stored["bf"]) and read.data_ptr() == buffer.data_ptr()
        with pytest.raises(ManytaskError, match="needs a 1-D uint8 buffer of at least"):
            source.read_into("bf", torch.empty(8, dtype=torch.uint8))
    with pytest.raises(ManytaskError, match="was closed"):
        source.get("bf")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[:5], "fewer than a header needs"),
        (lambda raw: (10**9).to_bytes(8, "little") + raw[8:], "exceeds the file's size"),
        (lambda raw: raw[:-4], "ends past the end of the file"),
    ],
)
def test_a_damaged_safetensors_file_is_an_error_saying_what_is_wrong(tmp_path, damage, message):
    save_file({"w": torch.ones(4)}, str(tmp_path / "m.safetensors"))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(damage((tmp_path / "m.safetensors").read_bytes()))
    with pytest.raises(DataError, match=message):
        SafetensorsSource(broken)


def test_a_header_whose_offsets_disagree_with_shape_and_dtype_is_refused(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(DataError, match=r"tensor 'w' has shape \[3\] and dtype F32 \(12 bytes\)"):
        SafetensorsSource(path)


def test_sharded_source_reads_every_tensor_through_the_index(tmp_path):
    full = write_sharded(tmp_path)
    with open_checkpoint(tmp_path / "m.safetensors.index.json") as source:
        assert isinstance(source, ShardedSource)
        assert source.keys()[0] == "z.weight"  # shards in file-name order
        assert set(source.keys()) == set(full)
        for name, tensor in full.items():
            assert torch.equal(source.get(name), tensor)
            assert source.info(name).shape == tuple(tensor.shape)


def test_sharded_index_naming_a_missing_shard_or_tensor_is_an_error(tmp_path):
    write_sharded(tmp_path)
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"z.weight": "gone.safetensors"}}))
    with pytest.raises(DataError, match="shard 'gone.safetensors' listed in index"):
        ShardedSource(index)
    index.write_text(json.dumps({"weight_map": {"q": "s-1.safetensors"}}))
    with pytest.raises(DataError, match="places tensor 'q' in shard 's-1.safetensors'"):
        ShardedSource(index)
    index.write_text(json.dumps({"shards": []}))
    with pytest.raises(DataError, match='must hold a "weight_map"'):
        ShardedSource(index)


def test_folder_with_a_hugging_face_layout_opens_its_checkpoint(tmp_path):
    save_file(tensors(), str(tmp_path / "model.safetensors"))
    with open_checkpoint(tmp_path) as source:
        assert set(source.keys()) == set(tensors())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no checkpoint: expected model.safetensors"):
        open_checkpoint(empty)


def test_state_dict_source_detaches_and_refuses_non_tensors():
    weight = torch.nn.Parameter(torch.ones(2))
    source = StateDictSource({"w": weight})
    assert not source.get("w").requires_grad
    with pytest.raises(DataError, match="entry 'x' is a list"):
        StateDictSource({"x": [1, 2]})  # type: ignore[dict-item]


def test_default_model_names_come_from_files_or_their_folders(tmp_path):
    assert default_model_name("ckpt/sst2.safetensors") == "sst2"
    assert default_model_name("ckpt/mnli/model.safetensors") == "mnli"
    assert default_model_name("ckpt/mnli/model.safetensors.index.json") == "mnli"
    assert default_model_name(tmp_path) == tmp_path.name


# ----------------------------------------------------------------------------------------------
# LoRA adapters


def write_adapter(
    folder: Path, factors: dict[str, torch.Tensor], config: dict[str, object]
) -> Path:
    folder.mkdir(parents=True)
    save_file(factors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return folder


def test_lora_delta_is_alpha_over_r_times_b_times_a_under_the_base_weight_name(tmp_path):
    a = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])  # r=2, in=3
    b = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, -1.0], [1.0, 0.0]])  # out=4
    folder = write_adapter(
        tmp_path / "ad",
        {
            "base_model.model.enc.q.lora_A.weight": a,
            "base_model.model.enc.q.lora_B.weight": b,
        },
        {"r": 2, "lora_alpha": 8},
    )
    with LoraAdapterSource(folder) as adapter:
        assert adapter.keys() == ["enc.q.weight"]
        assert adapter.info("enc.q.weight").shape == (4, 3)
        expected = 4.0 * torch.tensor(
            [[1.0, 1.0, 1.0], [2.0, 0.0, 4.0], [0.0, -1.0, 1.0], [1.0, 0.0, 2.0]]
        )
        assert torch.equal(adapter.get("enc.q.weight"), expected)


def test_lora_rslora_scales_by_alpha_over_sqrt_r(tmp_path):
    a, b = torch.ones(4, 2), torch.ones(3, 4)
    folder = write_adapter(
        tmp_path / "ad",
        {"base_model.model.l.lora_A.weight": a, "base_model.model.l.lora_B.weight": b},
        {"r": 4, "lora_alpha": 6, "use_rslora": True},
    )
    delta = LoraAdapterSource(folder).get("l.weight")
    assert torch.allclose(delta, torch.full((3, 2), 6 / math.sqrt(4) * 4))


def test_lora_embedding_fan_in_fan_out_conv_and_alpha_pattern(tmp_path):
    g = torch.Generator().manual_seed(0)
    ea, eb = torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g)  # 5 tokens, dim 3
    ca, cb = torch.randn(2, 3, 3, 3, generator=g), torch.randn(4, 2, 1, 1, generator=g)
    fa, fb = torch.randn(2, 6, generator=g), torch.randn(7, 2, generator=g)
    prefix = "base_model.model."
    folder = write_adapter(
        tmp_path / "ad",
        {
            f"{prefix}emb.lora_embedding_A": ea,
            f"{prefix}emb.lora_embedding_B": eb,
            f"{prefix}conv.lora_A.weight": ca,
            f"{prefix}conv.lora_B.weight": cb,
        },
        {"r": 2, "lora_alpha": 2, "alpha_pattern": {"conv": 6}},
    )
    adapter = LoraAdapterSource(folder)
    assert torch.allclose(adapter.get("emb.weight"), (eb @ ea).T)  # alpha/r = 1
    conv = 3.0 * torch.einsum("ok,kihw->oihw", cb[:, :, 0, 0], ca)  # alpha_pattern: 6/2
    assert adapter.info("conv.weight").shape == (4, 3, 3, 3)
    assert torch.allclose(adapter.get("conv.weight"), conv, atol=1e-6)
    gpt2 = write_adapter(
        tmp_path / "gpt2",
        {f"{prefix}c_attn.lora_A.weight": fa, f"{prefix}c_attn.lora_B.weight": fb},
        {"r": 2, "lora_alpha": 4, "fan_in_fan_out": True},
    )
    assert torch.allclose(LoraAdapterSource(gpt2).get("c_attn.weight"), 2.0 * (fb @ fa).T)


def test_lora_adapter_refuses_dora_extra_tensors_and_a_wrong_rank(tmp_path):
    p = "base_model.model.l."
    pair = {f"{p}lora_A.weight": torch.ones(2, 3), f"{p}lora_B.weight": torch.ones(4, 2)}
    dora = write_adapter(tmp_path / "dora", pair, {"r": 2, "lora_alpha": 2, "use_dora": True})
    with pytest.raises(DataError, match="DoRA adapter"):
        LoraAdapterSource(dora)
    extra = write_adapter(
        tmp_path / "extra",
        {**pair, "base_model.model.head.modules_to_save.weight": torch.ones(2)},
        {"r": 2, "lora_alpha": 2},
    )
    with pytest.raises(DataError, match=r"holds tensor 'base_model.model.head.modules_to_save"):
        LoraAdapterSource(extra)
    rank = write_adapter(tmp_path / "rank", pair, {"r": 8, "lora_alpha": 2})
    with pytest.raises(DataError, match="has rank 2 .* says r=8"):
        LoraAdapterSource(rank).get("l.weight")
    lonely = write_adapter(
        tmp_path / "lonely", {f"{p}lora_A.weight": torch.ones(2, 3)}, {"r": 2, "lora_alpha": 2}
    )
    with pytest.raises(DataError, match="has no lora_B factor"):
        LoraAdapterSource(lonely)


def test_adapted_model_is_base_plus_delta_and_base_elsewhere(tmp_path):
    base = StateDictSource(
        {"l.weight": torch.ones(4, 3, dtype=torch.bfloat16), "l.bias": torch.zeros(4)}
    )
    a, b = torch.ones(2, 3), torch.ones(4, 2)
    folder = write_adapter(
        tmp_path / "ad",
        {"base_model.model.l.lora_A.weight": a, "base_model.model.l.lora_B.weight": b},
        {"r": 2, "lora_alpha": 1},
    )
    model = AdaptedModelSource(base, LoraAdapterSource(folder), "adapted")
    assert model.info("l.weight").dtype == torch.bfloat16  # stands for the base's storage
    weight = model.get("l.weight")
    assert weight.dtype == torch.float32 and torch.equal(weight, torch.full((4, 3), 2.0))
    assert torch.equal(model.get("l.bias"), torch.zeros(4))
    wrong = StateDictSource({"l.weight": torch.ones(5, 3)})
    with pytest.raises(DataError, match="delta of tensor 'l.weight' has shape"):
        AdaptedModelSource(wrong, LoraAdapterSource(folder), "adapted")
    other = StateDictSource({"x.weight": torch.ones(4, 3)})
    with pytest.raises(DataError, match="adapts tensor 'l.weight', which the base"):
        AdaptedModelSource(other, LoraAdapterSource(folder), "adapted")


# ----------------------------------------------------------------------------------------------
# pickle checkpoints


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_pickle_checkpoints_are_refused_with_how_to_opt_in(tmp_path, suffix):
    path = tmp_path / f"m{suffix}"
    torch.save(tensors(), path)
    with pytest.raises(DataError, match="pickle checkpoint.*allow_pickle_conversion: true"):
        open_checkpoint(path)
    source = open_checkpoint(path, allow_pickle_conversion=True)
    assert torch.equal(source.get("z.weight"), tensors()["z.weight"])


class Payload:
    """An arbitrary object: what weights-only loading must refuse."""


def test_weights_only_conversion_refuses_objects_and_round_trips_tensors(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "obj": Payload()}, evil)
    with pytest.raises(DataError, match="could not be read as weights only"):
        load_pickle_weights(evil)
    lightning = tmp_path / "l.ckpt"
    torch.save({"state_dict": tensors(), "epoch": 3}, lightning)
    assert set(load_pickle_weights(lightning)) == set(tensors())
    shared = torch.arange(4.0)
    src = tmp_path / "tied.bin"
    torch.save({"a": shared, "b": shared}, src)  # tied weights share storage
    out = convert_pickle_checkpoint(src, tmp_path / "tied.safetensors")
    with SafetensorsSource(out) as source:
        assert torch.equal(source.get("a"), shared) and torch.equal(source.get("b"), shared)
    with pytest.raises(RunExistsError, match="already exists"):
        convert_pickle_checkpoint(src, out)


# ----------------------------------------------------------------------------------------------
# writing


def test_sizes_parse_in_decimal_and_binary_units():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5 MiB") == 3 * 2**19
    assert parse_size(100) == 100
    with pytest.raises(ConfigError, match="max_shard_size must be a size such as '2GB'"):
        parse_size("lots")
    with pytest.raises(ConfigError, match="at least 1 byte"):
        parse_size(0)


def test_greedy_shards_never_exceed_the_limit_unless_one_tensor_does():
    assert shard_sizes([24, 16, 48, 16], 64) == [40, 64]
    assert shard_sizes([100, 8], 64) == [100, 8]
    assert shard_sizes([], 64) == [0]


def test_tiny_shards_round_trip_exactly_with_an_index(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = {f"t{i}": torch.randn(3, 4, generator=g).to(torch.bfloat16) for i in range(5)}
    files = write_checkpoint(tmp_path / "out", data, max_shard_size=50)  # 24 B per tensor
    names = sorted(f.name for f in files)
    assert names == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 24
    assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
    with open_checkpoint(tmp_path / "out") as back:
        assert back.keys() == list(data)
        for name, tensor in data.items():
            restored = back.get(name)
            assert restored.dtype == torch.bfloat16 and torch.equal(restored, tensor)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers


@pytest.mark.parametrize("limit", [50, 10**6])
def test_a_writer_with_a_layout_writes_the_same_bytes_as_a_spooling_one(tmp_path, limit):
    g = torch.Generator().manual_seed(0)
    data = {f"t{i}": torch.randn(3, 4, generator=g).to(torch.bfloat16) for i in range(5)}
    data["count"] = torch.tensor(3)
    layout = [(name, t.dtype, t.shape) for name, t in data.items()]
    written = {}
    for mode, plan in (("spooled", None), ("planned", layout)):
        writer = ShardWriter(tmp_path / mode, limit, layout=plan)
        for name, tensor in data.items():
            writer.add(name, tensor)
        written[mode] = {f.name: f.read_bytes() for f in writer.close()}
    assert written["planned"] == written["spooled"]
    assert len(written["planned"]) == (4 if limit == 50 else 1)
    assert not [p for p in (tmp_path / "planned").iterdir() if p.name.startswith(".")]


def test_a_writer_with_a_layout_refuses_tensors_out_of_plan_and_a_short_close(tmp_path):
    layout = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    writer = ShardWriter(tmp_path / "x", 100, layout=layout)
    with pytest.raises(ManytaskError, match=r"tensor 'b' .* arrived where the writer's layout"):
        writer.add("b", torch.zeros(3))
    with pytest.raises(ManytaskError, match="expects 'a' \\(torch.float32, \\[2\\]\\)"):
        writer.add("a", torch.zeros(2, dtype=torch.float64))
    writer.add("a", torch.zeros(2))
    with pytest.raises(ManytaskError, match="got 1 of 2 planned tensors; 'b'"):
        writer.close()


@pytest.mark.parametrize("planned", [False, True])
def test_a_tensor_written_in_blocks_of_rows_has_the_bytes_of_a_whole_one(tmp_path, planned):
    g = torch.Generator().manual_seed(1)
    data = {"a": torch.randn(7, 3, generator=g), "b": torch.randn(5, generator=g)}
    layout = [(name, t.dtype, t.shape) for name, t in data.items()] if planned else None
    written = {}
    for mode in ("whole", "blocks"):
        writer = ShardWriter(tmp_path / mode, 10**6, layout=layout)
        for name, tensor in data.items():
            if mode == "whole":
                writer.add(name, tensor)
            else:  # uneven blocks, one of them empty
                parts = [tensor[:2], tensor[2:2], tensor[2:5], tensor[5:]]
                writer.add_rows(name, tensor.dtype, tensor.shape, iter(parts))
        written[mode] = {f.name: f.read_bytes() for f in writer.close()}
    assert written["blocks"] == written["whole"]


def test_a_writer_refuses_blocks_that_do_not_make_up_the_tensor(tmp_path):
    writer = ShardWriter(tmp_path / "x", 100)
    with pytest.raises(ManytaskError, match=r"blocks of tensor 'w' hold 24 of its 36 bytes"):
        writer.add_rows("w", torch.float32, (3, 3), [torch.zeros(2, 3)])
    with pytest.raises(ManytaskError, match=r"blocks of tensor 'v' exceed its shape \[2, 3\]"):
        writer.add_rows("v", torch.float32, (2, 3), [torch.zeros(2, 3), torch.zeros(1, 3)])
    with pytest.raises(ManytaskError, match=r"a block of tensor 'u' is torch.float64 \[1, 3\]"):
        writer.add_rows("u", torch.float32, (2, 3), [torch.zeros(1, 3, dtype=torch.float64)])


def test_one_shard_is_model_safetensors_without_an_index(tmp_path):
    files = write_checkpoint(tmp_path / "out", tensors(), max_shard_size=10**6)
    assert [f.name for f in files] == ["model.safetensors"]


def test_writer_refuses_a_name_twice(tmp_path):
    writer = ShardWriter(tmp_path, 100)
    writer.add("x", torch.ones(1))
    with pytest.raises(Exception, match="tensor 'x' was written twice"):
        writer.add("x", torch.ones(1))


def stage_then_fail(target: Path, error: BaseException, overwrite: bool = False) -> None:
    with staged_directory(target, overwrite=overwrite) as stage:
        (stage / "half.safetensors").write_bytes(b"partial")
        raise error


def test_staged_directory_leaves_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        stage_then_fail(target, RuntimeError("boom"))
    assert list(tmp_path.iterdir()) == []


def test_staged_directory_refuses_an_existing_output_and_replaces_it_only_when_complete(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RunExistsError, match=r"output '.*out' already exists; pass --overwrite"):
        stage_then_fail(target, RuntimeError("not reached"))
    with pytest.raises(KeyboardInterrupt):
        stage_then_fail(target, KeyboardInterrupt(), overwrite=True)
    assert [p.name for p in target.iterdir()] == ["old.txt"]  # the old output survives
    with staged_directory(target, overwrite=True) as stage:
        (stage / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_shard_writer_keeps_no_tensor_and_writes_files_safetensors_reads(tmp_path):
    """Each added tensor goes to disk at once: no reference to it (or to a copy sharing its
    storage) survives ``add``; the shards load back exactly with safetensors, every dtype
    included, and no spool file is left."""
    from safetensors.torch import load_file

    writer = ShardWriter(tmp_path / "out", max_shard_size=64)
    tensors = {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "c": torch.tensor(7, dtype=torch.int64),
        "d": torch.tensor([True, False, True]),
        "e": torch.zeros(0, 3, dtype=torch.float16),
    }
    for name, tensor in tensors.items():
        copy = tensor.clone()
        alive = weakref.ref(copy)
        writer.add(name, copy)
        del copy
        assert alive() is None, name
    files = writer.close()
    loaded: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            loaded.update(load_file(str(file)))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert not list((tmp_path / "out").glob(".*"))
