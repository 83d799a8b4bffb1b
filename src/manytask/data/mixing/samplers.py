r"""Task samplers: which task, and which of its examples, fills each row of each batch.

A sampler is built from the sizes :math:`n_1 … n_T` of the task datasets and yields batches of
``batch_size`` global example indices (the index space of
:class:`~manytask.data.mixing.TaskMixture`: example :math:`i` of task :math:`t` is
:math:`o_t + i`, :math:`o_t = \sum_{s<t} n_s`); ``mixture.batch(indices)`` turns one into a
mixed-task :class:`~manytask.data.MultiTaskBatch`.

* **Task choice.** With ``mixed=True`` (the default) every row draws its own task
  :math:`t \sim p`, so a batch mixes tasks, as in T5 and mT5, where each example of a batch is
  drawn from a task; every task then has a loss in (almost) every step, which the balancers
  expect. With ``mixed=False`` each batch draws one task and all its rows come from that task,
  as in BERT and PALs.
* **Example choice.** Within a task, examples are taken without replacement, in the order of a
  random permutation of the task's dataset; when it is used up, the task starts a fresh
  permutation (a new pass). A task smaller than a batch therefore repeats examples only across
  passes.
* **Epoch.** An epoch is ``steps_per_epoch`` batches of ``batch_size`` rows; by default
  :math:`\lceil \sum_t n_t / B \rceil`, as many rows as the datasets hold together (rounded up to
  whole batches), i.e. the length of a Trainer epoch over the concatenated datasets. It does
  not mean that every example was seen: a task drawn less often than its share of the data
  sees only part of it, and a small task drawn often goes through several passes. The
  annealed sampler's schedule counts these epochs.
* **Randomness.** Every draw uses a CPU ``torch.Generator`` seeded by the sampler's ``seed`` and
  the draw's place: the task draws of batch ``step`` of epoch ``epoch`` use the seed of
  ``(seed, epoch, step)``, the permutation of pass ``k`` of task ``t`` that of ``(seed, t, k)``
  (mixed by SplitMix64: Steele, Lea and Flood, "Fast Splittable Pseudorandom Number
  Generators", OOPSLA 2014). So the generator state *is* the position: :meth:`state_dict` holds
  the seed, the epoch and step, and each task's pass and position in it — a few integers, JSON
  as it is — and a sampler loaded from it continues with exactly the batches the original would
  have drawn.

Iterating a sampler yields the remaining batches of the current epoch; the next iteration
starts the next epoch::

    sampler = build_sampler("temperature", sizes=mixture.sizes, batch_size=32, seed=0)
    for epoch in range(epochs):
        for indices in sampler:
            batch = mixture.batch(indices)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from manytask import registry
from manytask.data.mixing.mixture import global_offsets
from manytask.data.mixing.rates import (
    annealed_exponent,
    check_cap,
    check_sizes,
    proportional_rates,
    size_power_rates,
    temperature_rates,
    uniform_rates,
)
from manytask.errors import ConfigError

_MASK64 = (1 << 64) - 1
_TASK_DRAWS = 1  # stream of the task draws of one batch
_EXAMPLE_ORDER = 2  # stream of one pass over one task's examples


def _splitmix64(value: int) -> int:
    """One SplitMix64 output for the state ``value`` (Steele, Lea and Flood, OOPSLA 2014)."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def stream_seed(seed: int, *keys: int) -> int:
    """A 63-bit generator seed fixed by ``seed`` and the keys of one draw (its place)."""
    state = _splitmix64(seed & _MASK64)
    for key in keys:
        state = _splitmix64(state ^ (key & _MASK64))
    return state >> 1


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


class TaskSampler:
    """Batches of global example indices drawn from several task datasets (the base class).

    Args:
        sizes: :math:`n_t`, the number of examples of each task's dataset, in task order.
        batch_size: :math:`B`, rows per batch.
        seed: fixes every draw.
        mixed: ``True``: each row draws its own task (mixed-task batches); ``False``: each
            batch draws one task for all its rows (single-task batches).
        steps_per_epoch: batches per epoch; default :math:`\\lceil \\sum_t n_t / B \\rceil`.
    """

    name: ClassVar[str] = ""

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        seed: int = 0,
        *,
        mixed: bool = True,
        steps_per_epoch: int | None = None,
    ) -> None:
        self.sizes = check_sizes(sizes)
        _check_positive_int("batch_size", batch_size)
        self.batch_size = batch_size
        if steps_per_epoch is None:
            steps_per_epoch = math.ceil(sum(self.sizes) / batch_size)
        _check_positive_int("steps_per_epoch", steps_per_epoch)
        self.steps_per_epoch = steps_per_epoch
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.mixed = bool(mixed)
        self.epoch = 0  # the epoch of the last batch drawn (0-based)
        self.step = 0  # batches drawn in that epoch
        self.passes = [0] * len(self.sizes)  # each task's current pass over its examples
        self.positions = [0] * len(self.sizes)  # examples used in that pass
        self._offsets = global_offsets(self.sizes)
        self._orders: dict[int, tuple[int, Tensor]] = {}  # task -> (pass, permutation)

    # the method ------------------------------------------------------------------------
    def rates(self, epoch: int) -> Tensor:
        """The task probabilities :math:`p` in epoch ``epoch`` (0-based), float64."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """The method's own parameters (recorded in the state, checked on load)."""
        return {}

    def probabilities(self, epoch: int | None = None) -> Tensor:
        """The probability of each task in ``epoch`` (0-based); by default in the epoch of the
        next batch. Round robin gives each task's long-run share."""
        if epoch is None:
            epoch = self.epoch + (1 if self.step >= self.steps_per_epoch else 0)
        return self.rates(epoch)

    def _draw_tasks(self, epoch: int, step: int) -> Tensor:
        """The task of each row of batch ``step`` of ``epoch``: ``(B,)`` int64."""
        generator = _generator(stream_seed(self.seed, _TASK_DRAWS, epoch, step))
        rates = self.rates(epoch)
        if self.mixed:
            return torch.multinomial(rates, self.batch_size, replacement=True, generator=generator)
        task = torch.multinomial(rates, 1, generator=generator)
        return task.expand(self.batch_size).clone()

    # drawing ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[Tensor]:
        """The remaining batches of the current epoch (all of the next one if it is done)."""
        self._move_past_a_finished_epoch()
        while self.step < self.steps_per_epoch:
            yield self.next_batch()

    def _move_past_a_finished_epoch(self) -> None:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0

    def next_batch(self) -> Tensor:
        """The next batch: ``(B,)`` int64 global indices; moves to the next epoch when one ends."""
        self._move_past_a_finished_epoch()
        task_ids = self._draw_tasks(self.epoch, self.step)
        order = torch.argsort(task_ids, stable=True)
        counts = torch.bincount(task_ids, minlength=len(self.sizes)).tolist()
        local = torch.empty(self.batch_size, dtype=torch.int64)
        start = 0
        for t, count in enumerate(counts):
            if count:
                local[order[start : start + count]] = self._take(t, count)
                start += count
        self.step += 1
        return self._offsets[task_ids] + local

    def _take(self, task: int, count: int) -> Tensor:
        """The next ``count`` examples of ``task``, starting a new pass when one is used up."""
        size = self.sizes[task]
        pieces = []
        while count:
            order = self._order(task)
            position = self.positions[task]
            taken = min(count, size - position)
            pieces.append(order[position : position + taken])
            count -= taken
            if position + taken == size:
                self.passes[task] += 1
                self.positions[task] = 0
            else:
                self.positions[task] = position + taken
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _order(self, task: int) -> Tensor:
        cached = self._orders.get(task)
        if cached is None or cached[0] != self.passes[task]:
            seed = stream_seed(self.seed, _EXAMPLE_ORDER, task, self.passes[task])
            order = torch.randperm(self.sizes[task], generator=_generator(seed))
            cached = (self.passes[task], order)
            self._orders[task] = cached
        return cached[1]

    # state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the sampler is, as plain JSON values: the seed, epoch, step, each task's pass
        and position, and the settings that a resumed sampler must share."""
        return {
            "sampler": self.name,
            "params": self.params(),
            "sizes": list(self.sizes),
            "batch_size": self.batch_size,
            "mixed": self.mixed,
            "steps_per_epoch": self.steps_per_epoch,
            "seed": self.seed,
            "epoch": self.epoch,
            "step": self.step,
            "passes": list(self.passes),
            "positions": list(self.positions),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a sampler built alike)."""
        mine = self.state_dict()
        missing = [key for key in mine if key not in state]
        if missing:
            raise ConfigError(f"sampler state lacks {missing}; expected the keys {list(mine)}")
        differ = [
            f"{key} {state[key]!r} (this sampler: {mine[key]!r})"
            for key in ("sampler", "params", "sizes", "batch_size", "mixed", "steps_per_epoch")
            if state[key] != mine[key]
        ]
        if differ:
            raise ConfigError(
                "the sampler state was saved by a sampler built differently: "
                + "; ".join(differ)
                + ". Build the sampler as it was when the state was saved"
            )
        count = len(self.sizes)
        passes, positions = list(state["passes"]), list(state["positions"])
        valid = (
            isinstance(state["seed"], int)
            and not isinstance(state["seed"], bool)
            and all(_is_count(state[key]) for key in ("epoch", "step"))
            and int(state["step"]) <= self.steps_per_epoch
            and len(passes) == len(positions) == count
            and all(_is_count(value) for value in passes + positions)
            and all(p < n for p, n in zip(positions, self.sizes, strict=True))
        )
        if not valid:
            raise ConfigError(
                "the sampler state is inconsistent: seed must be an int, epoch and step ints ≥ 0 "
                f"(step ≤ {self.steps_per_epoch}), passes and positions {count} ints ≥ 0 with "
                f"each position below its task's size {self.sizes}"
            )
        self.seed, self.epoch, self.step = (int(state[k]) for k in ("seed", "epoch", "step"))
        self.passes, self.positions = [int(p) for p in passes], [int(p) for p in positions]
        self._orders.clear()


def _check_positive_int(label: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{label} must be an int ≥ 1, got {value!r}")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# the methods ---------------------------------------------------------------------------
@registry.register(
    "sampler",
    "proportional",
    "examples-proportional mixing with a cap K (Raffel et al., T5, arXiv:1910.10683)",
)
class ProportionalSampler(TaskSampler):
    r"""Examples-proportional mixing with an artificial size limit.

    :math:`p_t = \min(n_t, K) / \sum_s \min(n_s, K)` — Raffel et al., "Exploring the Limits of
    Transfer Learning with a Unified Text-to-Text Transformer" (T5), arXiv:1910.10683, §3.5.2.

    Args:
        cap: :math:`K`; ``None`` for no cap (plain examples-proportional mixing, the same task
            frequencies as shuffling the concatenated datasets). Default :math:`2^{19}`: the
            limit T5 uses for its multi-task runs (§3.5.3, Table 12) and among the best of the
            values :math:`2^{16} … 2^{21}` it compares (Table 11).
        sizes, batch_size, seed, mixed, steps_per_epoch: as in :class:`TaskSampler`.
    """

    name = "proportional"

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        seed: int = 0,
        *,
        cap: int | None = 2**19,
        mixed: bool = True,
        steps_per_epoch: int | None = None,
    ) -> None:
        super().__init__(sizes, batch_size, seed, mixed=mixed, steps_per_epoch=steps_per_epoch)
        self.cap = check_cap(cap)
        self._rates = proportional_rates(self.sizes, self.cap)

    def rates(self, epoch: int) -> Tensor:
        return self._rates.clone()

    def params(self) -> dict[str, Any]:
        return {"cap": self.cap}


@registry.register(
    "sampler",
    "temperature",
    "temperature-scaled mixing p ∝ min(n, K)^(1/τ) (T5, arXiv:1910.10683; mT5 α = 1/τ)",
)
class TemperatureSampler(TaskSampler):
    r"""Temperature-scaled mixing.

    :math:`p_t \propto \min(n_t, K)^{1/\tau}`: the capped examples-proportional rates raised to
    :math:`1/\tau` and renormalised — Raffel et al. (T5), arXiv:1910.10683, §3.5.2.
    :math:`\tau = 1` is examples-proportional mixing, :math:`\tau \to \infty` uniform.

    mT5's α-sampling :math:`p_t \propto n_t^{\alpha}` (Xue et al., "mT5: A Massively
    Multilingual Pre-trained Text-to-Text Transformer", arXiv:2010.11934, α = 0.3) is this
    sampler with ``temperature = 1/α`` (3.33…) and ``cap = None``; BERT and PALs' "square root
    sampling" is ``temperature = 2``, ``cap = None``.

    Args:
        temperature: :math:`\tau > 0`. Default 2: the best of T5's :math:`\tau \in \{2, 4, 8\}`
            in most tasks (§3.5.2, Table 11).
        cap: :math:`K` applied before the temperature; ``None`` for no cap. Default
            :math:`2^{21}`: T5's value with temperature scaling (§3.5.2; large, because a higher
            temperature already lowers the rates of the largest datasets).
        sizes, batch_size, seed, mixed, steps_per_epoch: as in :class:`TaskSampler`.
    """

    name = "temperature"

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        seed: int = 0,
        *,
        temperature: float = 2.0,
        cap: int | None = 2**21,
        mixed: bool = True,
        steps_per_epoch: int | None = None,
    ) -> None:
        super().__init__(sizes, batch_size, seed, mixed=mixed, steps_per_epoch=steps_per_epoch)
        self.temperature = float(temperature)
        self.cap = check_cap(cap)
        self._rates = temperature_rates(self.sizes, self.temperature, self.cap)

    def rates(self, epoch: int) -> Tensor:
        return self._rates.clone()

    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "cap": self.cap}


@registry.register("sampler", "uniform", "equal mixing p = 1/T (T5's baseline, arXiv:1910.10683)")
class UniformSampler(TaskSampler):
    r"""Equal mixing: every task is drawn with probability :math:`p_t = 1/T`, whatever its size.

    Raffel et al. (T5), arXiv:1910.10683, §3.5.2 ("equal mixing"; there each example of a batch
    draws its task uniformly, ``mixed=True``). Small tasks go through many passes, large ones see
    part of their data per epoch.

    Args:
        sizes, batch_size, seed, mixed, steps_per_epoch: as in :class:`TaskSampler`.
    """

    name = "uniform"

    def rates(self, epoch: int) -> Tensor:
        return uniform_rates(self.sizes)


@registry.register(
    "sampler", "round_robin", "deterministic cycling over the tasks, one row or batch each"
)
class RoundRobinSampler(TaskSampler):
    r"""Round robin: the tasks take turns, with no randomness in the task choice.

    With ``mixed=True`` row :math:`j` of the whole stream (counted over all batches and epochs,
    :math:`j = (\text{global step})\cdot B + r`) belongs to task :math:`j \bmod T`; with
    ``mixed=False`` batch :math:`k` of the stream belongs to task :math:`k \bmod T`. Each task
    thus gets the share :math:`1/T` exactly (up to the last incomplete cycle), which
    :meth:`probabilities` reports. Examples within a task are still drawn without replacement
    from seeded permutations. The simplest alternating schedule of multi-task training; it has
    no parameter, so there is no default to source.

    Args:
        sizes, batch_size, seed, mixed, steps_per_epoch: as in :class:`TaskSampler`.
    """

    name = "round_robin"

    def rates(self, epoch: int) -> Tensor:
        return uniform_rates(self.sizes)

    def _draw_tasks(self, epoch: int, step: int) -> Tensor:
        count = len(self.sizes)
        global_step = epoch * self.steps_per_epoch + step
        if not self.mixed:
            return torch.full((self.batch_size,), global_step % count, dtype=torch.int64)
        first = (global_step * self.batch_size) % count
        return (first + torch.arange(self.batch_size, dtype=torch.int64)) % count


@registry.register(
    "sampler",
    "annealed",
    "p ∝ n^α, α annealed 1 → 0.2 over the epochs (Stickland & Murray, arXiv:1902.02671)",
)
class AnnealedSampler(TaskSampler):
    r"""Annealed sampling: from examples-proportional towards uniform, epoch by epoch.

    :math:`p_t \propto n_t^{\alpha_e}`, :math:`\alpha_e = 1 - 0.8\,\frac{e-1}{E-1}` in epoch
    :math:`e = 1 … E` — Stickland and Murray, "BERT and PALs: Projected Attention Layers for
    Efficient Adaptation in Multi-Task Learning", ICML 2019, arXiv:1902.02671 (task sampling).
    Here the ends are parameters:
    :math:`\alpha_e = \alpha_1 + (\alpha_E - \alpha_1)\frac{e-1}{E-1}`
    (:math:`\alpha_1` when :math:`E = 1`). The paper draws one task per batch; ``mixed=False``
    reproduces that.

    An epoch is the sampler's epoch (``steps_per_epoch`` batches): set ``steps_per_epoch`` to
    the Trainer's steps per epoch and ``epochs`` to its number of epochs so that the schedule
    follows training; drawing past epoch :math:`E` is an error.

    Args:
        epochs: :math:`E`, the number of epochs the schedule spans (required).
        start: :math:`\alpha_1`; default 1 (the paper).
        end: :math:`\alpha_E`; default 0.2 (the paper).
        sizes, batch_size, seed, mixed, steps_per_epoch: as in :class:`TaskSampler`.
    """

    name = "annealed"

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        seed: int = 0,
        *,
        epochs: int,
        start: float = 1.0,
        end: float = 0.2,
        mixed: bool = True,
        steps_per_epoch: int | None = None,
    ) -> None:
        super().__init__(sizes, batch_size, seed, mixed=mixed, steps_per_epoch=steps_per_epoch)
        annealed_exponent(0, epochs, start, end)  # checks the schedule's parameters
        self.epochs, self.start, self.end = epochs, float(start), float(end)

    def exponent(self, epoch: int) -> float:
        """:math:`\\alpha` of epoch ``epoch`` (0-based)."""
        return annealed_exponent(epoch, self.epochs, self.start, self.end)

    def rates(self, epoch: int) -> Tensor:
        return size_power_rates(self.sizes, self.exponent(epoch))

    def params(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "start": self.start, "end": self.end}


def build_sampler(
    name: str, sizes: Sequence[int], batch_size: int, seed: int = 0, **params: Any
) -> TaskSampler:
    """The registered sampler ``name`` for these dataset sizes; ``params`` are checked against
    its signature (an unknown or mistyped parameter is a :class:`~manytask.errors.ConfigError`
    that lists the valid ones)."""
    sampler = registry.call_with_params(
        "sampler", name, params, sizes=list(sizes), batch_size=batch_size, seed=seed
    )
    assert isinstance(sampler, TaskSampler)
    return sampler
