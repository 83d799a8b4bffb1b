"""Each weighting method against its formula on inputs small enough to check by hand.

Shared parameter p = (p0, p1) at (1, 1); L1 = 2 p0 + p1 (gradient (2, 1), value 3) and
L2 = p0² (gradient (2, 0), value 1).
"""

import math

import pytest
import torch

import manytask as mt
from manytask.balance.weighting.dwa import DynamicWeightAverage
from manytask.balance.weighting.rlw import RandomLossWeighting
from manytask.balance.weighting.uw import UncertaintyWeighting
from manytask.errors import ConfigError, UnknownNameError
from tests.peers import libmtl_direction, manytask_direction, require, torchjd_direction

G1 = torch.tensor([2.0, 1.0])
G2 = torch.tensor([2.0, 0.0])


def losses_at_one():
    p = torch.nn.Parameter(torch.ones(2))
    return p, {"a": 2 * p[0] + p[1], "b": p[0] ** 2}


def test_every_method_is_registered_and_built_by_name():
    for name in ("ew", "uw", "dwa", "rlw"):
        balancer = mt.balance.get(name, tasks=["a", "b"])
        assert balancer.tasks == ("a", "b")
        assert balancer.needs is mt.balance.Need.LOSSES


def test_ew_gradient_is_the_sum_of_task_gradients():
    p, losses = losses_at_one()
    step = mt.balance.get("ew", tasks=["a", "b"]).backward(losses)
    assert torch.equal(step.weights, torch.ones(2))
    assert torch.allclose(p.grad, G1 + G2)


def test_uw_weights_gradients_and_log_variance_gradient_by_hand():
    uw = UncertaintyWeighting(["a", "b"])
    with torch.no_grad():
        uw.log_var.copy_(torch.tensor([0.0, math.log(2.0)]))
    p, losses = losses_at_one()
    step = uw.backward(losses)
    # w = ½ e^{-s} = (0.5, 0.25)
    assert torch.allclose(step.weights, torch.tensor([0.5, 0.25]))
    assert torch.allclose(p.grad, 0.5 * G1 + 0.25 * G2)
    # ∂/∂s (½ e^{-s} L + ½ s) = -½ e^{-s} L + ½ with L = (3, 1)
    assert torch.allclose(uw.log_var.grad, torch.tensor([-1.5 + 0.5, -0.25 + 0.5]))


def test_uw_log_variance_converges_to_log_loss():
    uw = UncertaintyWeighting(["a"], init_log_var=1.0)
    opt = torch.optim.SGD(uw.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        x = torch.tensor(4.0, requires_grad=True)
        uw.backward({"a": x})
        opt.step()
    assert float(uw.log_var.detach()) == pytest.approx(math.log(4.0), abs=1e-4)


def _dwa_epoch(dwa, values_per_step):
    weights = []
    for a, b in values_per_step:
        p = torch.nn.Parameter(torch.ones(()))
        weights.append(dwa.backward({"a": a * p, "b": b * p}).weights)
    dwa.end_epoch()
    return weights


def test_dwa_equal_weights_for_two_epochs_then_the_paper_formula():
    dwa = DynamicWeightAverage(["a", "b"], temperature=2.0)
    first = _dwa_epoch(dwa, [(1.0, 2.0), (3.0, 2.0)])  # epoch mean (2, 2)
    second = _dwa_epoch(dwa, [(1.0, 2.0)])  # epoch mean (1, 2)
    assert all(torch.equal(w, torch.ones(2)) for w in first + second)
    third = _dwa_epoch(dwa, [(5.0, 5.0)])[0]
    r = [1.0 / 2.0, 2.0 / 2.0]
    z = sum(math.exp(v / 2.0) for v in r)
    expected = [2 * math.exp(v / 2.0) / z for v in r]
    assert third.tolist() == pytest.approx(expected)
    # the next epoch uses means (1, 2) -> (5, 5): r = (5, 2.5)
    fourth = _dwa_epoch(dwa, [(1.0, 1.0)])[0]
    r = [5.0, 2.5]
    z = sum(math.exp(v / 2.0) for v in r)
    assert fourth.tolist() == pytest.approx([2 * math.exp(v / 2.0) / z for v in r])


def test_dwa_gradient_is_weighted_sum_and_state_resumes():
    dwa = DynamicWeightAverage(["a", "b"])
    _dwa_epoch(dwa, [(2.0, 1.0)])
    _dwa_epoch(dwa, [(1.0, 1.0)])
    restored = DynamicWeightAverage(["a", "b"])
    restored.load_state_dict(dwa.state_dict())
    p, losses = losses_at_one()
    step = dwa.backward(losses)
    assert torch.allclose(p.grad, step.weights[0] * G1 + step.weights[1] * G2)
    _p2, losses2 = losses_at_one()
    assert torch.equal(restored.backward(losses2).weights, step.weights)


def test_rlw_weights_are_softmax_of_seeded_gaussians():
    rlw = RandomLossWeighting(["a", "b"], seed=7)
    z = torch.randn(2, generator=torch.Generator().manual_seed(7))
    expected = torch.softmax(z, dim=0)
    p, losses = losses_at_one()
    step = rlw.backward(losses)
    assert torch.allclose(step.weights, expected)
    assert float(step.weights.sum()) == pytest.approx(1.0)
    assert torch.allclose(p.grad, expected[0] * G1 + expected[1] * G2)


def test_rlw_random_state_survives_state_dict():
    rlw = RandomLossWeighting(["a", "b", "c"], seed=3)
    for _ in range(5):
        p = torch.nn.Parameter(torch.ones(()))
        rlw.backward({t: p * 1.0 for t in "abc"})
    clone = RandomLossWeighting(["a", "b", "c"], seed=99)
    clone.load_state_dict(rlw.state_dict())
    p = torch.nn.Parameter(torch.ones(()))
    w1 = rlw.backward({t: p * 1.0 for t in "abc"}).weights
    w2 = clone.backward({t: p * 1.0 for t in "abc"}).weights
    assert torch.equal(w1, w2)


def test_task_specific_parameters_receive_their_weighted_task_gradient():
    shared = torch.nn.Parameter(torch.ones(()))
    head_a = torch.nn.Parameter(torch.tensor(2.0))
    head_b = torch.nn.Parameter(torch.tensor(3.0))
    uw = UncertaintyWeighting(["a", "b"], init_log_var=math.log(2.0))  # w = 0.25
    uw.backward({"a": shared * head_a, "b": shared * head_b})
    assert float(head_a.grad) == pytest.approx(0.25 * 1.0)
    assert float(head_b.grad) == pytest.approx(0.25 * 1.0)
    assert float(shared.grad) == pytest.approx(0.25 * (2.0 + 3.0))


def test_misuse_is_an_error():
    ew = mt.balance.get("ew", tasks=["a", "b"])
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ConfigError, match="missing \\['b'\\]"):
        ew.backward({"a": p.sum()})
    with pytest.raises(ConfigError, match="scalar tensor"):
        ew.backward({"a": p * 1, "b": p.sum()})
    with pytest.raises(ConfigError, match="does not require grad"):
        ew.backward({"a": p.sum().detach(), "b": p.sum()})
    with pytest.raises(UnknownNameError, match="unknown balancer 'uwx'.*Did you mean 'uw'"):
        mt.balance.get("uwx", tasks=["a"])
    with pytest.raises(ConfigError, match="unknown key 'temp'.*temperature"):
        mt.balance.get("dwa", tasks=["a"], temp=3)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        mt.balance.get("dwa", tasks=["a"], temperature=0)
    with pytest.raises(ConfigError, match="init_log_var must be a finite number"):
        mt.balance.get("uw", tasks=["a"], init_log_var=math.nan)


def test_ew_and_uw_match_libmtl():
    """LibMTL 1.1.5's ``EW`` (the sum) and ``UW`` (its log-variances start at −0.5; ours given the
    same start), on random gradients and loss values, in float32."""
    require("LibMTL")
    gen = torch.Generator().manual_seed(0)
    for t, p in [(2, 3), (3, 8), (5, 20)]:
        jacobian = torch.randn(t, p, generator=gen, dtype=torch.float64)
        values = torch.rand(t, generator=gen, dtype=torch.float64) + 0.1
        scale = jacobian.norm(dim=1).max()
        for ours, theirs in (
            (manytask_direction("ew", jacobian, values), libmtl_direction("EW", jacobian, values)),
            (
                manytask_direction("uw", jacobian, values, init_log_var=-0.5),
                libmtl_direction("UW", jacobian, values),
            ),
        ):
            assert (ours - theirs.double()).abs().max() <= 1e-6 * scale


def test_sum_matches_torchjd_sum():
    """``sum`` (an alias of ``ew``) against torchjd's ``Sum`` aggregator on random Jacobians."""
    aggregation = require("torchjd.aggregation")
    gen = torch.Generator().manual_seed(5)
    for t, p in [(2, 3), (6, 10)]:
        jacobian = torch.randn(t, p, generator=gen)
        values = torch.rand(t, generator=gen) + 0.1
        expected = torchjd_direction(aggregation.Sum(), jacobian)
        assert torch.allclose(manytask_direction("sum", jacobian, values), expected, atol=1e-6)
