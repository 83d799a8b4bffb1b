"""Shared-bottom (hard parameter sharing): one encoder, one head per task.

Caruana, "Multitask Learning", Machine Learning 28, 1997. The encoder's parameters are shared;
each head's parameters belong to its task.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from manytask import registry
from manytask.columns import Columns
from manytask.errors import ConfigError
from manytask.nn.base import MultiTaskModel
from manytask.nn.encoders import Encoder
from manytask.nn.heads import TaskHead
from manytask.nn.inputs import WithInput, input_layer
from manytask.task import TaskSet


class SharedBottom(MultiTaskModel):
    """An encoder shared by all tasks and a :class:`TaskHead` per task.

    Args:
        encoder: any module mapping inputs to ``(B, encoder.out_features)``.
        tasks: the tasks; each head's output size is the task's ``output_dim``.
        head_hidden: hidden widths of every head (none: a linear head).
    """

    def __init__(self, encoder: Encoder, tasks: TaskSet, head_hidden: Sequence[int] = ()) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(
            {
                name: TaskHead(encoder.out_features, task.output_dim, head_hidden)
                for name, task in tasks.items()
            }
        )
        self.task_names = tuple(tasks.names)

    def forward(  # type: ignore[override]
        self, x: Tensor, return_features: bool = False
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], list[Tensor]]:
        features = self.encoder(x)
        if not return_features:
            return {name: head(features) for name, head in self.heads.items()}
        # each head reads its own view of the features, so that one backward pass can tell
        # the tasks' gradients apart (manytask.balance.engine.one_pass_feature_backward)
        views = [features.view_as(features) for _ in self.heads]
        outputs = {name: head(v) for (name, head), v in zip(self.heads.items(), views, strict=True)}
        return outputs, views

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoder.parameters()

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        if name not in self.heads:
            raise ConfigError(f"unknown task '{name}'; tasks are: {', '.join(self.heads)}")
        return self.heads[name].parameters()


def build_encoder(spec: dict[str, Any], input_shape: Sequence[int]) -> Encoder:
    """Build a registered encoder from ``{name: ..., **params}``."""
    if "name" not in spec:
        raise ConfigError(
            f"model.encoder needs a 'name'; valid encoders: {', '.join(registry.names('encoder'))}"
        )
    params = {k: v for k, v in spec.items() if k != "name"}
    encoder: Encoder = registry.call_with_params(
        "encoder", spec["name"], params, input_shape=tuple(input_shape)
    )
    return encoder


@registry.register(
    "architecture", "shared_bottom", "hard parameter sharing: shared encoder + task heads"
)
def shared_bottom(
    tasks: TaskSet,
    input_shape: Sequence[int],
    columns: Columns | None = None,
    encoder: dict[str, Any] = {"name": "mlp"},  # noqa: B006 - read-only default
    head_hidden: list[int] = [],  # noqa: B006
    embedding_dim: int = 8,
) -> SharedBottom:
    """Shared-bottom model from config: ``encoder`` is ``{name: mlp|cnn, **params}``; tabular
    inputs have their categorical columns embedded (``embedding_dim``) in front of it."""
    if columns is None:
        return SharedBottom(build_encoder(encoder, input_shape), tasks, head_hidden)
    front, width = input_layer(input_shape, columns, embedding_dim)
    body = WithInput(front, build_encoder(encoder, (width,)))
    return SharedBottom(body, tasks, head_hidden)
