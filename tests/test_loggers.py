"""TensorBoard and MLflow sinks: what they hold equals metrics.jsonl, resume, errors."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from manytask.config import parse_config
from manytask.errors import ConfigError, ManytaskError
from manytask.train import RunDirectory, Trainer
from manytask.train.build import run_training
from manytask.train.loggers import (
    MetricSink,
    MLflowSink,
    build_sinks,
    flatten_params,
    flatten_record,
    mlflow_name,
)

from .conftest import tiny_regression_bundle, tiny_trainer

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
needs_tensorboard = pytest.mark.skipif(
    not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install 'manytask[loggers]')"
)
needs_mlflow = pytest.mark.skipif(
    not HAS_MLFLOW, reason="mlflow is not installed (pip install 'manytask[loggers]')"
)
TASKS = ("y1", "y2")
METRICS = ("mae", "rmse", "r2", "loss")


@pytest.fixture(autouse=True)
def _offline_mlflow(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def _config(tmp_path: Path, epochs: int = 2, **run) -> dict:
    return {
        "name": "logged",
        "seed": 3,
        "data": {"name": "mmoe_synthetic", "n_train": 128, "n_val": 32, "n_test": 32},
        "model": {"name": "shared_bottom", "encoder": {"name": "mlp", "hidden": [8]}},
        "balancer": {"name": "dwa"},
        "optimizer": {"name": "adam", "lr": 0.01},
        "train": {"epochs": epochs, "batch_size": 32, "checkpoint_every": 0, "progress": False},
        "run": {"dir": str(tmp_path / "runs"), "loggers": ["tensorboard", "mlflow"], **run},
    }


def _expected_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every scalar, built by hand from metrics.jsonl and summary.json."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected: dict[str, list[tuple[int, float]]] = {}

    def add(tag: str, step: int, value: float) -> None:
        expected.setdefault(tag, []).append((step, value))

    for line in lines:
        step = line["step"]
        add("epoch", step, line["epoch"])
        add("seconds", step, line["seconds"])
        add("score", step, line["score"])
        for group, lr in enumerate(line["lr"]):
            add(f"lr/{group}", step, lr)
        for task in TASKS:
            add(f"train_loss/{task}", step, line["train_loss"][task])
            add(f"weights/{task}", step, line["weights"][task])
            for metric in METRICS:
                add(f"val/{task}/{metric}", step, line["val"][task][metric])
    summary = json.loads((run / "summary.json").read_text())
    for task in TASKS:
        for metric in METRICS:
            add(f"test/{task}/{metric}", summary["steps"], summary["test"][task][metric])
    return expected


def _tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def _assert_same(got, expected, rel):
    assert sorted(got) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=rel), tag


def _client(run: Path):
    from mlflow.tracking import MlflowClient

    stored = json.loads((run / "mlflow_run.json").read_text())
    return MlflowClient(stored["tracking_uri"]), stored["run_id"]


def _mlflow_scalars(client, run_id: str, names) -> dict[str, list[tuple[int, float]]]:
    return {
        name: [(m.step, m.value) for m in client.get_metric_history(run_id, name)] for name in names
    }


# flattening, by hand -------------------------------------------------------------------------
def test_flatten_record_joins_nested_keys_and_indexes_lists():
    record = {
        "epoch": 2,
        "step": 8,
        "train_loss": {"a": 0.5},
        "lr": [0.1, 0.01],
        "val": {"a": {"mae": 1.5, "loss": 2.0}},
        "note": "text",
        "missing": None,
    }
    assert flatten_record(record) == {
        "epoch": 2.0,
        "train_loss/a": 0.5,
        "lr/0": 0.1,
        "lr/1": 0.01,
        "val/a/mae": 1.5,
        "val/a/loss": 2.0,
    }


def test_flatten_params_keeps_strings_and_writes_the_rest_as_json():
    params = flatten_params(
        {"name": "x", "train": {"epochs": 3, "grad_clip": None}, "model": {"hidden": [8, 4]}}
    )
    assert params == {
        "name": "x",
        "train.epochs": "3",
        "train.grad_clip": "null",
        "model.hidden": "[8, 4]",
    }


def test_mlflow_names_keep_slashes_and_replace_what_mlflow_refuses():
    assert mlflow_name("val/y1/mae") == "val/y1/mae"
    assert mlflow_name("val/Δm%/r2") == "val/_m_/r2"
    assert mlflow_name("val/../x") == "val/_/x"
    assert mlflow_name("a//b:c") == "a/_/b_c"


# the Trainer's side, with a recording sink (no optional package needed) -----------------------
class RecordingSink:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def start(self, step: int) -> None:
        self.calls.append(("start", step))

    def log(self, record, step: int) -> None:
        self.calls.append(("log", step, json.loads(json.dumps(record))))

    def close(self, failed: bool = False) -> None:
        self.calls.append(("close", failed))


def _trainer(sink, **kwargs) -> Trainer:
    bundle = tiny_regression_bundle(n=64)
    return tiny_trainer(
        bundle, 4, torch.optim.SGD, 0.01, epochs=2, batch_size=16, sinks=[sink], **kwargs
    )


def test_trainer_sends_each_epoch_record_and_the_test_metrics_then_closes(tmp_path):
    sink = RecordingSink()
    assert isinstance(sink, MetricSink)
    run_dir = RunDirectory.create(tmp_path / "run")
    summary = _trainer(sink, run_dir=run_dir).fit()
    kinds = [call[0] for call in sink.calls]
    assert kinds == ["start", "log", "log", "log", "close"]
    assert sink.calls[0] == ("start", 0)
    assert [call[2] for call in sink.calls[1:3]] == run_dir.read_metrics()
    assert [call[1] for call in sink.calls[1:3]] == [2, 4]  # 32 samples / 16 per batch
    assert sink.calls[3] == ("log", 4, {"test": summary["test"]})
    assert sink.calls[4] == ("close", False)


def test_trainer_closes_its_sinks_as_failed_when_training_raises():
    sink = RecordingSink()
    trainer = _trainer(sink)

    def explode(t):
        if t.state.global_step == 3:
            raise RuntimeError("boom")

    trainer.callbacks.append(explode)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    assert [call[0] for call in sink.calls] == ["start", "log", "close"]
    assert sink.calls[-1] == ("close", True)


# config and missing packages ------------------------------------------------------------------
def test_an_unknown_logger_is_a_config_error_naming_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.loggers.*'tensorboard'.*'mlflow'.*'wandb'"):
        parse_config(_config(tmp_path, loggers=["wandb"]))


@pytest.mark.parametrize("logger", ["tensorboard", "mlflow"])  # each named for its package
def test_a_missing_package_names_the_extra_before_the_run_directory_exists(
    tmp_path, monkeypatch, logger
):
    monkeypatch.setitem(sys.modules, logger, None)  # makes `import <logger>` fail
    config = parse_config(_config(tmp_path, loggers=[logger]))
    with pytest.raises(ManytaskError, match=rf"'{logger}' logger.*manytask\[loggers\]"):
        run_training(config)
    assert not (tmp_path / "runs").exists()


# the real packages ----------------------------------------------------------------------------
@needs_tensorboard
@needs_mlflow
def test_tensorboard_and_mlflow_hold_the_values_of_metrics_jsonl(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    run_training(parse_config(_config(tmp_path)))
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # set around the sink's calls only
    run = tmp_path / "runs" / "logged"
    expected = _expected_scalars(run)
    assert len(expected["train_loss/y1"]) == 2
    _assert_same(_tensorboard_scalars(run / "tensorboard"), expected, rel=1e-6)  # float32

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client, run_id = _client(run)
    assert client.tracking_uri == (run / "mlruns").resolve().as_uri()
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.info.run_name == "logged"
    experiment = client.get_experiment_by_name("logged")
    assert mlflow_run.info.experiment_id == experiment.experiment_id
    params = mlflow_run.data.params
    assert params["balancer.name"] == "dwa"
    assert params["train.epochs"] == "2"
    assert params["model.encoder.hidden"] == "[8]"
    assert params["run.loggers"] == '["tensorboard", "mlflow"]'
    assert params["train.grad_clip"] == "null"
    assert sorted(mlflow_run.data.metrics) == sorted(expected)
    _assert_same(_mlflow_scalars(client, run_id, expected), expected, rel=1e-12)


@needs_tensorboard
@needs_mlflow
def test_a_failed_run_is_marked_failed_and_resume_continues_the_same_mlflow_run(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    original = Trainer._end_epoch

    def end_epoch_then_crash(self):
        original(self)
        raise KeyboardInterrupt  # after epoch 1 is logged and checkpointed

    monkeypatch.setattr(Trainer, "_end_epoch", end_epoch_then_crash)
    config = parse_config(_config(tmp_path, epochs=3))
    with pytest.raises(KeyboardInterrupt):
        run_training(config)
    run = tmp_path / "runs" / "logged"
    client, run_id = _client(run)
    assert client.get_run(run_id).info.status == "FAILED"
    monkeypatch.setattr(Trainer, "_end_epoch", original)

    run_training(config, resume=True)
    assert _client(run)[1] == run_id
    experiment = client.get_experiment_by_name("logged")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert client.get_run(run_id).info.status == "FINISHED"
    expected = _expected_scalars(run)
    assert [s for s, _ in expected["train_loss/y1"]] == [4, 8, 12]
    _assert_same(_mlflow_scalars(client, run_id, expected), expected, rel=1e-12)
    _assert_same(_tensorboard_scalars(run / "tensorboard"), expected, rel=1e-6)


@needs_tensorboard
@needs_mlflow
def test_resume_from_an_older_checkpoint_hides_the_replayed_epochs_in_tensorboard(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    config = parse_config(_config(tmp_path, epochs=2))
    run_training(config)
    run = tmp_path / "runs" / "logged"
    first_run_id = _client(run)[1]
    # as if the run had stopped after logging epoch 2 but before its checkpoint was written
    latest = run / "checkpoints" / "latest.json"
    latest.write_text(json.dumps({"step": 4, "stem": "step-00000004"}))
    run_training(config, resume=True)
    expected = _expected_scalars(run)
    assert [s for s, _ in expected["train_loss/y1"]] == [4, 8]
    # the events of the interrupted run after step 4 are purged: one value per step
    _assert_same(_tensorboard_scalars(run / "tensorboard"), expected, rel=1e-6)
    # MLflow cannot delete: epoch 2 is there twice, at the same step, with the same value
    client, run_id = _client(run)
    assert run_id == first_run_id
    history = _mlflow_scalars(client, run_id, ["train_loss/y1"])["train_loss/y1"]
    assert history == [expected["train_loss/y1"][0], *[expected["train_loss/y1"][1]] * 2]


@needs_mlflow
def test_mlflow_sink_with_a_given_store_reuses_the_experiment_and_ends_failed(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "shared-store").as_uri()
    run_ids = []
    for name in ("a", "b"):
        sink = MLflowSink(tmp_path / name, "exp", name, {"k": "v"}, tracking_uri=uri)
        sink.start(0)
        sink.log({"step": 1, "x": {"y": 2.5}}, 1)
        sink.close(failed=name == "b")
        run_ids.append(sink.run_id)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("exp")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["a", "b"]
    assert runs["a"].info.status == "FINISHED" and runs["b"].info.status == "FAILED"
    assert runs["a"].data.metrics == {"x/y": 2.5} and runs["a"].data.params == {"k": "v"}
    assert not (tmp_path / "a" / "mlruns").exists()
    assert build_sinks(parse_config(_config(tmp_path, loggers=[])), tmp_path) == []
