"""Training adapters on mixed-task batches: per-task losses from one batch, every balancer, and
the Trainer (with the adapters' auxiliary loss)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import manytask as mt
import manytask.adapters as ad
from manytask import registry
from manytask.balance.base import Need
from manytask.data.batch import MultiTaskBatch
from manytask.train import Trainer

from .test_adapters_models import bert

transformers = pytest.importorskip("transformers")
TASKS = mt.TaskSet([mt.Task("a", "cross_entropy", output_dim=3), mt.Task("b", "mse")])
#: the parameters a balancer cannot do without
REQUIRED = {"constant": {"weights": [1.0, 0.5]}}
#: every balancer with its defaults, and two on the shared representation (features mode)
CASES = [(name, REQUIRED.get(name, {})) for name in registry.names("balancer")] + [
    ("mgda", {"mode": "features"}),
    ("upgrad", {"mode": "features"}),
]


@dataclass
class MixedTaskData:
    """Token sequences, each of one task; the other task's target is missing (-1 or NaN)."""

    input_ids: torch.Tensor
    task_ids: torch.Tensor
    targets: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.task_ids)

    def batch(self, indices: torch.Tensor) -> MultiTaskBatch:
        inputs = {"input_ids": self.input_ids[indices], "task_ids": self.task_ids[indices]}
        targets = {name: target[indices] for name, target in self.targets.items()}
        return MultiTaskBatch(inputs, targets, self.task_ids[indices])


def mixed_data(n: int = 8, seed: int = 0) -> MixedTaskData:
    g = torch.Generator().manual_seed(seed)
    task_ids = torch.arange(n) % 2
    labels = torch.randint(0, 3, (n,), generator=g)
    values = torch.randn(n, generator=g)
    return MixedTaskData(
        torch.randint(0, 100, (n, 5), generator=g),
        task_ids,
        {
            "a": torch.where(task_ids == 0, labels, torch.full_like(labels, -1)),
            "b": torch.where(task_ids == 1, values, torch.full_like(values, float("nan"))),
        },
    )


def model_for(method: str, **params) -> ad.MultiTaskAdapterModel:
    adapted = ad.inject(bert(), method, ["query", "value"], TASKS.names, rank=2, **params)
    torch.manual_seed(1)
    heads = {name: mt.nn.TaskHead(32, task.output_dim) for name, task in TASKS.items()}
    return ad.MultiTaskAdapterModel(adapted, heads)


def test_per_task_losses_of_a_mixed_batch_are_each_tasks_loss_on_its_own_samples():
    model = model_for("lora_per_task").eval()
    with torch.no_grad():
        for layer in model.adapted.adapter_layers().values():
            layer.up.normal_(0, 0.1)
    data = mixed_data()
    batch = data.batch(torch.arange(len(data)))
    losses = TASKS.losses(model(batch.inputs), batch.targets)
    for index, name in enumerate(TASKS.names):
        alone = data.batch(torch.nonzero(data.task_ids == index).flatten())
        expected = TASKS[name].compute_loss(model(alone.inputs)[name], alone.targets[name])
        assert torch.allclose(losses[name], expected, atol=1e-6), name
    # task a's loss reaches task a's LoRA only: expert b gets no gradient from it
    layer = model.adapted.adapter_layers()["encoder.layer.0.attention.self.query"]
    grad_up = torch.autograd.grad(losses["a"], layer.up)[0]
    assert grad_up[0].abs().sum() > 0 and torch.count_nonzero(grad_up[1]) == 0


@pytest.mark.parametrize(
    ("name", "params"), CASES, ids=[f"{n}-{p.get('mode', 'parameters')}" for n, p in CASES]
)
def test_every_balancer_trains_the_adapters_from_the_per_task_losses_of_a_mixed_batch(name, params):
    torch.manual_seed(0)
    model = model_for("mtl_lora").train()
    balancer = mt.balance.get(name, TASKS.names, **params)
    shared = list(model.shared_parameters())
    frozen = {
        n: p.detach().clone()
        for n, p in model.adapted.model.named_parameters()
        if not p.requires_grad
    }
    before = [p.detach().clone() for p in shared]
    optimizer = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.1)
    batch = mixed_data().batch(torch.arange(8))
    for _ in range(2):  # two steps: stateful methods use their history on the second
        optimizer.zero_grad()
        features = None
        if balancer.needs is Need.FEATURE_GRADIENTS:
            outputs, features = model(batch.inputs, return_features=True)
        else:
            outputs = model(batch.inputs)
        balancer.backward(TASKS.losses(outputs, batch.targets), shared=shared, features=features)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in shared)
        optimizer.step()
    assert any(not torch.equal(p, q) for p, q in zip(shared, before, strict=True))
    assert len(frozen) > 20
    for n, p in model.adapted.model.named_parameters():  # the base weights stay as they were
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_the_trainer_trains_adapters_on_mixed_batches_and_adds_their_auxiliary_loss():
    torch.manual_seed(0)
    model = model_for("align_lora", dropout=0.0)
    balancer = mt.balance.get("mgda", TASKS.names)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    seen: list[float] = []

    def record(trainer: Trainer) -> None:
        term = trainer.model.auxiliary_loss()
        seen.append(float("nan") if term is None else float(term.detach()))

    adapters = [p.detach().clone() for p in model.shared_parameters()]
    frozen = model.adapted.model.embeddings.word_embeddings.weight.detach().clone()
    trainer = Trainer(
        model,
        TASKS,
        balancer,
        optimizer,
        mixed_data(16),
        mixed_data(8, seed=1),
        epochs=2,
        batch_size=8,
        progress=False,
        callbacks=[record],
    )
    summary = trainer.fit()
    assert len(seen) == 4 and all(value > 0 for value in seen)  # the alignment term was there
    assert set(summary["val"]) >= {"a", "b"}
    after = list(model.shared_parameters())
    assert all(not torch.equal(p, q) for p, q in zip(after, adapters, strict=True))
    assert torch.equal(model.adapted.model.embeddings.word_embeddings.weight, frozen)


def test_heads_must_match_the_adapters_tasks_and_inputs_need_task_ids():
    adapted = ad.inject(bert(), "lora", ["query"], ["a", "b"])
    with pytest.raises(mt.ConfigError, match="heads must be given"):
        ad.MultiTaskAdapterModel(adapted, {"b": torch.nn.Identity(), "a": torch.nn.Identity()})
    model = ad.MultiTaskAdapterModel(adapted, {"a": torch.nn.Identity(), "b": torch.nn.Identity()})
    with pytest.raises(mt.ConfigError, match="'task_ids'"):
        model({"input_ids": torch.zeros(2, 3, dtype=torch.long)})


def test_mean_pooling_averages_the_tokens_the_attention_mask_keeps():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(ad.mean_tokens(hidden, mask), torch.tensor([[2.0, 3.0]]))
    assert torch.allclose(ad.mean_tokens(hidden), hidden.mean(dim=1))
    adapted = ad.inject(bert(), "lora", ["query", "value"], TASKS.names, rank=2)
    heads = {"a": torch.nn.Identity(), "b": torch.nn.Identity()}
    model = ad.MultiTaskAdapterModel(adapted, heads, pooling="mean").eval()
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = (ids != 0).long()
    outputs = model({"input_ids": ids, "attention_mask": mask, "task_ids": torch.tensor([0, 1])})
    with torch.no_grad():
        states = adapted(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 1]))
    expected = ad.mean_tokens(states, mask)
    assert torch.allclose(outputs["a"], expected) and torch.allclose(outputs["b"], expected)
    with pytest.raises(mt.ConfigError, match="pooling must be 'first' or 'mean'"):
        ad.MultiTaskAdapterModel(adapted, heads, pooling="max")  # type: ignore[arg-type]
