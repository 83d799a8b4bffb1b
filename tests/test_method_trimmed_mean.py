"""The coordinate-wise trimmed mean by hand, against torchjd, and its parameter checks."""

from __future__ import annotations

import pytest
import torch

import manytask as mt
from manytask.balance.aggregation.trimmed_mean import TrimmedMean
from manytask.errors import ConfigError
from tests.peers import manytask_direction, require, torchjd_direction

# Five tasks, two coordinates:
#   column 0: 5, -1, 2, 100, 0 → sorted -1, 0, 2, 5, 100
#   column 1: 1, 1, 1, 1, -50  → sorted -50, 1, 1, 1, 1
J = torch.tensor([[5.0, 1.0], [-1.0, 1.0], [2.0, 1.0], [100.0, 1.0], [0.0, -50.0]])
NAMES = [f"t{i}" for i in range(5)]


@pytest.mark.parametrize(
    ("trim", "expected"),
    [
        (0, [106.0 / 5.0, -46.0 / 5.0]),  # plain means
        (1, [7.0 / 3.0, 1.0]),  # (0 + 2 + 5)/3 and (1 + 1 + 1)/3: the outliers are gone
        (2, [2.0, 1.0]),  # the medians
    ],
)
def test_trimmed_mean_by_hand(trim, expected):
    d = TrimmedMean(NAMES, trim_number=trim).direction(J, torch.ones(5))
    assert torch.allclose(d, torch.tensor(expected))


def test_default_trims_one_from_each_end_when_it_can():
    assert TrimmedMean(["a", "b"]).trim_number == 0
    assert TrimmedMean(["a", "b", "c"]).trim_number == 1
    assert TrimmedMean(NAMES).trim_number == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("trim", [0, 1, 2, 3])
def test_matches_torchjd(seed, trim):
    aggregation = require("torchjd.aggregation")
    g = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(7, 11, generator=g)
    values = torch.rand(7, generator=g) + 0.1
    got = manytask_direction("trimmed_mean", jacobian, values, trim_number=trim)
    expected = torchjd_direction(aggregation.TrimmedMean(trim_number=trim), jacobian)
    # the same sorted values averaged in float32: rounding only
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize(("tasks", "trim"), [(2, 1), (4, 2), (5, 3), (3, -1)])
def test_invalid_trim_number_is_refused(tasks, trim):
    with pytest.raises(ConfigError, match="trim_number"):
        mt.balance.get("trimmed_mean", [f"t{i}" for i in range(tasks)], trim_number=trim)


@pytest.mark.parametrize("trim", [0, 1, 2, 3])
def test_matches_sorting_with_tied_values(trim):
    # the fast paths (two column reductions for trim 1, topk beyond) against a full sort
    g = torch.Generator().manual_seed(trim)
    jacobian = torch.randint(-3, 4, (9, 50), generator=g).double()  # many ties
    jacobian[4] = jacobian[2]
    direction = TrimmedMean([f"t{i}" for i in range(9)], trim_number=trim).direction(
        jacobian, torch.ones(9)
    )
    expected = jacobian.sort(dim=0).values[trim : 9 - trim].mean(dim=0)
    assert torch.allclose(direction, expected, atol=1e-12)
