"""Large tensors merged a block of rows at a time by entrywise rules: the same bytes, less memory.

The engine's block threshold is lowered so that small test tensors are cut into blocks; every
blocked merge is compared with the same merge done tensor by tensor.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from manytask.errors import ManytaskError
from manytask.merge import engine, merge, merge_state_dicts, open_checkpoint, plan
from manytask.merge.io import SafetensorsSource, StateDictSource
from manytask.merge.methods.dare import DareLinear, DareTies
from manytask.merge.methods.ties import Ties

SHAPES = {"embed": (37, 6), "dense.weight": (20, 5), "dense.bias": (150,), "norm": (6,)}
# whole-tensor inputs of 3 × 37 × 6 × 4 B = 2.7 kB for "embed": a 512-byte threshold cuts it
# into blocks of 7 rows, "dense.weight" into blocks of 8 and "dense.bias" into blocks of 42
SMALL_BLOCKS = 512


def checkpoints(tmp_path, dtype=torch.float32):
    tmp_path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(3)
    paths = []
    for name in ("base", "a", "b"):
        tensors = {k: torch.randn(s, generator=gen).to(dtype) for k, s in SHAPES.items()}
        tensors["steps"] = torch.tensor([5])
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        paths.append(path)
    return paths[0], paths[1:]


def read_all(folder):
    with open_checkpoint(folder) as merged:
        return {k: merged.get(k) for k in merged}


RULES = {
    "task_arithmetic": {"scale": 0.7},
    "average": {},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.6},
}


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_merges_equal_whole_tensor_merges_bit_for_bit(tmp_path, monkeypatch, rule, dtype):
    base, models = checkpoints(tmp_path, dtype)
    kwargs = {"base": base, "params": RULES[rule], "seed": 9}
    merge(models, rule, output=tmp_path / "whole", **kwargs)
    monkeypatch.setattr(engine, "_BLOCK_BYTES", SMALL_BLOCKS)
    dry = plan(models, rule, **kwargs)
    assert dry.blocked_tensors == 3  # embed, dense.weight, dense.bias; "norm" is small
    merge(models, rule, output=tmp_path / "blocks", **kwargs)
    whole, blocks = read_all(tmp_path / "whole"), read_all(tmp_path / "blocks")
    assert list(whole) == list(blocks)
    for name in whole:
        assert torch.equal(whole[name], blocks[name]), name
    # the report combines the blocks' statistics into one row per tensor (its sums of squares
    # are float32 dot products of slices, so the two agree to float32 rounding)
    rows = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("whole", "blocks")]
    for one, other in zip(rows[0]["tensors"], rows[1]["tensors"], strict=True):
        assert one.keys() == other.keys()
        for key, value in one.items():
            floats = value if isinstance(value, list) else [value]
            if floats and all(isinstance(v, float) for v in floats):
                assert other[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, one["name"])
            else:
                assert other[key] == value, (key, one["name"])


def test_blocks_shrink_the_planned_memory_and_the_buffers(tmp_path, monkeypatch):
    base, models = checkpoints(tmp_path)
    whole = plan(models, "task_arithmetic", base=base)
    monkeypatch.setattr(engine, "_BLOCK_BYTES", SMALL_BLOCKS)
    blocked = plan(models, "task_arithmetic", base=base)
    assert whole.held_numel == 37 * 6 and whole.blocked_tensors == 0
    # the largest blocks: 7 rows of "embed" and 42 of "dense.bias", 42 entries each; float32
    # inputs are read straight into the float32 workspace, so no byte buffer is needed
    assert blocked.held_numel == 42 and blocked.read_buffer_bytes == 0
    assert blocked.peak_memory_bytes < whole.peak_memory_bytes
    assert "block of rows" in blocked.to_text()
    base, models = checkpoints(tmp_path / "bf16", torch.bfloat16)
    bf16 = plan(models, "task_arithmetic", base=base)
    assert bf16.held_numel == 42 and bf16.read_buffer_bytes == 42 * 2  # read, then converted


def test_float32_inputs_are_read_in_place_and_others_converted(tmp_path):
    """The engine reads float32 tensors straight into its float32 workspace and converts the
    others from a byte buffer; either way task arithmetic is θ₀ + λ Σ (θₜ − θ₀) in float32."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        folder = tmp_path / str(dtype).split(".")[-1]
        base, models = checkpoints(folder, dtype)
        merge(models, "task_arithmetic", base=base, output=folder / "out", params={"scale": 0.5})
        theta, first, second = (read_all(path) for path in (base, *models))
        for name, merged in read_all(folder / "out").items():
            if name == "steps":
                continue
            b = theta[name].float()
            expected = (first[name].float() - b).add_(second[name].float() - b).mul_(0.5).add_(b)
            assert merged.dtype == dtype and torch.equal(merged, expected.to(dtype)), name


def test_rules_that_rank_a_whole_tensor_are_never_blocked(tmp_path, monkeypatch):
    base, models = checkpoints(tmp_path)
    monkeypatch.setattr(engine, "_BLOCK_BYTES", SMALL_BLOCKS)
    for rule, params in (("ties", {}), ("dare_ties", {"trim_density": 0.5}), ("della", {})):
        assert plan(models, rule, base=base, params=params).blocked_tensors == 0, rule
    assert not Ties().entrywise() and not DareTies(trim_density=0.5).entrywise()
    assert DareLinear().entrywise() and DareTies().entrywise()


def test_sources_read_a_block_of_rows_alone(tmp_path):
    base, _ = checkpoints(tmp_path)
    with SafetensorsSource(base) as source:
        whole = source.get("embed")
        buffer = torch.empty(1024, dtype=torch.uint8)
        block = source.read_rows_into("embed", 5, 12, buffer)
        assert torch.equal(block, whole[5:12])
        bias = source.get("dense.bias")
        assert torch.equal(source.read_rows_into("dense.bias", 149, 150, buffer), bias[149:])
        with pytest.raises(ManytaskError, match="rows 140:160 of tensor 'dense.bias'"):
            source.read_rows_into("dense.bias", 140, 160, buffer)
    memory = StateDictSource({"w": torch.arange(12.0).reshape(4, 3)})
    assert memory.reads_rows
    assert torch.equal(memory.read_rows_into("w", 1, 3, buffer), torch.arange(3.0, 9.0).view(2, 3))


def test_in_memory_inputs_are_blocked_too_and_agree(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    states = [{"w": torch.randn(40, 8, generator=gen)} for _ in range(4)]
    whole = merge_state_dicts(states[0], states[1:], "dare_linear", seed=2)
    monkeypatch.setattr(engine, "_BLOCK_BYTES", 256)
    blocked = merge_state_dicts(states[0], states[1:], "dare_linear", seed=2)
    assert torch.equal(whole["w"], blocked["w"])


def test_a_blocked_tensor_reaches_the_writer_a_block_at_a_time(tmp_path, monkeypatch):
    """The merged tensor is never whole in memory: the writer gets it as blocks of rows."""
    base, models = checkpoints(tmp_path)
    monkeypatch.setattr(engine, "_BLOCK_BYTES", SMALL_BLOCKS)
    seen: dict[str, list[int]] = {}
    add_rows = engine.ShardWriter.add_rows

    def spy(self, name, dtype, shape, blocks):
        sizes = seen.setdefault(name, [])

        def counted():
            for block in blocks:
                sizes.append(block.shape[0])
                yield block

        add_rows(self, name, dtype, shape, counted())

    monkeypatch.setattr(engine.ShardWriter, "add_rows", spy)
    merge(models, "task_arithmetic", base=base, output=tmp_path / "out")
    assert seen["embed"] == [7, 7, 7, 7, 7, 2]  # 37 rows, 7 at a time
    assert seen["dense.bias"] == [42, 42, 42, 24]
    assert seen["norm"] == [6]  # small: whole, through add
    blocked = plan(models, "task_arithmetic", base=base)
    assert blocked.output_buffer_bytes == 42 * 4  # a block of output, not the largest tensor
