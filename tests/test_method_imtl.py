"""IMTL-G and the hybrid IMTL against the paper's rules by hand, against LibMTL and torchjd, the
learned scales' gradient and state, and the parameter checks."""

from __future__ import annotations

import math

import pytest
import torch

import manytask as mt
from manytask.balance.aggregation.imtl import IMTL, IMTLG
from manytask.errors import ConfigError
from tests.peers import libmtl_direction, manytask_direction, require, torchjd_direction

# g₁ = (1, 0), g₂ = (1, 1): unit vectors u₁ = (1, 0), u₂ = (1, 1)/√2
JACOBIAN = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
ROOT2 = math.sqrt(2.0)


def test_imtl_g_by_hand():
    # Paper's closed form: D = g₁ − g₂ = (0, −1), U = u₁ − u₂ = (1 − 1/√2, −1/√2),
    # α₂ = g₁ᵀU / (DᵀU) = (1 − 1/√2)/(1/√2) = √2 − 1, α₁ = 1 − α₂ = 2 − √2.
    # d = α₁g₁ + α₂g₂ = (1, √2 − 1): u₁ᵀd = 1 and u₂ᵀd = (1 + √2 − 1)/√2 = 1, equal.
    balancer = IMTLG(["a", "b"])
    w = balancer.weights(JACOBIAN @ JACOBIAN.T, torch.ones(2))
    assert torch.allclose(w, torch.tensor([2 - ROOT2, ROOT2 - 1], dtype=torch.float64))
    d = balancer.direction(JACOBIAN, torch.ones(2))
    assert torch.allclose(d, torch.tensor([1.0, ROOT2 - 1], dtype=torch.float64))


def test_imtl_g_zero_and_duplicate_gradients():
    # a zero gradient gets weight 0; a duplicated gradient shares the weight of its copy
    jacobian = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    w = IMTLG(["a", "b", "c"]).weights(jacobian @ jacobian.T, torch.ones(3))
    assert torch.allclose(w, torch.tensor([2 - ROOT2, ROOT2 - 1, 0.0], dtype=torch.float64))
    jacobian = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    d = IMTLG(["a", "b", "c"]).direction(jacobian, torch.ones(3))
    assert torch.allclose(d, torch.tensor([1.0, ROOT2 - 1], dtype=torch.float64))
    assert torch.equal(IMTLG(["a", "b"]).weights(torch.zeros(2, 2), torch.ones(2)), torch.zeros(2))


def paper_closed_form(jacobian: torch.Tensor) -> torch.Tensor:
    """α₂:T = g₁Uᵀ(DUᵀ)⁻¹ with D = [g₁ − gᵢ], U = [u₁ − uᵢ] (i ≥ 2), α₁ = 1 − Σα₂:T."""
    units = jacobian / jacobian.norm(dim=1, keepdim=True)
    d, u = jacobian[:1] - jacobian[1:], units[:1] - units[1:]
    rest = jacobian[0] @ u.T @ torch.linalg.inv(d @ u.T)
    return torch.cat([1.0 - rest.sum().reshape(1), rest])


@pytest.mark.parametrize("spread", [1e2, 1e4])
def test_imtl_g_keeps_a_much_shorter_gradient(spread):
    # the rank tolerance acts on the cosines: on G itself it counted a gradient more than about
    # 1,500× shorter than the largest as zero, and the direction went 20× wrong at 10⁴
    gen = torch.Generator().manual_seed(4)
    jacobian = torch.randn(4, 12, generator=gen, dtype=torch.float64)
    jacobian *= torch.tensor([[1.0], [3.0], [30.0], [spread]]) / jacobian.norm(dim=1, keepdim=True)
    w = IMTLG(list("abcd")).weights(jacobian @ jacobian.T, torch.ones(4))
    assert torch.allclose(w, paper_closed_form(jacobian), rtol=1e-9, atol=0.0)
    single = jacobian.float()  # the engine's float32 Jacobian: projections still equal
    d = IMTLG(list("abcd")).direction(single, torch.ones(4))
    projections = (single / single.norm(dim=1, keepdim=True)) @ d
    assert torch.allclose(projections, projections.mean().expand(4), rtol=1e-5)


def test_imtl_g_tells_nearly_opposite_float64_gradients_from_opposite_ones():
    # equal projections on u₁ and u₂ need α₁‖g₁‖ = α₂‖g₂‖, whatever the angle: α ∝ 1/‖gᵢ‖ and
    # d ∝ u₁ + u₂. At π − 1e-5 the cosines' small eigenvalue is 5e-11: a float64 Gramian keeps
    # it (tolerance 4.4e-16); float32's tolerance (2.4e-7) dropped it and returned no step,
    # which stopped IMTL-G where it met the Pareto front of benchmarks/toy_pareto.py
    gap = 1e-5
    jacobian = torch.tensor(
        [[2.0, 0.0], [-5.0 * math.cos(gap), 5.0 * math.sin(gap)]], dtype=torch.float64
    )
    w = IMTLG(["a", "b"]).weights(jacobian @ jacobian.T, torch.ones(2))
    assert torch.allclose(w, torch.tensor([5.0, 2.0], dtype=torch.float64) / 7.0, rtol=1e-6)
    d = w @ jacobian
    units = jacobian / jacobian.norm(dim=1, keepdim=True)
    assert torch.allclose(units @ d, (units @ d).mean().expand(2), rtol=1e-6)
    bisector = units.sum(0)  # d = α₁‖g₁‖(u₁ + u₂) = (10/7)(u₁ + u₂)
    assert torch.allclose(d, 10.0 / 7.0 * bisector, rtol=1e-6, atol=0.0)
    # in float32 the pair is opposite to within the Gramian's rounding: no step
    single = jacobian.float()
    assert torch.equal(IMTLG(["a", "b"]).weights(single @ single.T, torch.ones(2)), torch.zeros(2))


def random_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for t, p in [(2, 5), (3, 7), (4, 9), (5, 20), (8, 30)]:
        jacobian = torch.randn(t, p, generator=gen, dtype=torch.float64)
        yield jacobian, torch.rand(t, generator=gen, dtype=torch.float64) + 0.1


def test_imtl_g_matches_torchjd():
    """torchjd 0.18's ``IMTLG`` (``pinv(G)·norms``, normalised): tolerance 1e-6 of the largest
    gradient norm, the float32 precision of manytask's Jacobian (observed ≤ 3e-8)."""
    aggregation = require("torchjd.aggregation")
    for jacobian, losses in random_inputs():
        ours = manytask_direction("imtl_g", jacobian, losses)
        theirs = torchjd_direction(aggregation.IMTLG(), jacobian)
        assert (ours - theirs).abs().max() <= 1e-6 * jacobian.norm(dim=1).max()


def test_imtl_g_matches_libmtl():
    """LibMTL 1.1.5's ``IMTL`` with its loss scales at their initial value 0 is IMTL-G with the
    paper's closed form (``torch.inverse`` in float32): tolerance 1e-5 of the largest gradient
    norm (observed ≤ 1e-7)."""
    require("LibMTL")
    for jacobian, losses in random_inputs(seed=1):
        ours = manytask_direction("imtl_g", jacobian, losses)
        theirs = libmtl_direction("IMTL", jacobian, losses).double()
        assert (ours - theirs).abs().max() <= 1e-5 * jacobian.norm(dim=1).max()


def test_imtl_hybrid_by_hand():
    # scales e^s = (2, 1): scaled gradients 2g₁ = (2, 0), g₂ = (1, 1). G̃ = [[4, 2], [2, 2]],
    # ñ = (2, √2), G̃⁻¹ = [[½, −½], [−½, 1]], G̃⁻¹ñ = (1 − √2/2, √2 − 1), sum √2/2, so
    # α̃ = (√2 − 1, 2 − √2) and the weights on the raw gradients are w = e^s α̃ =
    # (2√2 − 2, 2 − √2); d = w₁g₁ + w₂g₂ = (√2, 2 − √2), whose projections on u₁ and u₂ are
    # both √2. With loss values L = (3, 1) the scales' gradient is e^s L − 1 = (5, 0).
    balancer = IMTL(["a", "b"])
    with torch.no_grad():
        balancer.log_scale.copy_(torch.tensor([math.log(2.0), 0.0]))
    losses = torch.tensor([3.0, 1.0])
    w = balancer.weights(JACOBIAN @ JACOBIAN.T, losses)
    expected = torch.tensor([2 * ROOT2 - 2, 2 - ROOT2], dtype=torch.float64)
    assert torch.allclose(w, expected, rtol=1e-6)
    assert torch.allclose(balancer.log_scale.grad, torch.tensor([5.0, 0.0]), atol=1e-6)
    d = w @ JACOBIAN
    assert torch.allclose(d, torch.tensor([ROOT2, 2 - ROOT2], dtype=torch.float64), rtol=1e-6)


def test_imtl_hybrid_matches_libmtl_with_learned_scales(monkeypatch):
    """LibMTL's ``IMTL`` started from the same non-zero loss scales (its ``init_param`` patched
    to set them): same direction on the shared parameters, tolerance 1e-5 as above."""
    require("LibMTL")
    libmtl_imtl = require("LibMTL.weighting.IMTL").IMTL

    for jacobian, losses in random_inputs(seed=2):
        t = jacobian.shape[0]
        scales = torch.linspace(-0.7, 0.9, t)

        def init_param(self, scales=scales):
            self.loss_scale = torch.nn.Parameter(scales.clone())

        monkeypatch.setattr(libmtl_imtl, "init_param", init_param)
        theirs = libmtl_direction("IMTL", jacobian, losses).double()
        tasks = [f"t{i}" for i in range(t)]
        balancer = mt.balance.get("imtl", tasks)
        with torch.no_grad():
            balancer.log_scale.copy_(scales)
        ours = balancer.direction(jacobian, losses)
        assert (ours - theirs).abs().max() <= 1e-5 * jacobian.norm(dim=1).max()


def test_imtl_scales_learn_inverse_losses_and_state_round_trips():
    # descending e^s L − s drives e^s to 1/L
    balancer = mt.balance.get("imtl", ["a", "b"])
    optimizer = torch.optim.SGD(balancer.parameters(), lr=0.1)
    for _ in range(300):
        optimizer.zero_grad()
        w = torch.nn.Parameter(torch.zeros(2))
        losses = {"a": 4.0 + w[0], "b": 0.5 + w[1] + w[0]}
        balancer.backward(losses, shared=[w])
        optimizer.step()
    assert torch.allclose(
        balancer.log_scale.detach(), -torch.log(torch.tensor([4.0, 0.5])), atol=1e-4
    )
    restored = mt.balance.get("imtl", ["a", "b"])
    restored.load_state_dict(balancer.state_dict())
    assert torch.equal(restored.log_scale, balancer.log_scale)
    jacobian = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert torch.equal(
        restored.direction(jacobian, torch.ones(2)), balancer.direction(jacobian, torch.ones(2))
    )


def test_invalid_parameters():
    with pytest.raises(ConfigError, match="unknown key"):
        mt.balance.get("imtl_g", ["a", "b"], scale=1.0)
    with pytest.raises(ConfigError, match="unknown key"):
        mt.balance.get("imtl", ["a", "b"], init_scale=1.0)
