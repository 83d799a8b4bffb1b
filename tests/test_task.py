import math

import pytest
import torch
import torch.nn.functional as F

import manytask as mt
from manytask.errors import ConfigError, UnknownNameError


def test_cross_entropy_skips_negative_class_indices():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 3.0]], requires_grad=True)
    target = torch.tensor([0, -1, 2])
    task = mt.Task("t", "cross_entropy", output_dim=3)
    expected = F.cross_entropy(logits[[0, 2]], target[[0, 2]])
    assert torch.allclose(task.compute_loss(logits, target), expected)


def test_regression_losses_skip_nan_targets():
    out = torch.tensor([1.0, 2.0, 3.0, 4.0])
    target = torch.tensor([1.5, float("nan"), 2.0, float("nan")])
    assert math.isclose(float(mt.Task("m", "mse").compute_loss(out, target)), (0.25 + 1.0) / 2)
    assert math.isclose(float(mt.Task("l", "l1").compute_loss(out, target)), (0.5 + 1.0) / 2)


def test_bce_skips_nan_and_matches_torch_on_labelled():
    out = torch.tensor([0.3, -1.2, 2.0])
    target = torch.tensor([1.0, float("nan"), 0.0])
    expected = F.binary_cross_entropy_with_logits(out[[0, 2]], target[[0, 2]])
    assert torch.allclose(mt.Task("b", "bce").compute_loss(out, target), expected)


def test_all_missing_gives_zero_loss_that_still_backpropagates():
    out = torch.randn(4, 3, requires_grad=True)
    loss = mt.Task("t", "cross_entropy", output_dim=3).compute_loss(out, torch.full((4,), -1))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert out.grad is not None
    assert torch.all(out.grad == 0)


def test_callable_loss_receives_only_labelled_samples():
    seen = {}

    def loss(output, target):
        seen["n"] = target.numel()
        return ((output - target) ** 2).mean()

    task = mt.Task("c", loss, kind="regression")
    task.compute_loss(torch.zeros(5), torch.tensor([1.0, float("nan"), 1.0, 1.0, float("nan")]))
    assert seen["n"] == 3


def test_weight_scales_the_loss():
    out, target = torch.tensor([1.0]), torch.tensor([3.0])
    assert float(mt.Task("w", "mse", weight=0.5).compute_loss(out, target)) == 2.0


def test_task_defaults_and_directions():
    task = mt.Task("r", "mse")
    assert task.metrics == ("mae", "rmse", "r2")
    assert task.primary_metric == "mae"
    assert not task.higher_is_better("mae")
    assert task.higher_is_better("r2")
    assert mt.Task("c", "cross_entropy", output_dim=4).metrics[0] == "accuracy"


def test_task_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown loss 'hinge'.*cross_entropy"):
        mt.Task("t", "hinge")
    with pytest.raises(ConfigError, match="does not apply to a regression task.*mae"):
        mt.Task("t", "mse", metrics=("accuracy",))
    with pytest.raises(UnknownNameError, match="unknown metric 'acc'.*accuracy"):
        mt.Task("t", "cross_entropy", metrics=("acc",), output_dim=2)
    with pytest.raises(ConfigError, match="needs kind"):
        mt.Task("t", lambda o, t: o.sum())
    with pytest.raises(ConfigError, match="number of classes"):
        mt.Task("t", "cross_entropy")


def test_taskset_losses_and_errors():
    tasks = mt.TaskSet([mt.Task("a", "mse"), mt.Task("b", "l1")])
    losses = tasks.losses(
        {"a": torch.zeros(2), "b": torch.ones(2)}, {"a": torch.ones(2), "b": torch.ones(2)}
    )
    assert list(losses) == ["a", "b"]
    assert float(losses["a"]) == 1.0
    assert float(losses["b"]) == 0.0
    with pytest.raises(ConfigError, match="no output or target for task"):
        tasks.losses({"a": torch.zeros(2)}, {"a": torch.ones(2)})
    with pytest.raises(ConfigError, match="duplicate task name"):
        mt.TaskSet([mt.Task("a", "mse"), mt.Task("a", "l1")])
    with pytest.raises(ConfigError, match="tasks are: a, b"):
        tasks["z"]
