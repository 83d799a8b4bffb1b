r"""Multi-task adapters: the LoRA family as configurations of one expert bank and router.

Every method computes

.. math::

    h = W x + s \sum_e g_e(x, t)\, B_e\, M_t\, A_e\, x

and differs in which matrices are shared, where the gates come from (the task of each sample,
a learned router per token, or none) and how fine-grained they are (adapter, rank, block of
features, output feature). ``manytask list adapters`` shows the methods; docs/adapters.md
describes each as a configuration.

::

    import manytask.adapters as ad

    adapted = ad.inject(model, "poly", targets=["query", "value"], tasks=["a", "b"], skills=4)
    out = adapted(input_ids=ids, task_ids=torch.tensor([0, 1, 1, 0]))  # a mixed-task batch
    ad.save_adapters(adapted, "adapters/", name="poly-ab")
    plain_a = adapted.export("a")                                      # W + ΔW_a, no adapters

Importing this package registers the methods under the registry kind ``adapter``.
"""

from __future__ import annotations

from manytask.adapters import methods
from manytask.adapters.alignment import alignment_loss
from manytask.adapters.context import TaskContext, TaskIds
from manytask.adapters.layer import AdapterLayer
from manytask.adapters.model import AdaptedModel, build_spec, find_modules, inject
from manytask.adapters.multitask import MultiTaskAdapterModel, first_token, mean_tokens
from manytask.adapters.routers import SoftTokenRouter, TaskRouter, TopKTokenRouter
from manytask.adapters.spec import AdapterSpec, RouterSpec
from manytask.adapters.storage import load_adapters, read_adapter_meta, save_adapters

__all__ = [
    "AdaptedModel",
    "AdapterLayer",
    "AdapterSpec",
    "MultiTaskAdapterModel",
    "RouterSpec",
    "SoftTokenRouter",
    "TaskContext",
    "TaskIds",
    "TaskRouter",
    "TopKTokenRouter",
    "alignment_loss",
    "build_spec",
    "find_modules",
    "first_token",
    "inject",
    "load_adapters",
    "mean_tokens",
    "methods",
    "read_adapter_meta",
    "save_adapters",
]
