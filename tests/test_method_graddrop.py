"""GradDrop against the paper's rule by hand, against torchjd and LibMTL with aligned random
draws, its sign statistics, its state and its parameter checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import manytask as mt
from manytask.balance.aggregation.graddrop import GradDrop, graddrop_direction
from manytask.balance.randomness import lanes_to_uniform, uniform_lanes
from manytask.errors import ConfigError
from tests.peers import manytask_direction, require, torchjd_direction

# Two tasks, three coordinates:
#   coordinate 0: (1, 3)   both positive: P = ½(1 + 4/4) = 1 > U, positives kept → 4
#   coordinate 1: (-2, 1)  P = ½(1 - 1/3) = 1/3: U = 0.5 > P keeps the negative (-2),
#                          U = 0.2 < P keeps the positive (1)
#   coordinate 2: (0, 0)   no gradient: P = ½, direction 0
J = torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, 0.0]])


def test_direction_by_hand():
    no_leak = torch.zeros(2)
    keep_negative = graddrop_direction(J, torch.tensor([0.9, 0.5, 0.3]), no_leak)
    assert torch.equal(keep_negative, torch.tensor([4.0, -2.0, 0.0]))
    keep_positive = graddrop_direction(J, torch.tensor([0.9, 0.2, 0.3]), no_leak)
    assert torch.equal(keep_positive, torch.tensor([4.0, 1.0, 0.0]))
    # a tie: (-1, 3) has P = ½(1 + 2/4) = 0.75; U = 0.75 keeps neither sign (M = 0 for both)
    tie = torch.tensor([[-1.0], [3.0]])
    for leak in (None, no_leak):
        assert torch.equal(graddrop_direction(tie, torch.tensor([0.75]), leak), torch.zeros(1))
        assert torch.equal(graddrop_direction(tie, torch.tensor([0.7]), leak), torch.tensor([3.0]))


def test_leak_by_hand():
    # leak ½: the dropped component of coordinate 1 (task 2's +1) passes at half weight:
    # d1 = 1·(-2) + ½·1 = -1.5; kept components pass whole (ℓ + (1-ℓ)·1 = 1)
    d = graddrop_direction(J, torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.5, 0.5]))
    assert torch.equal(d, torch.tensor([4.0, -1.5, 0.0]))
    # a per-task leak: only task 2 leaks (ℓ₂ = 0.25): d1 = -2 + 0.25·1
    d = graddrop_direction(J, torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.0, 0.25]))
    assert torch.equal(d, torch.tensor([4.0, -1.75, 0.0]))


@pytest.mark.parametrize("leak", [None, (0.0, 0.3, 1.0, 0.5)])
def test_direction_equals_the_masked_sum_of_the_paper(leak):
    """The sums-of-signs form equals Σᵢ (ℓᵢ + (1 − ℓᵢ) Mᵢ) gᵢ with the masks of Algorithm 1,
    on random gradients with zero entries and zero columns."""
    g = torch.Generator().manual_seed(4)
    jacobian = torch.randn(4, 300, generator=g, dtype=torch.float64)
    jacobian[jacobian.abs() < 0.3] = 0.0
    jacobian[:, :20] = 0.0
    uniform = torch.rand(300, generator=g, dtype=torch.float64)
    leaks = torch.zeros(4, dtype=torch.float64) if leak is None else torch.tensor(leak).double()
    magnitude = jacobian.abs().sum(0)
    p = torch.where(magnitude > 0, 0.5 * (1 + jacobian.sum(0) / magnitude.clamp_min(1e-300)), 0.5)
    masks = ((p > uniform) & (jacobian > 0)) | ((p < uniform) & (jacobian < 0))
    expected = ((leaks[:, None] + (1 - leaks[:, None]) * masks) * jacobian).sum(0)
    result = graddrop_direction(jacobian, uniform, None if leak is None else leaks)
    assert torch.allclose(result, expected, rtol=1e-12, atol=1e-12)


def draws(count: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The uniform draws of a GradDrop balancer seeded with ``seed``, for its first step."""
    lanes = uniform_lanes(count, torch.Generator().manual_seed(seed))
    return lanes_to_uniform(lanes, dtype)


def test_balancer_uses_its_own_draws():
    balancer = GradDrop(["a", "b"], seed=7)
    expected = graddrop_direction(J, draws(3, 7), torch.zeros(2))
    assert torch.equal(balancer.direction(J, torch.ones(2)), expected)


def test_draws_are_the_midpoints_of_two_to_the_sixteen_cells():
    """Each draw is (k + ½)/2¹⁶ for an integer k in [0, 2¹⁶); 2¹⁸ draws fill the cells
    evenly: each quarter of (0, 1) holds a quarter of them (standard deviation 0.00085; 0.005
    is about six of them), the mean is ½, and both ends of the grid are reached."""
    uniform = draws(2**18, 0, torch.float64)
    cells = uniform * 2**16 - 0.5
    assert torch.equal(cells, cells.round()) and cells.min() >= 0 and cells.max() <= 2**16 - 1
    quarters = torch.bincount((uniform * 4).long(), minlength=4).double() / uniform.numel()
    assert (quarters - 0.25).abs().max() < 0.005, quarters
    assert abs(float(uniform.mean()) - 0.5) < 0.003
    assert cells.min() < 8 and cells.max() > 2**16 - 9
    odd = draws(5, 3)  # not a multiple of four lanes: the first five of eight
    assert torch.equal(odd, draws(8, 3)[:5])


def test_sign_is_kept_with_the_purity_probability():
    # 3000 copies of coordinate 1 (P = 1/3): the positive component should survive in about a
    # third of them (standard deviation √(⅓·⅔/3000) ≈ 0.0086; 0.04 is over 4.5 of them)
    column = torch.tensor([[-2.0], [1.0]]).repeat(1, 3000)
    d = GradDrop(["a", "b"], seed=0).direction(column, torch.ones(2))
    assert set(d.unique().tolist()) == {-2.0, 1.0}
    assert abs(float((d > 0).float().mean()) - 1.0 / 3.0) < 0.04


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_torchjd_with_the_same_draws(seed):
    aggregation = require("torchjd.aggregation")
    g = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(4, 50, generator=g)
    values = torch.rand(4, generator=g) + 0.1
    leak = [0.1, 0.0, 0.3, 0.0]
    got = manytask_direction("graddrop", jacobian, values, seed=100 + seed, leak=leak)
    # torchjd draws U = torch.rand(P) in J's dtype (float32): it is handed manytask's draws
    uniform = draws(50, 100 + seed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "rand", lambda *args, **kwargs: uniform.clone())
        expected = torchjd_direction(aggregation.GradDrop(leak=torch.tensor(leak)), jacobian)
    # same draws, same comparisons: only the float32 summation order can differ
    assert torch.allclose(got, expected, atol=1e-6)


def libmtl_graddrop(jacobian: torch.Tensor, values: torch.Tensor, leak: float) -> torch.Tensor:
    """LibMTL 1.1.5's GradDrop (it runs only on representations): a representation ``z`` of
    one sample with positive entries, so its sign is +1 and the batch sum is the row itself;
    task ``i``'s loss is ``⟨Jᵢ, z⟩``, so its gradient at ``z`` is ``Jᵢ``."""
    require("LibMTL")
    from LibMTL.weighting.GradDrop import GradDrop as Peer

    t, p = jacobian.shape

    class Harness(Peer):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.task_num = t
            self.task_name = [f"t{i}" for i in range(t)]
            self.device = torch.device("cpu")
            self.rep_grad = True

    harness = Harness()
    w = nn.Parameter(torch.zeros(p))
    harness.rep = (w + 1.0)[None]
    harness.rep_tasks = {
        name: harness.rep.detach().clone().requires_grad_(True) for name in harness.task_name
    }
    losses = [
        (jacobian[i] * harness.rep_tasks[name][0]).sum() + values[i]
        for i, name in enumerate(harness.task_name)
    ]
    harness.backward(torch.stack(losses), leak=leak)
    assert w.grad is not None
    return w.grad.detach().clone()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("leak", [0.0, 0.2])
def test_matches_libmtl_with_the_same_draws(seed, leak):
    g = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(3, 40, generator=g)
    values = torch.rand(3, generator=g) + 0.1
    got = manytask_direction("graddrop", jacobian, values, seed=seed, leak=leak)
    # LibMTL draws U = torch.rand_like(P) (float32): it is handed manytask's draws
    uniform = draws(40, seed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "rand_like", lambda like: uniform.clone().view_as(like))
        expected = libmtl_graddrop(jacobian, values, leak)
    # LibMTL adds 1e-7 to Σ|g| in P; that cannot flip a comparison with these draws
    assert torch.allclose(got, expected, atol=1e-6)


def test_feature_mode_runs_on_the_representation():
    torch.manual_seed(0)
    encoder = nn.Linear(3, 4)
    heads = [nn.Linear(4, 1), nn.Linear(4, 1)]
    z = encoder(torch.randn(5, 3))
    losses = {f"t{i}": head(z).pow(2).mean() for i, head in enumerate(heads)}
    balancer = mt.balance.get("graddrop", ["t0", "t1"], mode="features", seed=0)
    balancer.backward(losses, features=z)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())


def test_state_dict_resumes_the_draws():
    g = torch.Generator().manual_seed(0)
    jacobian = torch.randn(3, 20, generator=g)
    original = GradDrop(["a", "b", "c"], seed=1)
    original.direction(jacobian, torch.ones(3))
    restored = GradDrop(["a", "b", "c"], seed=2)
    restored.load_state_dict(original.state_dict())
    assert torch.equal(
        restored.direction(jacobian, torch.ones(3)), original.direction(jacobian, torch.ones(3))
    )


@pytest.mark.parametrize("leak", [-0.1, 1.5, [0.1, 2.0], [0.1, 0.1, 0.1]])
def test_invalid_leak_is_refused(leak):
    with pytest.raises(ConfigError, match="leak"):
        mt.balance.get("graddrop", ["a", "b"], leak=leak)
