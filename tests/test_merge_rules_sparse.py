"""Sparsifying merging rules against their formulas on hand-checked tensors: the shared pieces
(top-k, band, n:m masks, DARE, MagPrune, sign election), TIES, DARE, Model Breadcrumbs, DELLA,
CABS and PCB."""

from __future__ import annotations

import math

import pytest
import torch

from manytask.errors import ConfigError
from manytask.merge.methods.breadcrumbs import Breadcrumbs, BreadcrumbsTies
from manytask.merge.methods.cabs import Cabs, conflict_aware_masks
from manytask.merge.methods.dare import DareLinear, DareTies
from manytask.merge.methods.della import Della, DellaLinear
from manytask.merge.methods.pcb import ParameterCompetitionBalancing, clip_magnitudes
from manytask.merge.methods.sparsify import (
    block_top_mask,
    drop_and_rescale,
    keep_count,
    magnitude_band_mask,
    magnitude_sampled_drop,
    top_magnitude_mask,
)
from manytask.merge.methods.task_arithmetic import TaskArithmetic
from manytask.merge.methods.ties import Ties
from tests.merge_rules import close, run, t


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- shared pieces --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fraction", "size", "kept"),
    [(0.2, 5, 1), (0.5, 5, 3), (0.4, 5, 2), (0.01, 5, 1), (1.0, 5, 5), (0.3, 0, 0)],
)
def test_keep_count_rounds_to_nearest_and_keeps_at_least_one(fraction, size, kept):
    # 0.2·5 = 1; 0.5·5 = 2.5 rounds up to 3; 0.4·5 = 2; 0.05 → at least 1; empty tensor → 0
    assert keep_count(fraction, size) == kept


def test_top_magnitude_mask_keeps_the_largest_entries_of_each_task():
    # task 0: |[1, -5, 3, 0.5, -2]| top 2 → -5, 3; task 1: |[4, 0, 0, 0, 1]| top 2 → 4, 1
    vectors = torch.stack([t(1, -5, 3, 0.5, -2), t(4, 0, 0, 0, 1)])
    expected = [[False, True, True, False, False], [True, False, False, False, True]]
    assert top_magnitude_mask(vectors, 0.4).tolist() == expected


def test_magnitude_band_mask_drops_outliers_and_small_entries():
    # magnitudes in order: 10, 8, 7, 6, 5, 4, 3, 2, 1, 0.5; γ = 0.1 drops 10, d = 0.3 keeps
    # the next 3: 8 (index 7), 7 (index 9), -6 (index 8)
    vectors = t(10, -1, 5, 3, -4, 2, 0.5, 8, -6, 7)[None]
    mask = magnitude_band_mask(vectors, 0.3, 0.1)
    assert mask[0].nonzero().flatten().tolist() == [7, 8, 9]


def test_block_top_mask_keeps_n_of_every_m_and_a_share_of_the_tail():
    # blocks [1, 5, 2, 4] → 5, 4; [3, 0, 9, 1] → 9, 3; tail [7, 2] keeps round(2·2/4) = 1 → 7
    mask = block_top_mask(t(1, 5, 2, 4, 3, 0, 9, 1, 7, 2), n=2, m=4)
    assert mask.nonzero().flatten().tolist() == [1, 3, 4, 6, 8]


def test_drop_and_rescale_keeps_entries_where_the_uniform_draw_is_below_density():
    # DARE: τ̃ = m ⊙ τ / d with m = [u < d], u drawn from the generator entry by entry, the two
    # task vectors' draws of an entry together (draw k is entry k // 2 of task k % 2)
    vectors = torch.arange(1.0, 13.0).reshape(2, 6)
    draws = torch.rand(12, generator=gen(7)).reshape(6, 2).T
    expected = torch.where(draws < 0.3, vectors / 0.3, 0.0)
    torch.testing.assert_close(drop_and_rescale(vectors, 0.3, gen(7)), expected)


def test_drop_and_rescale_is_unbiased():
    # E[τ̃] = d · τ / d = τ: the mean of 40000 ones stays 1 (std of the mean ≈ 0.008)
    dropped = drop_and_rescale(torch.ones(1, 40000), 0.3, gen(0))
    assert float(dropped.mean()) == pytest.approx(1.0, abs=0.04)
    values = dropped.unique()
    assert values.tolist()[0] == 0.0
    assert values.tolist()[1:] == [pytest.approx(1 / 0.3)]


def test_magnitude_sampled_drop_keep_probabilities_follow_the_magnitude_rank():
    # row [1, -3, 2, 0.5], d = 0.5, ε = 0.2: ranks by magnitude 1, 3, 2, 0 →
    # q = 0.4 + 0.2·r/3 = [0.4667, 0.6, 0.5333, 0.4]; kept entries are divided by q
    row = t(1, -3, 2, 0.5)[None]
    keep_prob = t(0.4 + 0.2 / 3, 0.6, 0.4 + 0.4 / 3, 0.4)[None]
    draws = torch.rand(row.shape, generator=gen(3))
    expected = torch.where(draws < keep_prob, row / keep_prob, 0.0)
    torch.testing.assert_close(magnitude_sampled_drop(row, 0.5, 0.2, gen(3)), expected)


def test_magnitude_sampled_drop_ranks_within_each_row():
    # 6000 rows [1, 2, 3], d = 0.5, ε = 0.4 → q = 0.3, 0.5, 0.7 per column; unbiased values
    rows = t(1, 2, 3).repeat(6000, 1)[None]
    dropped = magnitude_sampled_drop(rows, 0.5, 0.4, gen(1))[0]
    kept = (dropped != 0).float().mean(dim=0)
    torch.testing.assert_close(kept, t(0.3, 0.5, 0.7), atol=0.03, rtol=0)
    torch.testing.assert_close(dropped.mean(dim=0), t(1, 2, 3), atol=0.12, rtol=0)


# --- TIES -----------------------------------------------------------------------------------

# A hand-made sign conflict (three tasks, base 0, no trim):
#   entry 0: τ = [3, -1, -1]   sum  1 → γ = +, agreeing {3}       → 3   (plain mean 1/3)
#   entry 1: τ = [-2, -2, 1]   sum -3 → γ = -, agreeing {-2, -2}  → -2  (plain mean -1)
#   entry 2: τ = [2, 4, 0]     sum  6 → γ = +, agreeing {2, 4}    → 3   (zero is not counted)
#   entry 3: τ = [1, -1, 0]    sum  0 → γ = 0, nothing agrees      → 0
CONFLICT = [t(3, -2, 2, 1), t(-1, -2, 4, -1), t(-1, 1, 0, 0)]


def test_ties_disjoint_mean_resolves_a_sign_conflict():
    close(run(Ties(density=1.0), t(0, 0, 0, 0), CONFLICT), [3, -2, 3, 0])
    # the plain mean (task arithmetic with λ = 1/3) differs on entries 0, 1 and 2
    close(run(TaskArithmetic(scale=1 / 3), t(0, 0, 0, 0), CONFLICT), [1 / 3, -1, 2, 0])


def test_ties_trims_each_task_to_its_top_k_before_electing():
    # density 0.5 keeps 2 of 4 per task:
    #   τ1 = [4, 1, -2, 0.5] → [4, 0, -2, 0];  τ2 = [-3, 0.5, -1, 2] → [-3, 0, 0, 2]
    #   τ3 = [1, -3, 0.25, 1.5] → [0, -3, 0, 1.5]
    # entry 0: 4 - 3 > 0 → {4} → 4; entry 1: {-3} → -3; entry 2: {-2} → -2;
    # entry 3: 2 + 1.5 > 0 → {2, 1.5} → 1.75; θ = 1 + τ_m
    models = [t(5, 2, -1, 1.5), t(-2, 1.5, 0, 3), t(2, -2, 1.25, 2.5)]
    close(run(Ties(density=0.5), t(1, 1, 1, 1), models), [5, -2, -1, 2.75])


def test_ties_scale_multiplies_the_merged_task_vector():
    close(run(Ties(density=1.0, scale=0.5), t(0, 0, 0, 0), CONFLICT), [1.5, -1, 1.5, 0])


def test_ties_weights_enter_the_election_and_the_mean():
    # τ = [1] and [-2]: unweighted sum -1 elects "-" → -2; weights [3, 1]: 3 - 2 > 0 → "+" → 1
    close(run(Ties(density=1.0), t(0), [t(1), t(-2)]), [-2])
    close(run(Ties(density=1.0, weights=[3, 1]), t(0), [t(1), t(-2)]), [1])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"density": 0.0}, r"ties: density must be in \(0, 1\], got 0.0"),
        ({"density": 1.5}, r"ties: density must be in \(0, 1\], got 1.5"),
        ({"scale": -0.1}, r"ties: scale must be in \[0, inf\), got -0.1"),
        ({"weights": [1.0, -1.0]}, "ties: weights must hold positive"),
    ],
)
def test_ties_rejects_bad_parameters(params, message):
    with pytest.raises(ConfigError, match=message):
        Ties(**params)


# --- DARE -----------------------------------------------------------------------------------


def entry_draws(vectors: torch.Tensor, seed: int) -> torch.Tensor:
    """The first tensor's generator of ``run`` (seeded ``seed·1000``), drawn entry by entry as
    DARE draws, as a ``(T, n)`` tensor."""
    generator = torch.Generator().manual_seed(seed * 1000)
    count, numel = vectors.shape[0], vectors[0].numel()
    return torch.rand(numel * count, generator=generator).reshape(numel, count).T


def test_dare_linear_adds_the_dropped_and_rescaled_task_vectors():
    # θ = θ0 + λ Σ_t [u_t < d] τ_t / d with u the tensor's generator's draws, entry by entry
    # (the T draws of an entry together)
    base, models = t(1, 1, 1, 1), [t(2, 3, 4, 5), t(0, -1, 1, 2)]
    vectors = torch.stack(models) - base
    draws = entry_draws(vectors, seed=0)
    expected = base + 0.5 * torch.where(draws < 0.6, vectors / 0.6, 0.0).sum(dim=0)
    close(run(DareLinear(density=0.6, scale=0.5), base, models), expected)


def test_dare_with_density_one_is_task_arithmetic_and_ties():
    base, models = t(1, 1, 1, 1), [t(2, 3, 4, 5), t(0, -1, 1, 2)]
    # τ1 = [1, 2, 3, 4], τ2 = [-1, -2, 0, 1]: 1 + 0.5·[0, 0, 3, 5] = [1, 1, 2.5, 3.5]
    close(run(DareLinear(density=1.0, scale=0.5), base, models), [1, 1, 2.5, 3.5])
    close(run(DareTies(density=1.0), t(0, 0, 0, 0), CONFLICT), [3, -2, 3, 0])


def test_dare_ties_trim_density_applies_the_ties_trim_after_the_drop():
    # with density 1 the drop keeps everything, so trim 0.5 is TIES's trimmed example
    models = [t(5, 2, -1, 1.5), t(-2, 1.5, 0, 3), t(2, -2, 1.25, 2.5)]
    rule = DareTies(density=1.0, trim_density=0.5)
    close(run(rule, t(1, 1, 1, 1), models), [5, -2, -1, 2.75])


def test_dare_ties_elects_signs_on_the_rescaled_vectors():
    # expected from the formula with the generator's draws: drop, elect, disjoint mean
    base, models = t(0, 0, 0, 0), CONFLICT
    vectors = torch.stack(models)
    draws = entry_draws(vectors, seed=0)
    dropped = torch.where(draws < 0.5, vectors / 0.5, 0.0)
    sign = dropped.sum(dim=0).sign()
    agree = (dropped.sign() == sign) & (dropped != 0)
    count = agree.sum(dim=0)
    mean = torch.where(count > 0, (dropped * agree).sum(dim=0) / count.clamp_min(1), 0.0)
    close(run(DareTies(density=0.5), base, models), mean)


@pytest.mark.parametrize("rule", [DareLinear, DareTies])
def test_dare_is_reproducible_with_a_seed(rule):
    base = torch.zeros(500)
    models = [torch.linspace(-1, 1, 500), torch.linspace(1, -1, 500) ** 3]
    first = run(rule(density=0.5), base, models, seed=11)
    again = run(rule(density=0.5), base, models, seed=11)
    other = run(rule(density=0.5), base, models, seed=12)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_dare_draws_only_from_the_given_generator():
    # changing the global RNG between two runs with the same seed changes nothing
    base, models = torch.zeros(300), [torch.randn(300), torch.randn(300)]
    torch.manual_seed(1)
    first = run(DareLinear(density=0.5), base, models, seed=3)
    torch.manual_seed(2)
    assert torch.equal(first, run(DareLinear(density=0.5), base, models, seed=3))


def test_dare_rejects_a_zero_density():
    with pytest.raises(ConfigError, match=r"dare_linear: density must be in \(0, 1\]"):
        DareLinear(density=0.0)
    with pytest.raises(ConfigError, match=r"dare_ties: trim_density must be in \(0, 1\]"):
        DareTies(trim_density=2.0)


# --- Model Breadcrumbs ----------------------------------------------------------------------

# τ1 = [10, -1, 5, 3, -4, 2, 0.5, 8, -6, 7]: γ = 0.1 drops 10, d = 0.3 keeps 8, -6, 7 (7, 8, 9)
# τ2 = [0.1, 0.2, ..., 1.0]: drops 1.0, keeps 0.9, 0.8, 0.7 (indices 8, 7, 6)
CRUMBS = [t(10, -1, 5, 3, -4, 2, 0.5, 8, -6, 7), torch.arange(1, 11) / 10]


def test_breadcrumbs_keeps_the_band_under_the_outliers_and_adds():
    # sum of kept: index 6: 0.7; 7: 8 + 0.8 = 8.8; 8: -6 + 0.9 = -5.1; 9: 7 → × λ = 0.5
    rule = Breadcrumbs(density=0.3, gamma=0.1, scale=0.5)
    close(run(rule, torch.zeros(10), CRUMBS), [0, 0, 0, 0, 0, 0, 0.35, 4.4, -2.55, 3.5])


def test_breadcrumbs_ties_elects_signs_on_the_masked_vectors():
    # index 6: {0.7}; 7: {8, 0.8} → 4.4; 8: -6 + 0.9 < 0 → {-6}; 9: {7}
    rule = BreadcrumbsTies(density=0.3, gamma=0.1)
    close(run(rule, torch.zeros(10), CRUMBS), [0, 0, 0, 0, 0, 0, 0.7, 4.4, -6, 7])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"gamma": 1.0}, r"breadcrumbs: gamma must be in \[0, 1\), got 1.0"),
        ({"density": 0.9, "gamma": 0.2}, r"breadcrumbs: density \+ gamma must be in \[0, 1\]"),
        ({"density": 0.0}, r"breadcrumbs: density must be in \(0, 1\]"),
    ],
)
def test_breadcrumbs_rejects_bad_parameters(params, message):
    with pytest.raises(ConfigError, match=message):
        Breadcrumbs(**params)


# --- DELLA ----------------------------------------------------------------------------------


def test_della_without_drop_is_elect_and_disjoint_mean_scaled():
    # d = 1, ε = 0 keeps everything unchanged: the TIES conflict example × λ = 1.1
    close(run(Della(density=1.0, epsilon=0.0), t(0, 0, 0, 0), CONFLICT), [3.3, -2.2, 3.3, 0])


def test_della_linear_without_drop_is_the_mean_task_vector_scaled():
    # mean of CONFLICT: [1/3, -1, 2, 0] × 1.1
    rule = DellaLinear(density=1.0, epsilon=0.0)
    close(run(rule, t(0, 0, 0, 0), CONFLICT), [1.1 / 3, -1.1, 2.2, 0])


def test_della_follows_magprune_then_elect_and_disjoint_mean():
    # two tasks, one row of 4 each, d = 0.5, ε = 0.2 (q from the magnitude rank in each row)
    models = [t(1, -3, 2, 0.5), t(-2, 1, 0.25, 3)]
    vectors = torch.stack(models)
    dropped = magnitude_sampled_drop(vectors.clone(), 0.5, 0.2, torch.Generator().manual_seed(0))
    sign = dropped.sum(dim=0).sign()
    agree = (dropped.sign() == sign) & (dropped != 0)
    count = agree.sum(dim=0)
    mean = torch.where(count > 0, (dropped * agree).sum(dim=0) / count.clamp_min(1), 0.0)
    close(run(Della(density=0.5, epsilon=0.2, scale=1.0), t(0, 0, 0, 0), models), mean)


def test_della_is_reproducible_with_a_seed():
    base, models = torch.zeros(40, 10), [torch.randn(40, 10), torch.randn(40, 10)]
    first = run(Della(), base, models, seed=5)
    assert torch.equal(first, run(Della(), base, models, seed=5))
    assert not torch.equal(first, run(Della(), base, models, seed=6))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"density": 0.7, "epsilon": 0.8}, r"della: density \+ epsilon/2 must be in \[0, 1\]"),
        ({"density": 0.05, "epsilon": 0.2}, r"della: density - epsilon/2 must be in \(0, inf\)"),
        ({"epsilon": -0.1}, r"della: epsilon must be in \[0, inf\)"),
    ],
)
def test_della_rejects_keep_probabilities_outside_0_1(params, message):
    with pytest.raises(ConfigError, match=message):
        Della(**params)


# --- CABS -----------------------------------------------------------------------------------


def test_cabs_later_tasks_prune_only_the_positions_left_free():
    # n:m = 1:2. τ1 = [3, 1, -2, 5]: blocks [3, 1] → 0, [-2, 5] → 3.  K1 = {0, 3}
    # τ2 = [4, -2, 6, 1] on the free {1, 2}: [·, -2] → 1, [6, ·] → 2.  K2 = {1, 2}
    # θ = Σ K_t ⊙ τ_t = [3, -2, 6, 5] (plain n:m would give τ2 the positions 0 and 2)
    models = [t(3, 1, -2, 5), t(4, -2, 6, 1)]
    close(run(Cabs(n=1, m=2), t(0, 0, 0, 0), models), [3, -2, 6, 5])
    masks = conflict_aware_masks(torch.stack(models), 1, 2)
    assert masks.tolist() == [[True, False, False, True], [False, True, True, False]]


def test_cabs_task_order_is_the_pruning_priority():
    # τ2 first: K = {0 (4), 2 (6)}; τ1 then keeps 1 (1) and 3 (5) → [4, 1, 6, 5]
    close(run(Cabs(n=1, m=2), t(0, 0, 0, 0), [t(4, -2, 6, 1), t(3, 1, -2, 5)]), [4, 1, 6, 5])


def test_cabs_scale_and_weights_multiply_each_sparse_task_vector():
    # 2·(1·[3, 0, 0, 5] + 0.5·[0, -2, 6, 0]) = [6, -2, 6, 10]
    rule = Cabs(n=1, m=2, scale=2.0, weights=[1.0, 0.5])
    close(run(rule, t(0, 0, 0, 0), [t(3, 1, -2, 5), t(4, -2, 6, 1)]), [6, -2, 6, 10])


def test_cabs_keeps_a_share_of_a_tensor_smaller_than_a_block():
    # 3 entries < m = 4: keeps round(2·3/4) = round(1.5) = 2 largest of τ1 = [1, -3, 2]
    close(run(Cabs(n=2, m=4), t(0, 0, 0), [t(1, -3, 2)]), [0, -3, 2])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"n": 5, "m": 4}, "cabs: n must be at most m"),
        ({"n": 0}, "cabs: n must be an integer ≥ 1, got 0"),
        ({"m": 2.5}, "cabs: m must be an integer ≥ 1, got 2.5"),
    ],
)
def test_cabs_rejects_bad_block_sizes(params, message):
    with pytest.raises(ConfigError, match=message):
        Cabs(**params)


# --- PCB ------------------------------------------------------------------------------------


def test_pcb_clips_magnitudes_at_the_quantiles():
    # d = 10, c = 0.1: low = 2nd smallest = 1, high = 9th smallest = 8
    clipped = clip_magnitudes(torch.arange(10.0)[None], 0.1)
    assert clipped[0].tolist() == [1, 1, 2, 3, 4, 5, 6, 7, 8, 8]


def test_pcb_balances_by_intra_and_inter_scores():
    # T = 2, τ1 = [2, -1, 1], τ2 = [1, 1, -2], clip 0, ratio 1 (all kept; the minimum gets 0)
    # intra: mm(|τ1|) = [1, 0, 0] → exp(2·[1, 0, 0]) = [e², 1, 1]; τ2 → [1, 1, e²]
    # inter: Σ τ = [3, 0, -1]; tanh(τ1 ⊙ Σ) = [tanh 6, 0, -tanh 1]; τ2 → [tanh 3, 0, tanh 2]
    # β1 = [e² tanh 6, 0, -tanh 1] → s1 = [1, tanh 1/(e² tanh 6 + tanh 1), 0]
    # β2 = [tanh 3, 0, e² tanh 2] → s2 = [x, 0, 1], x = tanh 3 / (e² tanh 2)
    # τ_m = (s1 τ1 + s2 τ2)/(s1 + s2) = [(2 + x)/(1 + x), -1, -2]
    x = math.tanh(3) / (math.exp(2) * math.tanh(2))
    rule = ParameterCompetitionBalancing(ratio=1.0, clip=0.0)
    close(run(rule, t(0, 0, 0), [t(2, -1, 1), t(1, 1, -2)]), [(2 + x) / (1 + x), -1, -2])


def test_pcb_drops_all_but_the_top_ratio_of_scores():
    # ratio 1/3 of d = 3 keeps K = 1 entry per task: c_t = 2nd largest β_t
    # β1 = [7.39, 0, -0.76] → s1 = [1, 0, 0]; β2 = [0.995, 0, 7.12] → s2 = [0, 0, 1]
    # entry 1 keeps no task → 0; θ = 1 + [2, 0, -2]·λ with λ = 0.5
    rule = ParameterCompetitionBalancing(ratio=1 / 3, clip=0.0, scale=0.5)
    close(run(rule, t(1, 1, 1), [t(3, 0, 2), t(2, 2, -1)]), [2, 1, 0])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"ratio": 0.0}, r"pcb: ratio must be in \(0, 1\]"),
        ({"clip": 0.5}, r"pcb: clip must be in \[0, 0.5\)"),
        ({"scale": -1.0}, r"pcb: scale must be in \[0, inf\)"),
    ],
)
def test_pcb_rejects_bad_parameters(params, message):
    with pytest.raises(ConfigError, match=message):
        ParameterCompetitionBalancing(**params)
