r"""Representation Surgery: a small per-task module that moves the merged model's representation
back toward each task model's, trained without labels.

Yang et al., "Representation Surgery for Multi-Task Model Merging", ICML 2024, arXiv:2402.02705.
With :math:`z` the merged model's representation for task ``i`` (the input of task ``i``'s
head) and :math:`z_i` the task model's own representation of the same input,

.. math::

    \hat z = z - W_{\text{up}}\, \operatorname{ReLU}(W_{\text{down}}\, z), \qquad
    \min_{W_{\text{down}}, W_{\text{up}}}\ \operatorname{mean} \lvert \hat z - z_i \rvert,

with :math:`W_{\text{down}} \in \mathbb{R}^{r \times d}` and
:math:`W_{\text{up}} \in \mathbb{R}^{d \times r}` per task (no biases), acting on the last axis of
:math:`z`. :math:`W_{\text{up}}` starts at zero, so training starts from the merged model
exactly; :math:`W_{\text{down}}` starts as ``nn.Linear``'s default (Kaiming-uniform, a = √5),
drawn from ``seed``. Each step takes one batch of every task and one Adam step per task; the
merged model and the task models stay frozen. The result is a :class:`SurgeryModel`:
``model(x, task=i)`` runs task ``i``'s model on the merged tensors with the surgery applied to its
head's input.

The representation is the input of the head submodule (``head``, by default the model's last
top-level child, e.g. ``1`` of ``nn.Sequential(encoder, head)``), read with a forward pre-hook;
the head must be called once per forward with the representation as its first argument. The
merged tensors come from ``fit(merged=...)`` or from the rule named by ``merge`` with its
``merge_params``: a fitted rule (e.g. ``adamerging_layer``, the paper's strongest base) gets the
same factory, models, data, ``base``, ``cache`` and ``seed``; a data-free rule (``ties``,
``task_arithmetic`` …) merges ``base`` and ``models`` in memory
(:func:`manytask.merge.engine.merge_state_dicts`, with ``seed``).

With ``cache=FOLDER`` the trained modules (and the L1 loss of the first and last step) are
stored by :mod:`manytask.merge.fitted.cache`, keyed by the settings (``rank``, ``steps``, ``lr``,
the head, ``seed``), the architecture, the merged and every task model's tensors, and every batch
the steps read; a fitted rule named by ``merge`` caches its own statistics in the same folder.

Defaults (the authors' code, github.com/EnnengYang/RepresentationSurgery, ``src/merging_model.py``
and ``src/main_TaskArithmetic_with_surgery.py``): ``rank = 16`` (``Linear(512, 16)``), ``lr =
1e-3`` with Adam's betas (0.9, 0.999), L1 loss (``torch.nn.L1Loss``), ``steps = 1000`` updates
per task (500 iterations of two batches each).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from manytask import registry
from manytask.errors import ConfigError
from manytask.merge.engine import merge_state_dicts
from manytask.merge.fitted.base import Experts, Factory, FittedRule, StateDict, module_device
from manytask.merge.fitted.batches import Inputs, cycle
from manytask.merge.fitted.cache import (
    Statistics,
    StatisticsCache,
    cached,
    check_rereadable,
    states_fingerprint,
    unmerged_states,
)


class SurgeryModule(nn.Module):
    r""":math:`\hat z = z - W_{\text{up}} \operatorname{ReLU}(W_{\text{down}} z)` on the last
    axis (computed in float32, returned in ``z``'s dtype)."""

    def __init__(self, dim: int, rank: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        down = torch.empty(rank, dim)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(torch.zeros(dim, rank))

    def forward(self, z: Tensor) -> Tensor:
        x = z.float()
        correction = nn.functional.linear(torch.relu(nn.functional.linear(x, self.down)), self.up)
        return (x - correction).to(z.dtype)


class SurgeryModel(nn.Module):
    """Task models on shared merged tensors, each with its surgery applied before its head.

    ``tasks[i]`` is task ``i``'s model (its merged tensors are the same storage for every task),
    ``surgery[i]`` its :class:`SurgeryModule`, ``merged`` the merged state dict and ``head`` the
    head's name. Save ``merged`` and ``surgery.state_dict()``: the task models share tensors,
    which a plain ``state_dict`` would list once per task.
    """

    def __init__(
        self,
        tasks: Sequence[nn.Module],
        surgery: Sequence[SurgeryModule],
        head: str,
        merged: dict[str, Tensor],
    ) -> None:
        super().__init__()
        self.tasks = nn.ModuleList(tasks)
        self.surgery = nn.ModuleList(surgery)
        self.head = head
        self.merged = merged
        for module, fix in zip(self.tasks, self.surgery, strict=True):
            module.get_submodule(head).register_forward_pre_hook(_corrector(fix))

    def forward(self, *args: Any, task: int, **kwargs: Any) -> Any:
        """Task ``task``'s output for the inputs ``args``/``kwargs``."""
        return self.tasks[task](*args, **kwargs)


def _corrector(fix: nn.Module) -> Any:
    def correct(head: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if not args or not isinstance(args[0], Tensor):
            raise ConfigError("surgery: the head must get the representation as a Tensor argument")
        return (fix(args[0]), *args[1:])

    return correct


def head_input(
    module: nn.Module, head: str, inputs: Inputs, tensors: StateDict | None = None
) -> Tensor:
    """The representation: what the submodule ``head`` receives when ``module`` runs on
    ``inputs`` (with ``tensors`` standing in for its own of those names)."""
    seen: list[Any] = []

    def grab(layer: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0] if args else None)

    handle = module.get_submodule(head).register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            inputs.call(module, tensors)
    finally:
        handle.remove()
    if len(seen) != 1 or not isinstance(seen[0], Tensor):
        raise ConfigError(
            f"surgery: the head '{head}' must be called once per forward with the "
            f"representation as its first argument; it was called {len(seen)} times"
            + ("" if not seen or isinstance(seen[0], Tensor) else " without a Tensor argument")
        )
    return seen[0]


def resolve_head(module: nn.Module, head: str | None) -> str:
    """``head``, checked to name a submodule, or the name of the model's last child."""
    children = [name for name, _ in module.named_children()]
    if head is None:
        if not children:
            raise ConfigError(
                "surgery: the model has no submodule to treat as its head; name the head "
                "submodule (the one that maps the representation to the logits) with head=..."
            )
        return children[-1]
    try:
        module.get_submodule(head)
    except AttributeError:
        raise ConfigError(
            f"surgery: the model has no submodule '{head}'; its top-level submodules are {children}"
        ) from None
    return head


@registry.register(
    "merge_rule", "surgery", "Representation Surgery (Yang et al., ICML 2024, arXiv:2402.02705)"
)
class RepresentationSurgery(FittedRule):
    """Per-task surgery modules on the representation of a merged model.

    Args:
        rank: r, the width of the surgery's bottleneck (≥ 1).
        steps: Adam updates per task (≥ 0).
        lr: Adam's learning rate (> 0).
        head: the name of the head submodule whose input is the representation (None = the
            model's last top-level child).
        merge: the rule (fitted or data-free) that produces the merged tensors when ``fit``
            gets no ``merged`` (e.g. ``"adamerging_layer"``, ``"ties"``).
        merge_params: that rule's parameters.
    """

    name: ClassVar[str] = "surgery"
    caches_statistics: ClassVar[bool] = True
    #: the version of the training procedure, part of the cache key: bump it when it changes
    statistic_version: ClassVar[int] = 1

    def __init__(
        self,
        rank: int = 16,
        steps: int = 1000,
        lr: float = 1e-3,
        head: str | None = None,
        merge: str | None = None,
        merge_params: dict[str, Any] | None = None,
    ) -> None:
        if int(rank) != rank or rank < 1:
            raise ConfigError(f"surgery: rank must be a positive integer, got {rank!r}")
        if int(steps) != steps or steps < 0:
            raise ConfigError(f"surgery: steps must be an integer ≥ 0, got {steps!r}")
        if not lr > 0:
            raise ConfigError(f"surgery: lr must be > 0, got {lr!r}")
        if merge_params and merge is None:
            raise ConfigError("surgery: merge_params is given but merge names no rule")
        self.rank = int(rank)
        self.steps = int(steps)
        self.lr = float(lr)
        self.head = head
        self.merge = merge
        self.merge_params = dict(merge_params or {})
        self.inner: FittedRule | None = None
        self.losses: dict[str, list[float]] = {}

    def fit(
        self,
        factory: Factory,
        models: Sequence[StateDict],
        data: Sequence[Iterable[Any]],
        *,
        base: StateDict | None = None,
        cache: str | Path | None = None,
        seed: int = 0,
        merged: StateDict | None = None,
    ) -> SurgeryModel:
        """Train the surgery of every task; ``merged`` is the merged state dict (else the rule
        named by ``merge`` computes it from the same arguments). With ``cache`` the trained
        modules are stored (and a fitted rule named by ``merge`` caches its own statistics)."""
        experts = self.experts(factory, models, data, None, None)
        if cache is not None:
            for source in experts.data:
                check_rereadable(source, self.name)
        merged = self._merged(experts, base, cache, seed, merged)
        if set(merged) != set(experts.keys):
            raise ConfigError(
                "surgery: merged must hold exactly the tensor names of the task models "
                f"({len(experts.keys)} names), got {len(merged)} names"
            )
        first = experts.create(0)
        experts.check(0, first)
        head = resolve_head(first, self.head)
        device = module_device(first)
        own = first.state_dict()
        shared = {k: merged[k].to(device, own[k].dtype) for k in experts.keys}
        modules = experts.build_shared(shared, first)
        targets = [{k: m[k].to(device, own[k].dtype) for k in experts.keys} for m in experts.models]
        store = None if cache is None else StatisticsCache(cache, self.name)
        labelled = [
            ("merged", shared),
            *((f"model{i}", m) for i, m in enumerate(experts.models)),
            *unmerged_states(modules, experts.keys),
        ]
        inputs_print = "" if store is None else states_fingerprint(first, labelled)

        def read() -> Iterator[Inputs]:  # one batch of every task per step (at least one)
            streams = [cycle(d, self.name, i) for i, d in enumerate(experts.data)]
            for _ in range(max(self.steps, 1)):
                for stream in streams:
                    yield next(stream)

        def train(batches: Iterator[Inputs]) -> Statistics:
            fixes = self._train(modules, targets, head, batches, device, seed)
            tensors = {
                f"{task}.{name}": value.detach().cpu()
                for task, fix in enumerate(fixes)
                for name, value in fix.state_dict().items()
            }
            return Statistics(tensors, dict(self.losses))

        settings = {
            "rank": self.rank,
            "steps": self.steps,
            "lr": self.lr,
            "head": head,
            "seed": seed,
        }
        stats = cached(
            store,
            lambda digest: {
                "rule": self.name,
                "statistic": self.statistic_version,
                "settings": settings,
                "models": inputs_print,
                "data": digest.hexdigest(),
                "examples": digest.count,
            },
            read,
            train,
            "surgery: the data",
        )
        fixes = []
        for task in range(experts.count):
            up = stats.tensors[f"{task}.up"]
            fix = SurgeryModule(up.shape[0], self.rank, torch.Generator()).to(device)
            fix.load_state_dict({n: stats.tensors[f"{task}.{n}"] for n in ("down", "up")})
            fixes.append(fix)
        self.losses = {k: [float(v) for v in stats.extra.get(k, [])] for k in ("first", "last")}
        return SurgeryModel(modules, fixes, head, dict(merged))

    def _train(
        self,
        modules: Sequence[nn.Module],
        targets: Sequence[StateDict],
        head: str,
        batches: Iterator[Inputs],
        device: torch.device,
        seed: int,
    ) -> list[SurgeryModule]:
        """The trained surgery modules, one Adam step per task and step on ``batches`` (one
        batch of every task per step, in task order); records :attr:`losses`."""
        pending = [next(batches).to(device) for _ in modules]
        generator = torch.Generator().manual_seed(seed)
        fixes = []
        for task, inputs in enumerate(pending):
            dim = head_input(modules[task], head, inputs).shape[-1]
            fixes.append(SurgeryModule(dim, self.rank, generator).to(device))
        optimizer = torch.optim.Adam(
            [p for fix in fixes for p in fix.parameters()], lr=self.lr, betas=(0.9, 0.999)
        )
        first_loss: list[Tensor] = []
        last_loss: list[Tensor] = []
        for step in range(self.steps):
            for task, (module, fix) in enumerate(zip(modules, fixes, strict=True)):
                inputs = pending[task] if step == 0 else next(batches).to(device)
                z = head_input(module, head, inputs)
                target = head_input(module, head, inputs, targets[task])
                loss = (fix(z).float() - target.float()).abs().mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if step == 0:
                    first_loss.append(loss.detach())
                    last_loss.append(loss.detach())
                else:
                    last_loss[task] = loss.detach()
        self.losses = {
            "first": [float(v) for v in first_loss],
            "last": [float(v) for v in last_loss],
        }
        return fixes

    def _merged(
        self,
        experts: Experts,
        base: StateDict | None,
        cache: str | Path | None,
        seed: int,
        merged: StateDict | None,
    ) -> StateDict:
        """``merged``, or what the rule named by :attr:`merge` makes of the task models and data
        of ``experts`` with ``base``, ``cache`` and ``seed``."""
        if merged is not None:
            if self.merge is not None:
                raise ConfigError(
                    f"surgery: got both merged=... and merge={self.merge!r}; give one of them"
                )
            if base is not None:
                raise ConfigError(
                    "surgery: base is only for the rule named by merge; with merged=... drop it"
                )
            return merged
        if self.merge is None:
            raise ConfigError(
                "surgery: needs the merged model: pass merged=<merged state dict> to fit, or "
                "name the rule that merges, e.g. merge='adamerging_layer' or merge='ties'"
            )
        rule = registry.get("merge_rule", self.merge)
        if rule is RepresentationSurgery:
            raise ConfigError("surgery: merge='surgery' would nest surgeries; name a merging rule")
        if not getattr(rule, "fitted", False):
            return merge_state_dicts(
                base, experts.models, self.merge, params=self.merge_params, seed=seed
            )
        inner = registry.call_with_params("merge_rule", self.merge, self.merge_params)
        self.inner = inner
        result = inner.fit(
            experts.factory, experts.models, experts.data, base=base, cache=cache, seed=seed
        )
        if not isinstance(result, dict):
            raise ConfigError(f"surgery: merge={self.merge!r} did not return a state dict")
        return result

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "l1_first_step": self.losses.get("first", []),
            "l1_last_step": self.losses.get("last", []),
        }
        if self.inner is not None:
            out["merge"] = {"rule": self.merge, **self.inner.summary()}
        return out
