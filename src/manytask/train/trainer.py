"""The Trainer: any model meeting the contract, any balancer, any torch optimizer.

Per epoch it trains on shuffled batches, evaluates on the validation split, keeps the model with
the best validation score (never looking at test), and may stop early; at the end it evaluates
the selected model on the test split. With a run directory it writes ``metrics.jsonl``,
checkpoints every ``checkpoint_every`` steps and at each epoch end, and ``summary.json``.

Resuming is exact on the CPU: a checkpoint holds the model, optimizer, scheduler and balancer
states, the global torch RNG state and the position in the epoch; the batch order of epoch ``e``
is a permutation drawn from a generator seeded by ``(seed, e)``, so the resumed run sees the
same batches in the same order and ends with the same weights and metrics as an uninterrupted
one.

Each step the Trainer reads the task loss values once (one device synchronisation) to stop on a
NaN or infinite loss before it reaches the weights, naming the task and the step, and to show
the running losses in the progress bar.

Mixed precision: ``amp="bf16"`` runs the forward pass under ``torch.autocast`` in bfloat16;
``amp="fp16"`` uses float16 with a ``GradScaler`` that the balancer applies to its own backward
passes (weights are computed from unscaled values).

Under ``torch.distributed`` (e.g. ``torchrun``) every rank takes its share of each batch
(``batch[rank::world_size]``), the balancer reduces what its method needs, and the remaining
gradients are averaged, so every rank applies the same update; only rank 0 writes the run
directory and prints.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from manytask import distributed
from manytask.balance.base import Balancer, BalanceStep, Need
from manytask.data.batch import MultiTaskBatch, MultiTaskDataset
from manytask.errors import ConfigError, NonFiniteLossError
from manytask.evaluate.metrics import task_metrics
from manytask.nn.base import MultiTaskModel
from manytask.task import TaskSet
from manytask.train.loggers import MetricSink
from manytask.train.progress import ProgressDisplay
from manytask.train.rundir import RunDirectory
from manytask.train.statefile import join_state, split_state

Results = dict[str, dict[str, float]]  # task -> metric -> value
StepCallback = Callable[["Trainer"], None]


@dataclass
class TrainState:
    """Where a run is and what it has seen; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0
    best_score: float | None = None
    best_epoch: int | None = None
    bad_evaluations: int = 0
    stopped_early: bool = False
    metric_lines: int = 0
    epoch_seconds: list[float] = field(default_factory=list)
    partial_epoch_seconds: float = 0.0
    # sums over the steps of the current epoch, for its mean training losses and weights
    epoch_loss_sum: list[float] = field(default_factory=list)
    epoch_weight_sum: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class EarlyStopping:
    """Stop when the validation score has not improved by ``min_delta`` for ``patience`` epochs."""

    patience: int
    min_delta: float = 0.0


def epoch_order(num_samples: int, seed: int, epoch: int) -> Tensor:
    """The sample order of one epoch: a permutation fixed by ``(seed, epoch)`` alone."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


class Trainer:
    """Train a multi-task model with a balancer.

    Args:
        model: a :class:`~manytask.nn.MultiTaskModel`.
        tasks: the tasks; their names key model outputs, targets and losses.
        balancer: any :class:`~manytask.balance.Balancer` built for these task names. Its
            parameters (if any) must be in the optimizer.
        optimizer: any ``torch.optim`` optimizer.
        train_data, val_data, test_data: datasets with ``len()`` and ``batch(indices)``.
        scheduler: any ``torch.optim.lr_scheduler`` scheduler, stepped per ``scheduler_interval``;
            ``ReduceLROnPlateau`` is stepped each epoch with the validation selection score
            (negated for ``mode="min"``).
        epochs, batch_size, eval_batch_size: as named.
        device: where the model and batches live.
        seed: fixes the batch order (model initialisation is the caller's).
        run_dir: where to write metrics, checkpoints and the summary (None: nothing is written).
        checkpoint_every: also checkpoint every this many steps (0: only at epoch ends).
        keep_checkpoints: how many step checkpoints to keep.
        selection: the validation score that selects the model: ``"mean_primary"`` (mean of
            each task's primary metric, negated where lower is better), ``"loss"`` (sum of the
            validation losses, lower is better) or ``"TASK/METRIC"``.
        early_stopping: stop when the selection score stops improving.
        grad_clip: clip the total gradient norm of the model's parameters to this value.
        amp: mixed precision: ``"none"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast and a
            gradient scaler).
        log_every: steps between progress-bar updates.
        progress: show the progress bar (the one-line epoch summaries are always printed).
        callbacks: functions called with the trainer after every optimizer step; they may read
            ``trainer.last_batch`` (this rank's share of the step's batch, on the device) and
            ``trainer.last_step`` (the :class:`~manytask.balance.BalanceStep` the balancer
            returned: weights, and gradient norms and cosines where the method formed them).
        sinks: :class:`~manytask.train.loggers.MetricSink` objects (TensorBoard, MLflow) that
            receive every per-epoch record written to ``metrics.jsonl`` and, at the end, the
            test metrics (``{"test": {task: {metric: value}}}``); used on rank 0 only, started
            by :meth:`fit` and closed when it returns or raises.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        tasks: TaskSet,
        balancer: Balancer,
        optimizer: torch.optim.Optimizer,
        train_data: MultiTaskDataset,
        val_data: MultiTaskDataset | None = None,
        test_data: MultiTaskDataset | None = None,
        *,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        epochs: int = 10,
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        device: str | torch.device = "cpu",
        seed: int = 0,
        run_dir: RunDirectory | None = None,
        checkpoint_every: int = 500,
        keep_checkpoints: int = 2,
        selection: str = "mean_primary",
        early_stopping: EarlyStopping | None = None,
        grad_clip: float | None = None,
        amp: Literal["none", "bf16", "fp16"] = "none",
        log_every: int = 20,
        progress: bool = True,
        callbacks: Sequence[StepCallback] = (),
        sinks: Sequence[MetricSink] = (),
    ) -> None:
        if list(balancer.tasks) != list(tasks.names):
            raise ConfigError(
                f"the balancer was built for tasks {list(balancer.tasks)} but the trainer's tasks "
                f"are {tasks.names}; build it with tasks=tasks.names"
            )
        if len(train_data) == 0:
            raise ConfigError("the training data is empty")
        if epochs < 1 or batch_size < 1 or eval_batch_size < 1:
            raise ConfigError("epochs, batch_size and eval_batch_size must be ≥ 1")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.balancer = balancer.to(self.device)
        self._check_optimizer_covers_balancer(optimizer)
        self.tasks = tasks
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        self.train_data, self.val_data, self.test_data = train_data, val_data, test_data
        self.epochs, self.batch_size, self.eval_batch_size = epochs, batch_size, eval_batch_size
        self.seed = seed
        self.run_dir = run_dir
        self.checkpoint_every = checkpoint_every
        self.keep_checkpoints = keep_checkpoints
        self.selection = selection
        self._check_selection()
        self.early_stopping = early_stopping
        self.grad_clip = grad_clip
        if amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"amp must be 'none', 'bf16' or 'fp16', got '{amp}'")
        self.amp = amp
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None
        self.is_main = distributed.rank() == 0
        self.log_every = log_every
        self.display = ProgressDisplay(enabled=progress and distributed.rank() == 0)
        self.callbacks = list(callbacks)
        self.sinks = list(sinks)
        self.state = TrainState()
        self._shared = list(model.shared_parameters())
        self._parameters = [*model.parameters(), *balancer.parameters()]
        distributed.broadcast_parameters(self.model)
        distributed.broadcast_parameters(self.balancer)
        self._shown = 0  # progress-bar steps already shown in this epoch
        self._epoch_losses: dict[str, float] = {}
        self._epoch_weights: dict[str, float] = {}
        self._best_in_memory: dict[str, Tensor] | None = None
        self.last_batch: MultiTaskBatch | None = None
        self.last_step: BalanceStep | None = None

    # checks ---------------------------------------------------------------------------
    def _check_optimizer_covers_balancer(self, optimizer: torch.optim.Optimizer) -> None:
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in self.balancer.named_parameters() if id(p) not in in_optimizer]
        if missing:
            raise ConfigError(
                f"the balancer has learnable parameters {missing} that the optimizer does not "
                "update; build the optimizer over model.parameters() and balancer.parameters()"
            )

    def _check_selection(self) -> None:
        if self.selection in ("mean_primary", "loss"):
            return
        task, _, metric = self.selection.partition("/")
        if task not in self.tasks or metric not in (*self.tasks[task].metrics, "loss"):
            choices = ["mean_primary", "loss"] + [
                f"{name}/{m}" for name, t in self.tasks.items() for m in (*t.metrics, "loss")
            ]
            raise ConfigError(
                f"unknown selection '{self.selection}'; valid choices: {', '.join(choices)}"
            )

    # public API -----------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_data) / self.batch_size)

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train (or continue training) and return the summary (also in ``summary.json``)."""
        sinks = self.sinks if self.is_main else []
        started: list[MetricSink] = []
        try:
            if resume:
                self.load_checkpoint()
            for sink in sinks:
                sink.start(self.state.global_step)
                started.append(sink)
            with self.display:
                while self.state.epoch < self.epochs and not self.state.stopped_early:
                    self._train_epoch()
                    self._end_epoch()
            summary = self._finish()
        except BaseException:
            for sink in started:  # the training error is the one to see, not a sink's
                with contextlib.suppress(Exception):
                    sink.close(failed=True)
            raise
        for sink in started:
            sink.close()
        return summary

    def _log_to_sinks(self, record: dict[str, Any]) -> None:
        if self.is_main:
            for sink in self.sinks:
                sink.log(record, self.state.global_step)

    @torch.no_grad()
    def evaluate(self, data: MultiTaskDataset) -> Results:
        """Metrics and mean loss of every task on ``data``, with the current weights."""
        was_training = self.model.training
        self.model.eval()
        outputs: dict[str, list[Tensor]] = {name: [] for name in self.tasks}
        targets: dict[str, list[Tensor]] = {name: [] for name in self.tasks}
        for start in range(0, len(data), self.eval_batch_size):
            idx = torch.arange(start, min(start + self.eval_batch_size, len(data)))
            batch = data.batch(idx).to(self.device)
            out = self.model(batch.inputs)
            for name in self.tasks:
                outputs[name].append(out[name].float().cpu())
                targets[name].append(batch.targets[name].cpu())
        self.model.train(was_training)
        results: Results = {}
        for name, task in self.tasks.items():
            output, target = torch.cat(outputs[name]), torch.cat(targets[name])
            results[name] = task_metrics(task, output, target)
            results[name]["loss"] = float(task.raw_loss(output, target))
        return results

    def selection_score(self, results: Results) -> float:
        """The validation score to maximise (metrics where lower is better are negated)."""
        if self.selection == "mean_primary":
            values = []
            for name, task in self.tasks.items():
                sign = 1.0 if task.higher_is_better(task.primary_metric) else -1.0
                values.append(sign * results[name][task.primary_metric])
            return sum(values) / len(values)
        if self.selection == "loss":
            return -sum(results[name]["loss"] for name in self.tasks)
        task_name, _, metric = self.selection.partition("/")
        higher = metric != "loss" and self.tasks[task_name].higher_is_better(metric)
        value = results[task_name][metric]
        return value if higher else -value

    # training -------------------------------------------------------------------------
    def _train_epoch(self) -> None:
        state = self.state
        order = epoch_order(len(self.train_data), self.seed, state.epoch)
        needs_features = self.balancer.needs is Need.FEATURE_GRADIENTS
        zeros = [0.0] * len(self.tasks)
        running = torch.tensor(state.epoch_loss_sum or zeros, dtype=torch.float64)
        weight_sum = torch.tensor(state.epoch_weight_sum or zeros, dtype=torch.float64)
        running_count = state.step_in_epoch
        self._shown = state.step_in_epoch
        self.model.train()
        self.display.start_epoch(
            state.epoch, self.epochs, self.steps_per_epoch, state.step_in_epoch
        )
        started = time.perf_counter()
        for index in range(state.step_in_epoch, self.steps_per_epoch):
            idx = order[index * self.batch_size : (index + 1) * self.batch_size]
            idx = idx[distributed.rank() :: distributed.world_size()]
            batch = self.train_data.batch(idx).to(self.device, non_blocking=True)
            features = None
            with self._autocast():
                if needs_features:
                    outputs, features = self.model(batch.inputs, return_features=True)
                else:
                    outputs = self.model(batch.inputs)
                losses = self.tasks.losses(outputs, batch.targets)
            losses = {name: loss.float() for name, loss in losses.items()}
            values = torch.stack([v.detach().double() for v in losses.values()])
            values = distributed.all_reduce_mean_(values).cpu()  # the union batch's losses
            self._check_finite(values)
            self.optimizer.zero_grad(set_to_none=True)
            self._backward_auxiliary_loss()
            step = self.balancer.backward(
                losses, shared=self._shared, features=features, scaler=self.scaler
            )
            distributed.average_gradients(step.unsynced(self._parameters))
            self._optimizer_step()
            self.last_batch, self.last_step = batch, step
            if self.scheduler is not None and self.scheduler_interval == "step":
                self.scheduler.step()
            if step.weights is not None:
                weight_sum += step.weights.detach().double().cpu()
            running += values
            running_count += 1
            state.step_in_epoch = index + 1
            state.global_step += 1
            if running_count % self.log_every == 0 or state.step_in_epoch == self.steps_per_epoch:
                means = self._per_task(running / running_count)
                self.display.advance(running_count - self._shown, means)
                self._shown = running_count
            if self.checkpoint_every and state.global_step % self.checkpoint_every == 0:
                state.partial_epoch_seconds += time.perf_counter() - started
                started = time.perf_counter()
                state.epoch_loss_sum, state.epoch_weight_sum = running.tolist(), weight_sum.tolist()
                self.save_checkpoint()
            for callback in self.callbacks:
                callback(self)
        state.partial_epoch_seconds += time.perf_counter() - started
        state.epoch_loss_sum, state.epoch_weight_sum = [], []
        self._epoch_losses = self._per_task(running / max(running_count, 1))
        self._epoch_weights = self._per_task(weight_sum / max(running_count, 1))

    def _autocast(self) -> Any:
        if self.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _optimizer_step(self) -> None:
        if self.scaler is None:
            if self.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            return
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _backward_auxiliary_loss(self) -> None:
        """The model's own training terms (the load-balancing and entropy losses of top-k and
        DSelect-k gates), back-propagated before the balancer's backward, which adds to them.

        They are not task losses, so no balancer weighs them. Under ``torch.distributed`` their
        gradients are those of each rank's share of the batch (averaged with the rest only where
        the balancer leaves gradients unreduced).
        """
        auxiliary = getattr(self.model, "auxiliary_loss", None)
        if not callable(auxiliary):
            return
        term = auxiliary()
        if isinstance(term, torch.Tensor) and term.requires_grad:
            scaled = self.scaler.scale(term) if self.scaler is not None else term
            scaled.backward(retain_graph=True)

    def _step_epoch_scheduler(self, score: float) -> None:
        """Step the scheduler; ``ReduceLROnPlateau`` watches the selection score."""
        scheduler = self.scheduler
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(score if scheduler.mode == "max" else -score)
        elif scheduler is not None:
            scheduler.step()

    def _per_task(self, values: Tensor) -> dict[str, float]:
        return dict(zip(self.tasks.names, values.cpu().tolist(), strict=True))

    def _check_finite(self, values: Tensor) -> None:
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            raise NonFiniteLossError(
                self.tasks.names[bad], self.state.global_step + 1, float(values[bad])
            )

    def _end_epoch(self) -> None:
        state = self.state
        learning_rates = [group["lr"] for group in self.optimizer.param_groups]  # of this epoch
        self.balancer.end_epoch()
        state.epoch_seconds.append(state.partial_epoch_seconds)
        state.partial_epoch_seconds = 0.0
        state.epoch += 1
        state.step_in_epoch = 0
        record: dict[str, Any] = {
            "epoch": state.epoch,
            "step": state.global_step,
            "train_loss": self._epoch_losses,
            "weights": self._epoch_weights,
            "lr": learning_rates,
            "seconds": state.epoch_seconds[-1],
        }
        message = f"epoch {state.epoch}/{self.epochs}  train " + "  ".join(
            f"{k} {v:.4f}" for k, v in self._epoch_losses.items()
        )
        score = -sum(self._epoch_losses.values())  # without validation data: training loss
        if self.val_data is not None:
            val = self.evaluate(self.val_data)
            score = self.selection_score(val)
            record["val"] = val
            record["score"] = score
            improved = state.best_score is None or score > state.best_score + (
                self.early_stopping.min_delta if self.early_stopping else 0.0
            )
            if improved:
                state.best_score, state.best_epoch = score, state.epoch
                state.bad_evaluations = 0
                self._save_best(val)
            else:
                state.bad_evaluations += 1
                if self.early_stopping and state.bad_evaluations >= self.early_stopping.patience:
                    state.stopped_early = True
            message += "  val " + "  ".join(
                f"{name}/{task.primary_metric} {val[name][task.primary_metric]:.4f}"
                for name, task in self.tasks.items()
            )
            message += "  *" if improved else ""
        if self.scheduler is not None and self.scheduler_interval == "epoch":
            self._step_epoch_scheduler(score)
        self.display.print(message)
        if self.run_dir is not None and self.is_main:
            self.run_dir.append_metrics(record)
            state.metric_lines += 1
        self._log_to_sinks(record)  # before the checkpoint, as metrics.jsonl
        if self.run_dir is not None and self.is_main:
            self.save_checkpoint()

    def _finish(self) -> dict[str, Any]:
        state = self.state
        best = (
            self.run_dir.load_best()
            if self.run_dir is not None and self.is_main
            else self._best_in_memory
        )
        if best is not None:
            self.model.load_state_dict({k: v.to(self.device) for k, v in best.items()})
        summary: dict[str, Any] = {
            "status": "completed",
            "epochs_run": state.epoch,
            "steps": state.global_step,
            "stopped_early": state.stopped_early,
            "best_epoch": state.best_epoch,
            "selection": self.selection,
            "best_score": state.best_score,
            "seconds_per_epoch": sum(state.epoch_seconds) / max(len(state.epoch_seconds), 1),
            "epoch_seconds": state.epoch_seconds,
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
            "primary_metrics": {name: task.primary_metric for name, task in self.tasks.items()},
        }
        if self.val_data is not None:
            summary["val"] = self.evaluate(self.val_data)
        if self.test_data is not None:
            summary["test"] = self.evaluate(self.test_data)
            self._log_to_sinks({"test": summary["test"]})
        if self.run_dir is not None and self.is_main:
            self.run_dir.write_summary(summary)
        return summary

    # checkpoints ----------------------------------------------------------------------
    def _save_best(self, val: Results) -> None:
        weights = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        if self.run_dir is None or not self.is_main:
            self._best_in_memory = weights
            return
        self.run_dir.save_best(
            weights, {"epoch": self.state.epoch, "score": self.state.best_score, "val": val}
        )

    def _training_state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "balancer": self.balancer.state_dict(),
            "rng": torch.get_rng_state(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def save_checkpoint(self) -> None:
        """Write the full training state to the run directory (no-op without one, or off
        rank 0)."""
        if self.run_dir is None or not self.is_main:
            return
        tensors, skeleton = split_state(self._training_state(), "state")
        meta = {"trainer": asdict(self.state), "state": skeleton}
        self.run_dir.save_checkpoint(self.state.global_step, tensors, meta, self.keep_checkpoints)

    def load_checkpoint(self) -> None:
        """Restore the latest checkpoint of the run directory."""
        if self.run_dir is None:
            raise ConfigError("resuming needs a run directory")
        tensors, meta = self.run_dir.load_checkpoint()
        training = join_state(meta["state"], tensors)
        self.model.load_state_dict(training["model"])
        self.optimizer.load_state_dict(training["optimizer"])
        if self.scheduler is not None and training["scheduler"] is not None:
            self.scheduler.load_state_dict(training["scheduler"])
        self.balancer.load_state_dict(training["balancer"])
        torch.set_rng_state(training["rng"])
        if self.scaler is not None and training.get("scaler") is not None:
            self.scaler.load_state_dict(training["scaler"])
        self.state = TrainState(**meta["trainer"])
        if self.is_main:
            self.run_dir.truncate_metrics(self.state.metric_lines)
