"""Mixed-task batches from single-task datasets: rows in the sampler's order, the other tasks'
targets missing (−1 / NaN), per-task losses equal to those on each task's own rows, every
balancer trains on them, also on batches without a task, and
the Trainer takes a mixture as its training data."""

from __future__ import annotations

import math

import pytest
import torch

import manytask as mt
from manytask import registry
from manytask.data import MultiTaskDataset, TensorMultiTaskDataset
from manytask.data.mixing import TaskMixture, build_sampler
from manytask.errors import ConfigError
from manytask.task import label_mask

TASKS = mt.TaskSet(
    [
        mt.Task("kind", "cross_entropy", output_dim=3),
        mt.Task("score", "mse"),
        mt.Task("flag", "bce"),
    ]
)


def single_task_data() -> dict[str, TensorMultiTaskDataset]:
    """Three datasets of 6, 4 and 3 examples; input row r of task t is (t, r, 0, 0)."""
    data = {}
    for t, (name, size) in enumerate([("kind", 6), ("score", 4), ("flag", 3)]):
        x = torch.zeros(size, 4)
        x[:, 0], x[:, 1] = float(t), torch.arange(size, dtype=torch.float32)
        if name == "kind":
            y = torch.arange(size) % 3
        elif name == "score":
            y = torch.arange(size, dtype=torch.float32) / 2
        else:
            y = (torch.arange(size) % 2).float()
        data[name] = TensorMultiTaskDataset(x, {name: y})
    return data


@pytest.fixture
def mixture() -> TaskMixture:
    return TaskMixture(single_task_data(), TASKS)


def test_a_mixture_is_a_dataset_over_the_concatenated_index_space(mixture):
    assert isinstance(mixture, MultiTaskDataset)
    assert len(mixture) == 13 and mixture.sizes == [6, 4, 3]
    task_ids, local = mixture.locate(torch.tensor([0, 5, 6, 9, 10, 12]))
    assert task_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert local.tolist() == [0, 5, 0, 3, 0, 2]


def test_a_mixed_batch_keeps_row_order_and_marks_other_tasks_targets_missing(mixture):
    batch = mixture.batch(torch.tensor([11, 2, 7, 0, 9]))  # flag 1, kind 2, score 1, kind 0, …
    assert batch.task_ids.tolist() == [2, 0, 1, 0, 1]
    assert isinstance(batch.inputs, torch.Tensor)
    assert batch.inputs[:, :2].tolist() == [[2, 1], [0, 2], [1, 1], [0, 0], [1, 3]]
    assert batch.targets["kind"].tolist() == [-1, 2, -1, 0, -1]
    assert batch.targets["kind"].dtype == torch.int64
    score = batch.targets["score"]
    assert torch.isnan(score[[0, 1, 3]]).all() and score[[2, 4]].tolist() == [0.5, 1.5]
    flag = batch.targets["flag"]
    assert flag[0].item() == 1.0 and torch.isnan(flag[1:]).all()


def test_each_task_loss_on_a_mixed_batch_equals_its_loss_on_its_own_rows(mixture):
    indices = torch.tensor([11, 2, 7, 0, 9, 12, 4])
    batch = mixture.batch(indices)
    g = torch.Generator().manual_seed(0)
    outputs = {"kind": torch.randn(7, 3, generator=g), "score": torch.randn(7, generator=g)}
    outputs["flag"] = torch.randn(7, generator=g)
    losses = TASKS.losses(outputs, batch.targets)
    for t, name in enumerate(TASKS.names):
        rows = batch.task_ids == t
        own = TASKS[name].compute_loss(outputs[name][rows], batch.targets[name][rows])
        assert torch.allclose(losses[name], own), name
    # by hand for `score`: rows 2 and 4 hold targets 0.5 and 1.5
    expected = ((outputs["score"][2] - 0.5) ** 2 + (outputs["score"][4] - 1.5) ** 2) / 2
    assert torch.allclose(losses["score"], expected)


def test_a_task_absent_from_the_batch_gets_a_zero_loss_with_a_graph(mixture):
    batch = mixture.batch(torch.tensor([0, 1, 6]))  # no `flag` row
    outputs = {
        name: torch.randn(3, 3 if name == "kind" else 1, requires_grad=True) for name in TASKS
    }
    losses = TASKS.losses(outputs, batch.targets)
    assert losses["flag"].item() == 0.0 and losses["flag"].requires_grad


def params_for(name: str) -> dict[str, object]:
    return {"weights": [1.0, 2.0, 0.5]} if name == "constant" else {}


def shared_gradients(model: mt.nn.SharedBottom, balancer, batch) -> list[torch.Tensor]:
    """The shared parameters' gradients after the balancer's backward on ``batch``."""
    model.zero_grad(set_to_none=True)
    outputs, features = model(batch.inputs, return_features=True)
    balancer.backward(
        TASKS.losses(outputs, batch.targets),
        shared=list(model.shared_parameters()),
        features=features,
    )
    return [p.grad for p in model.shared_parameters() if p.grad is not None]


def model_and_balancer(name: str):
    torch.manual_seed(0)
    model = mt.nn.SharedBottom(mt.nn.MLPEncoder((4,), [8]), TASKS)
    return model, mt.balance.get(name, tasks=TASKS.names, **params_for(name))


@pytest.mark.parametrize("name", registry.names("balancer"))
def test_every_balancer_trains_on_mixed_batches(name, mixture):
    model, balancer = model_and_balancer(name)
    sampler = build_sampler("round_robin", mixture.sizes, batch_size=6, seed=0)
    for indices in sampler:
        batch = mixture.batch(indices)
        assert set(batch.task_ids.tolist()) == {0, 1, 2}  # every batch mixes all three tasks
        grads = shared_gradients(model, balancer, batch)
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("name", registry.names("balancer"))
def test_every_balancer_steps_on_batches_without_one_task(name, mixture):
    # every third batch has no row of "score": its loss is a zero with a graph
    model, balancer = model_and_balancer(name)
    with_all, without_score = [0, 1, 6, 7, 10, 11], [0, 1, 2, 10, 11, 12]  # global indices
    for step in range(9):
        batch = mixture.batch(torch.tensor(without_score if step % 3 == 0 else with_all))
        grads = shared_gradients(model, balancer, batch)
        assert grads and all(torch.isfinite(g).all() for g in grads), step
        assert sum(float(g.norm()) for g in grads) > 1e-5, step


def test_the_trainer_trains_on_a_mixture(mixture):
    torch.manual_seed(0)
    model = mt.nn.SharedBottom(mt.nn.MLPEncoder((4,), [8]), TASKS)
    balancer = mt.balance.get("ew", tasks=TASKS.names)
    trainer = mt.train.Trainer(
        model,
        TASKS,
        balancer,
        torch.optim.SGD(model.parameters(), lr=0.1),
        mixture,
        epochs=2,
        batch_size=5,
        progress=False,
    )
    summary = trainer.fit()
    assert summary["steps"] == 2 * math.ceil(13 / 5)


def test_sampler_batches_become_mixed_batches_with_the_drawn_tasks(mixture):
    sampler = build_sampler("proportional", mixture.sizes, batch_size=8, seed=2, cap=None)
    indices = sampler.next_batch()
    batch = mixture.batch(indices)
    assert torch.equal(batch.task_ids, mixture.locate(indices)[0])
    for t, (name, task) in enumerate(TASKS.items()):
        labelled = label_mask(batch.targets[name], task.kind_)
        assert torch.equal(labelled, batch.task_ids == t)


def test_task_ids_can_travel_in_the_inputs_mapping():
    data = {
        name: TensorMultiTaskDataset(torch.zeros(2, 4), {name: torch.zeros(2)})
        for name in ("a", "b")
    }
    as_mapping = {name: _MappingInputs(dataset) for name, dataset in data.items()}
    batch = TaskMixture(as_mapping, task_ids_key="task_ids").batch(torch.tensor([3, 0]))
    assert isinstance(batch.inputs, dict)
    assert batch.inputs["task_ids"].tolist() == [1, 0]
    assert batch.inputs["x"].shape == (2, 4)


class _MappingInputs:
    """A dataset whose inputs are a mapping {"x": tensor}."""

    def __init__(self, dataset: TensorMultiTaskDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: torch.Tensor) -> mt.data.MultiTaskBatch:
        inner = self.dataset.batch(indices)
        return mt.data.MultiTaskBatch({"x": inner.inputs}, inner.targets)


# errors ----------------------------------------------------------------------------------
def test_inputs_of_different_shapes_are_an_error_that_says_to_pad():
    data = single_task_data()
    data["flag"] = TensorMultiTaskDataset(torch.zeros(3, 5), {"flag": torch.zeros(3)})
    with pytest.raises(ConfigError, match=r"task 'flag' are a tensor \(batch, 5\).*pad"):
        TaskMixture(data, TASKS)


def test_a_dataset_without_its_own_target_is_an_error():
    data = single_task_data()
    data["score"] = TensorMultiTaskDataset(torch.zeros(4, 4), {"label": torch.zeros(4)})
    with pytest.raises(ConfigError, match="targets for \\['label'\\] but not for 'score'"):
        TaskMixture(data, TASKS)


def test_a_float_class_target_is_an_error_naming_the_right_type():
    data = single_task_data()
    data["kind"] = TensorMultiTaskDataset(torch.zeros(6, 4), {"kind": torch.zeros(6)})
    with pytest.raises(ConfigError, match="give an integer \\(class index\\) target"):
        TaskMixture(data, TASKS)


def test_names_out_of_the_tasks_order_are_an_error():
    data = single_task_data()
    reordered = {name: data[name] for name in ("score", "kind", "flag")}
    with pytest.raises(ConfigError, match="in the tasks' order"):
        TaskMixture(reordered, TASKS)


def test_an_empty_dataset_and_out_of_range_indices_are_errors(mixture):
    data = single_task_data()
    data["flag"] = TensorMultiTaskDataset(torch.zeros(0, 4), {"flag": torch.zeros(0)})
    with pytest.raises(ConfigError, match="task 'flag' is empty"):
        TaskMixture(data, TASKS)
    with pytest.raises(ConfigError, match=r"\[0, 13\)"):
        mixture.batch(torch.tensor([13]))
