"""Expert banks and gates against their formulas, on inputs small enough to check by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from manytask.errors import ConfigError
from manytask.nn.experts import ExpertBank
from manytask.nn.gates import (
    DSelectKGate,
    FeatureGate,
    HierarchicalGate,
    NoisyTopKGate,
    SoftmaxGate,
    cv_squared,
    mix,
    smooth_step,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- expert bank


def _separate_mlps(bank: ExpertBank) -> list[nn.Sequential]:
    """E ordinary MLPs (Linear → ReLU per layer) holding copies of the bank's weights."""
    mlps = []
    for e in range(bank.num_experts):
        layers: list[nn.Module] = []
        for weight, bias in zip(bank.weights, bank.biases, strict=True):
            linear = nn.Linear(weight.shape[1], weight.shape[2])
            with torch.no_grad():
                linear.weight.copy_(weight[e].T)
                linear.bias.copy_(bias[e])
            layers += [linear, nn.ReLU()]
        mlps.append(nn.Sequential(*layers))
    return mlps


def test_expert_bank_equals_a_loop_of_separate_mlps_for_a_shared_input():
    torch.manual_seed(0)
    bank = ExpertBank(3, 5, [4, 6])
    mlps = _separate_mlps(bank)
    x = torch.randn(7, 5)
    out = bank(x)
    assert out.shape == (7, 3, 6)
    for e, mlp in enumerate(mlps):
        torch.testing.assert_close(out[:, e], mlp(x))
    # and the gradients of each expert's weights are those of its own MLP
    out.pow(2).sum().backward()
    for e, mlp in enumerate(mlps):
        mlp(x).pow(2).sum().backward()
        torch.testing.assert_close(bank.weights[0].grad[e], mlp[0].weight.grad.T)
        torch.testing.assert_close(bank.biases[1].grad[e], mlp[2].bias.grad)


def test_expert_bank_equals_a_loop_for_one_input_per_expert():
    torch.manual_seed(1)
    bank = ExpertBank(4, 3, [5])
    mlps = _separate_mlps(bank)
    x = torch.randn(6, 4, 3)
    out = bank(x)
    for e, mlp in enumerate(mlps):
        torch.testing.assert_close(out[:, e], mlp(x[:, e]))


def test_expert_bank_is_initialised_like_linear_layers():
    torch.manual_seed(0)
    bank = ExpertBank(16, 25, [40, 10])
    for weight, bias in zip(bank.weights, bank.biases, strict=True):
        bound = 1 / math.sqrt(weight.shape[1])
        assert weight.abs().max() <= bound
        assert bias.abs().max() <= bound
        # uniform on [-b, b]: standard deviation b / √3, as nn.Linear's weights
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    # every expert differs (they are not copies of one another)
    assert not torch.allclose(bank.weights[0][0], bank.weights[0][1])


def test_expert_norm_normalises_each_expert_and_accepts_a_batch_of_one():
    torch.manual_seed(0)
    bank = ExpertBank(3, 4, [5], activation="silu", norm=True)
    x = torch.randn(64, 4) * 10 + 3
    out = bank(x)
    pre = torch.einsum("bi,eio->beo", x, bank.weights[0]) + bank.biases[0]
    mean = pre.mean(0, keepdim=True)
    var = pre.var(0, unbiased=False, keepdim=True)
    torch.testing.assert_close(out, torch.nn.functional.silu((pre - mean) / (var + 1e-5).sqrt()))
    running = bank.norm.running_mean.clone()
    assert bank(torch.randn(1, 4)).shape == (1, 3, 5)  # training mode, one sample
    torch.testing.assert_close(bank.norm.running_mean, running)  # no batch statistics from it
    bank.eval()
    assert bank(torch.randn(1, 4)).shape == (1, 3, 5)


def test_expert_bank_refuses_bad_settings():
    with pytest.raises(ConfigError, match="num_experts"):
        ExpertBank(0, 3, [4])
    with pytest.raises(ConfigError, match="hidden"):
        ExpertBank(2, 3, [])
    with pytest.raises(ConfigError, match="dropout"):
        ExpertBank(2, 3, [4], dropout=1.0)
    with pytest.raises(ConfigError, match="activation"):
        ExpertBank(2, 3, [4], activation="bogus")


# --------------------------------------------------------------------------- softmax gate


def test_softmax_gate_rows_are_probability_vectors_and_mix_weights_experts():
    torch.manual_seed(0)
    gate = SoftmaxGate(5, 4)
    w = gate(torch.randn(9, 5))
    assert w.shape == (9, 4)
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(9))
    experts = torch.randn(9, 4, 3)
    torch.testing.assert_close(mix(w, experts), (w.unsqueeze(-1) * experts).sum(1))
    assert gate.auxiliary_loss() is None


# --------------------------------------------------------------------------- noisy top-k


@pytest.mark.parametrize("train", [True, False])
def test_top_k_gate_keeps_exactly_k_experts_per_row(train):
    torch.manual_seed(0)
    gate = NoisyTopKGate(6, 5, k=2)
    with torch.no_grad():
        gate.w_gate.normal_()
        gate.w_noise.normal_()
    gate.train(train)
    x = torch.randn(32, 6)
    w = gate(x)
    assert ((w > 0).sum(1) == 2).all()
    torch.testing.assert_close(w.sum(1), torch.ones(32))
    if not train:  # no noise: the k largest clean logits are kept
        chosen = (x @ gate.w_gate).topk(2, dim=1).indices.sort(1).values
        assert torch.equal((w > 0).nonzero()[:, 1].view(32, 2), chosen)


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_load_balancing_loss_by_hand():
    """Two samples, three experts, k = 1: importance and the smooth load of Shazeer et al."""
    gate = NoisyTopKGate(2, 3, k=1, w_importance=0.1, w_load=0.1, noise_epsilon=0.0)
    with torch.no_grad():
        gate.w_gate.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.5, 1.0, 0.0]]))
        gate.w_noise.copy_(torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, -1.0]]))
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    torch.manual_seed(3)
    gate(x)
    torch.manual_seed(3)
    noise = torch.randn(2, 3)  # the same draw the gate made

    importance = [0.0, 0.0, 0.0]
    load = [0.0, 0.0, 0.0]
    for b in range(2):
        xb = x[b].tolist()
        clean = [sum(xb[i] * gate.w_gate[i, e].item() for i in range(2)) for e in range(3)]
        raw = [sum(xb[i] * gate.w_noise[i, e].item() for i in range(2)) for e in range(3)]
        std = [math.log1p(math.exp(r)) for r in raw]
        noisy = [clean[e] + noise[b, e].item() * std[e] for e in range(3)]
        best = max(range(3), key=lambda e: noisy[e])
        importance[best] += 1.0  # softmax over one kept logit
        for e in range(3):
            others = sorted((noisy[j] for j in range(3) if j != e), reverse=True)
            load[e] += _phi((clean[e] - others[0]) / std[e])  # k-th largest excluding e

    def cv2(v):
        mean = sum(v) / len(v)
        return sum((a - mean) ** 2 for a in v) / len(v) / mean**2

    expected = 0.1 * cv2(importance) + 0.1 * cv2(load)
    assert gate.auxiliary_loss().item() == pytest.approx(expected, rel=1e-5)


def test_load_loss_has_a_gradient_to_both_gating_matrices():
    torch.manual_seed(0)
    gate = NoisyTopKGate(4, 6, k=2)  # zero initialisation, as the paper prescribes
    gate(torch.randn(16, 4))
    gate.auxiliary_loss().backward()
    assert gate.w_gate.grad.abs().sum() > 0
    assert gate.w_noise.grad.abs().sum() > 0


def test_top_k_without_noise_counts_the_load():
    gate = NoisyTopKGate(2, 3, k=1).eval()
    with torch.no_grad():
        gate.w_gate.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    x = torch.tensor([[2.0, 0.0], [3.0, 1.0], [0.0, 1.0]])
    w = gate(x)  # experts 0, 0, 1 chosen, weight 1 each
    importance = torch.tensor([2.0, 1.0, 0.0])
    load = torch.tensor([2.0, 1.0, 0.0])
    expected = 0.1 * cv_squared(importance) + 0.1 * cv_squared(load)
    torch.testing.assert_close(w.sum(0), importance)
    torch.testing.assert_close(gate.auxiliary_loss(), expected)


def test_cv_squared_by_hand():
    # mean 2, population variance 2/3 → CV² = 1/6
    assert cv_squared(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(1 / 6)
    assert cv_squared(torch.tensor([4.0])).item() == 0.0


def test_top_k_refuses_k_outside_one_to_e():
    with pytest.raises(ConfigError, match="top_k"):
        NoisyTopKGate(3, 4, k=5)
    with pytest.raises(ConfigError, match="top_k"):
        NoisyTopKGate(3, 4, k=0)


# --------------------------------------------------------------------------- DSelect-k


@pytest.mark.parametrize(
    ("gamma", "t", "expected"),
    [
        (1.0, -0.6, 0.0),
        (1.0, -0.5, 0.0),
        (1.0, -0.25, 0.15625),  # -2(-1/64) + 3(-1/4)/2 + 1/2
        (1.0, 0.0, 0.5),
        (1.0, 0.25, 0.84375),  # -2/64 + 3/8 + 1/2
        (1.0, 0.5, 1.0),
        (2.0, 0.5, 0.84375),  # -2(1/8)/8 + 3(1/2)/4 + 1/2
        (2.0, 0.9, 0.99275),  # -2(0.729)/8 + 2.7/4 + 1/2
        (2.0, -1.5, 0.0),
        (2.0, 1.0, 1.0),
    ],
)
def test_smooth_step_by_hand(gamma, t, expected):
    value = smooth_step(torch.tensor(t, dtype=torch.float64), gamma).item()
    assert value == pytest.approx(expected, abs=1e-12)


def test_smooth_step_is_continuously_differentiable_at_its_joints():
    for gamma in (1.0, 2.0):
        for edge in (-gamma / 2, gamma / 2):
            t = torch.tensor(edge, dtype=torch.float64, requires_grad=True)
            cubic = -2 / gamma**3 * t**3 + 3 / (2 * gamma) * t + 0.5
            (slope,) = torch.autograd.grad(cubic, t)
            assert slope.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("per_sample", [True, False])
def test_dselect_k_weights_are_a_probability_vector(per_sample):
    torch.manual_seed(0)
    gate = DSelectKGate(8, k=3, in_features=5 if per_sample else None)
    with torch.no_grad():
        for p in gate.z_params():
            p.uniform_(-0.3, 0.3)
    w = gate(torch.randn(10, 5))
    assert w.shape == (10, 8)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(10))
    assert gate.reads_input is per_sample


def _code(expert: int, bits: int, gamma: float) -> list[float]:
    """z saturated at ±γ so that the smooth-step returns exactly the bits of ``expert``."""
    return [gamma if (expert >> (bits - 1 - b)) & 1 else -gamma for b in range(bits)]


def test_saturated_static_selectors_pick_exactly_k_experts():
    gate = DSelectKGate(8, k=2, gamma=1.0, entropy_weight=0.1)
    with torch.no_grad():
        gate.z.copy_(torch.tensor([_code(5, 3, 1.0), _code(2, 3, 1.0)]))
        gate.w.copy_(torch.tensor([0.3, -0.4]))
    w = gate(torch.zeros(4, 1))
    alpha = torch.softmax(torch.tensor([0.3, -0.4]), 0)
    expected = torch.zeros(8)
    expected[5], expected[2] = alpha[0], alpha[1]
    assert ((w > 0).sum(1) == 2).all()
    torch.testing.assert_close(w, expected.expand(4, 8))
    # binary selectors have zero entropy, and 8 is a power of two: no penalty
    assert gate.auxiliary_loss().item() == pytest.approx(0.0, abs=1e-5)


def test_saturated_per_sample_selectors_pick_exactly_k_experts():
    gate = DSelectKGate(4, k=2, in_features=3, gamma=2.0)
    with torch.no_grad():
        gate.z_proj.weight.zero_()
        gate.z_proj.bias.copy_(torch.tensor([*_code(3, 2, 2.0), *_code(0, 2, 2.0)]))
    w = gate(torch.randn(6, 3))
    assert ((w > 0).sum(1) == 2).all()
    assert (w[:, [1, 2]] == 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(6))


def test_gamma_changes_the_gate():
    """The LibMTL bug: its smooth-step ignores γ. Here the same z gives other weights."""
    weights = []
    for gamma in (1.0, 2.0):
        gate = DSelectKGate(4, k=1, gamma=gamma)
        with torch.no_grad():
            gate.z.fill_(0.3)
            gate.w.zero_()
        weights.append(gate(torch.zeros(1, 1)))
    s1, s2 = smooth_step(torch.tensor(0.3), 1.0), smooth_step(torch.tensor(0.3), 2.0)
    torch.testing.assert_close(weights[0][0, 3], s1 * s1)  # expert 3 = code 11
    torch.testing.assert_close(weights[1][0, 3], s2 * s2)
    assert not torch.allclose(weights[0], weights[1])


def test_gamma_sets_the_initialisation_range_of_z():
    torch.manual_seed(0)
    gate = DSelectKGate(16, k=4, in_features=32, gamma=5.0)
    for p in gate.z_params():
        assert p.abs().max() <= 0.05
        assert p.abs().max() > 0.04


def test_entropy_regulariser_by_hand():
    gate = DSelectKGate(2, k=1, entropy_weight=0.5)
    with torch.no_grad():
        gate.z.fill_(0.25)  # S = 0.84375: weights (0.15625, 0.84375)
    gate(torch.zeros(3, 1))
    p = torch.tensor([0.15625, 0.84375])
    expected = 0.5 * -(p * torch.log(p + 1e-6)).sum()
    torch.testing.assert_close(gate.auxiliary_loss(), expected)


def test_unreachable_codes_are_penalised_when_e_is_not_a_power_of_two():
    gate = DSelectKGate(5, k=1, entropy_weight=0.0)  # 3 bits, codes 5, 6, 7 name no expert
    with torch.no_grad():
        gate.z.zero_()  # every code weighted 1/8: 5/8 on real experts
    w = gate(torch.zeros(2, 1))
    torch.testing.assert_close(w.sum(1), torch.full((2,), 5 / 8))
    assert gate.auxiliary_loss().item() == pytest.approx(8 / 5, rel=1e-4)
    with torch.no_grad():
        gate.z.copy_(torch.tensor([_code(4, 3, 1.0)]))
    w = gate(torch.zeros(2, 1))
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    assert gate.auxiliary_loss().item() == pytest.approx(1.0, rel=1e-4)


def test_dselect_k_refuses_bad_settings():
    with pytest.raises(ConfigError, match="gamma"):
        DSelectKGate(4, k=2, gamma=0.0)
    with pytest.raises(ConfigError, match="k must"):
        DSelectKGate(4, k=5)
    with pytest.raises(ConfigError, match="num_experts"):
        DSelectKGate(1, k=1)
    with pytest.raises(ConfigError, match="entropy_weight"):
        DSelectKGate(4, k=1, entropy_weight=-1.0)


# --------------------------------------------------------------------------- HoME gates


def test_hierarchical_gate_adds_a_self_gate_on_the_own_experts():
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    plain = HierarchicalGate(3, 4, own=2, self_gate=False)
    torch.testing.assert_close(plain(x).sum(1), torch.ones(5))
    one = HierarchicalGate(3, 4, own=1)
    w = one(x)
    base = torch.softmax(one.linear(x), -1)
    torch.testing.assert_close(w[:, :3], base[:, :3])
    torch.testing.assert_close(w[:, 3], base[:, 3] + torch.sigmoid(one.self_linear(x))[:, 0])
    two = HierarchicalGate(3, 4, own=2)
    torch.testing.assert_close(two(x).sum(1), torch.full((5,), 2.0))  # softmax + softmax


def test_feature_gate_is_the_identity_when_its_up_projection_is_zero():
    torch.manual_seed(0)
    gate = FeatureGate(4, 3, rank=2)
    x = torch.randn(6, 4)
    out = gate(x)
    assert out.shape == (6, 3, 4)
    assert not torch.equal(out[:, 0], out[:, 1])  # a private input per expert
    with torch.no_grad():
        gate.up.zero_()
    torch.testing.assert_close(gate(x), x.unsqueeze(1).expand(6, 3, 4))
    with torch.no_grad():
        gate.up.fill_(10.0)
    assert gate(x).abs().max() <= 2 * x.abs().max() + 1e-6  # 2σ(·) ∈ (0, 2)
