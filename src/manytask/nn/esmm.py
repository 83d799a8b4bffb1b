"""ESMM: post-click conversion learned over the entire impression space.

Ma, Zhao, Huang, Wang, Hu, Zhu and Gai, "Entire Space Multi-Task Model: An Effective Approach
for Estimating Post-Click Conversion Rate", SIGIR 2018, arXiv:1804.07931.

A shared input layer (embeddings of the categorical columns) feeds two MLP towers, a CTR tower
with logit ``z_ctr`` and a CVR tower with logit ``z_cvr``. The model predicts, on every
impression::

    p(ctr)   = σ(z_ctr)                            click
    p(ctcvr) = p(ctr) · p(cvr) = σ(z_ctr) σ(z_cvr)   click and convert

and is trained with ``L = BCE(y_click, p(ctr)) + BCE(y_click·y_convert, p(ctcvr))`` over all
impressions. The CVR tower has no loss of its own: it is learned through the product, which is
how ESMM avoids training CVR on clicked impressions only (sample selection bias).

**Outputs are logits.** manytask's ``bce`` loss takes logits, so the ctcvr output is
``logit(σ(z_ctr) σ(z_cvr))``, computed stably in log space (:func:`ctcvr_logit`)::

    log p       = logσ(z_ctr) + logσ(z_cvr)
    log (1 − p) = log(q_ctr + p_ctr · q_cvr)             q = 1 − p = σ(−z)
                = logaddexp(logσ(−z_ctr), logσ(z_ctr) + logσ(−z_cvr))
    logit p     = log p − log(1 − p)

Neither term rounds ``p`` to 0 or 1, so the logit — and ``bce`` on it — stays finite with
finite gradients for any finite ``z`` (``σ(50)²`` is 1 in float32, and the direct formula
would give an infinite logit). Probabilities are ``sigmoid`` of the outputs; the CVR itself
comes from :meth:`ESMM.cvr_logits`.

**What is shared.** The input layer and the CTR tower reach both outputs (``p(ctcvr)``
contains ``p(ctr)``), so both are shared; the CVR tower reaches only ctcvr and is that task's
own. The click task has no parameters of its own: ``task_parameters(click_task)`` is empty.
Either task alone is accepted too (for single-task baselines): the click task alone has no
CVR tower; the ctcvr task alone keeps the product, trained by its own loss only.
``return_features=True`` returns per-task views of ``[e ; z_ctr]`` (the input layer's output
and the CTR logit, ``(B, E + 1)``): the click output is the view's last column; the ctcvr
task runs the CVR tower on the first ``E`` columns and combines it with the last.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from manytask import registry
from manytask.columns import Columns
from manytask.errors import ConfigError
from manytask.nn.base import MultiTaskModel
from manytask.nn.encoders import mlp_layers
from manytask.nn.inputs import input_layer
from manytask.task import TaskSet


def ctcvr_logit(ctr_logit: Tensor, cvr_logit: Tensor) -> Tensor:
    """``logit(σ(a) σ(b))``, finite and accurate for any finite ``a``, ``b`` (module doc)."""
    log_p = F.logsigmoid(ctr_logit) + F.logsigmoid(cvr_logit)
    log_q = torch.logaddexp(
        F.logsigmoid(-ctr_logit), F.logsigmoid(ctr_logit) + F.logsigmoid(-cvr_logit)
    )
    return log_p - log_q


def tower(in_features: int, hidden: Sequence[int], activation: str) -> nn.Sequential:
    """``hidden`` layers then one logit."""
    return nn.Sequential(
        mlp_layers(in_features, hidden, activation),
        nn.Linear(hidden[-1] if hidden else in_features, 1),
    )


class ESMM(MultiTaskModel):
    """Shared input layer, a CTR and a CVR tower; outputs the ctr and ctcvr logits.

    Args:
        tasks: the binary tasks (output size 1) named ``click_task`` and ``ctcvr_task``, in
            any order. One of them alone is accepted too (a single-task baseline): the click
            task alone uses only the CTR tower; the ctcvr task alone keeps the product.
        front: the input layer and the width of its output.
        click_task: the task whose label is "clicked".
        ctcvr_task: the task whose label is "clicked and converted".
        hidden: hidden widths of each tower.
        activation: relu, gelu, silu or tanh.
    """

    cvr_tower: nn.Module | None

    def __init__(
        self,
        tasks: TaskSet,
        front: tuple[nn.Module, int],
        click_task: str = "ctr",
        ctcvr_task: str = "ctcvr",
        hidden: Sequence[int] = (360, 200, 80),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        _check_tasks(tasks, click_task, ctcvr_task)
        self.task_names = tuple(tasks.names)
        self.click_task = click_task
        self.ctcvr_task = ctcvr_task
        self.front, width = front
        self.ctr_tower = tower(width, hidden, activation)
        self.cvr_tower = tower(width, hidden, activation) if ctcvr_task in tasks else None

    def _cvr(self, e: Tensor) -> Tensor:
        if self.cvr_tower is None:
            raise ConfigError(
                f"this esmm model has no ctcvr task ('{self.ctcvr_task}'), so no CVR tower"
            )
        out: Tensor = self.cvr_tower(e).squeeze(-1)
        return out

    def cvr_logits(self, x: Tensor) -> Tensor:
        """Logits of the post-click conversion rate ``p(cvr)``, ``(B,)``."""
        return self._cvr(self.front(x))

    def forward(  # type: ignore[override]
        self, x: Tensor, return_features: bool = False
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], list[Tensor]]:
        e = self.front(x)
        z_ctr = self.ctr_tower(e)  # (B, 1)
        if not return_features:
            # separate squeezes: the click output is not an input of the ctcvr output
            return {
                name: (
                    z_ctr.squeeze(-1)
                    if name == self.click_task
                    else ctcvr_logit(z_ctr.squeeze(-1), self._cvr(e))
                )
                for name in self.task_names
            }
        base = torch.cat([e, z_ctr], dim=1)  # everything the tasks read from the shared part
        views = [base.view_as(base) for _ in self.task_names]
        outputs = {
            name: (
                view[:, -1]
                if name == self.click_task
                else ctcvr_logit(view[:, -1], self._cvr(view[:, :-1]))
            )
            for name, view in zip(self.task_names, views, strict=True)
        }
        return outputs, views

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.front.parameters()
        yield from self.ctr_tower.parameters()

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        if name not in self.task_names:
            raise ConfigError(f"unknown task '{name}'; tasks are: {', '.join(self.task_names)}")
        if name == self.ctcvr_task and self.cvr_tower is not None:
            return self.cvr_tower.parameters()
        return iter(())  # the click task: the CTR tower also feeds ctcvr, so it is shared


def _check_tasks(tasks: TaskSet, click_task: str, ctcvr_task: str) -> None:
    if click_task == ctcvr_task:
        raise ConfigError(f"esmm click_task and ctcvr_task must differ, both are '{click_task}'")
    if not set(tasks.names) <= {click_task, ctcvr_task}:
        raise ConfigError(
            f"esmm predicts two tasks, click_task='{click_task}' and ctcvr_task="
            f"'{ctcvr_task}' (or one of them), but the tasks are: {', '.join(tasks.names)}; "
            "set the model params click_task/ctcvr_task to your task names"
        )
    for name, task in tasks.items():
        if task.kind_ != "binary" or task.output_dim != 1:
            raise ConfigError(
                f"esmm task '{name}' must be binary with output_dim 1 (loss 'bce' on the logits "
                f"esmm outputs); it is {task.kind_} with output_dim {task.output_dim}"
            )


@registry.register(
    "architecture",
    "esmm",
    "ESMM: shared embeddings, CTR and CVR towers, p(ctcvr) = p(ctr)·p(cvr) (Ma et al. 2018)",
)
def esmm(
    tasks: TaskSet,
    input_shape: Sequence[int],
    columns: Columns | None = None,
    click_task: str = "ctr",
    ctcvr_task: str = "ctcvr",
    hidden: list[int] = [360, 200, 80],  # noqa: B006 - read-only default
    activation: str = "relu",
    embedding_dim: int = 18,
) -> ESMM:
    """ESMM: ``p(ctcvr) = σ(z_ctr)·σ(z_cvr)``, BCE on ctr and ctcvr over all impressions.

    Ma et al., "Entire Space Multi-Task Model: An Effective Approach for Estimating Post-Click
    Conversion Rate", arXiv:1804.07931. Outputs are logits (ctcvr's computed stably, see
    :func:`ctcvr_logit`); both tasks use the ``bce`` loss.

    Defaults from the paper's experimental setup: embedding size 18 per categorical column
    (``embedding_dim``), towers ``360 × 200 × 80`` (``hidden``; the paper's final 2-way
    softmax is the one logit here) with ReLU. ``click_task``/``ctcvr_task`` name the tasks.
    """
    front = input_layer(input_shape, columns, embedding_dim)
    return ESMM(tasks, front, click_task, ctcvr_task, hidden, activation)
