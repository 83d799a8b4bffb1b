"""Rules with per-task masks against their formulas on hand-checked tensors: TALL masks,
Consensus Merging (task arithmetic and TIES) and EMR-Merging."""

from __future__ import annotations

import pytest
import torch

from manytask.errors import ConfigError
from manytask.merge.methods.emr import Emr
from manytask.merge.methods.tall_masks import ConsensusTaskArithmetic, ConsensusTies, TallMasks
from manytask.merge.rule import Merged
from tests.merge_rules import close, run, run_many, t

# Three tasks, base 0:  τ1 = [1, 0.1], τ2 = [0.2, 1], τ3 = [0.3, -0.5];  Σ τ = [1.5, 0.6].
# TALL masks at λ = 0.4, m_t = |τ_t| > 0.4 |Σ τ - τ_t|:
#   τ1: 1 > 0.4·0.5 = 0.2 yes;    0.1 > 0.4·0.5 = 0.2 no
#   τ2: 0.2 > 0.4·1.3 = 0.52 no;  1 > 0.4·0.4 = 0.16 yes
#   τ3: 0.3 > 0.4·1.2 = 0.48 no;  0.5 > 0.4·1.1 = 0.44 yes
TASKS = [t(1, 0.1), t(0.2, 1), t(0.3, -0.5)]


def masks_of(result: torch.Tensor | Merged) -> list[list[bool]]:
    assert isinstance(result, Merged)
    assert all(mask.dtype == torch.bool for mask in result.extras.values())
    return [result.extras[f"mask/{task}"].tolist() for task in range(len(result.extras))]


# --- TALL masks -----------------------------------------------------------------------------


def test_tall_masks_mark_where_a_task_outweighs_the_others():
    result = run(TallMasks(), t(0, 0), TASKS)
    close(result, [1.5, 0.6])  # θ0 + Σ τ, from which task t is θ0 + m_t ⊙ Σ τ
    assert masks_of(result) == [[True, False], [False, True], [False, True]]


def test_tall_masks_take_one_lambda_per_task():
    # λ = [0.1, 1, 1]: τ1 entry 1: 0.1 > 0.1·0.5 yes; τ2: 0.2 > 1.3 no, 1 > 0.4 yes;
    # τ3: 0.3 > 1.2 no, 0.5 > 1.1 no
    result = run(TallMasks(mask_lambda=[0.1, 1.0, 1.0]), t(0, 0), TASKS)
    assert masks_of(result) == [[True, True], [False, True], [False, False]]


def test_tall_masks_are_empty_for_a_task_that_changed_nothing():
    # |0| > λ·|τ_MTL - 0| never holds (strict), even where the other task is also 0
    result = run(TallMasks(), t(0, 0), [t(0, 0), t(1, 0)])
    assert masks_of(result) == [[False, False], [True, False]]


def test_tall_masks_on_the_ties_vector_use_the_disjoint_sum():
    # no trim (density 1): entry 0 sum 1.5 > 0, all agree → 1.5;
    # entry 1 sum 0.6 > 0, agreeing {0.1, 1} → 1.1 (the plain sum is 0.6)
    result = run(TallMasks(multi_task="ties", density=1.0), t(0, 0), TASKS)
    close(result, [1.5, 1.1])


def test_tall_masks_reject_bad_parameters():
    with pytest.raises(ConfigError, match=r"tall_masks: mask_lambda must be in \[0, inf\)"):
        TallMasks(mask_lambda=-0.1)
    with pytest.raises(ConfigError, match=r"tall_masks: mask_lambda needs one value per task"):
        TallMasks(mask_lambda=[0.2, 0.3]).check_models(3)
    with pytest.raises(ConfigError, match="tall_masks: multi_task must be 'task_arithmetic'"):
        TallMasks(multi_task="average")  # type: ignore[arg-type]


# --- Consensus Merging ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (0, [0.45, 0.18]),  # k = 0 keeps everything: task arithmetic, 0.3·[1.5, 0.6]
        (1, [0.45, 0.18]),  # both entries matter to at least one task
        (2, [0, 0.18]),  # entry 0 matters to one task only (selfish): dropped
        (4, [0, 0]),  # more tasks than there are: the base
    ],
)
def test_consensus_ta_keeps_weights_relevant_to_at_least_k_tasks(k, expected):
    # relevance counts from the masks above: entry 0 → 1 task, entry 1 → 2 tasks
    close(run(ConsensusTaskArithmetic(k=k), t(0, 0), TASKS), expected)


def test_consensus_ties_masks_the_ties_vector():
    # τ_MTL (TIES, no trim) = [1.5, 1.1]; masks at λ = 0.4 against it:
    #   τ1: 1 > 0.2 yes, 0.1 > 0.4·1.0 no;  τ2: 0.2 > 0.52 no, 1 > 0.04 yes;
    #   τ3: 0.3 > 0.48 no, 0.5 > 0.4·1.6 = 0.64 no  → counts [1, 1]
    # k = 1: 0.3·[1.5, 1.1] = [0.45, 0.33];  k = 2: nothing left, the base
    close(run(ConsensusTies(k=1, density=1.0), t(0, 0), TASKS), [0.45, 0.33])
    close(run(ConsensusTies(k=2, density=1.0), t(0, 0), TASKS), [0, 0])


@pytest.mark.parametrize("k", [-1, 1.5])
def test_consensus_rejects_a_k_that_is_not_a_count(k):
    with pytest.raises(ConfigError, match="consensus_ta: k must be an integer ≥ 0"):
        ConsensusTaskArithmetic(k=k)


# --- EMR ------------------------------------------------------------------------------------

# Three tasks on tensor "a" (base 1): τ1 = [2, -1, 0.5], τ2 = [-1, -3, 1], τ3 = [0.5, 2, -2]
#   entry 0: Σ = 1.5 → +, agreeing |2|, |0.5| → max 2 → τ_uni = 2
#   entry 1: Σ = -2 → -, agreeing |-1|, |-3| → 3 → τ_uni = -3
#   entry 2: Σ = -0.5 → -, agreeing |-2| → τ_uni = -2
#   M_t = τ_t ⊙ τ_uni > 0: M1 = [1, 1, 0], M2 = [0, 1, 0], M3 = [1, 0, 1]
#   λ1 = (2 + 1 + 0.5)/(2 + 3) = 0.7, λ2 = 5/3, λ3 = 4.5/4 = 1.125
EMR_A = (t(1, 1, 1), [t(3, 0, 1.5), t(0, -2, 2), t(1.5, 3, -1)])


def test_emr_unified_vector_masks_and_rescalers():
    rule = Emr()
    result = run(rule, *EMR_A, name="a")
    close(result, [3, -2, -1])  # θ0 + τ_uni
    assert masks_of(result) == [[True, True, False], [False, True, False], [True, False, True]]
    assert rule.summary()["rescalers"] == pytest.approx([0.7, 5 / 3, 1.125])


def test_emr_rescalers_sum_over_the_whole_model():
    # tensor "b": τ = [1], [1], [1] → τ_uni = [1], every mask 1; sums add over tensors:
    # λ1 = (3.5 + 1)/(5 + 1) = 0.75, λ2 = (5 + 1)/(3 + 1) = 1.5, λ3 = (4.5 + 1)/(4 + 1) = 1.1
    rule = Emr()
    out = run_many(rule, {"a": EMR_A, "b": (t(0), [t(1), t(1), t(1)])})
    close(out["b"], [1])
    assert rule.summary()["rescalers"] == pytest.approx([0.75, 1.5, 1.1])


def test_emr_task_whose_mask_is_empty_gets_rescaler_one():
    # τ2 = [-1] disagrees with the elected "+" everywhere: its mask selects nothing
    rule = Emr()
    run(rule, t(0), [t(3), t(-1)])
    assert rule.summary()["rescalers"] == pytest.approx([1.0, 1.0])  # 3/3 and the fallback


def test_emr_refuses_to_merge_before_the_first_pass():
    with pytest.raises(RuntimeError, match="two-pass"):
        Emr().merge_tensor("w", t(0), [t(1)], torch.Generator())
