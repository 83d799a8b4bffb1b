"""Data: multi-task batches, in-memory datasets and the built-in datasets."""

from manytask.data import mixing
from manytask.data.batch import MultiTaskBatch, MultiTaskDataset, TensorMultiTaskDataset
from manytask.data.bundle import DatasetBundle
from manytask.data.multi_fashion import multi_fashion
from manytask.data.r_datasets import gss_wages, star
from manytask.data.synthetic import correlated_regression, mmoe_synthetic
from manytask.data.tabular import TargetSpec, load_table, tabular, tabular_bundle

__all__ = [
    "DatasetBundle",
    "MultiTaskBatch",
    "MultiTaskDataset",
    "TargetSpec",
    "TensorMultiTaskDataset",
    "correlated_regression",
    "gss_wages",
    "load_table",
    "mixing",
    "mmoe_synthetic",
    "multi_fashion",
    "star",
    "tabular",
    "tabular_bundle",
]
