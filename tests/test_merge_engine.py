"""The streaming merge engine: formulas, streaming, seeding, bad input, atomic run folders."""

from __future__ import annotations

import json
import math
import weakref
import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor, nn

from manytask.errors import ConfigError, DataError, ManytaskError, RunExistsError
from manytask.merge import (
    Merged,
    MergeRule,
    SafetensorsSource,
    TensorInfo,
    TensorSource,
    merge,
    merge_state_dicts,
    open_checkpoint,
    plan,
    tensor_seed,
)
from manytask.merge.report import tensor_stats
from manytask.registry import get as registry_get


class ScaledSum(MergeRule):
    """θ₀ + λ Σ (θ_t − θ₀): task arithmetic, written here so the tests need no other rule."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def merge_tensor(
        self, name: str, base: Tensor | None, models: Sequence[Tensor], generator: torch.Generator
    ) -> Tensor:
        assert base is not None
        return base + self.scale * sum((m - base for m in models), torch.zeros_like(base))


class FirstModelMasked(MergeRule):
    """Needs no base: the first model times a Bernoulli(½) mask drawn from the generator."""

    needs_base = False

    def merge_tensor(
        self, name: str, base: Tensor | None, models: Sequence[Tensor], generator: torch.Generator
    ) -> Tensor:
        assert base is None
        mask = torch.rand(models[0].shape, generator=generator) < 0.5
        return models[0] * mask


def state(**tensors: Sequence[float] | Tensor) -> dict[str, Tensor]:
    return {
        k: v if isinstance(v, Tensor) else torch.tensor(v, dtype=torch.float32)
        for k, v in tensors.items()
    }


# ----------------------------------------------------------------------------------------------
# formulas and dtypes


def test_merge_state_dicts_applies_the_rule_per_tensor():
    base = state(w=[[1.0, 2.0], [3.0, 4.0]], b=[0.5])
    a = state(w=[[2.0, 2.0], [3.0, 5.0]], b=[1.5])
    b = state(w=[[1.0, 0.0], [3.0, 4.0]], b=[-0.5])
    merged = merge_state_dicts(base, [a, b], ScaledSum(0.5))
    assert list(merged) == ["w", "b"]
    assert torch.equal(merged["w"], torch.tensor([[1.5, 1.0], [3.0, 4.5]]))
    assert torch.equal(merged["b"], torch.tensor([0.5]))


@pytest.mark.parametrize("name", ["metagpt", "emr", "model_stock"])
def test_one_rule_object_serves_several_merges(name):
    # model-wide sums (MetaGPT's norms, EMR's masses) and per-tensor records (Model Stock's
    # ratios) start afresh with every merge: before, a second merge added to the first's
    g = torch.Generator().manual_seed(3)

    def models(scale: float) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        base = {"w": torch.randn(4, 5, generator=g), "b": torch.randn(5, generator=g)}
        tasks = [
            {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
            for _ in range(3)
        ]
        return base, tasks

    first, second = models(1.0), models(0.1)
    rule = registry_get("merge_rule", name)()
    merge_state_dicts(first[0], first[1], rule, extras={})
    again = merge_state_dicts(second[0], second[1], rule, extras={})
    fresh_rule = registry_get("merge_rule", name)()
    fresh = merge_state_dicts(second[0], second[1], fresh_rule, extras={})
    assert all(torch.equal(again[k], fresh[k]) for k in fresh)
    assert rule.summary() == fresh_rule.summary()


def test_output_keeps_each_tensors_dtype_unless_asked_and_inputs_are_untouched():
    base = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "f": torch.tensor([1.0])}
    model = {"w": torch.tensor([3.0, 2.0], dtype=torch.bfloat16), "f": torch.tensor([2.0])}
    before = {k: v.clone() for k, v in model.items()}

    class InPlace(ScaledSum):  # a careless rule that writes into its inputs
        def merge_tensor(self, name, base, models, generator):
            return models[0].mul_(2).sub_(base)

    merged = merge_state_dicts(base, [model], InPlace())
    assert merged["w"].dtype == torch.bfloat16 and merged["f"].dtype == torch.float32
    assert torch.equal(merged["w"], torch.tensor([5.0, 2.0], dtype=torch.bfloat16))
    assert all(torch.equal(model[k], before[k]) for k in model)  # the rule got private copies
    as_float = merge_state_dicts(base, [model], ScaledSum(), dtype="float32")
    assert as_float["w"].dtype == torch.float32


def test_a_rule_without_base_runs_with_base_none_and_is_seeded_per_tensor_name():
    g = torch.Generator().manual_seed(1)
    model = {n: torch.randn(50, generator=g) for n in ("x", "y", "z")}
    merged = merge_state_dicts(None, [model], FirstModelMasked(), seed=7)
    for name, tensor in model.items():
        gen = torch.Generator().manual_seed(tensor_seed(7, name))
        expected = tensor * (torch.rand(50, generator=gen) < 0.5)
        assert torch.equal(merged[name], expected)
    reordered = {n: model[n] for n in ("z", "x", "y")}
    again = merge_state_dicts(None, [reordered], FirstModelMasked(), seed=7)
    assert all(torch.equal(again[n], merged[n]) for n in model)  # order does not matter
    other = merge_state_dicts(None, [model], FirstModelMasked(), seed=8)
    assert not torch.equal(other["x"], merged["x"])


def test_tensor_seed_is_the_crc32_of_the_name_started_from_the_seed():
    assert tensor_seed(3, "w") == zlib.crc32(b"w", 3)
    assert tensor_seed(0, "a") != tensor_seed(0, "b")
    assert len({tensor_seed(s, "layer.weight") for s in range(1000)}) == 1000
    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        merge_state_dicts(None, [state(w=[1.0])], FirstModelMasked(), seed=2**32)


# ----------------------------------------------------------------------------------------------
# streaming


class LiveTensors:
    """Which tensor names have tensors alive (tracked with weak references)."""

    def __init__(self) -> None:
        self.alive: dict[str, int] = {}
        self.overlaps: list[tuple[str, list[str]]] = []
        self.peak = 0

    def track(self, name: str, tensor: Tensor) -> None:
        self.alive[name] = self.alive.get(name, 0) + 1
        self.peak = max(self.peak, sum(self.alive.values()))
        weakref.finalize(tensor, self._release, name)

    def _release(self, name: str) -> None:
        self.alive[name] -= 1
        if not self.alive[name]:
            del self.alive[name]

    def reading(self, name: str) -> None:
        others = sorted(n for n in self.alive if n != name)
        if others:
            self.overlaps.append((name, others))


class CountingSource(TensorSource):
    def __init__(self, inner: TensorSource, live: LiveTensors) -> None:
        self.inner, self.live, self.label = inner, live, inner.label

    def keys(self) -> list[str]:
        return self.inner.keys()

    def info(self, name: str) -> TensorInfo:
        return self.inner.info(name)

    def get(self, name: str) -> Tensor:
        self.live.reading(name)
        tensor = self.inner.get(name)
        self.live.track(name, tensor)
        return tensor


class TrackingSum(ScaledSum):
    """ScaledSum that also tracks the float32 inputs the engine hands it."""

    two_pass = True

    def __init__(self, live: LiveTensors) -> None:
        super().__init__(1.0)
        self.live = live
        self.calls: list[tuple[str, str]] = []

    def observe(self, name, base, models):
        self.calls.append(("observe", name))
        for tensor in [base, *models]:
            self.live.track(name, tensor)

    def merge_tensor(self, name, base, models, generator):
        self.calls.append(("merge", name))
        for tensor in [base, *models]:
            self.live.track(name, tensor)
        return super().merge_tensor(name, base, models, generator)


def test_engine_streams_one_tensor_name_at_a_time_in_both_passes(tmp_path):
    g = torch.Generator().manual_seed(0)
    names = [f"layer{i}.weight" for i in range(6)]
    paths = []
    for who in ("base", "a", "b", "c"):
        save_file({n: torch.randn(8, 8, generator=g) for n in names}, str(tmp_path / f"{who}.st"))
        paths.append(tmp_path / f"{who}.st")
    live = LiveTensors()
    base, *models = [CountingSource(SafetensorsSource(p), live) for p in paths]
    rule = TrackingSum(live)
    merge(models, rule, base=base, output=tmp_path / "out", max_shard_size=300)
    assert live.overlaps == []  # no tensor of an earlier name was alive when a name was read
    assert live.peak <= 2 * 4  # at most the raw and float32 inputs of one name
    observed = [n for kind, n in rule.calls if kind == "observe"]
    assert observed == names and rule.calls[: len(names)] == [("observe", n) for n in names]
    assert [n for kind, n in rule.calls if kind == "merge"] == names


# ----------------------------------------------------------------------------------------------
# bad input


def test_mismatched_shapes_name_the_tensor_and_the_model():
    base = state(w=[[1.0, 2.0, 3.0]])
    bad = state(w=[[1.0, 2.0]])
    with pytest.raises(DataError, match=r"tensor 'w' has shape \[1, 2\] in model 'model1'"):
        merge_state_dicts(base, [base, bad], ScaledSum())


def test_missing_and_extra_keys_name_the_tensor():
    base = state(w=[1.0], b=[2.0])
    with pytest.raises(DataError, match="tensor 'b' of base is missing from model 'model0'"):
        merge_state_dicts(base, [state(w=[1.0])], ScaledSum())
    with pytest.raises(DataError, match="model 'model0' holds tensor 'extra'"):
        merge_state_dicts(base, [state(w=[1.0], b=[2.0], extra=[0.0])], ScaledSum())


def test_mixed_dtypes_name_the_tensor_unless_an_output_dtype_is_chosen():
    base = {"w": torch.ones(2)}
    half = {"w": torch.ones(2, dtype=torch.float16)}
    with pytest.raises(DataError, match=r"tensor 'w' is float16 in model 'model0' but float32"):
        merge_state_dicts(base, [half], ScaledSum())
    merged = merge_state_dicts(base, [half], ScaledSum(), dtype="bfloat16")
    assert merged["w"].dtype == torch.bfloat16
    integer = {"w": torch.ones(2, dtype=torch.int64)}
    with pytest.raises(DataError, match="tensor 'w' is int64 .* floating point in every"):
        merge_state_dicts(base, [integer], ScaledSum(), dtype="float32")


def test_integer_tensors_are_copied_when_equal_and_refused_when_not():
    base = {"w": torch.ones(2), "steps": torch.tensor(5)}
    same = {"w": torch.zeros(2), "steps": torch.tensor(5)}
    other = {"w": torch.zeros(2), "steps": torch.tensor(9)}
    merged = merge_state_dicts(base, [same], ScaledSum())
    assert merged["steps"].item() == 5 and merged["steps"].dtype == torch.int64
    with pytest.raises(DataError, match="int64 tensor 'steps' differs between base and model"):
        merge_state_dicts(base, [same, other], ScaledSum())
    kept = merge_state_dicts(base, [same, other], ScaledSum(), non_float="from_base")
    assert kept["steps"].item() == 5


def test_rule_requirements_and_rule_results_are_checked():
    base = state(w=[1.0, 2.0])
    with pytest.raises(ConfigError, match="rule 'ScaledSum' needs a base model"):
        merge_state_dicts(None, [base], ScaledSum())

    class AtMostOne(ScaledSum):
        max_models = 1

    with pytest.raises(ConfigError, match="at most 1 task models, got 2"):
        merge_state_dicts(base, [base, base], AtMostOne())
    with pytest.raises(ConfigError, match="params .* were given with a rule instance"):
        merge_state_dicts(base, [base], ScaledSum(), params={"scale": 2.0})

    class WrongShape(ScaledSum):
        def merge_tensor(self, name, base, models, generator):
            return base[:1]

    with pytest.raises(ManytaskError, match=r"returned shape \[1\] for tensor 'w' of shape \[2\]"):
        merge_state_dicts(base, [base], WrongShape())
    with pytest.raises(ManytaskError, match="unknown merge_rule 'no_such_rule'"):
        merge_state_dicts(base, [base], "no_such_rule")


# ----------------------------------------------------------------------------------------------
# run folders


def write_models(folder: Path) -> tuple[Path, list[Path]]:
    g = torch.Generator().manual_seed(0)
    base = {f"t{i}": torch.randn(4, 3, generator=g) for i in range(5)}
    base["count"] = torch.tensor([3])
    save_file(base, str(folder / "base.safetensors"))
    paths = []
    for who in ("a", "b"):
        model = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for k, v in base.items()}  # fmt: skip
        save_file(model, str(folder / f"{who}.safetensors"))
        paths.append(folder / f"{who}.safetensors")
    return folder / "base.safetensors", paths


def test_merge_writes_a_complete_run_folder(tmp_path):
    base, models = write_models(tmp_path)
    result = merge(models, ScaledSum(0.5), base=base, output=tmp_path / "out", seed=4)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "merge_config.yaml", "model.safetensors", "report.json", "report.md", "summary.json",
    ]  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rule"] == "ScaledSum" and summary["seed"] == 4
    assert summary["merged_tensors"] == 5 and summary["copied_tensors"] == 1
    assert summary["models"] == [
        {"name": "a", "path": str(models[0])},
        {"name": "b", "path": str(models[1])},
    ]
    assert summary["seconds"]["total_seconds"] > 0
    config = yaml.safe_load((out / "merge_config.yaml").read_text())
    assert config["base"] == str(base) and config["seed"] == 4
    expected = merge_state_dicts(
        open_checkpoint(base), [open_checkpoint(p) for p in models], ScaledSum(0.5)
    )
    with open_checkpoint(out) as merged:
        assert all(torch.equal(merged.get(k), v) for k, v in expected.items())
    assert result.files == [out / "model.safetensors"]


def test_tiny_shards_round_trip_the_merged_model_exactly(tmp_path):
    base, models = write_models(tmp_path)
    result = merge(models, ScaledSum(), base=base, output=tmp_path / "out", max_shard_size=50)
    shards = sorted(f.name for f in result.files if f.suffix == ".safetensors")
    assert shards == [f"model-0000{i}-of-00006.safetensors" for i in range(1, 7)]  # 48 B each
    expected = merge_state_dicts(
        open_checkpoint(base), [open_checkpoint(p) for p in models], ScaledSum()
    )
    with open_checkpoint(tmp_path / "out") as merged:
        assert merged.keys() == list(expected)
        assert all(torch.equal(merged.get(k), v) for k, v in expected.items())


def test_existing_output_is_refused_without_overwrite_and_replaced_with_it(tmp_path):
    base, models = write_models(tmp_path)
    out = tmp_path / "out"
    merge(models, ScaledSum(), base=base, output=out)
    with pytest.raises(RunExistsError, match=r"output '.*out' already exists; pass --overwrite"):
        merge(models, ScaledSum(), base=base, output=out)
    merge(models, ScaledSum(), base=base, output=out, overwrite=True, seed=9)
    assert json.loads((out / "summary.json").read_text())["seed"] == 9


class FailsAt(ScaledSum):
    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.seen = at, 0

    def merge_tensor(self, name, base, models, generator):
        self.seen += 1
        if self.seen == self.at:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-merge
        return super().merge_tensor(name, base, models, generator)


def test_an_interrupted_merge_leaves_no_output_and_no_temporary_files(tmp_path):
    base, models = write_models(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(KeyboardInterrupt):
        merge(models, FailsAt(3), base=base, output=tmp_path / "out", max_shard_size=50)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    merge(models, ScaledSum(), base=base, output=tmp_path / "out")
    old = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(KeyboardInterrupt):
        merge(models, FailsAt(2), base=base, output=tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == old  # old output intact
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "out"])


def test_side_outputs_are_written_as_side_checkpoints(tmp_path):
    class WithMasks(ScaledSum):
        def merge_tensor(self, name, base, models, generator):
            masks = {f"mask_{i}": (m != base) for i, m in enumerate(models)}
            return Merged(super().merge_tensor(name, base, models, generator), masks)

    base = state(w=[1.0, 2.0], v=[3.0])
    model = state(w=[1.0, 5.0], v=[4.0])
    result = merge([model], WithMasks(), base=base, output=tmp_path / "out")
    assert result.summary["extras"] == ["mask_0"]
    with open_checkpoint(tmp_path / "out" / "extras" / "mask_0") as masks:
        assert torch.equal(masks.get("w"), torch.tensor([False, True]))
        assert torch.equal(masks.get("v"), torch.tensor([True]))
    with pytest.raises(ManytaskError, match="returns side outputs .* pass extras="):
        merge_state_dicts(base, [model], WithMasks())
    collected: dict[str, dict[str, Tensor]] = {}
    merge_state_dicts(base, [model], WithMasks(), extras=collected)
    assert set(collected["mask_0"]) == {"w", "v"}


# ----------------------------------------------------------------------------------------------
# plan and report on hand-made examples


def test_plan_counts_bytes_and_estimates_peak_memory_on_a_hand_made_example(tmp_path):
    base = {
        "a": torch.zeros(2, 3),
        "b": torch.zeros(4),
        "c": torch.zeros(3, 4),
        "n": torch.zeros(2, dtype=torch.int64),
    }
    models = [dict(base), dict(base)]
    result = plan(models, ScaledSum(), base=base, output=tmp_path / "out", max_shard_size=64)
    assert result.tensors == 4 and result.merged_tensors == 3 and result.copied_tensors == 1
    assert result.parameters == 6 + 4 + 12 + 2
    assert (result.largest_tensor, result.largest_shape, result.largest_numel) == ("c", (3, 4), 12)
    assert [c.nbytes for c in result.checkpoints] == [24 + 16 + 48 + 16] * 3
    assert result.shard_bytes == [24 + 16, 48 + 16]  # greedy shards of at most 64 B
    # 3 inputs × largest × 4 B + the read buffer (the largest float tensor stored in another
    # dtype than float32: none here) + the largest output tensor (the writer spools each to disk)
    assert result.read_buffer_bytes == 0
    assert result.peak_memory_bytes == 3 * 12 * 4 + 0 + 48
    halves = [{k: v.half() if v.is_floating_point() else v for k, v in m.items()} for m in models]
    stored_half = plan(halves[1:], ScaledSum(), base=halves[0], max_shard_size=10**6)
    assert stored_half.read_buffer_bytes == 12 * 2  # "c" as float16 stores it
    half = plan(models, ScaledSum(), base=base, dtype="float16", max_shard_size=10**6)
    assert half.output_bytes == (6 + 4 + 12) * 2 + 16 and half.shard_bytes == [60]
    no_base = plan(models, FirstModelMasked(), max_shard_size=10**6)
    assert no_base.inputs_per_tensor == 2 and no_base.peak_memory_bytes == 2 * 48 + 0 + 48
    assert "peak memory estimate: 3 inputs × 12 × 4 B" in result.to_text()
    assert not (tmp_path / "out").exists()


def test_report_gives_norms_sparsity_and_sign_conflicts_of_a_hand_made_example(tmp_path):
    base = state(w=[0.0, 0.0, 0.0, 0.0], v=[1.0, 1.0])
    a = state(w=[1.0, -1.0, 0.0, 2.0], v=[1.0, 2.0])
    b = state(w=[1.0, 1.0, 0.0, -2.0], v=[1.0, 1.0])
    merge({"a": a, "b": b}, ScaledSum(), base=base, output=tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    w, v = report["tensors"]
    assert w["name"] == "w" and w["task_norms"] == pytest.approx([math.sqrt(6)] * 2)
    assert w["sign_conflict"] == 0.5  # coordinates 1 and 3 disagree; 0 agrees; 2 is zero
    assert w["task_sparsity"] == [0.25, 0.25] and w["delta_sparsity"] == 0.75
    assert w["delta_norm"] == pytest.approx(2.0) and w["base_norm"] == 0.0
    assert v["sign_conflict"] == 0.0 and v["task_sparsity"] == [0.5, 1.0]
    totals = report["totals"]
    assert totals["parameters"] == 6 and totals["sign_conflict"] == pytest.approx(2 / 6)
    assert totals["task_norms"] == pytest.approx([math.sqrt(7), math.sqrt(6)])
    assert totals["delta_norm"] == pytest.approx(math.sqrt(5))
    assert totals["delta_sparsity"] == pytest.approx(4 / 6)
    assert totals["task_sparsity"] == pytest.approx([2 / 6, 3 / 6])
    assert totals["base_norm"] == pytest.approx(math.sqrt(2))
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| `w` | 4 | 0 | 2.449 / 2.449 | 2 | 25.0% / 25.0% | 75.0% | 50.0% |" in text


def test_report_statistics_of_a_tensor_spanning_several_slices_match_a_float64_reference():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(3, 70_001, generator=generator)  # 210,003 entries: four slices, one short
    models = [base + torch.randn(base.shape, generator=generator) for _ in range(3)]
    for model in models:
        model[0, :5000] = base[0, :5000]  # exact zeros in every task vector
    models[1][1, :100] = base[1, :100] + 1.0  # positive where the others are mixed
    merged = base + sum(m - base for m in models)
    row = tensor_stats("w", base, models, merged, "F32")
    vectors = torch.stack([m.double() - base.double() for m in models])
    assert row.task_norms == pytest.approx([float(v.norm()) for v in vectors], rel=1e-6)
    assert row.model_norms == pytest.approx([float(m.double().norm()) for m in models], rel=1e-6)
    assert row.base_norm == pytest.approx(float(base.double().norm()), rel=1e-6)
    assert row.task_sparsity == [float((v == 0).double().mean()) for v in vectors]
    conflict = ((vectors > 0).any(0) & (vectors < 0).any(0)).double().mean()
    assert row.sign_conflict == float(conflict)
    delta = merged.double() - base.double()
    assert row.delta_norm == pytest.approx(float(delta.norm()), rel=1e-6)
    assert row.delta_sparsity == float((merged - base == 0).double().mean())


def test_report_counts_nan_and_infinite_entries_as_non_zero():
    base = torch.zeros(6)
    model = torch.tensor([0.0, float("nan"), float("inf"), -1.0, 0.0, 2.0])
    row = tensor_stats("w", base, [model], model.clone(), "F32")
    assert row.task_sparsity == [2 / 6] and row.delta_sparsity == 2 / 6


# ----------------------------------------------------------------------------------------------
# any model: a CNN, a LoRA adapter set, a Hugging Face BERT


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3)
        )
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def test_three_perturbed_cnns_merge_into_their_mean_and_load_back(tmp_path):
    torch.manual_seed(0)
    cnn = SmallCNN()
    base = {k: v.clone() for k, v in cnn.state_dict().items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    g = torch.Generator().manual_seed(1)
    copies = []
    for i in range(3):
        sd = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
              for k, v in base.items()}  # fmt: skip
        save_file(sd, str(tmp_path / f"cnn{i}.safetensors"))
        copies.append(sd)
    paths = [tmp_path / f"cnn{i}.safetensors" for i in range(3)]
    merge(paths, ScaledSum(1 / 3), base=tmp_path / "base.safetensors", output=tmp_path / "out")
    with open_checkpoint(tmp_path / "out") as merged:
        loaded = {k: merged.get(k) for k in merged}
    for name, tensor in base.items():
        if tensor.is_floating_point():
            mean = sum(c[name] for c in copies) / 3
            assert torch.allclose(loaded[name], mean, atol=1e-6), name
        else:
            assert torch.equal(loaded[name], tensor)  # BatchNorm's counter is copied
    model = SmallCNN()
    model.load_state_dict(loaded, strict=True)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 2)


def write_adapter(folder: Path, module: str, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g)
    folder.mkdir()
    prefix = f"base_model.model.{module}"
    save_file(
        {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b},
        str(folder / "adapter_model.safetensors"),
    )
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return {f"{module}.weight": 2.0 * (b @ a)}


def test_task_arithmetic_on_lora_adapters_adds_the_dense_deltas_to_the_base(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"enc.q.weight": torch.randn(4, 3, generator=g), "enc.q.bias": torch.randn(4)}
    base["head.weight"] = torch.randn(2, 4, generator=g)
    save_file(base, str(tmp_path / "base.safetensors"))
    d1 = write_adapter(tmp_path / "sst2", "enc.q", 1)
    d2 = write_adapter(tmp_path / "mnli", "enc.q", 2)
    adapters = [tmp_path / "sst2", tmp_path / "mnli"]
    merge(adapters, ScaledSum(), base=tmp_path / "base.safetensors", output=tmp_path / "out")
    with open_checkpoint(tmp_path / "out") as merged:
        expected = base["enc.q.weight"] + d1["enc.q.weight"] + d2["enc.q.weight"]
        assert torch.allclose(merged.get("enc.q.weight"), expected, atol=1e-6)
        assert torch.equal(merged.get("enc.q.bias"), base["enc.q.bias"])
        assert torch.equal(merged.get("head.weight"), base["head.weight"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["sst2", "mnli"]
    with pytest.raises(ConfigError, match="model 'sst2' .* is a LoRA adapter.*needs base"):
        merge(adapters, FirstModelMasked(), output=tmp_path / "again")


def test_tiny_hugging_face_bert_merges_and_loads_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    paths = []
    for name in ("base", "a", "b"):
        model = transformers.BertModel(config)
        model.save_pretrained(tmp_path / name, safe_serialization=True)
        paths.append(tmp_path / name)
    merge(paths[1:], ScaledSum(0.5), base=paths[0], output=tmp_path / "out")
    (tmp_path / "out" / "config.json").write_text((paths[0] / "config.json").read_text())
    merged = transformers.BertModel.from_pretrained(tmp_path / "out")
    states = [transformers.BertModel.from_pretrained(p).state_dict() for p in paths]
    for name, tensor in merged.state_dict().items():
        if tensor.is_floating_point():
            b = states[0][name]
            expected = b + 0.5 * ((states[1][name] - b) + (states[2][name] - b))
            assert torch.allclose(tensor, expected, atol=1e-6), name
