from pathlib import Path

import numpy as np
import pytest
import torch

from manytask.data import correlated_regression, mmoe_synthetic, multi_fashion
from manytask.data.idx import read_idx
from manytask.data.multi_fashion import DEBIAN_FASHION_MNIST, overlay, pair_split
from manytask.errors import DataError

from .conftest import write_idx


def test_idx_round_trip_gz_and_raw(tmp_path: Path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", array)
    write_idx(tmp_path / "b", array, compress=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    assert np.array_equal(read_idx(tmp_path / "b"), array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


def test_overlay_places_items_takes_max_and_resizes_nearest():
    left = np.zeros((1, 28, 28), np.uint8)
    right = np.zeros((1, 28, 28), np.uint8)
    left[0, 0, 0] = 200  # top-left corner of the canvas
    left[0, 10, 10] = 50  # overlaps right's (4, 4)
    right[0, 4, 4] = 120
    right[0, 26, 26] = 90  # canvas (32, 32)
    out = overlay(left, right)
    assert out.shape == (1, 28, 28)
    # nearest sampling: output pixel i reads canvas floor((i + 0.5) * 36 / 28)
    src = ((np.arange(28) + 0.5) * 36 / 28).astype(int)
    canvas = np.zeros((36, 36), np.uint8)
    canvas[:28, :28] = left[0]
    canvas[6:34, 6:34] = np.maximum(canvas[6:34, 6:34], right[0])
    assert canvas[10, 10] == 120  # the maximum of 50 and 120
    assert np.array_equal(out[0], canvas[src][:, src])
    assert out[0, 0, 0] == 200
    assert out[0, list(src).index(32), list(src).index(32)] == 90


def test_pairing_never_pairs_an_item_with_itself():
    images = np.arange(50, dtype=np.uint8)[:, None, None] * np.ones((1, 28, 28), np.uint8)
    labels = np.arange(50) % 10
    composed, left, right = pair_split(images, labels, np.random.default_rng(1))
    assert np.array_equal(left, labels)
    # the bottom-right item is visible at canvas (33, 33), i.e. output pixel (25, 25)
    partner_ids = composed[:, 25, 25]
    assert np.all(partner_ids != np.arange(50))
    assert np.array_equal(labels[partner_ids], right)


def test_multi_fashion_from_a_user_folder_splits_without_sharing_items(fake_fashion_root):
    bundle = multi_fashion(root=str(fake_fashion_root), val_size=20, seed=3)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (100, 20, 40)
    assert bundle.tasks.names == ["left", "right"]
    assert bundle.input_shape == (1, 28, 28)
    batch = bundle.train.batch(torch.arange(4))
    assert batch.inputs.shape == (4, 1, 28, 28)
    assert batch.targets["left"].dtype == torch.int64
    # standardised with training statistics
    assert abs(float(bundle.train.inputs.mean())) < 1e-4
    again = multi_fashion(root=str(fake_fashion_root), val_size=20, seed=3)
    assert torch.equal(again.train.inputs, bundle.train.inputs)  # fixed seed, same data
    other = multi_fashion(root=str(fake_fashion_root), val_size=20, seed=4)
    assert not torch.equal(other.train.inputs, bundle.train.inputs)


def test_missing_fashion_mnist_names_the_folder_and_the_fix(tmp_path: Path):
    with pytest.raises(DataError, match=r"'.*nowhere' lacks train-images-idx3-ubyte.*data.root"):
        multi_fashion(root=str(tmp_path / "nowhere"))


@pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed (make test installs it)",
)
def test_real_multi_fashion_sizes_and_labels():
    bundle = multi_fashion()
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (50_000, 10_000, 10_000)
    for split in (bundle.train, bundle.val, bundle.test):
        for task in ("left", "right"):
            counts = torch.bincount(split.targets[task], minlength=10)
            assert counts.numel() == 10
            assert int(counts.min()) > 0.05 * len(split)


def test_synthetic_weight_cosine_is_the_nominal_correlation_and_labels_differ():
    for p in (-0.5, 0.0, 0.9):
        bundle = mmoe_synthetic(correlation=p, n_train=3000, n_val=100, n_test=100, seed=1)
        measured = bundle.info["label_correlation"]
        assert bundle.info["nominal_correlation"] == p
        assert -1 <= measured <= 1
        assert abs(measured - p) > 1e-3  # the sine terms move it away from p
    # with p = 1 both tasks share w: labels differ only by noise
    _x, y1, y2 = correlated_regression(2000, 1.0, seed=0)
    assert np.corrcoef(y1, y2)[0, 1] > 0.99
    assert np.std(y1 - y2) == pytest.approx(0.1 * np.sqrt(2), rel=0.1)
