"""The simplex projection, in torch and in numpy, against its definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from manytask.balance.solvers import simplex
from manytask.balance.solvers.simplex import project_simplex, simplex_qp


def by_bisection(v: np.ndarray) -> np.ndarray:
    """max(v − θ, 0) with θ found by bisection on Σ max(v − θ, 0) = 1 (the definition)."""
    low, high = v.min() - 1.0, v.max()
    for _ in range(200):
        theta = 0.5 * (low + high)
        if np.maximum(v - theta, 0.0).sum() > 1.0:
            low = theta
        else:
            high = theta
    return np.maximum(v - 0.5 * (low + high), 0.0)


@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_torch_and_numpy_projections_agree_with_the_definition(n):
    rng = np.random.default_rng(n)
    rows = rng.normal(scale=3.0, size=(5, n))
    rows[0] = 1.0 / n  # already on the simplex: unchanged
    rows[1, : n // 2] = rows[1, -1]  # ties
    batched = project_simplex(torch.from_numpy(rows)).numpy()
    for row, from_batch in zip(rows, batched, strict=True):
        expected = by_bisection(row)
        one = project_simplex(row)  # numpy, one vector
        assert isinstance(one, np.ndarray)
        np.testing.assert_allclose(one, expected, atol=1e-12)
        np.testing.assert_allclose(from_batch, expected, atol=1e-12)
        np.testing.assert_allclose(project_simplex(torch.from_numpy(row)).numpy(), one, atol=1e-15)
    np.testing.assert_allclose(project_simplex(rows), batched, atol=1e-15)  # numpy, batched
    np.testing.assert_allclose(project_simplex(rows[0]), rows[0], atol=1e-15)
    # a NaN entry: NaN throughout, in every kind
    spoiled = rows.copy()
    spoiled[:, n // 2] = np.nan
    assert np.isnan(project_simplex(spoiled[0])).all()
    assert np.isnan(project_simplex(spoiled)).all()
    assert torch.isnan(project_simplex(torch.from_numpy(spoiled))).all()
    # into a given array or tensor, for each kind of input
    for given in (rows[2], rows, torch.from_numpy(rows[2]), torch.from_numpy(rows)):
        out = given * 0 + 7.0
        returned = project_simplex(given, out=out)
        assert returned is out
        np.testing.assert_allclose(np.asarray(out), np.asarray(project_simplex(given)), atol=0)


@pytest.mark.parametrize("t", [3, 10, 40])
def test_simplex_qp_in_numpy_equals_the_torch_iterations(t):
    """On a CPU simplex_qp iterates in numpy; the torch iterations (those of a GPU) reach the
    same minimiser, and it satisfies the KKT conditions of the simplex."""
    gen = torch.Generator().manual_seed(t)
    for _ in range(5):
        jacobian = torch.randn(t, t + 5, generator=gen, dtype=torch.float64)
        jacobian[0] = jacobian[1]  # a duplicate task
        a = jacobian @ jacobian.T
        b = torch.randn(t, generator=gen, dtype=torch.float64) * 0.1
        w = simplex_qp(a, b)
        reference = simplex._fista(a, b, 300, 1e-9, may_stop=False)
        assert isinstance(w, torch.Tensor) and w.dtype == torch.float64
        assert float((w - reference).abs().max()) <= 1e-7
        assert float(w.min()) >= 0.0 and float(w.sum()) == pytest.approx(1.0, abs=1e-12)
        gradient = a @ w + b
        level = float((w * gradient).sum())
        assert float(gradient.min()) >= level - 1e-8 * (1 + float(gradient.abs().max()))


def test_a_non_finite_problem_raises_torch_linalg_error_without_numpy_warnings(recwarn):
    for value in (float("nan"), float("inf")):
        with pytest.raises(RuntimeError):  # torch's LinAlgError, as the torch iterations raise
            simplex_qp(torch.full((3, 3), value, dtype=torch.float64))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_polish_falls_back_to_least_squares_on_duplicate_tasks(monkeypatch):
    """The support's system of two equal gradients is singular: the LU solve gives up and
    least squares splits their weight evenly; a regular support never calls least squares."""
    calls = []
    lstsq = np.linalg.lstsq
    monkeypatch.setattr(np.linalg, "lstsq", lambda *a, **k: calls.append(1) or lstsq(*a, **k))
    gen = torch.Generator().manual_seed(2)
    jacobian = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    w = simplex_qp(jacobian @ jacobian.T)
    assert calls == []
    duplicated = torch.cat([jacobian, jacobian[:1]])
    v = simplex_qp(duplicated @ duplicated.T)
    assert calls and float(v[0]) == pytest.approx(float(v[3]), abs=1e-12)
    assert float(v[0] + v[3]) == pytest.approx(float(w[0]), abs=1e-9)  # the same direction
    assert v[1:3].tolist() == pytest.approx(w[1:3].tolist(), abs=1e-9)
