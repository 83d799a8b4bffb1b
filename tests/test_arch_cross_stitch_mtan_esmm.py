"""Cross-stitch, MTAN and ESMM: shapes, the shared/task split by autograd, the feature views,
missing labels, construction from the registry, and each architecture's own formula."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import manytask as mt
from manytask import balance, registry
from manytask.balance import engine
from manytask.columns import Columns
from manytask.errors import ConfigError
from manytask.nn.base import MultiTaskModel
from manytask.nn.cross_stitch import CrossStitchNetwork, stitch_init
from manytask.nn.esmm import ctcvr_logit
from manytask.task import masked_bce

TABLE = Columns(numeric=("n1", "n2"), categorical=(("c1", 5), ("c2", 3)))


def _mixed_tasks() -> mt.TaskSet:
    return mt.TaskSet(
        [
            mt.Task("c", "cross_entropy", output_dim=4),
            mt.Task("r", "mse"),
            mt.Task("b", "bce"),
        ]
    )


def _esmm_tasks() -> mt.TaskSet:
    # deliberately not in (click, ctcvr) order
    return mt.TaskSet([mt.Task("buy", "bce"), mt.Task("click", "bce")])


def _table_input(batch: int, gen: torch.Generator) -> torch.Tensor:
    numeric = torch.randn(batch, 2, generator=gen)
    codes = torch.stack(
        [
            torch.randint(0, 6, (batch,), generator=gen),
            torch.randint(0, 4, (batch,), generator=gen),
        ],
        dim=1,
    ).float()
    return torch.cat([numeric, codes], dim=1)


def _build(case: str) -> tuple[MultiTaskModel, mt.TaskSet, Callable[[int], torch.Tensor]]:
    """A small model of each kind, its tasks and a seeded input maker."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    tasks = _mixed_tasks()
    if case == "cross_stitch_mlp":
        model = registry.call_with_params(
            "architecture",
            "cross_stitch",
            {"hidden": [12, 8]},
            tasks=tasks,
            input_shape=(10,),
            columns=None,
        )
        return model, tasks, lambda b: torch.randn(b, 10, generator=gen)
    if case == "cross_stitch_cnn":
        params = {"channels": [3, 4], "fc": 6, "kernel_size": 3, "head_hidden": [5]}
        model = registry.call_with_params(
            "architecture",
            "cross_stitch",
            params,
            tasks=tasks,
            input_shape=(1, 12, 12),
            columns=None,
        )
        return model, tasks, lambda b: torch.randn(b, 1, 12, 12, generator=gen)
    if case == "cross_stitch_table":
        model = registry.call_with_params(
            "architecture",
            "cross_stitch",
            {"hidden": [6, 5], "embedding_dim": 3},
            tasks=tasks,
            input_shape=(TABLE.width,),
            columns=TABLE,
        )
        return model, tasks, lambda b: _table_input(b, gen)
    if case == "mtan":
        model = registry.call_with_params(
            "architecture",
            "mtan",
            {"channels": [3, 4, 5]},
            tasks=tasks,
            input_shape=(1, 12, 12),
            columns=None,
        )
        return model, tasks, lambda b: torch.randn(b, 1, 12, 12, generator=gen)
    if case == "esmm":
        tasks = _esmm_tasks()
        params = {"click_task": "click", "ctcvr_task": "buy", "hidden": [8, 6], "embedding_dim": 3}
        model = registry.call_with_params(
            "architecture",
            "esmm",
            params,
            tasks=tasks,
            input_shape=(TABLE.width,),
            columns=TABLE,
        )
        return model, tasks, lambda b: _table_input(b, gen)
    raise AssertionError(case)


CASES = ["cross_stitch_mlp", "cross_stitch_cnn", "cross_stitch_table", "mtan", "esmm"]


def _targets(tasks: mt.TaskSet, batch: int, seed: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, task in tasks.items():
        if task.kind_ == "multiclass":
            out[name] = torch.randint(0, task.output_dim, (batch,), generator=gen)
        elif task.kind_ == "binary":
            out[name] = torch.randint(0, 2, (batch,), generator=gen).float()
        else:
            out[name] = torch.randn(batch, generator=gen)
    return out


def _expected_shape(task: mt.Task, batch: int) -> tuple[int, ...]:
    return (batch, task.output_dim) if task.output_dim > 1 else (batch,)


def _is_zero(grad: torch.Tensor | None) -> bool:
    return grad is None or not bool(grad.abs().gt(0).any())


@pytest.mark.parametrize("case", CASES)
def test_output_shapes_batch_of_one_and_both_forward_paths_agree(case):
    model, tasks, make = _build(case)
    for batch in (5, 1):
        for train in (True, False):
            model.train(train)
            out = model(make(batch))
            assert list(out) == tasks.names
            for name, task in tasks.items():
                assert out[name].shape == _expected_shape(task, batch), (name, batch, train)
    model.eval()
    x = make(3)
    plain = model(x)
    with_views, views = model(x, return_features=True)
    assert len(views) == len(tasks)
    for name in tasks:
        torch.testing.assert_close(plain[name], with_views[name])


@pytest.mark.parametrize("case", CASES)
def test_shared_and_task_parameters_partition_the_model(case):
    model, tasks, _ = _build(case)
    shared = [id(p) for p in model.shared_parameters()]
    own = [[id(p) for p in model.task_parameters(t)] for t in tasks]
    flat = shared + [i for ids in own for i in ids]
    assert len(flat) == len(set(flat)), "a parameter is listed twice"
    assert set(flat) == {id(p) for p in model.parameters()}
    with pytest.raises(ConfigError, match="unknown task"):
        list(model.task_parameters("nope"))


@pytest.mark.parametrize("case", CASES)
def test_each_loss_reaches_its_own_and_the_shared_parameters_only(case):
    model, tasks, make = _build(case)
    out = model(make(6))
    losses = tasks.losses(out, _targets(tasks, 6))
    shared = list(model.shared_parameters())
    own = {t: list(model.task_parameters(t)) for t in tasks}
    reached = [0] * len(shared)
    for t, loss in losses.items():
        params = shared + [p for ps in own.values() for p in ps]
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        by_param = dict(zip(map(id, params), grads, strict=True))
        for s, ps in own.items():
            for p in ps:
                if s == t:
                    assert not _is_zero(by_param[id(p)]), f"task {t} does not train its {p.shape}"
                else:
                    assert _is_zero(by_param[id(p)]), f"task {t} reaches task {s}'s {p.shape}"
        for i, p in enumerate(shared):
            reached[i] += not _is_zero(by_param[id(p)])
    assert min(reached) >= 2, f"shared parameters reached by fewer than 2 tasks: {reached}"


@pytest.mark.parametrize("case", CASES)
def test_views_are_a_complete_cut_between_shared_and_task_parameters(case):
    model, tasks, make = _build(case)
    out, views = model(make(4), return_features=True)
    assert engine.are_task_views(views, len(tasks))
    base = views[0]._base
    losses = tasks.losses(out, _targets(tasks, 4))
    shared = list(model.shared_parameters())
    for i, loss in enumerate(losses.values()):
        direct = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        per_view = torch.autograd.grad(loss, views, retain_graph=True, allow_unused=True)
        for j, g in enumerate(per_view):
            if j != i:
                assert _is_zero(g), "a task reads another task's view"
        (at_base,) = torch.autograd.grad(loss, base, retain_graph=True)
        through = torch.autograd.grad(
            base, shared, grad_outputs=at_base, retain_graph=True, allow_unused=True
        )
        for p, a, b in zip(shared, direct, through, strict=True):
            a = torch.zeros_like(p) if a is None else a
            b = torch.zeros_like(p) if b is None else b
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_missing_labels_get_no_gradient(case):
    model, tasks, make = _build(case)
    out = model(make(6))
    targets = _targets(tasks, 6)
    missing = {name: torch.tensor([0, 3]) + k for k, name in enumerate(tasks)}
    for name, task in tasks.items():
        targets[name][missing[name]] = -1 if task.kind_ == "multiclass" else math.nan
    losses = tasks.losses(out, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    total = torch.stack(list(losses.values())).sum()
    for name in tasks:
        (g,) = torch.autograd.grad(total, out[name], retain_graph=True)
        rows = g.reshape(6, -1).abs().sum(dim=1)
        assert torch.all(rows[missing[name]] == 0), name
        labelled = torch.ones(6, dtype=torch.bool)
        labelled[missing[name]] = False
        assert torch.all(rows[labelled] > 0), name


@pytest.mark.parametrize("case", CASES)
def test_mgda_in_feature_mode_runs_one_backward_through_the_views(case):
    model, tasks, make = _build(case)
    balancer = balance.get("mgda", tasks.names, mode="features")
    out, views = model(make(5), return_features=True)
    balancer.backward(tasks.losses(out, _targets(tasks, 5)), features=views)
    shared = list(model.shared_parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in shared)
    assert any(bool(p.grad.abs().gt(0).any()) for p in shared)
    for t in tasks:
        assert all(p.grad is not None for p in model.task_parameters(t))


@pytest.mark.parametrize(
    ("name", "input_shape", "tasks"),
    [
        ("cross_stitch", (1, 28, 28), _mixed_tasks()),
        ("cross_stitch", (10,), _mixed_tasks()),
        ("mtan", (1, 28, 28), _mixed_tasks()),
        ("esmm", (10,), mt.TaskSet([mt.Task("ctr", "bce"), mt.Task("ctcvr", "bce")])),
    ],
)
def test_builds_from_the_registry_with_default_parameters(name, input_shape, tasks):
    model = registry.call_with_params(
        "architecture", name, {}, tasks=tasks, input_shape=input_shape, columns=None
    )
    out = model(torch.randn(2, *input_shape))
    assert {k: v.shape for k, v in out.items()} == {
        t: _expected_shape(task, 2) for t, task in tasks.items()
    }


@pytest.mark.parametrize(
    ("name", "params", "input_shape", "columns", "match"),
    [
        ("cross_stitch", {"alpha_same": 1.5}, (10,), None, "alpha_same"),
        ("cross_stitch", {"column": "rnn"}, (10,), None, "column"),
        ("cross_stitch", {"column": "cnn"}, (10,), None, "image inputs"),
        ("cross_stitch", {"column": "cnn"}, (TABLE.width,), TABLE, "image inputs"),
        ("cross_stitch", {"hidden": []}, (10,), None, "hidden"),
        ("cross_stitch", {"kernel_size": 4}, (1, 8, 8), None, "kernel_size"),
        ("cross_stitch", {"channels": [2, 2, 2, 2]}, (1, 8, 8), None, "too many"),
        ("cross_stitch", {"activation": "sine"}, (10,), None, "activation"),
        ("cross_stitch", {"alpha": 0.9}, (10,), None, "alpha"),
        ("mtan", {}, (10,), None, "image inputs"),
        ("mtan", {}, (TABLE.width,), TABLE, "tabular"),
        ("mtan", {"convs_per_stage": 1}, (1, 8, 8), None, "convs_per_stage"),
        ("mtan", {"channels": [2, 2, 2, 2, 2]}, (1, 8, 8), None, "too many"),
        ("mtan", {"channels": []}, (1, 8, 8), None, "channels"),
        ("mtan", {"channels": "wide"}, (1, 8, 8), None, "channels"),
    ],
)
def test_bad_hyper_parameters_raise_config_error(name, params, input_shape, columns, match):
    with pytest.raises(ConfigError, match=match):
        registry.call_with_params(
            "architecture",
            name,
            params,
            tasks=_mixed_tasks(),
            input_shape=input_shape,
            columns=columns,
        )


@pytest.mark.parametrize(
    ("params", "tasks", "match"),
    [
        ({}, mt.TaskSet([mt.Task("click", "bce"), mt.Task("buy", "bce")]), "click_task"),
        ({"click_task": "a", "ctcvr_task": "a"}, mt.TaskSet([mt.Task("a", "bce")]), "differ"),
        (
            {},
            mt.TaskSet([mt.Task("ctr", "bce"), mt.Task("ctcvr", "bce"), mt.Task("x", "bce")]),
            "predicts two tasks",
        ),
        (
            {},
            mt.TaskSet([mt.Task("ctr", "bce"), mt.Task("ctcvr", "cross_entropy", output_dim=2)]),
            "binary",
        ),
        ({}, mt.TaskSet([mt.Task("ctr", "bce"), mt.Task("ctcvr", "mse")]), "binary"),
        ({"embedding_dim": 0}, None, "embedding_dim"),
    ],
)
def test_esmm_rejects_tasks_it_cannot_model(params, tasks, match):
    tasks = tasks or mt.TaskSet([mt.Task("ctr", "bce"), mt.Task("ctcvr", "bce")])
    with pytest.raises(ConfigError, match=match):
        registry.call_with_params(
            "architecture",
            "esmm",
            params,
            tasks=tasks,
            input_shape=(TABLE.width,),
            columns=TABLE,
        )


@pytest.mark.parametrize("name", ["ctr", "ctcvr"])
def test_esmm_builds_for_one_of_its_tasks_as_a_single_task_baseline(name):
    tasks = mt.TaskSet([mt.Task(name, "bce")])
    model = registry.call_with_params(
        "architecture", "esmm", {"hidden": [4]}, tasks=tasks, input_shape=(6,), columns=None
    )
    x = torch.randn(3, 6)
    out, views = model(x, return_features=True)
    assert len(views) == 1
    assert out[name].shape == (3,)
    torch.testing.assert_close(model(x)[name], out[name])
    everything = {id(p) for p in model.parameters()}
    split = {id(p) for p in model.shared_parameters()} | {
        id(p) for p in model.task_parameters(name)
    }
    assert split == everything
    if name == "ctr":
        assert model.cvr_tower is None
        with pytest.raises(ConfigError, match="no CVR tower"):
            model.cvr_logits(x)
    else:
        assert model.cvr_logits(x).shape == (3,)


# --- cross-stitch: the units' formula -------------------------------------------------------


def test_stitch_init_generalises_the_papers_two_task_values():
    torch.testing.assert_close(stitch_init(2, 0.9), torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    three = stitch_init(3, 0.9)
    torch.testing.assert_close(three.diagonal(), torch.full((3,), 0.9))
    torch.testing.assert_close(three.sum(dim=1), torch.ones(3))
    torch.testing.assert_close(three[0, 1:], torch.tensor([0.05, 0.05]))
    torch.testing.assert_close(stitch_init(1, 0.9), torch.ones(1, 1))


def _two_regression_tasks() -> mt.TaskSet:
    return mt.TaskSet([mt.Task("a", "mse"), mt.Task("b", "mse")])


def test_cross_stitch_mlp_matches_the_formula_by_hand_for_two_tasks():
    torch.manual_seed(0)
    model = CrossStitchNetwork(_two_regression_tasks(), (4,), column="mlp", hidden=(3, 2))
    with torch.no_grad():
        model.stitch[0].copy_(torch.tensor([[0.7, 0.3], [0.2, 0.8]]))
        model.last_stitch["a"].copy_(torch.tensor([0.6, 0.4]))
        model.last_stitch["b"].copy_(torch.tensor([0.25, 0.75]))
    units = {id(p) for p in model.stitch_parameters()}
    assert units == {id(model.stitch[0]), *(id(p) for p in model.last_stitch.values())}
    x = torch.randn(5, 4)
    w1, b1 = model.linear[0].weight, model.linear[0].bias
    w2, b2 = model.linear[1].weight, model.linear[1].bias
    h1 = [torch.relu(x @ w1[t] + b1[t]) for t in (0, 1)]
    m1 = [0.7 * h1[0] + 0.3 * h1[1], 0.2 * h1[0] + 0.8 * h1[1]]
    h2 = [torch.relu(m1[t] @ w2[t] + b2[t]) for t in (0, 1)]
    final = {"a": 0.6 * h2[0] + 0.4 * h2[1], "b": 0.25 * h2[0] + 0.75 * h2[1]}
    expected = {
        t: (final[t] @ model.heads[t].out.weight.T + model.heads[t].out.bias).squeeze(-1)
        for t in ("a", "b")
    }
    out = model(x)
    out_views, _ = model(x, return_features=True)
    for t in ("a", "b"):
        torch.testing.assert_close(out[t], expected[t])
        torch.testing.assert_close(out_views[t], expected[t])


def test_cross_stitch_cnn_columns_equal_separate_convolutions_mixed_by_hand():
    torch.manual_seed(0)
    model = CrossStitchNetwork(
        _two_regression_tasks(), (1, 8, 8), column="cnn", channels=(2, 3), kernel_size=3, fc=4
    )
    alpha = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    with torch.no_grad():
        model.stitch[0].copy_(alpha)
        model.stitch[1].copy_(alpha.flip(1))
    x = torch.randn(3, 1, 8, 8)
    conv1, conv2 = model.conv[0], model.conv[1]

    def block(inp, conv, t, width):
        w = conv.weight[t * width : (t + 1) * width]
        b = conv.bias[t * width : (t + 1) * width]
        return F.max_pool2d(torch.relu(F.conv2d(inp, w, b, padding=1)), 2)

    def mix(a, cols):
        return [a[s, 0] * cols[0] + a[s, 1] * cols[1] for s in (0, 1)]

    h = mix(alpha, [block(x, conv1, t, 2) for t in (0, 1)])
    h = mix(alpha.flip(1), [block(h[t], conv2, t, 3) for t in (0, 1)])
    fc = model.linear[0]
    expected = torch.stack(
        [torch.relu(h[t].flatten(1) @ fc.weight[t] + fc.bias[t]) for t in (0, 1)]
    )
    torch.testing.assert_close(model.columns_forward(x), expected)


# --- ESMM: the product and its logit --------------------------------------------------------


def test_ctcvr_logit_matches_the_direct_formula():
    grid = torch.linspace(-12, 12, 25, dtype=torch.float64)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    direct = torch.logit(torch.sigmoid(a) * torch.sigmoid(b))
    torch.testing.assert_close(ctcvr_logit(a, b), direct, rtol=1e-9, atol=1e-9)


def test_esmm_ctcvr_probability_is_the_product_of_ctr_and_cvr():
    model, _, make = _build("esmm")
    model = model.double()
    x = make(7).double()
    out = model(x)
    p_ctr = torch.sigmoid(out["click"])
    p_cvr = torch.sigmoid(model.cvr_logits(x))
    torch.testing.assert_close(torch.sigmoid(out["buy"]), p_ctr * p_cvr)


def test_ctcvr_loss_and_gradients_are_finite_and_exact_for_extreme_logits():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60

    def exact_loss(za, zb, label):
        za, zb = mpmath.mpf(za), mpmath.mpf(zb)
        p = 1 / (1 + mpmath.exp(-za)) / (1 + mpmath.exp(-zb))
        return -mpmath.log(p) if label else -mpmath.log(1 - p)

    for za in (-50.0, 50.0):
        for zb in (-50.0, 50.0):
            for label in (0.0, 1.0):
                a = torch.tensor([za], requires_grad=True)
                b = torch.tensor([zb], requires_grad=True)
                loss = masked_bce(ctcvr_logit(a, b), torch.tensor([label]))
                loss.backward()
                exact = float(exact_loss(za, zb, label))
                grad_a = float(mpmath.diff(lambda u, v=zb, y=label: exact_loss(u, v, y), za))
                grad_b = float(mpmath.diff(lambda v, u=za, y=label: exact_loss(u, v, y), zb))
                case = (za, zb, label)
                assert torch.isfinite(loss), case
                assert math.isclose(loss.item(), exact, rel_tol=1e-5, abs_tol=1e-6), case
                assert math.isclose(a.grad.item(), grad_a, rel_tol=1e-4, abs_tol=1e-6), case
                assert math.isclose(b.grad.item(), grad_b, rel_tol=1e-4, abs_tol=1e-6), case
    # the direct formula is what would break: σ(50)² rounds to 1 in float32
    naive = torch.logit(torch.sigmoid(torch.tensor(50.0)) ** 2)
    assert not torch.isfinite(naive)
