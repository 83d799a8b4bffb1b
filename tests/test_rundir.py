import json

import pytest
import torch

from manytask import atomic
from manytask.errors import ManytaskError, RunExistsError
from manytask.evaluate.leaderboard import Stat
from manytask.train.rundir import RunDirectory
from manytask.train.statefile import join_state, split_state


def test_state_round_trip_keeps_tuples_int_keys_and_tensors():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.randn(3))], lr=0.1, betas=(0.8, 0.9))
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    state = {
        "optimizer": opt.state_dict(),
        "rng": torch.get_rng_state(),
        "none": None,
        "x": [1, 2.5, "s"],
    }
    tensors, skeleton = split_state(state, "s")
    json.dumps(skeleton)  # the skeleton is plain JSON
    back = join_state(json.loads(json.dumps(skeleton)), tensors)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert set(back["optimizer"]["state"]) == {0}
    assert torch.equal(
        back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
    assert torch.equal(back["rng"], state["rng"])
    assert back["x"] == [1, 2.5, "s"] and back["none"] is None


def test_state_refuses_objects_it_would_have_to_pickle():
    with pytest.raises(ManytaskError, match="cannot save state entry 's.f'.*nothing is pickled"):
        split_state({"f": object()}, "s")


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic.write_json(tmp_path / "a.json", {"k": 1})
    atomic.write_json(tmp_path / "a.json", {"k": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"k": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]

    def fail(path):
        path.write_text("partial")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        atomic.write_with(tmp_path / "a.json", fail)
    assert json.loads((tmp_path / "a.json").read_text()) == {"k": 2}  # the old content survives
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_checkpoints_rotate_and_latest_points_at_the_newest(tmp_path):
    run = RunDirectory.create(tmp_path / "r")
    for step in (10, 20, 30):
        run.save_checkpoint(step, {"w": torch.full((2,), float(step))}, {"step": step}, keep=2)
    assert run.latest_step() == 30
    tensors, meta = run.load_checkpoint()
    assert meta == {"step": 30} and float(tensors["w"][0]) == 30.0
    names = sorted(p.name for p in run.checkpoints.iterdir())
    assert names == [
        "latest.json",
        "step-00000020.json",
        "step-00000020.safetensors",
        "step-00000030.json",
        "step-00000030.safetensors",
    ]


def test_create_refuses_existing_runs_and_resume_needs_a_checkpoint(tmp_path):
    run = RunDirectory.create(tmp_path / "r")
    run.write_config({"a": 1})
    with pytest.raises(RunExistsError, match="--overwrite"):
        RunDirectory.create(tmp_path / "r")
    with pytest.raises(ManytaskError, match="nothing to resume"):
        RunDirectory.create(tmp_path / "r", resume=True)
    assert RunDirectory.create(tmp_path / "r", overwrite=True).read_metrics() == []
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_metrics_are_truncated_to_the_checkpointed_count(tmp_path):
    run = RunDirectory.create(tmp_path / "r")
    for epoch in range(3):
        run.append_metrics({"epoch": epoch})
    run.truncate_metrics(2)
    assert [r["epoch"] for r in run.read_metrics()] == [0, 1]


def test_stat_formatting():
    assert Stat.of([1.0, 3.0]).format(1) == "2.0 ± 1.4"
    assert Stat.of([-0.0001, 0.0001, -0.0002]).format(2, signed=True).startswith("+0.00")
    assert Stat.of([0.5]).format(2) == "0.50"
