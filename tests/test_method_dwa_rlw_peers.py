"""DWA and random weighting against their peers over several steps: LibMTL 1.1.5's ``DWA``
(fed the epoch-mean losses its trainer keeps), LibMTL's ``RLW`` and torchjd's ``Random`` (both
drawing from the global torch generator, seeded as ours is). The formulas by hand are in
``test_balancers.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import manytask as mt
from tests.peers import (
    libmtl_step,
    libmtl_weighting,
    manytask_step,
    require,
    torchjd_direction,
)


@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_dwa_matches_libmtl_epoch_by_epoch(temperature):
    """Five epochs of four steps with random gradients and losses. LibMTL's trainer stores each
    epoch's mean training loss in ``train_loss_buffer[:, epoch]`` and sets ``epoch`` (from 0);
    its DWA weights from the third epoch on, as the paper and ours do."""
    tasks, size, epochs, steps = 3, 6, 5, 4
    gen = torch.Generator().manual_seed(1)
    ours = mt.balance.get("dwa", [f"t{i}" for i in range(tasks)], temperature=temperature)
    peer = libmtl_weighting("DWA", tasks, size)
    peer.train_loss_buffer = np.zeros((tasks, epochs))
    weighted_epochs = 0
    for epoch in range(epochs):
        peer.epoch = epoch
        seen = []
        for _ in range(steps):
            jacobian = torch.randn(tasks, size, generator=gen, dtype=torch.float64)
            # losses that fall at different rates, so the ratios differ between tasks
            values = torch.rand(tasks, generator=gen, dtype=torch.float64) + torch.tensor(
                [3.0, 2.0, 1.0], dtype=torch.float64
            ) / (1 + epoch * torch.arange(1, tasks + 1, dtype=torch.float64))
            seen.append(values)
            mine = manytask_step(ours, jacobian, values)
            theirs = libmtl_step(peer, jacobian, values, T=temperature)
            scale = float(jacobian.abs().sum(dim=0).max())
            assert (mine - theirs.double()).abs().max() <= 1e-5 * scale, (epoch, mine, theirs)
            if epoch >= 2:
                unequal = not torch.allclose(mine, jacobian.sum(dim=0))
                weighted_epochs += int(unequal)
        ours.end_epoch()
        peer.train_loss_buffer[:, epoch] = torch.stack(seen).mean(dim=0).numpy()
    # the comparison covered DWA's own weights, not only its warm-up at equal weights
    assert weighted_epochs == (epochs - 2) * steps


def test_rlw_matches_libmtl_normal_with_the_same_draws():
    """LibMTL's ``RLW`` with ``dist='Normal'`` draws ``N(0, I)`` from the global generator and
    weights the losses by its softmax; ours draws the same normals from a generator seeded
    alike, so the directions agree step by step."""
    tasks, size, seed = 4, 7, 11
    gen = torch.Generator().manual_seed(2)
    ours = mt.balance.get("rlw", [f"t{i}" for i in range(tasks)], seed=seed)
    peer = libmtl_weighting("RLW", tasks, size)
    torch.manual_seed(seed)
    for _ in range(6):
        jacobian = torch.randn(tasks, size, generator=gen, dtype=torch.float64)
        values = torch.rand(tasks, generator=gen, dtype=torch.float64) + 0.1
        mine = manytask_step(ours, jacobian, values)
        theirs = libmtl_step(peer, jacobian, values, dist="Normal")
        scale = float(jacobian.abs().max())
        assert (mine - theirs.double()).abs().max() <= 1e-6 * scale


def test_random_matches_torchjd_random_with_the_same_draws():
    """torchjd's ``Random`` aggregator (the paper's Algorithm 2) combines the rows of ``J`` with
    ``softmax(N(0, I))`` drawn from the global generator in ``J``'s dtype; ``random`` gives the
    shared parameters that combination."""
    aggregation = require("torchjd.aggregation")
    tasks, size, seed = 5, 9, 4
    gen = torch.Generator().manual_seed(3)
    ours = mt.balance.get("random", [f"t{i}" for i in range(tasks)], seed=seed)
    peer = aggregation.Random()
    torch.manual_seed(seed)
    for _ in range(6):
        jacobian = torch.randn(tasks, size, generator=gen)
        values = torch.rand(tasks, generator=gen) + 0.1
        mine = manytask_step(ours, jacobian, values)
        theirs = torchjd_direction(peer, jacobian)
        assert torch.allclose(mine, theirs, atol=1e-6 * float(jacobian.abs().max()))
