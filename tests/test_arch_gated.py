"""The gated architectures (MoE, MMoE, DSelect-k, CGC, PLE, AdaTT, HoME) meet the model contract.

Every architecture is checked with autograd: a task's loss never reaches another task's
parameters, every shared parameter is reached by at least two tasks, and the views returned
with ``return_features=True`` are a complete cut (gradients through them equal the direct ones).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import manytask as mt
from manytask import registry
from manytask.columns import Columns
from manytask.errors import ConfigError
from manytask.nn import MultiTaskModel, StagedModel

SMALL: dict[str, Any] = {"expert_hidden": [6], "tower_hidden": [4]}

#: (registered name, parameters): every architecture, and the variants with other code paths
CASES: list[tuple[str, dict[str, Any]]] = [
    ("moe", {"num_experts": 4}),
    ("moe", {"num_experts": 4, "gate": "topk", "top_k": 2}),
    ("mmoe", {"num_experts": 4}),
    ("mmoe", {"num_experts": 4, "gate": "topk", "top_k": 2}),
    ("dselect_k", {"num_experts": 4, "k": 2}),
    ("dselect_k", {"num_experts": 5, "k": 2, "per_sample": False, "gamma": 2.0}),
    ("cgc", {"shared_experts": 2, "task_experts": 2}),
    ("ple", {}),
    ("ple", {"num_levels": 3, "shared_experts": 2}),
    ("adatt", {}),
    ("adatt", {"num_levels": 1, "task_experts": 2}),
    ("adatt", {"num_levels": 3, "task_experts": 2, "shared_experts": 0}),
    ("adatt", {"num_levels": 3, "task_experts": 1, "shared_experts": 2}),
    ("home", {}),
    ("home", {"groups": [["c", "r"], ["b"]], "task_experts": 2}),
    ("home", {"feature_gate_rank": 0, "self_gate": False, "expert_norm": False}),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]
NAMES = sorted({name for name, _ in CASES})

COLUMNS = Columns(numeric=("u", "v"), categorical=(("k", 3), ("m", 2)))


pytestmark = pytest.mark.usefixtures("one_thread")


def _tasks() -> mt.TaskSet:
    return mt.TaskSet(
        [mt.Task("c", "cross_entropy", output_dim=3), mt.Task("r", "mse"), mt.Task("b", "bce")]
    )


def _build(name: str, params: dict[str, Any], tabular: bool = False) -> MultiTaskModel:
    model: MultiTaskModel = registry.call_with_params(
        "architecture",
        name,
        {**SMALL, **params},
        tasks=_tasks(),
        input_shape=(COLUMNS.width,) if tabular else (5,),
        columns=COLUMNS if tabular else None,
    )
    return model


def _inputs(n: int, tabular: bool = False, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if not tabular:
        return torch.randn(n, 5, generator=g)
    numeric = torch.randn(n, 2, generator=g)
    codes = torch.stack(
        [torch.randint(0, 4, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)], 1
    )
    return torch.cat([numeric, codes.float()], 1)


def _targets(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "c": torch.randint(0, 3, (n,), generator=g),
        "r": torch.randn(n, generator=g),
        "b": torch.randint(0, 2, (n,), generator=g).float(),
    }


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def test_distinct_names_are_registered():
    names = registry.names("architecture")
    for name in ("moe", "mmoe", "dselect_k", "cgc", "ple", "adatt", "home"):
        assert name in names
        assert "(" in registry.entries("architecture")[names.index(name)].summary  # cites


@pytest.mark.parametrize("name", NAMES)
def test_builds_from_the_registry_with_defaults(name):
    model = registry.call_with_params(
        "architecture", name, {}, tasks=_tasks(), input_shape=(5,), columns=None
    )
    assert isinstance(model, MultiTaskModel)
    out = model(torch.randn(4, 5))
    assert set(out) == {"c", "r", "b"}


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_output_shapes_views_and_batch_of_one(name, params):
    torch.manual_seed(0)
    model = _build(name, params)
    out, views = model(_inputs(7), return_features=True)
    assert out["c"].shape == (7, 3)
    assert out["r"].shape == (7,)
    assert out["b"].shape == (7,)
    assert len(views) == 3
    base = views[0]._base
    assert base is not None and base.requires_grad
    assert all(v._base is base for v in views)
    for train in (True, False):
        model.train(train)
        single = model(_inputs(1))
        assert single["c"].shape == (1, 3) and single["r"].shape == (1,)
        single, views = model(_inputs(1), return_features=True)
        assert single["b"].shape == (1,) and views[0].shape[0] == 1
    # in evaluation the two forward paths compute the same outputs
    x = _inputs(5)
    plain = model(x)
    with_views, _ = model(x, return_features=True)
    for task in plain:
        torch.testing.assert_close(plain[task], with_views[task])


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_parameters_are_partitioned_into_shared_and_per_task(name, params):
    model = _build(name, params, tabular=True)
    shared = {id(p) for p in model.shared_parameters()}
    own = [{id(p) for p in model.task_parameters(t)} for t in ("c", "r", "b")]
    assert shared | own[0] | own[1] | own[2] == {id(p) for p in model.parameters()}
    assert all(not (shared & o) for o in own)
    assert not (own[0] & own[1]) and not (own[0] & own[2]) and not (own[1] & own[2])
    with pytest.raises(ConfigError, match="unknown task"):
        model.task_parameters("nope")


@pytest.mark.parametrize("tabular", [False, True], ids=["dense", "tabular"])
@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_split_and_cut_by_autograd(name, params, tabular):
    """Task t's loss reaches only its own and the shared parameters; every shared parameter is
    reached by two or more tasks; gradients through the views equal the direct gradients."""
    torch.manual_seed(0)
    model = _build(name, params, tabular)
    tasks = _tasks()
    x, y = _inputs(32, tabular), _targets(32)
    out, views = model(x, return_features=True)
    losses = tasks.losses(out, y)
    base = views[0]._base
    shared = list(model.shared_parameters())
    own = {t: list(model.task_parameters(t)) for t in tasks}
    everything = [*shared, *(p for t in tasks for p in own[t])]
    reached = torch.zeros(len(shared), dtype=torch.long)
    for t, loss in losses.items():
        *grads, at_base = _grads(loss, [*everything, base])
        direct, rest = grads[: len(shared)], grads[len(shared) :]
        for u in tasks:
            mine, rest = rest[: len(own[u])], rest[len(own[u]) :]
            if u == t:  # the gradients reach every parameter of the task
                assert all(g.abs().sum() > 0 for g in mine), f"{t}: a parameter gets nothing"
            else:
                assert all(g.abs().sum() == 0 for g in mine), f"{t} reaches {u}'s parameters"
        reached += torch.tensor([int(g.abs().sum() > 0) for g in direct])
        through = torch.autograd.grad(
            base, shared, grad_outputs=at_base, retain_graph=True, allow_unused=True
        )
        for d, v in zip(direct, through, strict=True):
            torch.testing.assert_close(v if v is not None else torch.zeros_like(d), d)
    assert (reached >= 2).all(), "a shared parameter is reached by fewer than two tasks"


def test_the_cut_check_detects_an_incomplete_cut():
    """Negative control: an MMoE whose views leave out the embedded input (that its gates read)
    is not a cut, and the comparison of the previous test catches it."""
    torch.manual_seed(0)
    model = _build("mmoe", {"num_experts": 4}, tabular=True)
    assert isinstance(model, StagedModel)
    model.tasks_read_input = False  # the gates still read the input, now past the views
    out, views = model(_inputs(16, tabular=True), return_features=True)
    loss = _tasks().losses(out, _targets(16))["r"]
    embedding = model.front.embedding.weight
    (direct,) = torch.autograd.grad(loss, embedding, retain_graph=True)
    (at_base,) = torch.autograd.grad(loss, views[0]._base, retain_graph=True)
    (through,) = torch.autograd.grad(views[0]._base, embedding, grad_outputs=at_base)
    assert not torch.allclose(direct, through)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_missing_labels_are_ignored(name, params):
    torch.manual_seed(0)
    model = _build(name, params).eval()
    tasks = _tasks()
    x, y = _inputs(10), _targets(10)
    y["c"][::3] = -1
    y["r"][1::2] = float("nan")
    y["b"][:] = float("nan")
    out = model(x)
    losses = tasks.losses(out, y)
    keep_c = torch.arange(10) % 3 != 0
    keep_r = torch.arange(10) % 2 == 0
    torch.testing.assert_close(
        losses["c"], torch.nn.functional.cross_entropy(out["c"][keep_c], y["c"][keep_c])
    )
    torch.testing.assert_close(losses["r"], ((out["r"] - y["r"])[keep_r] ** 2).mean())
    assert losses["b"].item() == 0.0  # no label at all: zero, with a graph
    grads = torch.autograd.grad(losses["b"], list(model.parameters()), allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)
    assert all(torch.isfinite(v).all() for v in losses.values())


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_tabular_inputs_train_the_embeddings(name, params):
    torch.manual_seed(0)
    model = _build(name, params, tabular=True)
    out = model(_inputs(12, tabular=True))
    sum(_tasks().losses(out, _targets(12)).values()).backward()
    assert model.front.embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_one_mgda_step_in_feature_mode(name, params):
    torch.manual_seed(0)
    model = _build(name, params)
    tasks = _tasks()
    out, views = model(_inputs(16), return_features=True)
    losses = tasks.losses(out, _targets(16))
    balancer = mt.balance.get("mgda", tasks.names, mode="features")
    balancer.backward(losses, features=views)
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert any(p.grad.abs().sum() > 0 for p in model.shared_parameters())


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_auxiliary_loss_is_a_scalar_and_zero_without_such_gates(name, params):
    torch.manual_seed(0)
    model = _build(name, params)
    assert isinstance(model, StagedModel)
    model(_inputs(16))
    aux = model.auxiliary_loss()
    assert aux.shape == ()
    if params.get("gate") == "topk" or name == "dselect_k":
        assert aux.requires_grad and aux.item() > 0
        aux.backward()
        gates = [p for n, p in model.named_parameters() if "gate" in n]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gates)
    else:
        assert aux.item() == 0.0


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("moe", {"num_experts": 0}, "num_experts"),
    ("moe", {"gate": "topk", "top_k": 9}, "top_k"),
    ("moe", {"gate": "bogus"}, "gate"),
    ("mmoe", {"expert_hidden": []}, "expert_hidden"),
    ("mmoe", {"dropout": 1.0}, "dropout"),
    ("mmoe", {"activation": "bogus"}, "activation"),
    ("mmoe", {"tower_hidden": [0]}, "tower_hidden"),
    ("dselect_k", {"k": 0}, "k must"),
    ("dselect_k", {"gamma": 0.0}, "gamma"),
    ("dselect_k", {"num_experts": 1}, "num_experts"),
    ("dselect_k", {"entropy_weight": -1.0}, "entropy_weight"),
    ("cgc", {"task_experts": 0}, "task_experts"),
    ("ple", {"num_levels": 0}, "num_levels"),
    ("ple", {"shared_experts": 0}, "shared_experts"),
    ("adatt", {"shared_experts": -1}, "shared_experts"),
    ("adatt", {"num_levels": 0}, "num_levels"),
    ("home", {"groups": [["c", "r"]]}, "leave out"),
    ("home", {"groups": [["c", "x"], ["r", "b"]]}, "unknown"),
    ("home", {"groups": [["c", "r"], ["r", "b"]]}, "more than once"),
    ("home", {"groups": [["c", "r", "b"], []]}, "empty"),
    ("home", {"feature_gate_rank": -1}, "feature_gate_rank"),
    ("home", {"group_experts": 0}, "group_experts"),
    ("home", {"num_experts": 4}, "num_experts"),  # not a parameter of home
]


@pytest.mark.parametrize(("name", "params", "match"), BAD, ids=[f"{b[0]}-{b[2]}" for b in BAD])
def test_bad_hyper_parameters_raise_config_errors(name, params, match):
    with pytest.raises(ConfigError, match=match):
        _build(name, params)


def test_auxiliary_loss_adds_to_a_balancers_gradients():
    """The recipe of docs/architectures.md: the auxiliary loss's own backward pass, then the
    balancer's; the gradients add up."""
    torch.manual_seed(0)
    model = _build("mmoe", {"num_experts": 4, "gate": "topk"}).eval()  # eval: no noise
    tasks = _tasks()
    x, y = _inputs(16), _targets(16)
    gate = model.gates[0].w_gate
    with torch.no_grad():
        gate.normal_()
    losses = tasks.losses(model(x), y)
    (alone,) = torch.autograd.grad(model.auxiliary_loss(), gate, retain_graph=True)
    assert alone.abs().sum() > 0
    (expected,) = torch.autograd.grad(
        sum(losses.values()) + model.auxiliary_loss(), gate, retain_graph=True
    )
    model.auxiliary_loss().backward(retain_graph=True)
    mt.balance.get("ew", tasks.names).backward(losses, shared=list(model.shared_parameters()))
    torch.testing.assert_close(gate.grad, expected)
