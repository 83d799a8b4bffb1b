"""Per-task metrics with a direction: accuracy, macro-F1, AUROC, MAE, RMSE, R².

Metrics are computed once per evaluation, on the concatenated outputs and targets of a whole
split, after the missing labels are dropped (class index < 0, or NaN). Outputs are raw model
outputs: logits for classification, values for regression.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from manytask import registry
from manytask.task import Kind, Task, label_mask

MetricFn = Callable[[Tensor, Tensor, Kind], float]


@dataclass(frozen=True)
class Metric:
    """A named metric: ``fn(output, target, kind) -> float`` and its direction."""

    name: str
    fn: MetricFn
    higher_is_better: bool
    kinds: tuple[Kind, ...]
    summary: str

    def __call__(self, output: Tensor, target: Tensor, kind: Kind) -> float:
        return self.fn(output, target, kind)


def register_metric(
    name: str, higher_is_better: bool, kinds: tuple[Kind, ...], summary: str
) -> Callable[[MetricFn], MetricFn]:
    """Register ``fn`` as a metric; users can add their own the same way."""

    def decorate(fn: MetricFn) -> MetricFn:
        registry.register("metric", name, summary)(
            Metric(name, fn, higher_is_better, kinds, summary)
        )
        return fn

    return decorate


def _labels(output: Tensor, kind: Kind) -> Tensor:
    if kind == "multiclass":
        return output.argmax(dim=-1)
    return (output > 0).long()


@register_metric("accuracy", True, ("multiclass", "binary"), "fraction of correct predictions")
def accuracy(output: Tensor, target: Tensor, kind: Kind) -> float:
    """The share of correct predictions; for binary targets of several columns (multi-label),
    of correct entries (the Hamming score, not scikit-learn's subset accuracy)."""
    target = target.long() if kind == "multiclass" else (target > 0.5).long()
    return float((_labels(output, kind) == target).double().mean())


def _f1_per_class(pred: Tensor, target: Tensor, classes: Tensor) -> Tensor:
    scores = []
    for c in classes.tolist():
        tp = float(((pred == c) & (target == c)).sum())
        fp = float(((pred == c) & (target != c)).sum())
        fn = float(((pred != c) & (target == c)).sum())
        denominator = 2 * tp + fp + fn
        scores.append(2 * tp / denominator if denominator else 0.0)
    return torch.tensor(scores, dtype=torch.float64)


@register_metric(
    "macro_f1", True, ("multiclass", "binary"), "unweighted mean of per-class F1 scores"
)
def macro_f1(output: Tensor, target: Tensor, kind: Kind) -> float:
    """Mean F1 over the classes present in the targets or the predictions (as scikit-learn);
    for binary targets of two or more columns (multi-label), the mean over the columns of each
    column's F1 of its positive class (scikit-learn's multi-label macro average)."""
    if kind == "binary" and target.dim() == 2 and target.shape[1] > 1:
        pred = _labels(output, kind).reshape(target.shape)
        truth = (target > 0.5).long()
        one = torch.ones(1, dtype=torch.long)
        return float(
            torch.cat([_f1_per_class(pred[:, j], truth[:, j], one) for j in range(truth.shape[1])])
            .double()
            .mean()
        )
    pred = _labels(output, kind).reshape(-1)
    target = (target.long() if kind == "multiclass" else (target > 0.5).long()).reshape(-1)
    classes = torch.unique(torch.cat([pred, target]))
    return float(_f1_per_class(pred, target, classes).mean())


def _binary_auroc(score: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve by the Mann–Whitney statistic, ties counted as one half."""
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(score.double())
    sorted_scores = score.double()[order]
    ranks = torch.empty_like(sorted_scores)
    # average rank within groups of equal scores
    _, inverse, counts = torch.unique_consecutive(
        sorted_scores, return_inverse=True, return_counts=True
    )
    ends = torch.cumsum(counts, 0).double()
    starts = ends - counts.double() + 1
    ranks[order] = ((starts + ends) / 2)[inverse]
    rank_sum = float(ranks[positive.bool()].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@register_metric(
    "auroc",
    True,
    ("multiclass", "binary"),
    "area under the ROC curve (multiclass: macro one-vs-rest on softmax scores)",
)
def auroc(output: Tensor, target: Tensor, kind: Kind) -> float:
    if kind == "binary":
        output = output.reshape(target.shape)
        if target.dim() == 1:
            return _binary_auroc(output, target > 0.5)
        scores = [_binary_auroc(output[:, j], target[:, j] > 0.5) for j in range(target.shape[1])]
        return float(torch.tensor(scores, dtype=torch.float64).nanmean())
    probs = torch.softmax(output.double(), dim=-1)
    scores = [
        _binary_auroc(probs[:, c], target == c)
        for c in range(probs.shape[-1])
        if bool((target == c).any())
    ]
    return float(torch.tensor(scores, dtype=torch.float64).nanmean()) if scores else float("nan")


def _regression_pair(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    output = output.double().reshape(target.shape) if output.numel() == target.numel() else output
    return output.double(), target.double()


@register_metric("mae", False, ("regression",), "mean absolute error")
def mae(output: Tensor, target: Tensor, kind: Kind) -> float:
    output, target = _regression_pair(output, target)
    return float((output - target).abs().mean())


@register_metric("rmse", False, ("regression",), "root mean squared error")
def rmse(output: Tensor, target: Tensor, kind: Kind) -> float:
    output, target = _regression_pair(output, target)
    return float(((output - target) ** 2).mean().sqrt())


@register_metric(
    "r2", True, ("regression",), "coefficient of determination (mean over output columns)"
)
def r2(output: Tensor, target: Tensor, kind: Kind) -> float:
    output, target = _regression_pair(output, target)
    if target.dim() == 1:
        output, target = output[:, None], target[:, None]
    residual = ((target - output) ** 2).sum(0)
    total = ((target - target.mean(0)) ** 2).sum(0)
    # a constant target column: 1 for a perfect fit, 0 otherwise (scikit-learn's force_finite)
    constant = total == 0
    score = 1 - residual / torch.where(constant, torch.ones_like(total), total)
    score = torch.where(constant, (residual == 0).double(), score)
    return float(score.mean())


def task_metrics(task: Task, output: Tensor, target: Tensor) -> dict[str, float]:
    """All metrics of ``task`` on one split, skipping missing labels.

    A metric with no labelled sample is NaN.
    """
    mask = label_mask(target, task.kind_)
    if mask.dim() > 1:  # a sample counts if all its label columns are present
        mask = mask.all(dim=tuple(range(1, mask.dim())))
    output, target = output[mask], target[mask]
    results: dict[str, float] = {}
    for name in task.metrics:
        metric: Metric = registry.get("metric", name)
        results[name] = metric(output, target, task.kind_) if target.numel() else float("nan")
    return results
