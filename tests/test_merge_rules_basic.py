"""Linear and geometric merging rules against their formulas on hand-checked tensors:
weight average, task arithmetic, Model Stock, SLERP and MetaGPT."""

from __future__ import annotations

import math

import pytest
import torch

from manytask.errors import ConfigError
from manytask.merge.methods.average import WeightAverage
from manytask.merge.methods.metagpt import MetaGPT
from manytask.merge.methods.model_stock import ModelStock
from manytask.merge.methods.slerp import Slerp
from manytask.merge.methods.task_arithmetic import TaskArithmetic
from tests.merge_rules import close, run, run_many, t

# --- weight average -------------------------------------------------------------------------


def test_average_is_the_mean_of_the_models_and_ignores_the_base():
    # ([1, 2, 3] + [3, 6, 9]) / 2 = [2, 4, 6]; no base is passed to a base-free rule
    close(run(WeightAverage(), t(100, 100, 100), [t(1, 2, 3), t(3, 6, 9)]), [2, 4, 6])


def test_average_weights_are_relative():
    # (1·[1, 2, 3] + 3·[3, 6, 9]) / 4 = [10, 20, 30] / 4; weights [2, 6] give the same
    models = [t(1, 2, 3), t(3, 6, 9)]
    close(run(WeightAverage(weights=[1, 3]), None, models), [2.5, 5.0, 7.5])
    close(run(WeightAverage(weights=[2, 6]), None, models), [2.5, 5.0, 7.5])


def test_average_rejects_a_weight_list_of_the_wrong_length():
    with pytest.raises(ConfigError, match=r"average: weights needs one value per task model \(3\)"):
        WeightAverage(weights=[1, 2]).check_models(3)


def test_average_rejects_non_positive_weights():
    with pytest.raises(ConfigError, match="average: weights must hold positive"):
        WeightAverage(weights=[1, 0])


# --- task arithmetic ------------------------------------------------------------------------


def test_task_arithmetic_adds_the_scaled_sum_of_task_vectors():
    # τ1 = [2, 1, 0] - 1 = [1, 0, -1], τ2 = [1, 3, 1] - 1 = [0, 2, 0]; sum [1, 2, -1]
    # base + 0.5·sum = [1.5, 2, 0.5]
    close(run(TaskArithmetic(scale=0.5), t(1, 1, 1), [t(2, 1, 0), t(1, 3, 1)]), [1.5, 2, 0.5])


def test_task_arithmetic_negative_weight_subtracts_a_task():
    # τ1 - τ2 = [1, -2, -1]; base + 0.5·[1, -2, -1] = [1.5, 0, 0.5]
    rule = TaskArithmetic(scale=0.5, weights=[1, -1])
    close(run(rule, t(1, 1, 1), [t(2, 1, 0), t(1, 3, 1)]), [1.5, 0, 0.5])


def test_task_arithmetic_default_scale_is_0_3():
    # τ = [10]; 1 + 0.3·10 = 4
    close(run(TaskArithmetic(), t(1), [t(11)]), [4])


def test_task_arithmetic_rejects_a_negative_scale():
    with pytest.raises(ConfigError, match=r"task_arithmetic: scale must be in \[0, inf\), got -1"):
        TaskArithmetic(scale=-1)


# --- Model Stock ----------------------------------------------------------------------------


def test_model_stock_interpolates_by_the_angle_of_two_task_vectors():
    # τ1 = [1, 0], τ2 = [1, 1]: cos = 1/√2; t = 2c / (1 + c) = 2(√2 - 1) = 0.828427
    # θ = θ0 + t·mean(τ) = [1, 2] + 0.828427·[1, 0.5]
    rule = ModelStock()
    merged = run(rule, t(1, 2), [t(2, 2), t(2, 3)])
    close(merged, [1 + 0.828427, 2 + 0.414214])
    assert rule.summary()["ratio"]["w"] == pytest.approx(2 * (math.sqrt(2) - 1))


def test_model_stock_uses_the_mean_pairwise_cosine_for_three_models():
    # τ = [1,0,0], [0,1,0], [1,1,0]: cosines 0, 1/√2, 1/√2 → mean c = √2/3 = 0.471405
    # t = 3c / (1 + 2c) = 0.727922; mean τ = [2/3, 2/3, 0] → θ = t·mean τ = [0.485281, 0.485281, 0]
    models = [t(1, 0, 0), t(0, 1, 0), t(1, 1, 0)]
    close(run(ModelStock(), t(0, 0, 0), models), [0.485281, 0.485281, 0])


def test_model_stock_opposed_task_vectors_give_the_base():
    # cos < 0 is clamped to 0, so t = 0
    close(run(ModelStock(), t(5, 5), [t(6, 5), t(4, 5.1)]), [5, 5])


def test_model_stock_needs_two_task_models():
    with pytest.raises(ConfigError, match="at least 2"):
        ModelStock().check_models(1)


# --- SLERP ----------------------------------------------------------------------------------


def test_slerp_midpoint_of_orthogonal_unit_vectors_stays_on_the_circle():
    # Ω = π/2: both coefficients sin(π/4)/1 = √2/2; a linear mean would give [0.5, 0.5]
    close(run(Slerp(), None, [t(1, 0), t(0, 1)]), [math.sqrt(0.5), math.sqrt(0.5)])


def test_slerp_quarter_way_follows_the_arc():
    # t = 0.25, Ω = π/2: [sin(3π/8), sin(π/8)] = [cos(π/8), sin(π/8)]
    close(run(Slerp(t=0.25), None, [t(1, 0), t(0, 1)]), [0.9238795, 0.3826834])


def test_slerp_weights_the_unnormalised_tensors():
    # v0 = [2, 0], v1 = [0, 1]: Ω = π/2 → √2/2·v0 + √2/2·v1 = [√2, √2/2]
    close(run(Slerp(), None, [t(2, 0), t(0, 1)]), [math.sqrt(2), math.sqrt(0.5)])


def test_slerp_falls_back_to_linear_interpolation_for_colinear_tensors():
    # [1, 2] and [2, 4] are parallel (cos = 1): lerp at 0.5 = [1.5, 3]; a zero tensor too
    close(run(Slerp(), None, [t(1, 2), t(2, 4)]), [1.5, 3])
    close(run(Slerp(), None, [t(0, 0), t(2, 4)]), [1, 2])


def test_slerp_merges_exactly_two_models():
    with pytest.raises(ConfigError, match="at most 2"):
        Slerp().check_models(3)


@pytest.mark.parametrize(("param", "value"), [("t", 1.5), ("dot_threshold", 0.0)])
def test_slerp_rejects_out_of_range_parameters(param, value):
    with pytest.raises(ConfigError, match=f"slerp: {param} must be in"):
        Slerp(**{param: value})


# --- MetaGPT --------------------------------------------------------------------------------


def test_metagpt_coefficients_are_squared_norm_shares_over_the_whole_model():
    # tensor a: τ1 = [3, 0], τ2 = [0, 1]; tensor b: τ1 = [0], τ2 = [2]
    # ‖τ1‖² = 9, ‖τ2‖² = 1 + 4 = 5 → λ = [9/14, 5/14]
    # a: [3·9/14, 1·5/14] = [27/14, 5/14]; b: [2·5/14] = [10/14]
    rule = MetaGPT()
    out = run_many(rule, {"a": (t(0, 0), [t(3, 0), t(0, 1)]), "b": (t(1), [t(1), t(3)])})
    close(out["a"], [27 / 14, 5 / 14])
    close(out["b"], [1 + 10 / 14])
    assert rule.summary()["coefficients"] == pytest.approx([9 / 14, 5 / 14])
    assert rule.summary()["squared_norms"] == pytest.approx([9, 5])


def test_metagpt_refuses_to_merge_before_the_first_pass():
    with pytest.raises(RuntimeError, match="two-pass"):
        MetaGPT().merge_tensor("w", t(0), [t(1)], torch.Generator())
