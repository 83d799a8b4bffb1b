import pytest

import manytask as mt
from manytask.errors import ConfigError
from manytask.evaluate import delta_m


def test_delta_m_by_hand_with_directions():
    tasks = mt.TaskSet(
        [
            mt.Task("cls", "cross_entropy", output_dim=3, metrics=("accuracy",)),
            mt.Task("reg", "mse", metrics=("mae", "r2")),
        ]
    )
    base = {"cls": {"accuracy": 0.80}, "reg": {"mae": 2.0, "r2": 0.5}}
    model = {"cls": {"accuracy": 0.88}, "reg": {"mae": 2.5, "r2": 0.6}}
    # +0.10 (acc up 10%), -0.25 (mae up 25% is worse), +0.20 (r2 up 20%)
    assert delta_m(model, base, tasks) == pytest.approx(100 * (0.10 - 0.25 + 0.20) / 3)
    assert delta_m(base, base, tasks) == 0.0


def test_delta_m_rejects_missing_or_zero_baselines():
    tasks = mt.TaskSet([mt.Task("r", "mse", metrics=("mae",))])
    with pytest.raises(ConfigError, match="metric 'mae' of task 'r'"):
        delta_m({"r": {"mae": 1.0}}, {"r": {}}, tasks)
    with pytest.raises(ConfigError, match="undefined"):
        delta_m({"r": {"mae": 1.0}}, {"r": {"mae": 0.0}}, tasks)
