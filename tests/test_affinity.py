"""Task affinity: the TAG lookahead formula, gradient cosines, the accumulator and the monitor."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import manytask as mt
from manytask.config import parse_config
from manytask.errors import ConfigError
from manytask.evaluate.affinity import AffinityAccumulator, cosine_matrix, measure_affinity
from manytask.train.affinity import AFFINITY_FILE, AffinityMonitor, read_affinity_records
from manytask.train.build import build_experiment, run_training
from manytask.train.rundir import RunDirectory


class LinearTasks(nn.Module):
    """Every task predicts ``x @ theta`` with one shared weight vector (no task parameters)."""

    def __init__(self, theta: torch.Tensor, names: list[str]) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta.clone())
        self.names = names

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = x @ self.theta
        return {name: out for name in self.names}

    def shared_parameters(self):
        return iter([self.theta])


def _close(actual, expected) -> None:
    torch.testing.assert_close(
        torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    )


def _linear_problem(n: int = 40, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("lr", [0.05, 1e-4])
def test_lookahead_matches_the_tag_formula_computed_by_hand(lr):
    # float64 throughout: with a small step Z is a small difference of two losses (taken in
    # float32 it was 18% off at lr 1e-4)
    x, y = _linear_problem()
    y2 = 0.5 * y + torch.sin(x[:, 0])
    theta = 0.1 * torch.ones(5, dtype=torch.float64)
    tasks = mt.TaskSet([mt.Task("a", "mse"), mt.Task("b", "mse")])
    model = LinearTasks(theta, ["a", "b"])
    result = measure_affinity(model, tasks, x, {"a": y, "b": y2}, lr)

    def loss(t, target):
        return ((x @ t - target) ** 2).mean()

    targets = [y, y2]
    grads = [2 * x.T @ (x @ theta - t) / len(t) for t in targets]  # ∇θ mean (xθ − t)²
    for i in range(2):
        for j in range(2):
            expected = 1 - loss(theta - lr * grads[i], targets[j]) / loss(theta, targets[j])
            assert result.lookahead[i, j].item() == pytest.approx(expected.item(), rel=1e-9)
    cos = torch.dot(grads[0], grads[1]) / (grads[0].norm() * grads[1].norm())
    assert result.cosine[0, 1].item() == pytest.approx(cos.item(), rel=1e-6)
    assert torch.equal(model.theta.detach(), theta)  # restored exactly


def _shared_bottom_with_a_copied_task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=g)
    y = x @ torch.randn(6, generator=g)
    other = torch.cos(3 * x[:, 1]) + x[:, 2] ** 2
    tasks = mt.TaskSet([mt.Task("a", "mse"), mt.Task("twin", "mse"), mt.Task("other", "mse")])
    torch.manual_seed(seed)
    model = mt.nn.SharedBottom(mt.nn.MLPEncoder((6,), [16]), tasks)
    with torch.no_grad():  # the twin's head starts as a copy of a's
        for mine, theirs in zip(
            model.task_parameters("twin"), model.task_parameters("a"), strict=True
        ):
            mine.copy_(theirs)
    return model, tasks, x, {"a": y, "twin": y.clone(), "other": other}


def test_identical_tasks_have_maximal_affinity_and_cosine_one():
    model, tasks, x, targets = _shared_bottom_with_a_copied_task()
    out = model(x)
    assert torch.equal(out["a"], out["twin"])  # the twin really is the same task
    result = measure_affinity(model, tasks, x, targets, lr=0.05)
    z, cos = result.lookahead, result.cosine
    a, twin, other = 0, 1, 2
    # a step for `a` helps `twin` exactly as much as a step for `twin` itself does
    assert z[a, twin].item() == pytest.approx(z[twin, twin].item(), rel=1e-5)
    assert z[twin, a].item() == pytest.approx(z[a, a].item(), rel=1e-5)
    assert z[a, twin] > 0 and z[a, twin] > z[other, twin]
    assert z[a, twin] == z[:, twin].max()  # no task helps the twin more
    assert cos[a, twin].item() == pytest.approx(1.0, abs=1e-6)
    assert cos[a, other] < 1 - 1e-3


def test_opposed_tasks_have_negative_affinity_and_conflict():
    x, y = _linear_problem(seed=1)
    tasks = mt.TaskSet([mt.Task("up", "mse"), mt.Task("down", "mse")])
    model = LinearTasks(torch.zeros(5, dtype=torch.float64), ["up", "down"])
    result = measure_affinity(model, tasks, x, {"up": y, "down": -y}, lr=0.05)
    # at θ = 0 the gradients are exact opposites: what lowers one loss raises the other
    assert result.cosine[0, 1].item() == pytest.approx(-1.0, abs=1e-12)
    assert result.lookahead[0, 1] < 0 and result.lookahead[1, 0] < 0
    assert result.lookahead[0, 0] > 0 and result.lookahead[1, 1] > 0


def test_a_measurement_changes_no_parameter_buffer_gradient_or_random_state():
    torch.manual_seed(0)
    tasks = mt.TaskSet([mt.Task("a", "mse"), mt.Task("c", "cross_entropy", output_dim=3)])
    encoder = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder
            self.heads = nn.ModuleDict({"a": nn.Linear(8, 1), "c": nn.Linear(8, 3)})

        def forward(self, x):
            h = self.encoder(x)
            return {name: head(h) for name, head in self.heads.items()}

        def shared_parameters(self):
            return self.encoder.parameters()

    model = Model().train()
    x = torch.randn(32, 4)
    targets = {"a": torch.randn(32), "c": torch.randint(0, 3, (32,))}
    out = model(x)
    (out["a"].sum() + out["c"].sum()).backward()  # some .grad to keep
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    first = measure_affinity(model, tasks, x, targets, lr=0.1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)
    # dropout draws the same masks in every forward pass of a measurement: repeatable
    second = measure_affinity(model, tasks, x, targets, lr=0.1)
    assert torch.equal(first.lookahead, second.lookahead)
    assert torch.equal(first.losses, second.losses)


def test_cosine_of_a_zero_gradient_is_zero_not_nan():
    jac = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-2.0, 0.0]])
    cos = cosine_matrix(jac)
    assert torch.equal(cos, torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 1.0]]))


def test_accumulator_means_skip_nan_and_count_conflicts_by_hand():
    acc = AffinityAccumulator(["a", "b"])
    acc.add([[0.1, 0.2], [0.3, 0.4]], [[1.0, -0.5], [-0.5, 1.0]])
    acc.add([[0.3, math.nan], [-0.1, 0.0]], [[1.0, 0.25], [0.25, 1.0]])
    acc.add(None, [[1.0, -0.1], [-0.1, 1.0]])
    summary = acc.summary()
    assert summary["measurements"] == 3
    _close(summary["lookahead"], [[0.2, 0.2], [0.1, 0.2]])
    off = (-0.5 + 0.25 - 0.1) / 3
    _close(summary["cosine"], [[1.0, off], [off, 1.0]])
    _close(summary["conflict"], [[0.0, 2 / 3], [2 / 3, 0.0]])
    with pytest.raises(ConfigError, match=r"expected \(2, 2\)"):
        acc.add([[0.0]], None)
    rebuilt = AffinityAccumulator.from_records(
        ["a", "b"],
        [{"lookahead": [[0.1, 0.2], [0.3, 0.4]], "cosine": None}],
    )
    assert rebuilt.summary()["cosine"] is None and rebuilt.summary()["conflict"] is None


def _config(tmp_path: Path, **extra) -> dict:
    return {
        "name": "aff",
        "seed": 3,
        "data": {
            "name": "mmoe_synthetic",
            "n_train": 160,
            "n_val": 32,
            "n_test": 32,
            "input_dim": 8,
        },
        "model": {
            "name": "shared_bottom",
            "encoder": {"name": "mlp", "hidden": [12], "dropout": 0.2},
        },
        "balancer": {"name": "ew"},
        "optimizer": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 2, "batch_size": 32, "checkpoint_every": 3, "progress": False},
        "run": {"dir": str(tmp_path / "runs")},
        **extra,
    }


def test_the_monitor_writes_the_fixed_format_and_leaves_training_unchanged(tmp_path):
    plain = run_training(parse_config({**_config(tmp_path), "run": {"dir": str(tmp_path / "p")}}))
    watched = run_training(parse_config(_config(tmp_path, monitor={"affinity_every": 2})))
    assert watched["test"] == plain["test"]  # bit for bit: dropout, Adam and all
    assert "affinity" not in plain
    records = read_affinity_records(tmp_path / "runs" / "aff" / AFFINITY_FILE)
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10]  # 5 steps per epoch, 2 epochs
    assert [r["epoch"] for r in records] == [1, 1, 2, 2, 2]
    for record in records:
        assert list(record) == ["step", "epoch", "tasks", "lookahead", "cosine"]
        assert record["tasks"] == ["y1", "y2"]
        assert len(record["lookahead"]) == 2 and len(record["cosine"][0]) == 2
    expected = AffinityAccumulator.from_records(["y1", "y2"], records).summary()
    summary = json.loads((tmp_path / "runs" / "aff" / "summary.json").read_text())
    assert summary["affinity"] == expected == watched["affinity"]
    assert summary["affinity"]["measurements"] == 5
    assert set(summary["affinity"]) == {"tasks", "lookahead", "cosine", "conflict", "measurements"}


def test_the_monitor_reuses_the_cosines_a_gramian_balancer_formed(tmp_path):
    config = parse_config(
        _config(
            tmp_path, balancer={"name": "mgda"}, monitor={"affinity_every": 1, "lookahead": False}
        )
    )
    experiment = build_experiment(config)
    seen = []
    experiment.trainer.callbacks.append(lambda t: seen.append(t.last_step.cosines.tolist()))
    experiment.trainer.run_dir = RunDirectory.create(tmp_path / "run")
    experiment.trainer.fit()
    records = read_affinity_records(tmp_path / "run" / AFFINITY_FILE)
    assert len(records) == len(seen) == 10
    assert all(r["lookahead"] is None for r in records)
    _close([r["cosine"] for r in records], seen)


def test_a_resumed_run_ends_with_the_same_affinity_as_an_uninterrupted_one(tmp_path):
    monitor = {"affinity_every": 2}
    full = run_training(parse_config(_config(tmp_path, monitor=monitor, name="full")))

    config = parse_config(_config(tmp_path, monitor=monitor, name="cut"))
    run_dir = RunDirectory.create(tmp_path / "runs" / "cut")
    run_dir.write_config(config.to_dict())
    experiment = build_experiment(config, run_dir)

    class StopError(Exception):
        pass

    def stop(trainer):  # runs after the monitor, at step 8: checkpoint at 6, lines for 2..8
        if trainer.state.global_step == 8:
            raise StopError

    experiment.trainer.callbacks.append(stop)
    with pytest.raises(StopError):
        experiment.trainer.fit()
    path = tmp_path / "runs" / "cut" / AFFINITY_FILE
    assert [r["step"] for r in read_affinity_records(path)] == [2, 4, 6, 8]
    assert run_dir.latest_step() == 6
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"step": 10, "epo')  # a line cut short by the crash
    resumed = run_training(config, resume=True)
    assert resumed["affinity"] == full["affinity"]
    assert path.read_text() == (tmp_path / "runs" / "full" / AFFINITY_FILE).read_text()


def test_monitor_config_is_checked():
    base = {"data": {"name": "mmoe_synthetic"}}
    with pytest.raises(ConfigError, match="monitor.affinity_every"):
        parse_config({**base, "monitor": {"affinity_every": 0}})
    with pytest.raises(ConfigError, match="lookahead or cosine"):
        parse_config(
            {**base, "monitor": {"affinity_every": 5, "lookahead": False, "cosine": False}}
        )
    with pytest.raises(ConfigError, match="interval"):
        AffinityMonitor(every=0)


def test_tasks_with_no_label_in_the_batch_get_nan_not_a_crash():
    x, y = _linear_problem()
    tasks = mt.TaskSet([mt.Task("a", "mse"), mt.Task("gone", "mse")])
    model = LinearTasks(torch.zeros(5, dtype=torch.float64), ["a", "gone"])
    result = measure_affinity(model, tasks, x, {"a": y, "gone": torch.full_like(y, math.nan)}, 0.1)
    # "gone" neither receives (column) nor gives (row: its zero gradient moves nothing, and a 0
    # would be averaged in as a measurement)
    assert torch.isnan(result.lookahead[:, 1]).all() and torch.isnan(result.lookahead[1]).all()
    assert torch.isfinite(result.lookahead[0, 0])
