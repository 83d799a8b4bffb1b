import math

import pytest
import torch

import manytask as mt
from manytask.evaluate.metrics import accuracy, auroc, macro_f1, mae, r2, rmse, task_metrics
from tests.peers import require


def test_accuracy_multiclass_and_binary():
    logits = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1]), "multiclass") == 0.75
    assert accuracy(
        torch.tensor([0.5, -0.5, 2.0]), torch.tensor([1.0, 0.0, 0.0]), "binary"
    ) == pytest.approx(2 / 3)


def test_macro_f1_by_hand():
    # predictions 0,0,1,2 ; targets 0,1,1,2
    logits = torch.eye(3)[[0, 0, 1, 2]]
    target = torch.tensor([0, 1, 1, 2])
    # class 0: tp1 fp1 fn0 -> 2/3 ; class 1: tp1 fp0 fn1 -> 2/3 ; class 2: 1
    assert macro_f1(logits, target, "multiclass") == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_binary_auroc_with_ties_by_hand():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.4])
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    # positive/negative pairs: (.35,.1)=1 (.35,.4)=0 (.8,.1)=1 (.8,.4)=1 (.4,.1)=1 (.4,.4)=.5
    assert auroc(scores, labels, "binary") == pytest.approx(4.5 / 6)


def test_multiclass_auroc_is_macro_one_vs_rest():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]])
    assert auroc(logits, torch.tensor([0, 1, 2, 0]), "multiclass") == pytest.approx(1.0)
    assert math.isnan(auroc(torch.tensor([0.2, 0.3]), torch.tensor([1.0, 1.0]), "binary"))


def test_regression_metrics_by_hand():
    out = torch.tensor([1.0, 2.0, 4.0])
    target = torch.tensor([1.0, 3.0, 2.0])
    assert mae(out, target, "regression") == pytest.approx(1.0)
    assert rmse(out, target, "regression") == pytest.approx(math.sqrt(5 / 3))
    # ss_res = 0+1+4 = 5; mean 2, ss_tot = 1+1+0 = 2
    assert r2(out, target, "regression") == pytest.approx(1 - 5 / 2)


def test_task_metrics_skip_missing_labels():
    task = mt.Task("r", "mse")
    out = torch.tensor([1.0, 100.0, 3.0])
    target = torch.tensor([1.0, float("nan"), 3.0])
    assert task_metrics(task, out, target)["mae"] == 0.0
    cls = mt.Task("c", "cross_entropy", output_dim=2)
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert task_metrics(cls, logits, torch.tensor([0, -1]))["accuracy"] == 1.0


def test_multi_label_macro_f1_averages_each_labels_positive_class_f1():
    # the mean over labels of each label's F1 of its positive class (scikit-learn's multi-label
    # macro average): label 0 has tp 2, fp 0, fn 0 → 1; label 1 has tp 0, fp 2, fn 0 → 0
    scores = torch.tensor([[1.0, -1.0], [1.0, 1.0], [-1.0, -1.0], [-1.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    assert macro_f1(scores, targets, "binary") == pytest.approx(0.5)  # pooled it read 0.733


def test_multi_label_macro_f1_matches_scikit_learn():
    metrics = require("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n, labels = int(torch.randint(3, 12, (1,), generator=g)), int(torch.randint(2, 5, (1,)))
        scores = torch.randint(-2, 3, (n, labels), generator=g).double()
        targets = torch.randint(0, 2, (n, labels), generator=g).double()
        expected = metrics.f1_score(
            targets.numpy(), (scores > 0).long().numpy(), average="macro", zero_division=0
        )
        assert macro_f1(scores, targets, "binary") == pytest.approx(expected, abs=1e-12)


def test_r2_of_a_constant_target_is_finite_as_scikit_learn_gives_it():
    target = torch.full((5,), 2.0)
    assert r2(target.clone(), target, "regression") == 1.0  # a perfect fit
    assert r2(target + 1.0, target, "regression") == 0.0
