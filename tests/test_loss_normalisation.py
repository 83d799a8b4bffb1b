"""Per-task normalisation of token-level losses on a hand-made (B, L) batch.

Four samples, four token positions; ``m`` marks the tokens that count:

    sample  task  losses          m          counted losses   N_i  mean
    0       a     1  2  3  100    1 1 1 0    1, 2, 3          3    2
    1       a     5  7  7  7      1 0 0 0    5                1    5
    2       b     2  4  9  nan    1 1 0 0    2, 4             2    3
    3       b     8  8  8  8      0 0 0 0    —                0    —

Task a: N_a = 4 tokens, sum 11; task b: N_b = 2 tokens, sum 6; N = 6; task c has no sample.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import manytask as mt
from manytask.errors import ConfigError
from manytask.loss_normalisation import per_task_token_losses

NAMES = ["a", "b", "c"]
TASK_IDS = torch.tensor([0, 0, 1, 1])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)


def token_losses() -> torch.Tensor:
    values = [[1, 2, 3, 100], [5, 7, 7, 7], [2, 4, 9, float("nan")], [8, 8, 8, 8]]
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def losses(mode: str, **kwargs: object) -> dict[str, torch.Tensor]:
    return per_task_token_losses(token_losses(), TASK_IDS, NAMES, MASK, mode, **kwargs)


def values(result: dict[str, torch.Tensor]) -> list[float]:
    return [result[name].item() for name in NAMES]


def test_token_mode_divides_each_tasks_token_sum_by_its_token_count():
    # a: (1 + 2 + 3 + 5) / 4; b: (2 + 4) / 2; c: no token
    assert values(losses("token")) == pytest.approx([11 / 4, 3.0, 0.0])


def test_sample_mode_averages_per_sample_means_over_samples_with_tokens():
    # a: (2 + 5) / 2; b: sample 3 has no counted token, so only sample 2: 3
    assert values(losses("sample")) == pytest.approx([3.5, 3.0, 0.0])


def test_task_weighted_by_token_share_sums_to_the_batch_token_mean():
    # a: 11/4 · 4/6 = 11/6; b: 3 · 2/6 = 1; total 17/6 = (11 + 6) / 6
    result = losses("task_weighted")
    assert values(result) == pytest.approx([11 / 6, 1.0, 0.0])
    assert sum(v.item() for v in result.values()) == pytest.approx(17 / 6)


def test_task_weighted_with_given_weights_scales_the_token_means():
    result = losses("task_weighted", weights={"a": 2.0, "b": 0.5, "c": 3.0})
    assert values(result) == pytest.approx([5.5, 1.5, 0.0])


def test_gradients_reach_only_counted_tokens_with_the_mode_weights():
    ell = token_losses()
    out = per_task_token_losses(ell, TASK_IDS, NAMES, MASK, "sample")
    (out["a"] + out["b"]).backward()
    # sample mode: token j of sample i gets 1 / (N_i · |S_t⁺|)
    expected = torch.tensor(
        [[1 / 6, 1 / 6, 1 / 6, 0], [1 / 2, 0, 0, 0], [1 / 2, 1 / 2, 0, 0], [0, 0, 0, 0]],
        dtype=torch.float64,
    )
    assert torch.allclose(ell.grad, expected)


def test_an_absent_task_has_a_zero_loss_that_carries_the_graph():
    result = losses("token")
    assert result["c"].item() == 0.0 and result["c"].requires_grad


def test_no_mask_counts_every_token():
    ell = torch.tensor([[1.0, 3.0], [2.0, 6.0]])
    result = per_task_token_losses(ell, torch.tensor([0, 0]), ["a"], mode="sample")
    assert result["a"].item() == pytest.approx((2 + 4) / 2)


def test_token_mode_equals_the_built_in_cross_entropy_of_a_mixed_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 6, generator=g)  # (B, C, L)
    labels = torch.randint(0, 5, (4, 6), generator=g)
    labels[0, 4:] = -1  # padding
    labels[2, 1:] = -1
    ids = torch.tensor([1, 0, 1, 0])
    per_token = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
    ours = per_task_token_losses(per_token, ids, ["x", "y"], labels >= 0, "token")
    for t, name in enumerate(["x", "y"]):
        target = torch.where((ids == t)[:, None], labels, torch.full_like(labels, -1))
        builtin = mt.Task(name, "cross_entropy", output_dim=5).compute_loss(logits, target)
        assert torch.allclose(ours[name], builtin), name


def test_half_precision_losses_come_back_in_float32():
    ell = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16)
    result = per_task_token_losses(ell, torch.tensor([0, 1]), ["a", "b"], mode="token")
    assert result["a"].dtype == torch.float32
    assert [result["a"].item(), result["b"].item()] == [1.5, 3.5]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "tokens"}, "unknown loss normalisation mode 'tokens'"),
        ({"mode": "token", "weights": {"a": 1.0}}, "weights apply only to mode 'task_weighted'"),
        ({"mode": "task_weighted", "weights": {"a": 1.0}}, r"missing \['b', 'c'\]"),
        (
            {"mode": "task_weighted", "weights": {"a": 1.0, "b": float("nan"), "c": 1.0}},
            "finite",
        ),
    ],
)
def test_bad_modes_and_weights_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        per_task_token_losses(token_losses(), TASK_IDS, NAMES, MASK, **kwargs)


def test_mismatched_shapes_and_float_task_ids_are_config_errors():
    with pytest.raises(ConfigError, match="task_ids \\(batch,\\)"):
        per_task_token_losses(token_losses(), torch.tensor([0, 1]), NAMES, MASK)
    with pytest.raises(ConfigError, match="mask must have the shape"):
        per_task_token_losses(token_losses(), TASK_IDS, NAMES, MASK[:, :2])
    with pytest.raises(ConfigError, match="integer task indices"):
        per_task_token_losses(token_losses(), TASK_IDS.float(), NAMES, MASK)
