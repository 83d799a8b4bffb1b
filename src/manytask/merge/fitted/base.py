r"""What a fitted (data-driven) merging rule is, and the inputs every such rule reads.

A fitted rule gets

* ``factory`` — ``factory(i)`` builds task ``i``'s full model (the shared architecture and task
  ``i``'s head, with the head's weights loaded); ``model(*inputs)`` returns task ``i``'s logits,
  ``[batch, classes]`` (``[batch, …, classes]`` where a rule says so);
* ``models`` — one state dict per task model holding the tensors to merge, named as in the
  factory's models (e.g. the backbone keys ``encoder.…`` of a backbone + head model). Every model
  holds the same names and shapes; tensors the factory's model has but the state dicts lack
  (the heads) are task-specific and never merged;
* ``data`` — ``data[i]`` yields batches of task ``i``'s inputs (see
  :mod:`manytask.merge.fitted.batches`); no labels are read;
* ``base`` — the pre-trained model's tensors of the same names, for rules that merge task vectors
  :math:`\tau_i = \theta_i - \theta_0` (AdaMerging);

and returns the merged state dict (same names as ``models``) or, for Representation Surgery, a
wrapper module. The rule runs where the factory's model lives: build it on a GPU to fit there.
Merged tensors come back in the dtype of ``models`` and on the device of the factory's model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from manytask.errors import ConfigError

Factory = Callable[[int], nn.Module]
StateDict = Mapping[str, Tensor]


def _listing(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    more = f" … ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (the CPU for an empty module)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def average(tensors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    r""":math:`\sum_i w_i \theta_i / \sum_i w_i` in float32, cast back to the inputs' dtype.

    Integer tensors (counters such as BatchNorm's ``num_batches_tracked``) have no meaningful
    average: the first model's value is kept.
    """
    first = tensors[0]
    if not first.is_floating_point():
        return first.clone()
    w = torch.tensor(
        [1.0] * len(tensors) if weights is None else list(weights), device=first.device
    )
    stack = torch.stack([t.to(first.device, torch.float32) for t in tensors])
    mean: Tensor = torch.tensordot(w / w.sum(), stack, dims=1)
    return mean.to(first.dtype)


class Experts:
    """The checked inputs of a fitted rule: task models as state dicts, their data, and the
    factory that builds each task's full model."""

    def __init__(
        self,
        rule: str,
        factory: Factory,
        models: Sequence[StateDict],
        data: Sequence[Iterable[Any]],
        base: StateDict | None = None,
    ) -> None:
        self.rule = rule
        if not callable(factory):
            raise ConfigError(
                f"{rule}: factory must be a callable that builds task i's model, factory(i), "
                f"got {type(factory).__name__}"
            )
        self.factory = factory
        self.models = list(models)
        self.data = list(data)
        if not self.models:
            raise ConfigError(f"{rule}: needs at least one task model, got none")
        if len(self.data) != len(self.models):
            raise ConfigError(
                f"{rule}: needs one data source per task model: {len(self.models)} models but "
                f"{len(self.data)} data sources"
            )
        self.keys: tuple[str, ...] = tuple(self.models[0])
        if not self.keys:
            raise ConfigError(f"{rule}: the task models hold no tensor to merge")
        for i, model in enumerate(self.models[1:], start=1):
            self._check_same(model, f"task model {i}")
        self.base = base
        if base is not None:
            self._check_same(base, "the base model")

    def _check_same(self, other: StateDict, what: str) -> None:
        reference = self.models[0]
        if set(other) != set(self.keys):
            missing, extra = set(self.keys) - set(other), set(other) - set(self.keys)
            raise ConfigError(
                f"{self.rule}: {what} must hold the same tensor names as task model 0; "
                + (f"it lacks {_listing(missing)}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"it has extra {_listing(extra)}" if extra else "")
            )
        for key in self.keys:
            if other[key].shape != reference[key].shape:
                raise ConfigError(
                    f"{self.rule}: tensor '{key}' of {what} has shape {tuple(other[key].shape)}, "
                    f"task model 0's has {tuple(reference[key].shape)}"
                )

    @property
    def count(self) -> int:
        return len(self.models)

    def create(self, task: int) -> nn.Module:
        """``factory(task)``, checked to be a module."""
        module = self.factory(task)
        if not isinstance(module, nn.Module):
            raise ConfigError(
                f"{self.rule}: factory({task}) must return an nn.Module, "
                f"got {type(module).__name__}"
            )
        return module

    def build(
        self,
        task: int,
        state: StateDict | None = None,
        *,
        share: bool = False,
        module: nn.Module | None = None,
    ) -> nn.Module:
        """``factory(task)`` (or ``module``, a model it built already) in eval mode with frozen
        parameters, holding ``state`` (task ``task``'s own tensors when None). With ``share``
        the module keeps references to the given tensors instead of copies (they must already
        have its devices and dtypes)."""
        module = self.create(task) if module is None else module
        tensors = dict(self.models[task] if state is None else state)
        self.check(task, module, tensors)
        module.load_state_dict(tensors, strict=False, assign=share)
        module.eval()
        module.requires_grad_(False)
        return module

    def build_shared(self, state: StateDict, first: nn.Module) -> list[nn.Module]:
        """Every task's model (task 0's is ``first``, a model ``factory(0)`` built already)
        holding references to the tensors of ``state``, for a rule that evaluates every task on
        the same merged tensors."""
        return [self.build(0, state, share=True, module=first)] + [
            self.build(i, state, share=True) for i in range(1, self.count)
        ]

    def check(self, task: int, module: nn.Module, tensors: StateDict | None = None) -> None:
        """Raise a :class:`ConfigError` unless ``module`` (built by ``factory(task)``) has every
        tensor of ``tensors`` (task ``task``'s by default) under the same name and shape."""
        tensors = self.models[task] if tensors is None else tensors
        own = module.state_dict()
        unknown = set(tensors) - set(own)
        if unknown:
            raise ConfigError(
                f"{self.rule}: factory({task}) builds a model without the tensors "
                f"{_listing(unknown)} of the task models; name the merged tensors as in the "
                f"model's state_dict() (its names look like {_listing(own, 3)})"
            )
        for key, tensor in tensors.items():
            if tensor.shape != own[key].shape:
                raise ConfigError(
                    f"{self.rule}: tensor '{key}' has shape {tuple(tensor.shape)} but "
                    f"factory({task})'s model has {tuple(own[key].shape)}"
                )


def logits_of(output: Any, rule: str, task: int, *, ndim: int | None = None) -> Tensor:
    """The model's output as a logits tensor ``[batch, …, classes]`` (``ndim`` axes exactly)."""
    if not isinstance(output, Tensor):
        raise ConfigError(
            f"{rule}: task {task}'s model must return a logits Tensor, got "
            f"{type(output).__name__}; wrap it so that model(inputs) returns task {task}'s "
            "logits (e.g. pick the task's entry of a dict output)"
        )
    if output.ndim < 2 or (ndim is not None and output.ndim != ndim):
        want = f"{ndim} axes [batch, classes]" if ndim else "at least 2 axes [batch, …, classes]"
        raise ConfigError(
            f"{rule}: task {task}'s logits must have {want}, got shape {tuple(output.shape)}"
        )
    return output


class FittedRule:
    """Base class of the rules that need data. Constructor arguments are the rule's
    parameters (validated against the signature when built from a config); :meth:`fit` merges.

    ``fitted`` tells these rules apart from the data-free
    :class:`~manytask.merge.rule.MergeRule` in the shared ``merge_rule`` registry kind.
    """

    fitted: ClassVar[bool] = True
    #: the rule merges task vectors and needs the base (pre-trained) model
    needs_base: ClassVar[bool] = False
    #: ``fit(cache=...)`` stores and reuses the statistics the rule computes
    caches_statistics: ClassVar[bool] = False
    #: the registered name, used in messages
    name: ClassVar[str] = ""

    def fit(
        self,
        factory: Factory,
        models: Sequence[StateDict],
        data: Sequence[Iterable[Any]],
        *,
        base: StateDict | None = None,
        cache: str | Path | None = None,
        seed: int = 0,
    ) -> dict[str, Tensor] | nn.Module:
        """Merge ``models`` (see the module docstring for the arguments); ``cache`` is a folder
        for reusable statistics, ``seed`` seeds the rule's random draws. The arguments are
        checked by :meth:`experts`, then :meth:`fit_experts` merges."""
        return self.fit_experts(self.experts(factory, models, data, base, cache), cache, seed)

    def fit_experts(
        self, experts: Experts, cache: str | Path | None, seed: int
    ) -> dict[str, Tensor] | nn.Module:
        """Merge the checked inputs of :meth:`fit`; rules override this (or :meth:`fit` itself,
        when they take more arguments)."""
        raise NotImplementedError(f"{type(self).__name__} merges in fit()")

    def summary(self) -> dict[str, Any]:
        """Values worth reporting beside the merged model (JSON-serialisable); e.g. the
        coefficients AdaMerging learned. Empty by default."""
        return {}

    def experts(
        self,
        factory: Factory,
        models: Sequence[StateDict],
        data: Sequence[Iterable[Any]],
        base: StateDict | None,
        cache: str | Path | None,
    ) -> Experts:
        """Check the arguments of :meth:`fit` against what this rule takes."""
        if base is None and self.needs_base:
            raise ConfigError(
                f"{self.name}: merges task vectors and needs the base (pre-trained) model's "
                "tensors: pass base=..."
            )
        if base is not None and not self.needs_base:
            raise ConfigError(
                f"{self.name}: does not use a base model (it merges the task models' own "
                "tensors); drop base=..."
            )
        if cache is not None and not self.caches_statistics:
            raise ConfigError(
                f"{self.name}: computes no statistics to cache; drop cache=... "
                "(fisher, regmean, adamerging and surgery cache theirs)"
            )
        return Experts(self.name, factory, models, data, base)
