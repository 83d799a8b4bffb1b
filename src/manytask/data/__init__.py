"""Data: multi-task batches, in-memory datasets and the built-in datasets."""

from manytask.data.batch import MultiTaskBatch, MultiTaskDataset, TensorMultiTaskDataset
from manytask.data.bundle import DatasetBundle
from manytask.data.multi_fashion import multi_fashion
from manytask.data.synthetic import correlated_regression, mmoe_synthetic

__all__ = [
    "DatasetBundle",
    "MultiTaskBatch",
    "MultiTaskDataset",
    "TensorMultiTaskDataset",
    "correlated_regression",
    "mmoe_synthetic",
    "multi_fashion",
]
