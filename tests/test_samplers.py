"""Task samplers against their formulas: rates by hand on sizes (100, 10, 1), empirical task
frequencies, round-robin order, the annealing schedule, without-replacement passes, seeds,
resuming from a JSON state, and the errors for bad parameters."""

from __future__ import annotations

import json
import math

import pytest
import torch

from manytask import registry
from manytask.data.mixing import (
    AnnealedSampler,
    ProportionalSampler,
    RoundRobinSampler,
    TemperatureSampler,
    UniformSampler,
    annealed_exponent,
    build_sampler,
    proportional_rates,
    temperature_rates,
)
from manytask.errors import ConfigError

SIZES = [100, 10, 1]

# every registered sampler, with parameters that make its draws non-trivial
BUILDS = {
    "proportional": {"cap": 50},
    "temperature": {"temperature": 2.0},
    "uniform": {},
    "round_robin": {},
    "annealed": {"epochs": 4},
}


def close(actual: torch.Tensor, expected: list[float], tol: float = 1e-6) -> bool:
    return torch.allclose(actual, torch.tensor(expected, dtype=torch.float64), atol=tol, rtol=0)


def task_of(indices: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Task index of each global index (example i of task t is offset_t + i)."""
    ends = torch.tensor(sizes).cumsum(0)
    return torch.searchsorted(ends, indices, right=True)


def draw(sampler, batches: int) -> list[torch.Tensor]:
    return [sampler.next_batch() for _ in range(batches)]


# registry ------------------------------------------------------------------------------
def test_five_samplers_are_registered_with_a_summary_naming_their_source():
    assert registry.names("sampler") == sorted(BUILDS)
    for entry in registry.entries("sampler"):
        assert entry.summary, entry.name
        assert entry.name == "round_robin" or "arXiv" in entry.summary, entry


def test_build_sampler_rejects_an_unknown_parameter_and_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="temperature") as info:
        build_sampler("proportional", SIZES, batch_size=4, temperature=2.0)
    assert "cap" in str(info.value)


# rates by hand ---------------------------------------------------------------------------
def test_proportional_without_cap_is_size_over_total():
    sampler = ProportionalSampler(SIZES, batch_size=4, cap=None)
    assert close(sampler.probabilities(), [100 / 111, 10 / 111, 1 / 111])


def test_proportional_cap_limits_each_size_before_normalising():
    # min(n, 10) = (10, 10, 1), total 21
    assert close(proportional_rates(SIZES, cap=10), [10 / 21, 10 / 21, 1 / 21])


def test_proportional_default_cap_is_t5s_two_to_the_nineteen():
    sizes = [2**20, 2**18, 1]  # capped at 2^19: (2^19, 2^18, 1)
    total = 2**19 + 2**18 + 1
    sampler = ProportionalSampler(sizes, batch_size=4)
    assert sampler.cap == 2**19
    assert close(sampler.probabilities(), [2**19 / total, 2**18 / total, 1 / total], 1e-12)


def test_temperature_two_is_square_root_of_sizes():
    # (√100, √10, √1) = (10, 3.16227766, 1), total 14.16227766
    sampler = TemperatureSampler(SIZES, batch_size=4, temperature=2.0, cap=None)
    assert close(sampler.probabilities(), [0.70610111, 0.22328878, 0.07061011], 1e-7)


def test_temperature_default_is_two_with_cap_two_to_the_twenty_one():
    sizes = [2**22, 2**21, 1]  # capped at 2^21: √ gives (2^10.5, 2^10.5, 1) = (1448.1547, ., 1)
    sampler = TemperatureSampler(sizes, batch_size=4)
    assert (sampler.temperature, sampler.cap) == (2.0, 2**21)
    assert close(sampler.probabilities(), [0.49982743, 0.49982743, 0.00034515], 1e-7)


def test_temperature_one_is_proportional_and_a_huge_one_is_uniform():
    assert close(temperature_rates(SIZES, 1.0), [100 / 111, 10 / 111, 1 / 111])
    assert close(temperature_rates(SIZES, 1e9), [1 / 3, 1 / 3, 1 / 3], 1e-7)


def test_mt5_alpha_point_three_is_temperature_one_over_alpha():
    # 100^0.3 = 3.98107171, 10^0.3 = 1.99526231, 1; total 6.97633402
    rates = temperature_rates(SIZES, 1 / 0.3, cap=None)
    assert close(rates, [0.57065383, 0.28600441, 0.14334176], 1e-7)


def test_uniform_is_one_over_the_number_of_tasks():
    assert close(UniformSampler(SIZES, batch_size=4).probabilities(), [1 / 3] * 3)


def test_round_robin_reports_equal_long_run_shares():
    assert close(RoundRobinSampler(SIZES, batch_size=4).probabilities(), [1 / 3] * 3)


def test_annealed_exponent_falls_from_one_to_point_two_linearly_over_epochs():
    # α_e = 1 − 0.8 (e − 1)/(E − 1), E = 5
    exponents = [annealed_exponent(e, 5) for e in range(5)]
    assert exponents == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert annealed_exponent(0, 1) == 1.0  # one epoch: α_1
    assert annealed_exponent(1, 3, start=0.5, end=0.0) == pytest.approx(0.25)


def test_annealed_rates_per_epoch_by_hand():
    sampler = AnnealedSampler(SIZES, batch_size=4, epochs=5)
    assert close(sampler.probabilities(0), [100 / 111, 10 / 111, 1 / 111])
    # α = 0.6: (15.8489319, 3.98107171, 1), total 20.8300036
    assert close(sampler.probabilities(2), [0.76087034, 0.19112199, 0.04800767], 1e-7)
    # α = 0.2: (2.51188643, 1.58489319, 1), total 5.09677962
    assert close(sampler.probabilities(4), [0.49283795, 0.31095973, 0.19620232], 1e-7)


def test_annealed_probabilities_follow_the_epoch_being_drawn():
    sampler = AnnealedSampler(SIZES, batch_size=37, epochs=2)  # 3 batches per epoch
    assert len(sampler) == 3
    first = sampler.probabilities()
    list(sampler)
    assert torch.equal(sampler.probabilities(), sampler.rates(1))  # the next epoch's
    assert not torch.equal(first, sampler.rates(1))


def test_annealed_drawing_past_its_last_epoch_is_an_error():
    sampler = AnnealedSampler(SIZES, batch_size=111, epochs=1)
    list(sampler)
    with pytest.raises(ConfigError, match="outside the annealing schedule of 1 epochs"):
        sampler.next_batch()


# empirical frequencies -------------------------------------------------------------------
@pytest.mark.parametrize("mixed", [True, False])
@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("proportional", {"cap": 50}),
        ("temperature", {"temperature": 2.0}),
        ("uniform", {}),
        ("annealed", {"epochs": 1}),
    ],
)
def test_task_frequencies_match_the_probabilities(name, params, mixed):
    draws = 3000  # independent task draws: one per row (mixed) or one per batch (single-task)
    batch_size, steps = (30, draws // 30) if mixed else (4, draws)
    sampler = build_sampler(
        name, SIZES, batch_size, seed=3, mixed=mixed, steps_per_epoch=steps, **params
    )
    tasks = task_of(torch.cat(list(sampler)), SIZES)
    frequencies = torch.bincount(tasks, minlength=3).double() / len(tasks)
    expected = sampler.rates(0)
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert torch.all((frequencies - expected).abs() <= 5 * sigma), (frequencies, expected)


def test_single_task_batches_hold_one_task_each():
    sampler = ProportionalSampler(SIZES, batch_size=8, cap=None, mixed=False, seed=1)
    tasks = [task_of(batch, SIZES) for batch in draw(sampler, 30)]
    assert all(bool((t == t[0]).all()) for t in tasks)
    assert len({int(t[0]) for t in tasks}) > 1  # different batches, different tasks


# round robin -----------------------------------------------------------------------------
def test_round_robin_mixed_cycles_rows_over_tasks_across_batches_and_epochs():
    sampler = RoundRobinSampler([5, 3, 2], batch_size=4)  # 10 rows: 3 batches per epoch
    assert len(sampler) == 3
    epoch_one = [task_of(b, [5, 3, 2]).tolist() for b in sampler]
    epoch_two = [task_of(b, [5, 3, 2]).tolist() for b in sampler]
    assert epoch_one == [[0, 1, 2, 0], [1, 2, 0, 1], [2, 0, 1, 2]]
    assert epoch_two == [[0, 1, 2, 0], [1, 2, 0, 1], [2, 0, 1, 2]]  # rows 12…23 go on cycling


def test_round_robin_single_task_batches_take_turns():
    sampler = RoundRobinSampler([5, 3, 2], batch_size=2, mixed=False)  # 5 batches per epoch
    tasks = [task_of(b, [5, 3, 2]).tolist() for b in draw(sampler, 7)]
    assert tasks == [[0, 0], [1, 1], [2, 2], [0, 0], [1, 1], [2, 2], [0, 0]]


# examples within a task ------------------------------------------------------------------
def test_each_pass_over_a_task_is_a_permutation_and_the_next_pass_reshuffles():
    sizes = [20, 7]
    sampler = RoundRobinSampler(sizes, batch_size=6, seed=5)
    indices = torch.cat(draw(sampler, 14))  # 84 rows: 42 per task, > 2 passes over each
    first = indices[task_of(indices, sizes) == 0]
    second = indices[task_of(indices, sizes) == 1] - 20
    for local, size in ((first, 20), (second, 7)):
        for start in range(0, len(local) - size + 1, size):
            assert sorted(local[start : start + size].tolist()) == list(range(size))
    assert first[:20].tolist() != first[20:40].tolist()  # reshuffled (1 in 20! to fail)


def test_a_task_smaller_than_the_batch_repeats_only_across_passes():
    sampler = UniformSampler([3, 2], batch_size=10, mixed=False, seed=0)
    batch = sampler.next_batch()
    size = 3 if int(task_of(batch, [3, 2])[0]) == 0 else 2
    local = batch - (0 if size == 3 else 3)
    for start in range(0, 10 - size + 1, size):
        assert sorted(local[start : start + size].tolist()) == list(range(size))


# epochs, seeds, resuming ----------------------------------------------------------------
def test_default_epoch_is_the_total_size_in_whole_batches_and_iteration_moves_on():
    sampler = TemperatureSampler(SIZES, batch_size=8)  # ⌈111 / 8⌉ = 14
    assert len(sampler) == 14
    assert len(list(sampler)) == 14
    assert (sampler.epoch, sampler.step) == (0, 14)
    assert len(list(sampler)) == 14
    assert (sampler.epoch, sampler.step) == (1, 14)
    assert len(TemperatureSampler(SIZES, batch_size=8, steps_per_epoch=3)) == 3


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_the_same_seed_gives_the_same_batches_and_another_seed_others(name):
    runs = [draw(build_sampler(name, SIZES, 6, seed=s, **BUILDS[name]), 12) for s in (7, 7, 8)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2], strict=True))


@pytest.mark.parametrize("mixed", [True, False])
@pytest.mark.parametrize("name", sorted(BUILDS))
@pytest.mark.parametrize("stop", [5, 19, 20])  # mid-epoch, mid-second epoch, at an epoch end
def test_a_sampler_loaded_from_json_state_continues_identically(name, mixed, stop):
    def build():
        return build_sampler(name, SIZES, 11, seed=4, mixed=mixed, **BUILDS[name])

    original = build()  # ⌈111 / 11⌉ = 11 batches per epoch
    draw(original, stop)
    state = json.loads(json.dumps(original.state_dict()))
    resumed = build()
    resumed.load_state_dict(state)
    rest = 44 - stop  # up to the end of epoch 4 (the annealed sampler's last)
    for a, b in zip(draw(original, rest), draw(resumed, rest), strict=True):
        assert torch.equal(a, b)
    assert resumed.state_dict() == original.state_dict()


def test_loading_into_a_used_sampler_replaces_its_seed_and_position():
    original = TemperatureSampler(SIZES, batch_size=11, seed=4)
    draw(original, 5)
    used = TemperatureSampler(SIZES, batch_size=11, seed=9)
    draw(used, 5)  # its own permutations are cached; loading must forget them
    used.load_state_dict(json.loads(json.dumps(original.state_dict())))
    for a, b in zip(draw(original, 30), draw(used, 30), strict=True):
        assert torch.equal(a, b)


def test_loading_a_state_of_a_differently_built_sampler_is_an_error_naming_the_difference():
    state = TemperatureSampler(SIZES, batch_size=4, temperature=2.0).state_dict()
    with pytest.raises(ConfigError, match=r"params .*'temperature': 2\.0.*'temperature': 4\.0"):
        TemperatureSampler(SIZES, batch_size=4, temperature=4.0).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"sizes \[100, 10, 1\] \(this sampler: \[100, 10\]\)"):
        TemperatureSampler([100, 10], batch_size=4).load_state_dict(state)
    with pytest.raises(ConfigError, match="sampler 'temperature'"):
        UniformSampler(SIZES, batch_size=4).load_state_dict(state)


def test_loading_an_inconsistent_state_is_an_error():
    sampler = UniformSampler(SIZES, batch_size=4)
    state = sampler.state_dict()
    with pytest.raises(ConfigError, match="lacks"):
        sampler.load_state_dict({k: v for k, v in state.items() if k != "passes"})
    with pytest.raises(ConfigError, match="below its task's size"):
        sampler.load_state_dict({**state, "positions": [0, 10, 0]})


# errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TemperatureSampler(SIZES, 4, temperature=-1.0), "temperature must be .* > 0"),
        (lambda: TemperatureSampler(SIZES, 4, temperature=0.0), "temperature must be .* > 0"),
        (lambda: TemperatureSampler(SIZES, 4, temperature=math.inf), "temperature must be"),
        (lambda: UniformSampler([], 4), "at least one task dataset"),
        (lambda: ProportionalSampler([5, 0, 2], 4), "task number 1 has 0 examples"),
        (lambda: ProportionalSampler([5, 2.5], 4), "must be an int"),
        (lambda: ProportionalSampler(SIZES, 4, cap=0), "cap must be an int ≥ 1"),
        (lambda: UniformSampler(SIZES, 0), "batch_size must be an int ≥ 1"),
        (lambda: UniformSampler(SIZES, 4, steps_per_epoch=0), "steps_per_epoch must be"),
        (lambda: AnnealedSampler(SIZES, 4, epochs=0), "epochs must be an int ≥ 1"),
        (lambda: AnnealedSampler(SIZES, 4, epochs=3, end=-0.1), "end exponent must be"),
    ],
)
def test_bad_parameters_are_config_errors_that_say_what_is_right(build, message):
    with pytest.raises(ConfigError, match=message):
        build()
