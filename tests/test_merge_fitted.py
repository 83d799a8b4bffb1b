"""Fitted merging rules against their formulas on small hand-checkable inputs."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from manytask import registry
from manytask.errors import ConfigError, DataError
from manytask.merge.fitted import (
    FisherMerging,
    LayerWiseAdaMerging,
    RegMean,
    RepresentationSurgery,
    SurgeryModel,
    TaskWiseAdaMerging,
)
from manytask.merge.fitted.adamerging import mean_entropy
from manytask.merge.fitted.batches import Inputs
from manytask.merge.fitted.fisher import fisher_average, merge_fishers
from manytask.merge.fitted.regmean import regmean_weight
from manytask.merge.fitted.surgery import head_input
from tests.merge_fitted_models import Net, Setup, setup

# ---------------------------------------------------------------- registry


def test_all_fitted_rules_are_registered_as_merge_rules_marked_fitted():
    names = {"fisher", "regmean", "adamerging_task", "adamerging_layer", "surgery"}
    assert names <= set(registry.names("merge_rule"))
    for name in names:
        entry = next(e for e in registry.entries("merge_rule") if e.name == name)
        assert entry.obj.fitted is True
        assert "arXiv:" in entry.summary


FITTED = ["fisher", "regmean", "adamerging_task", "adamerging_layer", "surgery"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "merge-fitted.md"


@pytest.mark.parametrize("name", FITTED)
def test_docs_table_lists_every_fitted_rule_with_its_defaults(name):
    rows = [
        r for r in DOCS.read_text(encoding="utf-8").splitlines() if r.startswith(f"| `{name}` |")
    ]
    assert len(rows) == 1, f"add one row for `{name}` to {DOCS.name}"
    rule = registry.get("merge_rule", name)
    for parameter in inspect.signature(rule).parameters.values():
        if parameter.default is not None:
            assert f"`{parameter.name}={parameter.default!r}`" in rows[0], parameter.name
    module_doc = sys.modules[rule.__module__].__doc__ or ""
    assert "arXiv:" in module_doc and "Defaults" in module_doc


def test_config_parameters_are_validated_by_the_registry():
    rule = registry.call_with_params("merge_rule", "regmean", {"alpha": 0.5})
    assert rule.alpha == 0.5
    with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\]"):
        registry.call_with_params("merge_rule", "regmean", {"alpha": 2.0})
    with pytest.raises(ConfigError, match="unknown key"):
        registry.call_with_params("merge_rule", "fisher", {"alpha": 0.5})


# ---------------------------------------------------------------- Fisher


def linear_factory(weight: Tensor, bias: Tensor):
    def factory(task: int) -> nn.Linear:
        layer = nn.Linear(weight.shape[1], weight.shape[0])
        layer.load_state_dict({"weight": weight, "bias": bias})
        return layer

    return factory


def fisher_by_hand(weight: Tensor, bias: Tensor, xs: Tensor) -> tuple[Tensor, Tensor]:
    """F = mean_n Σ_c p_c g_c², with ∇_W log p_c = (e_c - p) xᵀ and ∇_b log p_c = e_c - p."""
    fw, fb = torch.zeros_like(weight), torch.zeros_like(bias)
    for x in xs:
        p = torch.softmax(weight @ x + bias, dim=0)
        for c in range(len(p)):
            r = torch.eye(len(p))[c] - p
            fw += p[c] * torch.outer(r, x) ** 2
            fb += p[c] * r**2
    return fw / len(xs), fb / len(xs)


def compute_fisher(rule: FisherMerging, weight: Tensor, bias: Tensor, xs: Tensor) -> dict:
    module = linear_factory(weight, bias)(0).requires_grad_(False)
    batches = [Inputs((xs[:3],), {}), Inputs((xs[3:],), {})]
    stats = rule.compute(module, ("weight", "bias"), batches, torch.Generator(), 0)
    assert stats.extra["examples"] == len(xs)
    return stats.tensors


def test_exact_fisher_of_a_softmax_regression_matches_the_hand_formula():
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    xs = torch.randn(7, 4, generator=g)
    fisher = compute_fisher(FisherMerging(labels="exact"), weight, bias, xs)
    fw, fb = fisher_by_hand(weight, bias, xs)
    assert torch.allclose(fisher["weight"], fw, atol=1e-6)
    assert torch.allclose(fisher["bias"], fb, atol=1e-6)


def test_fisher_at_zero_weights_is_a_quarter_of_the_squared_inputs_for_either_labels():
    # two classes, p = (½, ½): (e_c - p)² = ¼ in both rows for either c, so F_W = ¼ mean(x²)
    # whatever label is drawn; sampling gives the exact value here
    xs = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 2.0], [2.0, 2.0], [1.0, 0.0]])
    expected = 0.25 * (xs**2).mean(dim=0).expand(2, 2)
    for labels in ("exact", "sampled"):
        fisher = compute_fisher(FisherMerging(labels=labels), torch.zeros(2, 2), torch.zeros(2), xs)
        assert torch.allclose(fisher["weight"], expected), labels
        assert torch.allclose(fisher["bias"], torch.full((2,), 0.25)), labels


def test_fisher_average_by_hand():
    # λ = (1, 3): num = 1·1·0 + 3·3·4 = 36, den = 1 + 9 → 3.6; num = 3·1·4 = 12, den = 3 + 3 → 2
    merged = fisher_average(
        [torch.zeros(2), torch.full((2,), 4.0)],
        [torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])],
        [1.0, 3.0],
        floor=1e-6,
    )
    assert torch.allclose(merged, torch.tensor([3.6, 2.0]))


def test_fisher_average_with_equal_fishers_is_the_weighted_average():
    g = torch.Generator().manual_seed(1)
    thetas = [torch.randn(3, 2, generator=g) for _ in range(3)]
    fisher = torch.rand(3, 2, generator=g) + 0.1
    merged = fisher_average(thetas, [fisher] * 3, [1.0, 2.0, 1.0], floor=1e-6)
    assert torch.allclose(merged, (thetas[0] + 2 * thetas[1] + thetas[2]) / 4, atol=1e-6)


def test_fisher_floor_falls_back_to_the_average_where_no_model_has_information():
    merged = fisher_average(
        [torch.tensor([1.0]), torch.tensor([3.0])], [torch.zeros(1), torch.zeros(1)], [1, 1], 1e-6
    )
    assert torch.allclose(merged, torch.tensor([2.0]))


def test_normalized_fishers_ignore_each_models_fisher_scale():
    # F_2 = 100 F_1 elementwise: unnormalised, model 2 dominates; normalised, the weights are equal
    models = [{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])}]
    f1 = torch.tensor([1.0, 2.0])
    fishers = [{"w": f1}, {"w": 100 * f1}]
    plain = merge_fishers(models, fishers, [1.0, 1.0], 1e-6, normalize=False)["w"]
    normal = merge_fishers(models, fishers, [1.0, 1.0], 1e-6, normalize=True)["w"]
    assert torch.allclose(plain, torch.full((2,), 100 / 101))
    assert torch.allclose(normal, torch.full((2,), 0.5))


def test_fisher_merging_keeps_each_models_values_where_only_its_data_reach():
    # task 0's inputs use only feature 0, task 1's only feature 1: the other model's Fisher is 0
    # (floored to 1e-6) on that column, so each column comes from the model whose data reach it
    g = torch.Generator().manual_seed(2)
    w0, w1 = torch.randn(2, 2, generator=g), torch.randn(2, 2, generator=g)
    x0 = torch.randn(6, 2, generator=g) * torch.tensor([1.0, 0.0])
    x1 = torch.randn(6, 2, generator=g) * torch.tensor([0.0, 1.0])
    heads = [w0, w1]

    def factory(task: int) -> nn.Linear:
        layer = nn.Linear(2, 2, bias=False)
        layer.weight.data.copy_(heads[task])
        return layer

    merged = FisherMerging().fit(factory, [{"weight": w0}, {"weight": w1}], [[x0], [x1]])
    assert torch.allclose(merged["weight"][:, 0], w0[:, 0], atol=1e-4)
    assert torch.allclose(merged["weight"][:, 1], w1[:, 1], atol=1e-4)


def test_fisher_averages_merged_buffers_and_keeps_integer_counters():
    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(2, 2)
            self.norm = nn.BatchNorm1d(2)

        def forward(self, x: Tensor) -> Tensor:
            return self.norm(self.linear(x))

    states = []
    for shift in (0.0, 2.0):
        net = Normed()
        net.norm.running_mean.fill_(shift)
        net.norm.num_batches_tracked.fill_(int(shift) + 5)
        states.append({k: v.clone() for k, v in net.state_dict().items()})
    merged = FisherMerging(num_examples=4).fit(
        lambda task: Normed(), states, [[torch.randn(4, 2)], [torch.randn(4, 2)]]
    )
    assert torch.allclose(merged["norm.running_mean"], torch.ones(2))
    assert int(merged["norm.num_batches_tracked"]) == 5


def test_sampled_fisher_is_reproducible_from_the_seed():
    s = setup()
    rule = FisherMerging(labels="sampled", num_examples=8)
    a = rule.fit(s.factory, s.models, s.data, seed=3)
    b = rule.fit(s.factory, s.models, s.data, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fisher_reads_only_num_examples_examples():
    s = setup(batches=3, batch=4)
    few = FisherMerging(num_examples=5).fit(s.factory, s.models, s.data)
    cut = [[d[0], d[1][:1]] for d in s.data]  # the same first 5 examples, nothing after
    same = FisherMerging(num_examples=100).fit(s.factory, s.models, cut)
    assert all(torch.allclose(few[k], same[k]) for k in few)


# ---------------------------------------------------------------- RegMean


def single_linear(weights: list[Tensor]):
    def factory(task: int) -> nn.Linear:
        layer = nn.Linear(
            weights[0].shape[1], weights[0].shape[0], bias=False, dtype=weights[0].dtype
        )
        layer.weight.data.copy_(weights[task])
        return layer

    return factory


def linear_tasks(seed: int, tasks: int, rows: int):
    """Random float64 ``(2, 3)`` weights of ``tasks`` models, their state dicts and ``rows``
    inputs of each."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(tasks)]
    xs = [torch.randn(rows, 3, generator=g, dtype=torch.float64) for _ in range(tasks)]
    return ws, xs, [{"weight": w} for w in ws]


def test_regmean_with_alpha_one_is_the_least_squares_fit_of_every_models_outputs():
    # min_W Σ_i ||X_i Wᵀ - X_i W_iᵀ||²: stack the rows and solve by least squares
    ws, xs, models = linear_tasks(3, tasks=3, rows=10)
    merged = RegMean(alpha=1.0).fit(single_linear(ws), models, [[x] for x in xs])["weight"]
    x_all = torch.cat(xs)
    y_all = torch.cat([x @ w.T for x, w in zip(xs, ws, strict=True)])
    expected = torch.linalg.lstsq(x_all, y_all).solution.T
    assert torch.allclose(merged, expected, atol=1e-8)


def test_regmean_weighs_every_task_alike_however_many_rows_it_gives():
    # each Gram is the mean over its task's rows (the authors' code): task 1 reading its rows
    # four times over changes nothing (summed Grams would weigh it four times as much)
    ws, xs, models = linear_tasks(5, tasks=2, rows=12)
    reference = RegMean(alpha=0.5).fit(single_linear(ws), models, [[x] for x in xs])["weight"]
    repeated = [[xs[0]], [xs[1]] * 4]
    merged = RegMean(alpha=0.5).fit(single_linear(ws), models, repeated)["weight"]
    grams = [x.T @ x / x.shape[0] for x in xs]
    assert torch.allclose(merged, reference, atol=1e-10)
    assert torch.allclose(merged, regmean_weight(ws, grams, alpha=0.5), atol=1e-10)


def test_regmean_with_equal_grams_is_the_average_for_any_alpha():
    g = torch.Generator().manual_seed(4)
    ws = [torch.randn(2, 3, generator=g) for _ in range(2)]
    x = torch.randn(8, 3, generator=g)
    for alpha in (0.0, 0.1, 1.0):
        merged = RegMean(alpha=alpha).fit(
            single_linear(ws), [{"weight": w} for w in ws], [[x], [x]]
        )
        assert torch.allclose(merged["weight"], (ws[0] + ws[1]) / 2, atol=1e-5), alpha


def test_regmean_with_alpha_zero_weighs_each_input_column_by_its_gram_diagonal():
    # G̃_i = diag(G_i): column k is Σ_i G_i[k,k] W_i[:,k] / Σ_i G_i[k,k]
    # column 0: (4·1 + 2·3) / 6 = 5/3; column 1: (1·2 + 3·0) / 4 = 1/2
    grams = [torch.tensor([[4.0, 1.5], [1.5, 1.0]]), torch.tensor([[2.0, -1.0], [-1.0, 3.0]])]
    weights = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.0]])]
    merged = regmean_weight(weights, grams, alpha=0.0)
    assert torch.allclose(merged, torch.tensor([[5 / 3, 0.5]]))


def test_regmean_alpha_scales_only_the_off_diagonal_of_each_gram():
    # α = 0.5 on G = [[2, 2], [2, 4]] gives G̃ = [[2, 1], [1, 4]]: with G_2 = G̃ given as exact
    # (α = 1), both merges must agree
    g1 = torch.tensor([[2.0, 2.0], [2.0, 4.0]])
    g1_tilde = torch.tensor([[2.0, 1.0], [1.0, 4.0]])
    g2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    weights = [torch.tensor([[1.0, -1.0]]), torch.tensor([[2.0, 5.0]])]
    half = regmean_weight(weights, [g1, g2], alpha=0.5)
    exact = regmean_weight(weights, [g1_tilde, g2], alpha=1.0)
    assert torch.allclose(half, exact)


def test_regmean_keeps_the_average_along_inputs_no_task_reaches():
    # feature 2 is 0 for every task: the Gram sum is singular there and column 2 stays averaged,
    # while the reached columns still solve the regression
    g = torch.Generator().manual_seed(5)
    ws = [torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    mask = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    xs = [torch.randn(6, 3, generator=g, dtype=torch.float64) * mask for _ in range(2)]
    merged = RegMean(alpha=1.0).fit(
        single_linear(ws), [{"weight": w} for w in ws], [[x] for x in xs]
    )
    assert torch.allclose(merged["weight"][:, 2], (ws[0][:, 2] + ws[1][:, 2]) / 2)
    x_all = torch.cat(xs)[:, :2]
    y_all = torch.cat([x @ w.T for x, w in zip(xs, ws, strict=True)])
    assert torch.allclose(merged["weight"][:, :2], torch.linalg.lstsq(x_all, y_all).solution.T)


def test_regmean_counts_every_token_of_a_sequence_input_as_a_row():
    g = torch.Generator().manual_seed(6)
    ws = [torch.randn(2, 3, generator=g) for _ in range(2)]
    xs = [torch.randn(2, 5, 3, generator=g) for _ in range(2)]
    models = [{"weight": w} for w in ws]
    tokens = RegMean(alpha=0.5).fit(single_linear(ws), models, [[x] for x in xs])
    rows = RegMean(alpha=0.5).fit(single_linear(ws), models, [[x.reshape(10, 3)] for x in xs])
    assert torch.allclose(tokens["weight"], rows["weight"], atol=1e-5)


def test_regmean_averages_biases_and_tensors_of_other_layers():
    s = setup()
    merged = RegMean().fit(s.factory, s.models, s.data)
    for key in ("encoder.0.bias", "encoder.2.bias"):
        assert torch.allclose(merged[key], (s.models[0][key] + s.models[1][key]) / 2)
    assert not torch.allclose(
        merged["encoder.2.weight"],
        (s.models[0]["encoder.2.weight"] + s.models[1]["encoder.2.weight"]) / 2,
    )


# ---------------------------------------------------------------- AdaMerging


def task_arithmetic(s: Setup, lam: float) -> dict[str, Tensor]:
    return {k: s.base[k] + lam * sum(m[k] - s.base[k] for m in s.models) for k in s.base}


def merged_entropy(s: Setup, merged: dict[str, Tensor]) -> float:
    total = 0.0
    for task, batches in enumerate(s.data):
        net = s.factory(task)
        net.load_state_dict(merged, strict=False)
        with torch.no_grad():
            total += sum(float(mean_entropy(net(x))) for x in batches)
    return total


@pytest.mark.parametrize("rule", [TaskWiseAdaMerging, LayerWiseAdaMerging])
def test_adamerging_without_steps_is_task_arithmetic_at_the_initial_coefficient(rule):
    s = setup(tasks=3)
    merged = rule(steps=0).fit(s.factory, s.models, s.data, base=s.base)
    expected = task_arithmetic(s, 0.3)
    assert all(torch.allclose(merged[k], expected[k], atol=1e-6) for k in expected)


@pytest.mark.parametrize("rule", [TaskWiseAdaMerging, LayerWiseAdaMerging])
def test_adamerging_lowers_the_entropy_and_keeps_coefficients_in_range(rule):
    s = setup(tasks=2)
    fitted = rule(steps=40, lr=0.05)
    merged = fitted.fit(s.factory, s.models, s.data, base=s.base)
    assert merged_entropy(s, merged) < merged_entropy(s, task_arithmetic(s, 0.3))
    lam = fitted.coefficients
    assert lam is not None and bool(((lam >= 0) & (lam <= 1)).all())
    if rule is TaskWiseAdaMerging:
        assert lam.shape == (2,)
    else:
        assert lam.shape == (len(s.base), 2)
        assert fitted.summary()["layers"] == list(s.base)
    assert len(fitted.summary()["entropy"]) == 40


def test_adamerging_clamps_coefficients_at_one():
    # base logits are 0 (maximal entropy) and each task vector only scales the logits up, so the
    # entropy keeps falling as λ grows: λ is pushed past 1 and clamped there
    def factory(task: int) -> nn.Linear:
        return nn.Linear(2, 2, bias=False)

    base = {"weight": torch.zeros(2, 2)}
    models = [{"weight": torch.tensor([[1.0, 0.0], [0.0, -1.0]])}] * 2
    data = [[torch.tensor([[1.0, 0.5], [2.0, -1.0]])]] * 2
    rule = TaskWiseAdaMerging(steps=30, lr=0.1)
    merged = rule.fit(factory, models, data, base=base)
    assert rule.coefficients is not None
    assert torch.equal(rule.coefficients, torch.ones(2))
    assert torch.allclose(merged["weight"], 2 * models[0]["weight"])


def test_adamerging_needs_the_base_model():
    s = setup()
    with pytest.raises(ConfigError, match="needs the base"):
        TaskWiseAdaMerging(steps=1).fit(s.factory, s.models, s.data)


def test_adamerging_reads_the_data_again_when_it_runs_out():
    s = setup(batches=1)
    rule = TaskWiseAdaMerging(steps=3)
    rule.fit(s.factory, s.models, s.data, base=s.base)
    assert len(rule.entropy) == 3
    with pytest.raises(DataError, match="one-shot"):
        TaskWiseAdaMerging(steps=3).fit(s.factory, s.models, [iter(d) for d in s.data], base=s.base)


# ---------------------------------------------------------------- Surgery


def surgery_fit(s: Setup, steps: int, **kwargs) -> tuple[SurgeryModel, dict[str, Tensor]]:
    merged = task_arithmetic(s, 0.3)
    model = RepresentationSurgery(steps=steps, rank=3, lr=0.05, **kwargs).fit(
        s.factory, s.models, s.data, merged=merged
    )
    return model, merged


def test_surgery_starts_from_the_merged_model():
    s = setup()
    model, merged = surgery_fit(s, steps=0)
    for task in range(2):
        net = s.factory(task)
        net.load_state_dict(merged, strict=False)
        x = s.data[task][0]
        assert torch.allclose(model(x, task=task), net(x), atol=1e-6)


def test_surgery_model_applies_z_minus_up_relu_down_z_before_each_head():
    s = setup()
    model, merged = surgery_fit(s, steps=5)
    for task in range(2):
        net = s.factory(task)
        net.load_state_dict(merged, strict=False)
        fix = model.surgery[task]
        assert float(fix.up.detach().abs().sum()) > 0  # trained away from the identity
        x = s.data[task][1]
        z = net.encoder(x)
        expected = net.head(z - torch.relu(z @ fix.down.T) @ fix.up.T)
        assert torch.allclose(model(x, task=task), expected, atol=1e-5)


def test_surgery_reduces_the_l1_gap_to_each_task_models_representation():
    s = setup()
    model, merged = surgery_fit(s, steps=60)
    for task in range(2):
        expert = s.factory(task)
        expert.load_state_dict(s.models[task], strict=False)
        plain = s.factory(task)
        plain.load_state_dict(merged, strict=False)
        x = torch.cat(s.data[task])
        with torch.no_grad():
            target = expert.encoder(x)
            before = (plain.encoder(x) - target).abs().mean()
            after = (model.surgery[task](plain.encoder(x)) - target).abs().mean()
        assert after < 0.8 * before, (task, float(before), float(after))


def test_surgery_merges_with_a_named_fitted_rule():
    s = setup()
    rule = RepresentationSurgery(steps=0, merge="adamerging_task", merge_params={"steps": 0})
    model = rule.fit(s.factory, s.models, s.data, base=s.base)
    expected = task_arithmetic(s, 0.3)
    assert all(torch.allclose(model.merged[k], expected[k], atol=1e-6) for k in expected)
    assert rule.summary()["merge"]["coefficients"] == pytest.approx([0.3, 0.3])


def test_surgery_merges_with_a_named_data_free_rule():
    s = setup()
    rule = RepresentationSurgery(steps=0, merge="task_arithmetic", merge_params={"scale": 0.5})
    model = rule.fit(s.factory, s.models, s.data, base=s.base)
    expected = task_arithmetic(s, 0.5)
    assert all(torch.allclose(model.merged[k], expected[k], atol=1e-6) for k in expected)


def test_surgery_needs_a_merged_model_and_a_head_submodule():
    s = setup()
    with pytest.raises(ConfigError, match="pass merged="):
        RepresentationSurgery(steps=0).fit(s.factory, s.models, s.data)
    with pytest.raises(ConfigError, match="no submodule 'neck'"):
        surgery_fit(s, steps=0, head="neck")


def test_head_input_is_what_the_head_receives():
    s = setup()
    net = s.factory(0)
    x = s.data[0][0]
    assert torch.allclose(head_input(net, "head", Inputs((x,), {})), net.encoder(x))


# ---------------------------------------------------------------- inputs and errors


def test_labelled_and_dict_batches_are_read_as_inputs():
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, *, pixels: Tensor) -> Tensor:
            return self.linear(pixels)

    state = {k: v.detach().clone() for k, v in Keyword().state_dict().items()}
    x = torch.randn(4, 3)
    labelled = RegMean().fit(
        lambda t: Keyword(), [state, state], [[{"pixels": x}], [{"pixels": x}]]
    )
    assert torch.allclose(labelled["linear.weight"], state["linear.weight"], atol=1e-5)

    weights = [torch.randn(2, 3), torch.randn(2, 3)]
    y = torch.zeros(4, dtype=torch.long)
    with_labels = RegMean().fit(
        single_linear(weights), [{"weight": w} for w in weights], [[(x, y)], [(x, y)]]
    )
    plain = RegMean().fit(single_linear(weights), [{"weight": w} for w in weights], [[x], [x]])
    assert torch.allclose(with_labels["weight"], plain["weight"])


def test_inputs_that_do_not_fit_are_config_errors_that_say_what_is_wrong():
    s = setup()
    other = [dict(s.models[0]), {k: v for k, v in s.models[1].items() if k != "encoder.0.bias"}]
    with pytest.raises(ConfigError, match="lacks 'encoder.0.bias'"):
        RegMean().fit(s.factory, other, s.data)
    with pytest.raises(ConfigError, match="one data source per task model"):
        RegMean().fit(s.factory, s.models, s.data[:1])
    with pytest.raises(ConfigError, match="without the tensors 'encoder.weight'"):
        RegMean().fit(s.factory, [{"encoder.weight": torch.zeros(1)}] * 2, s.data)
    wrong = [{"encoder.weight": torch.zeros(1)}] * 2
    with pytest.raises(ConfigError, match="without the tensors 'encoder.weight'"):
        TaskWiseAdaMerging().fit(s.factory, wrong, s.data, base=wrong[0])
    with pytest.raises(ConfigError, match="without the tensors 'encoder.weight'"):
        RepresentationSurgery().fit(s.factory, wrong, s.data, merged=wrong[0])
    with pytest.raises(ConfigError, match="must return an nn.Module"):
        RegMean().fit(lambda task: None, s.models, s.data)
    with pytest.raises(ConfigError, match="does not use a base"):
        FisherMerging().fit(s.factory, s.models, s.data, base=s.base)
    with pytest.raises(ConfigError, match="base is only for the rule named by merge"):
        RepresentationSurgery().fit(s.factory, s.models, s.data, base=s.base, merged=s.base)
    with pytest.raises(DataError, match="holds no example"):
        RegMean().fit(s.factory, s.models, [[], []])


def test_a_model_that_does_not_return_logits_is_a_config_error():
    class DictOut(Net):
        def forward(self, x: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
            return {"task": super().forward(x)}

    s = setup()
    with pytest.raises(ConfigError, match="must return a logits Tensor"):
        FisherMerging().fit(lambda task: DictOut(), s.models, s.data)
