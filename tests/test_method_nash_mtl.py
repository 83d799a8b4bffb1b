"""Nash-MTL against the paper's rule by hand, against torchjd, its state, and its parameter
checks (the solver itself is compared with the authors' cvxpy procedure in
``tests/test_solvers_nash.py``)."""

from __future__ import annotations

import math

import pytest
import torch

import manytask as mt
from manytask.balance.aggregation.nash_mtl import NashMTL
from manytask.errors import ConfigError
from tests.peers import manytask_direction, require, torchjd_direction

ONES = torch.ones(2, dtype=torch.float64)


def test_orthogonal_gradients_by_hand():
    # g₁ = (2, 0), g₂ = (0, 1): G = diag(4, 1); Gα = 1/α gives 4α₁² = 1, α₂² = 1: α = (½, 1),
    # d = (1, 1) with ‖d‖ = √2 = √T. Clipping to max_norm = 1 divides the weights by √2.
    jacobian = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    gramian = jacobian @ jacobian.T
    w = NashMTL(["a", "b"], max_norm=0.0).weights(gramian, ONES)
    assert torch.allclose(w, torch.tensor([0.5, 1.0], dtype=torch.float64), rtol=1e-10)
    w = NashMTL(["a", "b"]).weights(gramian, ONES)
    assert torch.allclose(w, torch.tensor([0.5, 1.0], dtype=torch.float64) / math.sqrt(2))


def test_correlated_gradients_by_hand():
    # g₁ = (1, 0), g₂ = (1, 1): G = [[1, 1], [1, 2]]. α₁(α₁ + α₂) = 1 and α₂(α₁ + 2α₂) = 1.
    # From the first, α₂ = 1/α₁ − α₁; in the second with x = α₁²: (1 − x)(2 − x) = x, i.e.
    # x² − 4x + 2 = 0, x = 2 − √2 (the root with α₂ > 0). Then gᵢᵀd = 1/αᵢ for both tasks.
    jacobian = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    alpha_1 = math.sqrt(2 - math.sqrt(2))
    expected = torch.tensor([alpha_1, 1 / alpha_1 - alpha_1], dtype=torch.float64)
    balancer = NashMTL(["a", "b"], max_norm=0.0)
    w = balancer.weights(jacobian @ jacobian.T, ONES)
    assert torch.allclose(w, expected, rtol=1e-10)
    d = balancer.direction(jacobian, ONES)
    assert torch.allclose(jacobian @ d, 1 / expected, rtol=1e-10)


def test_direction_is_scale_invariant():
    # α scales like 1/‖g‖, so d = Jᵀα does not change when J is scaled (not homogeneous)
    gen = torch.Generator().manual_seed(0)
    jacobian = torch.randn(3, 5, generator=gen, dtype=torch.float64) + 1.0
    balancer = NashMTL(["a", "b", "c"], max_norm=0.0)
    d = balancer.direction(jacobian, torch.ones(3))
    assert torch.allclose(balancer.direction(7.0 * jacobian, torch.ones(3)), d, rtol=1e-9)
    assert float(d.norm()) == pytest.approx(math.sqrt(3), rel=1e-9)  # ‖d‖² = αᵀGα = T


def random_inputs(seed: int = 0):
    """Gradients sharing a component: torchjd's solver (the authors' procedure) starts from
    α = 1 and needs G1 > 0 there; it keeps α = 1 when that fails."""
    gen = torch.Generator().manual_seed(seed)
    for t, p in [(2, 5), (3, 7), (4, 9), (5, 20), (8, 30)]:
        jacobian = torch.randn(t, p, generator=gen, dtype=torch.float64)
        jacobian = jacobian + torch.randn(p, generator=gen, dtype=torch.float64)
        assert bool((jacobian @ jacobian.T).sum(dim=1).min() > 0)
        yield jacobian, torch.rand(t, generator=gen, dtype=torch.float64) + 0.1


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("max_norm", [1.0, 0.0])
def test_matches_torchjd(max_norm):
    """torchjd 0.18's ``NashMTL`` is the authors' cvxpy/ECOS procedure (fresh instance, so no
    warm start) with the same ``max_norm`` clipping. Relative tolerance 1e-5 on the direction:
    ECOS's tolerance and the float32 Jacobian of manytask's engine (observed ≤ 1e-7)."""
    aggregation = require("torchjd.aggregation")
    for jacobian, losses in random_inputs():
        t = jacobian.shape[0]
        ours = manytask_direction("nash_mtl", jacobian, losses, max_norm=max_norm)
        theirs = torchjd_direction(aggregation.NashMTL(n_tasks=t, max_norm=max_norm), jacobian)
        assert (ours - theirs).norm() <= 1e-5 * theirs.norm()


def test_update_every_reuses_weights_and_state_round_trips():
    jacobian = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)

    def step(balancer, scale):
        w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        losses = {"a": scale * (jacobian[0] * w).sum(), "b": scale * (jacobian[1] * w).sum()}
        return balancer.backward(losses, shared=[w]).weights

    balancer = mt.balance.get("nash_mtl", ["a", "b"], update_every=2)
    first = step(balancer, 1.0)
    restored = mt.balance.get("nash_mtl", ["a", "b"], update_every=2)
    restored.load_state_dict(balancer.state_dict())
    # the next step reuses the weights (though the gradients doubled) in both
    assert torch.equal(step(balancer, 2.0), first)
    assert torch.equal(step(restored, 2.0), first)
    # then both recompute: weights halve with doubled gradients
    assert torch.allclose(step(balancer, 2.0), first / 2, rtol=1e-6)


def test_invalid_parameters():
    with pytest.raises(ConfigError, match="max_norm must be ≥ 0"):
        mt.balance.get("nash_mtl", ["a", "b"], max_norm=-1.0)
    with pytest.raises(ConfigError, match="iterations must be ≥ 1"):
        mt.balance.get("nash_mtl", ["a", "b"], iterations=0)
    with pytest.raises(ConfigError, match="unknown key"):
        mt.balance.get("nash_mtl", ["a", "b"], optim_niter=20)
