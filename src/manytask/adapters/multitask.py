"""An adapted backbone with one head per task: a :class:`~manytask.nn.MultiTaskModel` that the
Trainer and every balancer train on mixed-task batches.

The inputs are a mapping that holds ``task_ids`` (one task index per sample) and the backbone's
keyword arguments (``input_ids``, ``attention_mask`` … or ``input`` for an ``nn.Sequential``).
Every head runs on every sample; a sample's targets for the other tasks are missing (NaN or a
negative class), so each task's loss is computed on its own samples only — the per-task losses
of one mixed batch, which any balancer combines::

    model = MultiTaskAdapterModel(adapted, {"nli": nn.Linear(32, 3), "sts": nn.Linear(32, 1)})
    outputs = model({"input_ids": ids, "attention_mask": mask, "task_ids": task_ids})
    losses = tasks.losses(outputs, targets)          # each masked to its task's samples
    balancer.backward(losses, shared=model.shared_parameters())
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

from torch import Tensor, nn

from manytask.adapters.model import AdaptedModel
from manytask.errors import ConfigError
from manytask.nn.base import MultiTaskModel

Features = Callable[[Any], Tensor]


def _hidden(output: Any) -> Tensor:
    hidden = getattr(output, "last_hidden_state", output)
    if not isinstance(hidden, Tensor):
        raise ConfigError(
            f"cannot read features from a {type(output).__name__}; pass features=... that maps "
            "the backbone's output to a (batch, d) tensor"
        )
    return hidden


def first_token(output: Any) -> Tensor:
    """The backbone's features for the heads: a tensor as it is, ``(N, L, d)`` → its first
    token, a Hugging Face output → ``last_hidden_state[:, 0]`` (the ``[CLS]`` position)."""
    hidden = _hidden(output)
    return hidden[:, 0] if hidden.dim() == 3 else hidden


def mean_tokens(output: Any, attention_mask: Tensor | None = None) -> Tensor:
    """The mean over the tokens of ``(N, L, d)`` hidden states (a Hugging Face output's
    ``last_hidden_state``), counting only the positions where ``attention_mask`` is 1 (all when it
    is None): the pooling sentence transformers such as all-MiniLM-L6-v2 were trained with."""
    hidden = _hidden(output)
    if hidden.dim() != 3:
        return hidden
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


class MultiTaskAdapterModel(MultiTaskModel):
    """Heads on an adapted backbone; the task ids in the inputs route the adapters.

    Args:
        adapted: the adapted backbone (see :func:`~manytask.adapters.inject`).
        heads: one module per task, keyed and ordered like ``adapted.task_names``.
        features: maps the backbone's output to ``(batch, d)``; default by ``pooling``.
        pooling: ``"first"`` (:func:`first_token`, the ``[CLS]`` position) or ``"mean"``
            (:func:`mean_tokens` over the positions the inputs' ``attention_mask`` keeps); used
            when ``features`` is not given.
    """

    def __init__(
        self,
        adapted: AdaptedModel,
        heads: Mapping[str, nn.Module],
        features: Features | None = None,
        pooling: Literal["first", "mean"] = "first",
    ) -> None:
        super().__init__()
        if pooling not in ("first", "mean"):
            raise ConfigError(f"pooling must be 'first' or 'mean', got {pooling!r}")
        if list(heads) != list(adapted.task_names):
            raise ConfigError(
                f"heads must be given for the adapter's tasks in order {list(adapted.task_names)}; "
                f"got {list(heads)}"
            )
        self.adapted = adapted
        self.heads = nn.ModuleDict(dict(heads))
        self.features = features
        self.pooling = pooling
        self.task_names = adapted.task_names

    def forward(  # type: ignore[override]
        self, inputs: Mapping[str, Any], return_features: bool = False
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], list[Tensor]]:
        if not isinstance(inputs, Mapping) or "task_ids" not in inputs:
            raise ConfigError(
                "a MultiTaskAdapterModel takes a mapping of inputs with 'task_ids' (one task "
                "index per sample) and the backbone's keyword arguments"
            )
        kwargs = {key: value for key, value in inputs.items() if key != "task_ids"}
        output = self.adapted(task_ids=inputs["task_ids"], **kwargs)
        if self.features is not None:
            shared = self.features(output)
        elif self.pooling == "mean":
            shared = mean_tokens(output, kwargs.get("attention_mask"))
        else:
            shared = first_token(output)
        if not return_features:
            return {name: head(shared) for name, head in self.heads.items()}
        # the views must share one base: the features themselves, not the backbone output they
        # may be a slice of (manytask.balance.engine.are_task_views)
        shared = shared.clone()
        views = [shared.view_as(shared) for _ in self.heads]
        outputs = {name: head(v) for (name, head), v in zip(self.heads.items(), views, strict=True)}
        return outputs, views

    def auxiliary_loss(self) -> Tensor | None:
        """The adapters' training terms (load balancing, alignment) of the last forward pass."""
        return self.adapted.auxiliary_loss()

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The adapters' trainable parameters: every task's samples reach them."""
        return self.adapted.trainable_parameters()

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        if name not in self.heads:
            raise ConfigError(f"unknown task '{name}'; tasks are: {', '.join(self.heads)}")
        return self.heads[name].parameters()
