"""Columns and the input layer: dense inputs flatten, tabular codes are embedded."""

from __future__ import annotations

import pytest
import torch

from manytask.columns import Columns
from manytask.errors import ConfigError
from manytask.nn.inputs import TabularInput, input_layer

COLUMNS = Columns(numeric=("age", "hours"), categorical=(("sex", 2), ("region", 3)))


def test_dense_inputs_are_flattened():
    layer, width = input_layer((1, 4, 5), None)
    assert width == 20
    assert layer(torch.zeros(3, 1, 4, 5)).shape == (3, 20)


def test_tabular_width_and_embedding_rows():
    layer, width = input_layer((4,), COLUMNS, embedding_dim=3)
    assert isinstance(layer, TabularInput)
    assert width == 2 + 2 * 3
    # one row per category plus the missing/unseen code, per column: (2 + 1) + (3 + 1)
    assert layer.embedding.weight.shape == (7, 3)


def test_codes_select_their_own_columns_rows():
    layer = TabularInput(COLUMNS, embedding_dim=2)
    with torch.no_grad():
        layer.embedding.weight.copy_(torch.arange(14.0).reshape(7, 2))
    x = torch.tensor([[0.5, -1.0, 1.0, 2.0]])
    out = layer(x)
    assert out[0, :2].tolist() == [0.5, -1.0]  # numeric columns unchanged
    assert out[0, 2:4].tolist() == [2.0, 3.0]  # sex = 1 → row 1
    assert out[0, 4:6].tolist() == [10.0, 11.0]  # region = 2 → row 3 + 2 = 5


def test_out_of_range_codes_read_as_missing():
    layer = TabularInput(COLUMNS, embedding_dim=2)
    x = torch.tensor([[0.0, 0.0, 9.0, -1.0], [0.0, 0.0, 2.0, 3.0]])
    out = layer(x)
    assert torch.equal(out[0], out[1])  # 9 and -1 both mean "missing", like codes 2 and 3


def test_gradients_reach_only_the_rows_used():
    layer = TabularInput(COLUMNS, embedding_dim=2)
    layer(torch.tensor([[0.0, 0.0, 0.0, 1.0]])).sum().backward()
    used = layer.embedding.weight.grad.abs().sum(dim=1) > 0
    assert used.tolist() == [True, False, False, False, True, False, False]


def test_lookup_equals_nn_embedding_with_repeated_codes():
    # the CPU path gathers with index_select (its backward is an index_add); values and
    # gradients equal nn.Embedding's, codes repeated across rows accumulating
    layer = TabularInput(COLUMNS, embedding_dim=3)
    x = torch.tensor([[0.1, 0.2, 1.0, 2.0], [0.3, 0.4, 1.0, 2.0], [0.5, 0.6, 0.0, 9.0]])
    weights = torch.randn(x.shape[0], layer.out_features)
    (layer(x) * weights).sum().backward()
    reference = torch.nn.Embedding.from_pretrained(layer.embedding.weight.detach(), freeze=False)
    rows = torch.tensor([[1, 5], [1, 5], [0, 6]])  # codes + offsets (3 + code; 9 → missing, 3)
    embedded = reference(rows).flatten(1)
    (embedded * weights[:, 2:]).sum().backward()
    assert torch.equal(layer(x)[:, 2:], embedded)
    assert torch.allclose(layer.embedding.weight.grad, reference.weight.grad, atol=1e-6)


def test_bad_columns_are_refused():
    with pytest.raises(ConfigError, match="unique"):
        Columns(numeric=("a",), categorical=(("a", 2),))
    with pytest.raises(ConfigError, match="at least one"):
        Columns()
    with pytest.raises(ConfigError, match="does not match"):
        input_layer((5,), COLUMNS)
