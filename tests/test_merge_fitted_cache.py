"""The statistics cache of the fitted rules: a hit skips the model, a change or a damaged entry
recomputes, and only safetensors and JSON are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from manytask.errors import ConfigError
from manytask.merge.fitted import (
    FisherMerging,
    LayerWiseAdaMerging,
    RegMean,
    RepresentationSurgery,
    TaskWiseAdaMerging,
)
from manytask.merge.fitted.statistics import StatisticsRule
from tests.merge_fitted_models import Net, setup

RULES = [lambda: FisherMerging(num_examples=8), lambda: RegMean(num_examples=8)]


def fit_counting(rule: StatisticsRule, s, cache: Path) -> tuple[dict, int]:
    Net.calls = 0
    merged = rule.fit(s.factory, s.models, s.data, cache=cache)
    return merged, Net.calls


@pytest.mark.parametrize("make", RULES, ids=["fisher", "regmean"])
def test_second_merge_reuses_the_statistics_without_running_the_model(make, tmp_path):
    s = setup()
    first, calls = fit_counting(make(), s, tmp_path)
    assert calls > 0
    second, calls = fit_counting(make(), s, tmp_path)
    assert calls == 0
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("make", RULES, ids=["fisher", "regmean"])
def test_changed_data_or_model_is_computed_again(make, tmp_path):
    s = setup()
    _, calls_all = fit_counting(make(), s, tmp_path)
    s.data[1][0] = s.data[1][0] + 1.0  # task 1's data change; task 0's entry still serves
    _, calls_data = fit_counting(make(), s, tmp_path)
    s.models[0]["encoder.0.bias"] = s.models[0]["encoder.0.bias"] + 1.0
    _, calls_model = fit_counting(make(), s, tmp_path)
    s.heads[0]["bias"] = s.heads[0]["bias"] + 1.0  # the head is part of the task model
    _, calls_head = fit_counting(make(), s, tmp_path)
    _, calls_none = fit_counting(make(), s, tmp_path)
    assert calls_data > 0 and calls_model > 0 and calls_head > 0
    assert calls_none == 0
    assert max(calls_data, calls_model, calls_head) < calls_all  # only the changed task runs


@pytest.mark.parametrize("make", RULES, ids=["fisher", "regmean"])
def test_merging_more_tensors_is_not_served_by_the_entry_of_fewer(make, tmp_path):
    # the statistic covers only the merged tensors: an entry computed for encoder.0 alone must
    # not serve a merge of the whole encoder (encoder.2 would silently get the plain mean)
    s = setup()
    subset = [{k: v for k, v in m.items() if k.startswith("encoder.0.")} for m in s.models]
    Net.calls = 0
    make().fit(s.factory, subset, s.data, cache=tmp_path)
    merged, calls = fit_counting(make(), s, tmp_path)
    fresh = make().fit(s.factory, s.models, s.data)
    assert calls > 0
    assert all(torch.allclose(merged[k], fresh[k]) for k in fresh)


def test_regmean_reuses_its_grams_for_another_alpha_but_fisher_not_for_other_labels(tmp_path):
    s = setup()
    fit_counting(RegMean(alpha=0.1, num_examples=8), s, tmp_path)
    merged, calls = fit_counting(RegMean(alpha=0.9, num_examples=8), s, tmp_path)
    fresh = RegMean(alpha=0.9, num_examples=8).fit(s.factory, s.models, s.data)
    assert calls == 0
    assert all(torch.allclose(merged[k], fresh[k]) for k in merged)
    fit_counting(FisherMerging(num_examples=8), s, tmp_path)
    _, calls = fit_counting(FisherMerging(num_examples=8, labels="sampled"), s, tmp_path)
    assert calls > 0
    _, calls = fit_counting(FisherMerging(num_examples=8, floor=1e-3), s, tmp_path)
    assert calls == 0  # the floor is applied at merge time, the Fisher is the same


def test_a_damaged_tensor_file_is_recomputed_with_a_warning(tmp_path):
    s = setup()
    first, _ = fit_counting(RegMean(num_examples=8), s, tmp_path)
    files = sorted((tmp_path / "regmean").glob("*.safetensors"))
    data = bytearray(files[0].read_bytes())
    data[-1] ^= 0xFF
    files[0].write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="SHA-256 differs"):
        again, calls = fit_counting(RegMean(num_examples=8), s, tmp_path)
    assert calls > 0
    assert all(torch.equal(first[k], again[k]) for k in first)
    _, calls = fit_counting(RegMean(num_examples=8), s, tmp_path)
    assert calls == 0  # the entry was rewritten


def test_a_manifest_for_other_inputs_is_not_trusted(tmp_path):
    s = setup()
    fit_counting(FisherMerging(num_examples=8), s, tmp_path)
    manifest = sorted((tmp_path / "fisher").glob("*.json"))[0]
    content = json.loads(manifest.read_text())
    content["fields"]["examples"] = 7
    manifest.write_text(json.dumps(content))
    with pytest.warns(RuntimeWarning, match="describes other inputs"):
        _, calls = fit_counting(FisherMerging(num_examples=8), s, tmp_path)
    assert calls > 0
    manifest.write_text("{ not json")
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        _, calls = fit_counting(FisherMerging(num_examples=8), s, tmp_path)
    assert calls > 0


def test_the_cache_holds_only_safetensors_and_json_that_describe_each_other(tmp_path):
    s = setup()
    fit_counting(RegMean(num_examples=8), s, tmp_path)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert {p.suffix for p in files} == {".safetensors", ".json"}
    assert len(files) == 4  # one entry per task model
    for manifest in (p for p in files if p.suffix == ".json"):
        content = json.loads(manifest.read_text())
        tensors = load_file(manifest.with_suffix(".safetensors"))
        assert set(content["tensors"]) == set(tensors) == {"encoder.0", "encoder.2"}
        assert content["extra"]["examples"] == 8
        assert content["fields"]["rule"] == "regmean"


def test_a_one_shot_iterator_cannot_be_cached(tmp_path):
    s = setup()
    with pytest.raises(ConfigError, match="one-shot iterator"):
        RegMean().fit(s.factory, s.models, [iter(d) for d in s.data], cache=tmp_path)


def test_data_that_change_between_readings_warn_that_they_never_hit(tmp_path):
    class Shuffling:
        def __init__(self, batches: list[torch.Tensor]) -> None:
            self.batches = batches
            self.turn = 0

        def __iter__(self):
            self.turn += 1
            return iter(self.batches[self.turn % 2 :] + self.batches[: self.turn % 2])

    s = setup()
    data = [Shuffling(d) for d in s.data]
    with pytest.warns(RuntimeWarning, match="differed between two readings"):
        RegMean(num_examples=4).fit(s.factory, s.models, data, cache=tmp_path)


@pytest.mark.parametrize("make", [TaskWiseAdaMerging, LayerWiseAdaMerging], ids=["task", "layer"])
def test_adamerging_reuses_its_coefficients_until_an_input_or_setting_changes(make, tmp_path):
    s = setup()

    def fit(rule):
        Net.calls = 0
        merged = rule.fit(s.factory, s.models, s.data, base=s.base, cache=tmp_path)
        return merged, Net.calls, rule.summary()

    first, calls, summary = fit(make(steps=6))
    assert calls > 0 and len(summary["entropy"]) == 6
    second, calls, again = fit(make(steps=6))
    assert calls == 0  # no forward pass: the coefficients come from the cache
    assert again == summary
    assert all(torch.equal(first[k], second[k]) for k in first)
    uncached = make(steps=6).fit(s.factory, s.models, s.data, base=s.base)
    assert all(torch.equal(first[k], uncached[k]) for k in first)
    _, calls, _ = fit(make(steps=6, lr=1e-2))
    assert calls > 0  # another setting
    s.data[0][0] = s.data[0][0] + 1.0
    _, calls, _ = fit(make(steps=6))
    assert calls > 0  # other data
    s.base["encoder.0.bias"] = s.base["encoder.0.bias"] + 1.0
    _, calls, _ = fit(make(steps=6))
    assert calls > 0  # another base
    s.heads[0]["bias"] = s.heads[0]["bias"] + 1.0
    _, calls, _ = fit(make(steps=6))
    assert calls > 0  # another head (the factory's, not merged): the entropy is measured on it
    _, calls, _ = fit(make(steps=6))
    assert calls == 0
    manifests = sorted((tmp_path / make.name).glob("*.json"))
    assert len(manifests) == 5
    entry = json.loads(manifests[0].read_text())
    assert set(entry["tensors"]) == {"coefficients"} and entry["fields"]["settings"]["steps"] == 6


def test_adamerging_refuses_one_shot_data_with_a_cache(tmp_path):
    s = setup()
    with pytest.raises(ConfigError, match="one-shot iterators"):
        TaskWiseAdaMerging(steps=2).fit(
            s.factory, s.models, [iter(d) for d in s.data], base=s.base, cache=tmp_path
        )


def test_surgery_reuses_its_trained_modules_until_an_input_or_setting_changes(tmp_path):
    s = setup()
    merged = {k: s.base[k] + 0.3 * sum(m[k] - s.base[k] for m in s.models) for k in s.base}

    def fit(merged=merged, **settings):
        Net.calls = 0
        rule = RepresentationSurgery(**{"steps": 4, "rank": 3, "lr": 0.05, **settings})
        model = rule.fit(s.factory, s.models, s.data, cache=tmp_path, merged=merged)
        return model, Net.calls, rule.summary()

    first, calls, summary = fit()
    assert calls > 0 and len(summary["l1_last_step"]) == 2
    second, calls, again = fit()
    assert calls == 0  # no forward pass: the modules come from the cache
    assert again == summary
    uncached = RepresentationSurgery(steps=4, rank=3, lr=0.05).fit(
        s.factory, s.models, s.data, merged=merged
    )
    for model in (second, uncached):
        for task in range(2):
            for name, value in first.surgery[task].state_dict().items():
                assert torch.equal(model.surgery[task].state_dict()[name], value)
    x = s.data[1][0]
    assert torch.equal(first(x, task=1), second(x, task=1))
    for changed in ({"rank": 2}, {"steps": 3}, {"lr": 0.01}):
        _, calls, _ = fit(**changed)
        assert calls > 0, changed
    _, calls, _ = fit(merged={k: v + 0.1 for k, v in merged.items()})
    assert calls > 0  # another merged model
    s.data[0][0] = s.data[0][0] + 1.0
    _, calls, _ = fit()
    assert calls > 0  # other data
    s.heads[1]["bias"] = s.heads[1]["bias"] + 1.0
    _, calls, _ = fit()
    assert calls > 0  # any unmerged tensor of a task model enters the key (here the head,
    # which the surgery does not read: the key is conservative there)
    manifests = sorted((tmp_path / "surgery").glob("*.json"))
    assert len(manifests) == 7
    entry = json.loads(manifests[0].read_text())
    assert set(entry["tensors"]) == {"0.down", "0.up", "1.down", "1.up"}
    assert entry["fields"]["settings"]["head"] == "head"


def test_surgery_passes_its_cache_to_the_fitted_rule_that_merges(tmp_path):
    s = setup()

    def fit():
        Net.calls = 0
        rule = RepresentationSurgery(
            steps=2, rank=3, merge="adamerging_task", merge_params={"steps": 3}
        )
        model = rule.fit(s.factory, s.models, s.data, base=s.base, cache=tmp_path)
        return model, Net.calls

    first, calls = fit()
    assert calls > 0
    second, calls = fit()
    assert calls == 0  # neither AdaMerging nor the surgery runs the model
    assert all(torch.equal(first.merged[k], second.merged[k]) for k in first.merged)
    assert len(list((tmp_path / "adamerging_task").glob("*.json"))) == 1
    assert len(list((tmp_path / "surgery").glob("*.json"))) == 1
    data_free = RepresentationSurgery(steps=2, rank=3, merge="task_arithmetic")
    data_free.fit(s.factory, s.models, s.data, base=s.base, cache=tmp_path)
    assert len(list((tmp_path / "surgery").glob("*.json"))) == 2


def test_surgery_refuses_one_shot_data_with_a_cache(tmp_path):
    s = setup()
    with pytest.raises(ConfigError, match="one-shot iterators"):
        RepresentationSurgery(steps=2, merge="task_arithmetic").fit(
            s.factory, s.models, [iter(d) for d in s.data], base=s.base, cache=tmp_path
        )
