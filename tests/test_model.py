import torch

import manytask as mt
from manytask.nn import CNNEncoder, MLPEncoder, SharedBottom, shared_bottom


def _tasks():
    return mt.TaskSet([mt.Task("c", "cross_entropy", output_dim=5), mt.Task("r", "mse")])


def test_shared_bottom_shapes_and_features():
    model = SharedBottom(MLPEncoder((3, 4), hidden=[16, 8]), _tasks(), head_hidden=[4])
    out, features = model(torch.randn(7, 3, 4), return_features=True)
    assert out["c"].shape == (7, 5)
    assert out["r"].shape == (7,)
    assert len(features) == 2
    assert all(f.shape == (7, 8) for f in features)
    assert features[0]._base is features[1]._base  # one view of the same features per head
    assert set(model(torch.randn(1, 3, 4))) == {"c", "r"}  # batch size 1 works


def test_parameter_split_is_a_partition():
    model = shared_bottom(
        _tasks(), (1, 28, 28), encoder={"name": "cnn", "channels": [4, 8], "hidden": 16}
    )
    assert isinstance(model.encoder, CNNEncoder)
    shared = {id(p) for p in model.shared_parameters()}
    heads = [{id(p) for p in model.task_parameters(t)} for t in ("c", "r")]
    everything = {id(p) for p in model.parameters()}
    assert shared | heads[0] | heads[1] == everything
    assert not (shared & heads[0])
    assert not (shared & heads[1])
    assert not (heads[0] & heads[1])


def test_each_head_gets_gradient_only_from_its_task():
    model = SharedBottom(MLPEncoder((6,), hidden=[5]), _tasks())
    out = model(torch.randn(3, 6))
    out["r"].sum().backward()
    assert all(p.grad is None for p in model.task_parameters("c"))
    assert all(p.grad is not None for p in model.task_parameters("r"))
    assert all(p.grad is not None for p in model.shared_parameters())
