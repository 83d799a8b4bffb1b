"""Tabular multi-task datasets: a CSV file, a Parquet file or a pandas DataFrame.

Some columns are *targets* (one task each), the others are *features*. The input of a row is
one float vector laid out as :class:`~manytask.columns.Columns` describes:

- **numeric features** are standardised with the mean and standard deviation of the *training
  split* (population std; a constant column is only centred). A missing value (empty, NaN,
  ±inf) becomes 0 after standardisation, the training mean. With ``missing_indicators`` (the
  default) every numeric column that has a missing value *in the training split* also gets a
  0/1 column ``<name>:missing``, placed after the numeric columns, so that a model can tell
  "missing" from "average";
- **categorical features** become integer codes ``0 … n − 1`` over the ``n`` values seen in the
  *training split* (sorted; a pandas ``category`` column keeps its own order); a missing value,
  or a value seen only in validation or test, gets the reserved code ``n``.

So nothing about the validation and test rows leaks into the inputs. A feature is categorical
when its column holds text, booleans or a pandas ``category``, or when it is listed in
``categorical`` (integer codes such as school ids); other numeric columns are numeric.

Targets (:class:`TargetSpec`): ``mse``/``l1`` regression (optionally on a log scale, and by
default standardised with the training split's labelled mean and std, reported in
``info["target_scale"]`` so that errors can be converted back), ``bce`` binary (0/1, booleans, or
two declared ``classes: [negative, positive]``) and ``cross_entropy`` (declared ``classes`` in
index order, or every labelled value of the column, sorted). A missing target stays missing:
NaN for regression and binary tasks, −1 for classes, so the losses and metrics skip it.

Splits: a ``split_column`` holding ``train``/``val``/``test`` per row, or a random split of the
rows with ``fractions`` (default 70/15/15) drawn with ``seed``.

Files are read with pandas (``.csv``, ``.tsv``, optionally compressed, and ``.parquet``); a
pickle is never loaded. Needs the ``tabular`` extra: ``pip install 'manytask[tabular]'``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from manytask import registry
from manytask.columns import Columns
from manytask.data.batch import TensorMultiTaskDataset
from manytask.data.bundle import DatasetBundle
from manytask.errors import ConfigError, DataError
from manytask.task import Task, TaskSet
from manytask.validation import format_validation_error

if TYPE_CHECKING:
    import pandas as pd

SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
CSV_SUFFIXES = (".csv", ".tsv", ".txt")
PARQUET_SUFFIXES = (".parquet", ".pq")
MISSING_SUFFIX = ":missing"

ClassValue = str | int | float | bool


class TargetSpec(BaseModel):
    """One target column and the task it defines.

    Args:
        loss: ``mse`` or ``l1`` (regression), ``bce`` (binary), ``cross_entropy`` (classes).
        column: the column holding the target (default: the task name).
        classes: ``cross_entropy``: the classes in index order (default: every labelled value of
            the column, sorted); ``bce``: ``[negative, positive]`` (default: the column holds
            0/1 or booleans). A labelled value outside ``classes`` is an error.
        transform: regression only: ``log`` takes the natural log (values ≤ 0 become missing).
        standardize: regression only: subtract the training split's mean and divide by its
            std (after ``transform``), so tasks of different units weigh alike.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    loss: Literal["mse", "l1", "bce", "cross_entropy"]
    column: str | None = None
    classes: list[ClassValue] | None = None
    transform: Literal["none", "log"] = "none"
    standardize: bool = True

    @model_validator(mode="before")
    @classmethod
    def _loss_shorthand(cls, data: Any) -> Any:
        """``targets: {price: mse}`` is short for ``targets: {price: {loss: mse}}``."""
        return {"loss": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _check_options(self) -> TargetSpec:
        regression = self.loss in ("mse", "l1")
        if not regression and self.transform != "none":
            raise ValueError(f"transform '{self.transform}' applies to mse/l1 targets only")
        if regression and self.classes is not None:
            raise ValueError("classes apply to bce and cross_entropy targets only")
        if self.loss == "bce" and self.classes is not None and len(self.classes) != 2:
            raise ValueError(
                f"a bce target needs classes: [negative, positive], got {self.classes}"
            )
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct, got {self.classes}")
        return self


def require_pandas() -> Any:
    """The pandas module, or a :class:`ConfigError` that says how to install it."""
    try:
        import pandas
    except ImportError:
        raise ConfigError(
            "tabular data needs pandas (and pyarrow for Parquet): pip install 'manytask[tabular]'"
        ) from None
    return pandas


def load_table(source: str | Path | pd.DataFrame) -> pd.DataFrame:
    """A DataFrame from a ``.csv``/``.tsv`` (optionally ``.gz``, ``.bz2``, ``.zip``, ``.xz``)
    or ``.parquet`` file, or the DataFrame itself. Pickles are refused: loading one runs code."""
    pandas = require_pandas()
    if isinstance(source, pandas.DataFrame):
        return source
    if not isinstance(source, (str, Path)):
        raise ConfigError(
            f"a table must be a CSV/Parquet path or a pandas DataFrame, got {type(source).__name__}"
        )
    path = Path(source)
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".zip", ".xz", ".zst"):
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    if suffix not in (*CSV_SUFFIXES, *PARQUET_SUFFIXES):
        pickled = suffix in (".pkl", ".pickle", ".pk", ".joblib")
        refused = " (pickles are never loaded: they can run code)" if pickled else ""
        raise ConfigError(
            f"data.path '{path}': unsupported file type '{suffix or path.name}'{refused}; "
            f"use {', '.join(CSV_SUFFIXES)} (optionally compressed) or "
            f"{', '.join(PARQUET_SUFFIXES)}"
        )
    if not path.is_file():
        raise DataError(
            f"data.path '{path}' does not exist (relative paths are read from the current "
            f"directory, {Path.cwd()})"
        )
    try:
        if suffix in PARQUET_SUFFIXES:
            return pandas.read_parquet(path)
        return pandas.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    except ImportError as exc:
        raise ConfigError(
            f"reading '{path}' needs {exc.name or 'pyarrow'}: pip install 'manytask[tabular]'"
        ) from None
    except Exception as exc:  # pandas and pyarrow raise many types for a bad file
        raise DataError(f"could not read '{path}': {exc}") from None


def _unknown_column(name: str, key: str, columns: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name, columns, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(
        f"unknown column '{name}' in data.{key}{hint}; the table's columns are: "
        f"{', '.join(columns)}"
    )


def _check_columns(names: Iterable[str], key: str, columns: Sequence[str]) -> None:
    for name in names:
        if name not in columns:
            raise _unknown_column(name, key, columns)


def parse_targets(
    targets: Mapping[str, TargetSpec | Mapping[str, Any] | str],
) -> dict[str, TargetSpec]:
    """Targets as :class:`TargetSpec` objects (dicts and loss-name strings are accepted)."""
    if not isinstance(targets, Mapping) or not targets:
        raise ConfigError(
            "data.targets must map task names to targets, e.g. "
            "{price: {loss: mse}, kind: {loss: cross_entropy}}"
        )
    parsed: dict[str, TargetSpec] = {}
    for name, spec in targets.items():
        if isinstance(spec, TargetSpec):
            parsed[name] = spec
            continue
        try:
            parsed[name] = TargetSpec.model_validate(spec)
        except ValidationError as exc:
            message = format_validation_error(exc, f"data.targets.{name}", TargetSpec)
            raise ConfigError(message) from None
    return parsed


def _sort_key(value: Any) -> tuple[int, Any]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, value) if isinstance(value, str) else (2, str(value))


def _sorted_values(values: Iterable[Any]) -> list[Any]:
    """Distinct values, sorted (numbers by value, text alphabetically; numbers before text)."""
    return sorted(dict.fromkeys(values), key=_sort_key)


def _is_categorical(series: pd.Series) -> bool:
    pandas = require_pandas()
    dtype = series.dtype
    if pandas.api.types.is_bool_dtype(dtype) or isinstance(dtype, pandas.CategoricalDtype):
        return True
    if pandas.api.types.is_numeric_dtype(dtype):
        return False
    if pandas.api.types.is_string_dtype(dtype) or pandas.api.types.is_object_dtype(dtype):
        return True
    raise ConfigError(
        f"column '{series.name}' has dtype {dtype}, which is neither numeric nor categorical; "
        "convert it (to numbers or text) or leave it out of data.features"
    )


def _as_float(series: pd.Series, what: str) -> np.ndarray:
    """A numeric column as float64, missing and non-finite values as NaN."""
    pandas = require_pandas()
    try:
        values = pandas.to_numeric(series, errors="raise")
        array: np.ndarray = np.array(values.to_numpy(dtype="float64", na_value=np.nan), np.float64)
    except (ValueError, TypeError):
        example = next((v for v in series.dropna().tolist() if not _number_like(v)), None)
        raise ConfigError(
            f"{what} needs a numeric column, but '{series.name}' holds values such as {example!r}"
        ) from None
    array[~np.isfinite(array)] = np.nan
    return array


def _number_like(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class FeaturePlan:
    """Which columns feed the input, and how."""

    numeric: tuple[str, ...]
    categorical: tuple[str, ...]


def plan_features(
    table: pd.DataFrame,
    target_columns: Mapping[str, str],
    features: Sequence[str] | None = None,
    categorical: Sequence[str] = (),
    exclude: Sequence[str] = (),
    split_column: str | None = None,
) -> FeaturePlan:
    """Choose and type the feature columns; every misuse is a :class:`ConfigError`.

    ``target_columns`` maps each target column to its task name. Without ``features`` every
    column that is neither a target, the split column nor in ``exclude`` is a feature.
    """
    columns = [str(c) for c in table.columns]
    if features is not None and exclude:
        raise ConfigError(
            "give data.features (the columns to use) or data.exclude (the columns to leave "
            "out), not both"
        )
    _check_columns(target_columns, "targets", columns)
    _check_columns(features or (), "features", columns)
    _check_columns(categorical, "categorical", columns)
    _check_columns(exclude, "exclude", columns)
    if split_column is not None:
        _check_columns([split_column], "split_column", columns)
    if features is None:
        skipped = {*target_columns, *exclude, *([split_column] if split_column else [])}
        chosen = [c for c in columns if c not in skipped]
    else:
        chosen = list(dict.fromkeys(features))
        for name in chosen:
            if name in target_columns:
                raise ConfigError(
                    f"column '{name}' is the target of task '{target_columns[name]}' and cannot "
                    "also be a feature; remove it from data.features"
                )
            if name == split_column:
                raise ConfigError(
                    f"column '{name}' is data.split_column and cannot also be a feature; remove "
                    "it from data.features"
                )
    for name in categorical:
        if name not in chosen:
            raise ConfigError(
                f"column '{name}' in data.categorical is not a feature; features are: "
                f"{', '.join(chosen) or '(none)'}"
            )
    if not chosen:
        raise ConfigError(
            "no feature columns are left after removing the targets"
            + (", the split column and data.exclude" if exclude or split_column else "")
        )
    forced = set(categorical)
    kinds = {name: name in forced or _is_categorical(table[name]) for name in chosen}
    return FeaturePlan(
        numeric=tuple(n for n in chosen if not kinds[n]),
        categorical=tuple(n for n in chosen if kinds[n]),
    )


def split_rows(
    table: pd.DataFrame,
    split_column: str | None = None,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Sorted row positions of ``train``, ``val`` and ``test``.

    From ``split_column`` (values ``train``, ``val``/``valid``/``validation``, ``test``, any
    case), or a random split with ``fractions`` (train, val, test; each > 0, sum 1) drawn with
    ``seed``: ``round(f·n)`` validation and test rows, the rest for training.
    """
    n = len(table)
    if split_column is not None:
        labels = table[split_column]
        normal = labels.astype("string").str.strip().str.lower().map(SPLIT_NAMES)
        bad = labels[normal.isna()]
        if len(bad):
            shown = ", ".join(repr(v) for v in list(dict.fromkeys(bad.tolist()))[:5])
            raise ConfigError(
                f"data.split_column '{split_column}' has values other than train, val, test "
                f"(e.g. {shown}, in {len(bad)} rows); every row needs one of them"
            )
        split_of = normal.to_numpy(dtype=object)
        rows = {s: np.flatnonzero(split_of == s) for s in SPLITS}
    else:
        if len(fractions) != 3 or any(not f > 0 for f in fractions):
            raise ConfigError(
                f"data.fractions must be three positive numbers (train, val, test), got "
                f"{list(fractions)}"
            )
        if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
            raise ConfigError(
                f"data.fractions must sum to 1, got {list(fractions)} = {sum(fractions):.6g}"
            )
        n_val, n_test = round(fractions[1] * n), round(fractions[2] * n)
        order = np.random.default_rng(seed).permutation(n)
        cuts = {
            "train": order[: n - n_val - n_test],
            "val": order[n - n_val - n_test : n - n_test],
            "test": order[n - n_test :],
        }
        rows = {s: np.sort(cuts[s]) for s in SPLITS}
    empty = [s for s in SPLITS if len(rows[s]) == 0]
    if empty:
        raise ConfigError(
            f"the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty "
            f"({n} rows); give more rows, other data.fractions or other data.split_column values"
        )
    return rows


def encode_features(
    table: pd.DataFrame, plan: FeaturePlan, train_rows: np.ndarray, missing_indicators: bool
) -> tuple[np.ndarray, Columns, dict[str, Any]]:
    """The ``(N, width)`` input matrix, its :class:`Columns` and the statistics used, every
    statistic taken from ``train_rows`` only."""
    pandas = require_pandas()
    numeric: list[np.ndarray] = []
    numeric_names: list[str] = []
    indicators: list[np.ndarray] = []
    indicator_names: list[str] = []
    stats: dict[str, Any] = {}
    for name in plan.numeric:
        x = _as_float(table[name], f"numeric feature '{name}'")
        train = x[train_rows]
        seen = train[~np.isnan(train)]
        mean = float(seen.mean()) if seen.size else 0.0
        std = float(seen.std()) if seen.size else 0.0
        scale = std if std > 0 and math.isfinite(std) else 1.0
        stats[name] = {"mean": mean, "std": scale}
        missing = np.isnan(x)
        numeric.append(np.where(missing, 0.0, (x - mean) / scale))
        numeric_names.append(name)
        if missing_indicators and bool(np.isnan(train).any()):
            indicators.append(missing.astype(np.float64))
            indicator_names.append(name + MISSING_SUFFIX)
    codes: list[np.ndarray] = []
    categorical: list[tuple[str, int]] = []
    for name in plan.categorical:
        series = table[name]
        seen = series.iloc[train_rows].dropna()
        if isinstance(series.dtype, pandas.CategoricalDtype):
            present = set(seen.tolist())
            categories = [c for c in series.dtype.categories.tolist() if c in present]
        else:
            categories = _sorted_values(seen.tolist())
        if not categories:
            raise ConfigError(
                f"categorical feature '{name}' has no value in the training split; leave it "
                "out (data.exclude) or fill it"
            )
        lookup = {value: code for code, value in enumerate(categories)}
        code = np.asarray(
            series.map(lookup).to_numpy(dtype="float64", na_value=np.nan), dtype=np.float64
        )
        codes.append(np.where(np.isnan(code), float(len(categories)), code))
        categorical.append((name, len(categories)))
        stats[name] = {"categories": categories}
    clash = [n for n in indicator_names if n in table.columns]
    if clash:
        raise ConfigError(
            f"column '{clash[0]}' clashes with the missing-value indicator manytask adds for "
            f"'{clash[0][: -len(MISSING_SUFFIX)]}'; rename it or set data.missing_indicators: false"
        )
    columns = Columns(numeric=(*numeric_names, *indicator_names), categorical=tuple(categorical))
    matrix = np.stack([*numeric, *indicators, *codes], axis=1).astype(np.float32)
    return matrix, columns, stats


def encode_target(
    name: str, spec: TargetSpec, series: pd.Series, train_rows: np.ndarray
) -> tuple[torch.Tensor, Task, dict[str, Any]]:
    """One task's target tensor (missing labels as NaN or −1), its :class:`Task` and facts."""
    facts: dict[str, Any] = {}
    what = f"target '{name}' (loss {spec.loss})"
    if spec.loss in ("mse", "l1"):
        y = _as_float(series, what)
        if spec.transform == "log":
            positive = y > 0
            facts["non_positive_masked"] = int(np.sum(~positive & ~np.isnan(y)))
            y = np.where(positive, np.log(np.where(positive, y, 1.0)), np.nan)
        if spec.standardize:
            train = y[train_rows]
            seen = train[~np.isnan(train)]
            mean = float(seen.mean()) if seen.size else 0.0
            std = float(seen.std()) if seen.size else 0.0
            std = std if std > 0 and math.isfinite(std) else 1.0
            y = (y - mean) / std
            facts["scale"] = {"mean": mean, "std": std}
        return torch.from_numpy(y.astype(np.float32)), Task(name, spec.loss), facts
    labelled = series.dropna()
    if spec.classes is not None:
        classes = list(spec.classes)
    elif spec.loss == "bce":
        classes = [0, 1]
    else:
        classes = _sorted_values(labelled.tolist())
    lookup = {value: index for index, value in enumerate(classes)}
    index = series.map(lookup)
    stray = labelled[index.loc[labelled.index].isna()]
    if len(stray):
        shown = ", ".join(repr(v) for v in list(dict.fromkeys(stray.tolist()))[:5])
        if spec.loss == "cross_entropy":
            hint = "add them to its classes"
        elif spec.classes is None:
            hint = "declare the two values as classes: [negative, positive]"
        else:
            hint = (
                "a bce target takes exactly two values; blank out the others or use cross_entropy"
            )
        raise ConfigError(
            f"{what}: column '{series.name}' holds values outside the classes {classes} "
            f"(e.g. {shown}); {hint}"
        )
    if spec.loss == "cross_entropy" and len(classes) < 2:
        raise ConfigError(
            f"{what}: column '{series.name}' has only one class {classes!r}; a cross_entropy "
            "task needs ≥ 2 classes (use another column or declare the classes)"
        )
    facts["classes"] = classes
    values = index.to_numpy(dtype="float64", na_value=np.nan)
    if spec.loss == "bce":
        return torch.from_numpy(values.astype(np.float32)), Task(name, "bce"), facts
    target = torch.from_numpy(np.where(np.isnan(values), -1, values).astype(np.int64))
    return target, Task(name, "cross_entropy", output_dim=len(classes)), facts


def tabular_bundle(
    table: str | Path | pd.DataFrame,
    targets: Mapping[str, TargetSpec | Mapping[str, Any] | str],
    features: Sequence[str] | None = None,
    categorical: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    split_column: str | None = None,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    missing_indicators: bool = True,
) -> DatasetBundle:
    """A :class:`DatasetBundle` from a table (see the module docstring for every rule).

    Args:
        table: a ``.csv``/``.tsv``/``.parquet`` path or a pandas DataFrame.
        targets: task name → :class:`TargetSpec` (or its dict, or just the loss name).
        features: the feature columns (default: all but targets, split column and ``exclude``).
        categorical: numeric columns to treat as categories (ids, codes).
        exclude: columns left out of the default features (ids, leaks).
        split_column: a column naming each row's split; otherwise a random split.
        fractions: train/val/test fractions of the random split.
        seed: seed of the random split.
        missing_indicators: add ``<name>:missing`` 0/1 columns for numeric features with
            missing training values.
    """
    source = str(table) if isinstance(table, (str, Path)) else None
    frame = load_table(table)
    columns = [str(c) for c in frame.columns]
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise ConfigError(f"the table has repeated column names: {', '.join(repeated)}")
    if len(frame) == 0:
        raise ConfigError(f"the table{f' {source!r}' if source else ''} has no rows")
    frame = frame.set_axis(columns, axis=1).reset_index(drop=True)
    specs = parse_targets(targets)
    target_columns: dict[str, str] = {}
    for name, spec in specs.items():
        target_columns.setdefault(spec.column or name, name)
    plan = plan_features(
        frame, target_columns, features, categorical or (), exclude or (), split_column
    )
    rows = split_rows(frame, split_column, fractions, seed)
    inputs, layout, encoding = encode_features(frame, plan, rows["train"], missing_indicators)
    tensors: dict[str, torch.Tensor] = {}
    tasks: list[Task] = []
    coverage: dict[str, float] = {}
    scales: dict[str, Any] = {}
    classes: dict[str, list[Any]] = {}
    masked: dict[str, int] = {}
    for name, spec in specs.items():
        target, task, facts = encode_target(name, spec, frame[spec.column or name], rows["train"])
        labelled = ~torch.isnan(target) if task.kind_ != "multiclass" else target >= 0
        if not bool(labelled[torch.from_numpy(rows["train"])].any()):
            raise ConfigError(
                f"target '{name}' has no label in the training split; check column "
                f"'{spec.column or name}'"
            )
        tensors[name] = target
        tasks.append(task)
        coverage[name] = round(float(labelled.double().mean()), 4)
        if "scale" in facts:
            scales[name] = facts["scale"]
        if "classes" in facts:
            classes[name] = facts["classes"]
        if facts.get("non_positive_masked"):
            masked[name] = facts["non_positive_masked"]
    full = TensorMultiTaskDataset(torch.from_numpy(inputs), tensors)
    info: dict[str, Any] = {}
    if source is not None:
        info["source"] = source
    info["sizes"] = {s: len(rows[s]) for s in SPLITS}
    info["split"] = (
        f"column {split_column}" if split_column else f"random {list(fractions)}, seed {seed}"
    )
    info["label_coverage"] = coverage
    info["numeric"] = list(layout.numeric)
    info["categorical"] = {name: size for name, size in layout.categorical}
    # what a model trained on this table expects of new rows: every numeric column's training
    # mean and std, every categorical column's categories in code order (the summary keeps it)
    info["encoding"] = encoding
    if scales:
        info["target_scale"] = scales
    if classes:
        info["classes"] = classes
    if masked:
        info["non_positive_masked"] = masked
    split_sets = {s: full.subset(torch.from_numpy(rows[s])) for s in SPLITS}
    return DatasetBundle(
        train=split_sets["train"],
        val=split_sets["val"],
        test=split_sets["test"],
        tasks=TaskSet(tasks),
        input_shape=(layout.width,),
        info=info,
        columns=layout,
    )


@registry.register("dataset", "tabular", "a CSV or Parquet table: target columns become tasks")
def tabular(
    path: str,
    targets: dict[str, TargetSpec],
    features: list[str] | None = None,
    categorical: list[str] | None = None,
    exclude: list[str] | None = None,
    split_column: str | None = None,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    missing_indicators: bool = True,
) -> DatasetBundle:
    """Tasks from the target columns of a ``.csv``/``.tsv``/``.parquet`` file at ``path``.

    ``targets`` maps task names to ``{loss, column, classes, transform, standardize}`` (or just
    a loss name); see :func:`tabular_bundle` for the other keys.
    """
    return tabular_bundle(
        path,
        targets,
        features=features,
        categorical=categorical,
        exclude=exclude,
        split_column=split_column,
        fractions=fractions,
        seed=seed,
        missing_indicators=missing_indicators,
    )
