"""Fitted (data-driven) merging rules: they read each task's data through a model factory.

Importing this package registers ``fisher``, ``regmean``, ``adamerging_task``,
``adamerging_layer`` and ``surgery`` in the ``merge_rule`` registry kind (beside the data-free
rules; ``fitted = True`` tells them apart). See ``docs/merge-fitted.md``.
"""

from manytask.merge.fitted import adamerging, fisher, regmean, surgery
from manytask.merge.fitted.adamerging import AdaMerging, LayerWiseAdaMerging, TaskWiseAdaMerging
from manytask.merge.fitted.base import Experts, FittedRule
from manytask.merge.fitted.fisher import FisherMerging
from manytask.merge.fitted.regmean import RegMean
from manytask.merge.fitted.surgery import RepresentationSurgery, SurgeryModel, SurgeryModule

__all__ = [
    "AdaMerging",
    "Experts",
    "FisherMerging",
    "FittedRule",
    "LayerWiseAdaMerging",
    "RegMean",
    "RepresentationSurgery",
    "SurgeryModel",
    "SurgeryModule",
    "TaskWiseAdaMerging",
    "adamerging",
    "fisher",
    "regmean",
    "surgery",
]
