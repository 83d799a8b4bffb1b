import json
import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import manytask as mt
from manytask.config import parse_config
from manytask.errors import NonFiniteLossError, RunExistsError
from manytask.train import RunDirectory, Trainer
from manytask.train.build import build_experiment, run_training
from manytask.train.trainer import EarlyStopping, epoch_order

from .conftest import tiny_regression_bundle, tiny_trainer


def _config(tmp_path: Path, **train) -> dict:
    return {
        "name": "t",
        "seed": 5,
        "data": {
            "name": "mmoe_synthetic",
            "n_train": 300,
            "n_val": 64,
            "n_test": 64,
            "input_dim": 10,
        },
        "model": {
            "name": "shared_bottom",
            "encoder": {"name": "mlp", "hidden": [16], "dropout": 0.1},
        },
        "balancer": {"name": "rlw"},
        "optimizer": {"name": "adam", "lr": 0.01},
        "scheduler": {"name": "steplr", "step_size": 1, "gamma": 0.7},
        "train": {"epochs": 3, "batch_size": 32, "checkpoint_every": 4, "progress": False, **train},
        "run": {"dir": str(tmp_path / "runs")},
    }


def _trainer(bundle, tmp_path=None, **kwargs) -> Trainer:
    run_dir = RunDirectory.create(tmp_path / "run") if tmp_path is not None else None
    defaults = {"epochs": 3, "batch_size": 16, "run_dir": run_dir}
    return tiny_trainer(bundle, lr=kwargs.pop("lr", 1e-2), **{**defaults, **kwargs})


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from manytask.config import load_config
    from manytask.train.build import build_experiment
    from manytask.train.rundir import RunDirectory

    config = load_config(sys.argv[1], sys.argv[3:])
    kill_at = int(sys.argv[2])
    run_dir = RunDirectory.create(config.run.dir / config.run_name)
    run_dir.write_config(config.to_dict())
    experiment = build_experiment(config, run_dir)

    def kill(trainer):
        if trainer.state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    experiment.trainer.callbacks.append(kill)
    experiment.trainer.fit()
    """
)


@pytest.mark.parametrize("balancer", ["rlw", "dwa", "uw"])
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, balancer):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(_config(tmp_path)))
    cli = [sys.executable, "-m", "manytask.cli", "train", str(config_path), "--quiet"]
    balancer_set = f"balancer.name={balancer}"
    full = subprocess.run(
        [*cli, "--set", "run.name=full", "--set", balancer_set],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert full.returncode == 0, full.stderr

    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    steps_per_epoch = math.ceil(300 / 32)  # 10
    kill_at = steps_per_epoch + 7  # mid epoch 2, three steps after the checkpoint of step 16
    killed = subprocess.run(
        [
            sys.executable,
            str(script),
            str(config_path),
            str(kill_at),
            "run.name=killed",
            balancer_set,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = RunDirectory(tmp_path / "runs" / "killed")
    assert run.latest_step() == 16
    assert run.read_summary() is None
    assert len(run.read_metrics()) == 1  # epoch 1 was evaluated before the kill

    resumed = subprocess.run(
        [*cli, "--resume", "--set", "run.name=killed", "--set", balancer_set],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    a = RunDirectory(tmp_path / "runs" / "full")
    assert run.read_summary()["test"] == a.read_summary()["test"]

    def timeless(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert timeless(run.read_metrics()) == timeless(a.read_metrics())
    best_a, best_b = a.load_best(), run.load_best()
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


def test_nan_loss_stops_with_task_and_step_and_keeps_last_good_checkpoint(tmp_path):
    bundle = tiny_regression_bundle()
    trainer = _trainer(bundle, tmp_path, checkpoint_every=2)
    steps = trainer.steps_per_epoch  # 8

    def poison(t):  # from the 4th step of epoch 2 on, one target of task b is infinite
        if t.state.global_step == steps + 3:
            bundle.train.targets["b"][epoch_order(len(bundle.train), 0, 1)[16 * 3 + 2]] = float(
                "inf"
            )

    trainer.callbacks.append(poison)
    with pytest.raises(NonFiniteLossError, match=f"loss of task 'b' is inf at step {steps + 4}"):
        trainer.fit()
    run = trainer.run_dir
    assert run.latest_step() == steps + 2
    tensors, meta = run.load_checkpoint()
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if t.is_floating_point())
    assert meta["trainer"]["global_step"] == steps + 2


def test_nan_loss_from_the_cli_exits_1_without_traceback(tmp_path):
    data = _config(tmp_path)
    data["optimizer"] = {"name": "sgd", "lr": 1.0e30}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    result = subprocess.run(
        [sys.executable, "-m", "manytask.cli", "train", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "error: loss of task 'y" in result.stderr
    assert "at step" in result.stderr


def test_early_stopping_respects_lower_is_better():
    bundle = tiny_regression_bundle()
    # the validation MAE of task a falls every epoch: a lower-is-better metric must not stop
    trainer = _trainer(
        bundle, epochs=6, lr=3e-3, selection="a/mae", early_stopping=EarlyStopping(1)
    )
    summary = trainer.fit()
    assert not summary["stopped_early"]
    assert summary["best_epoch"] == 6
    # with nothing to learn (lr = 0) the score never improves: stop after 1 + patience epochs
    frozen = _trainer(bundle, epochs=6, lr=0.0, selection="a/mae", early_stopping=EarlyStopping(2))
    summary = frozen.fit()
    assert summary["stopped_early"]
    assert summary["epochs_run"] == 3
    assert summary["best_epoch"] == 1


def test_selection_score_signs_by_direction():
    trainer = _trainer(tiny_regression_bundle())
    results = {
        "a": {"mae": 2.0, "loss": 1.0},
        "b": {"mae": 4.0, "loss": 3.0},
        "c": {"accuracy": 0.5, "loss": 2.0},
    }
    assert trainer.selection_score(results) == pytest.approx((-2.0 - 4.0 + 0.5) / 3)
    trainer.selection = "c/accuracy"
    assert trainer.selection_score(results) == 0.5
    trainer.selection = "loss"
    assert trainer.selection_score(results) == -6.0
    with pytest.raises(mt.ConfigError, match="unknown selection 'a/accuracy'.*a/mae"):
        _trainer(tiny_regression_bundle(), selection="a/accuracy")


class _Recording:
    def __init__(self, data, log, trainer_ref):
        self.data, self.log, self.trainer_ref = data, log, trainer_ref

    def __len__(self):
        return len(self.data)

    def batch(self, indices):
        self.log.append(self.trainer_ref[0].state.epoch)
        return self.data.batch(indices)


def test_test_split_is_only_read_after_training():
    bundle = tiny_regression_bundle()
    log, ref = [], []
    bundle.test = _Recording(bundle.test, log, ref)
    trainer = _trainer(bundle, epochs=3)
    ref.append(trainer)
    trainer.fit()
    assert log
    assert set(log) == {3}


def test_existing_run_is_not_overwritten(tmp_path):
    config = parse_config(_config(tmp_path, epochs=1))
    run_training(config)
    with pytest.raises(RunExistsError, match="--overwrite"):
        run_training(config)
    before = RunDirectory(tmp_path / "runs" / "t").read_summary()
    assert before is not None
    run_training(config, overwrite=True)


def test_run_directory_holds_no_pickle_and_metrics_per_epoch(tmp_path):
    config = parse_config(_config(tmp_path))
    summary = run_training(config)
    root = tmp_path / "runs" / "t"
    suffixes = {p.suffix for p in root.rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json", ".jsonl", ".yaml"}
    records = RunDirectory(root).read_metrics()
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[1]["lr"][0] == pytest.approx(0.01 * 0.7)  # StepLR stepped per epoch
    assert summary["dataset"]["label_correlation"] == pytest.approx(
        json.loads((root / "summary.json").read_text())["dataset"]["label_correlation"]
    )
    assert yaml.safe_load((root / "config.yaml").read_text())["balancer"]["name"] == "rlw"


def test_balancer_parameters_must_be_in_the_optimizer():
    bundle = tiny_regression_bundle()
    model = mt.nn.SharedBottom(mt.nn.MLPEncoder((8,), [4]), bundle.tasks)
    uw = mt.balance.get("uw", bundle.tasks.names)
    with pytest.raises(mt.ConfigError, match="optimizer does not update"):
        Trainer(model, bundle.tasks, uw, torch.optim.SGD(model.parameters(), lr=0.1), bundle.train)


def test_experiment_from_config_trains_loss_down(tmp_path):
    config = parse_config(_config(tmp_path, epochs=4))
    experiment = build_experiment(config)
    before = experiment.trainer.evaluate(experiment.bundle.val)
    experiment.trainer.fit()
    after = experiment.trainer.evaluate(experiment.bundle.val)
    assert after["y1"]["loss"] < before["y1"]["loss"]
    assert after["y2"]["loss"] < before["y2"]["loss"]


def test_reduce_lr_on_plateau_watches_the_selection_score():
    bundle = tiny_regression_bundle()
    # a flat score: the rate falls tenfold after each epoch without improvement (patience 0)
    flat = _trainer(bundle, epochs=3, lr=1e-3)
    flat.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        flat.optimizer, mode="max", patience=0
    )
    flat.selection_score = lambda results: 0.0  # type: ignore[method-assign]
    flat.fit()
    assert flat.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.1**2)
    # a rising score in mode "min" is negated, so it counts as improving: no reduction
    rising = _trainer(bundle, epochs=3, lr=1e-3)
    rising.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        rising.optimizer, mode="min", patience=0
    )
    scores = iter([1.0, 2.0, 3.0, 4.0])
    rising.selection_score = lambda results: next(scores)  # type: ignore[method-assign]
    rising.fit()
    assert rising.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("balancer", ["ew", "mgda"])
def test_the_models_auxiliary_loss_is_trained(balancer):
    # a model term that no task loss touches (an extra parameter pulled to 3) must move, and
    # the balancer's gradients must be added to it, not replace it
    bundle = tiny_regression_bundle()
    torch.manual_seed(0)
    model = mt.nn.SharedBottom(mt.nn.MLPEncoder(bundle.input_shape, [16]), bundle.tasks)
    model.pull = torch.nn.Parameter(torch.zeros(()))
    model.auxiliary_loss = lambda: (model.pull - 3.0) ** 2
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = Trainer(
        model,
        bundle.tasks,
        mt.balance.get(balancer, bundle.tasks.names),
        optimizer,
        bundle.train,
        bundle.val,
        bundle.test,
        epochs=2,
        batch_size=16,
        progress=False,
    )
    before = [p.detach().clone() for p in model.encoder.parameters()]
    trainer.fit()
    # 16 SGD steps of x ← x + 0.1·(3 − x) from 0
    assert float(model.pull.detach()) == pytest.approx(3.0 * (1 - 0.9**16), rel=1e-5)
    after = list(model.encoder.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, after, strict=True))
