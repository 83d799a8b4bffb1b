r"""The adapter layer: a frozen base layer plus an expert bank of low-rank updates and a router.

For an input ``x`` of a sample of task ``t`` (or a token of it) the layer computes

.. math::

    h = W x + b + s \sum_{e=1}^{E} g_e(x, t)\; B_e\, M_t\, A_e\, x

with down-projections ``A`` of shape ``(E, r, in)`` (one shared ``A`` when ``share_down``),
up-projections ``B`` of shape ``(E, out, r)``, an optional mixer ``M`` (``r × r``, shared or one
per task, possibly diagonal) and gates ``g`` from the router: ``(N, 1, E)`` from the task of
each sample, ``(N, L, E)`` from each token, or ``(N, 1, E, out)`` per output feature. The sum
over experts is one contraction over ``(expert, rank)``: the gates scale the rank-``r`` codes
``A_e x`` and a single ``einsum`` with ``B`` adds them up, so the cost is that of one LoRA of
rank ``E·r`` and there is no Python loop over experts or tasks. With fixed one-hot task gates (one
LoRA per task) each sample's ``A_t`` and ``B_t`` are gathered instead and applied with two
batched products, so a token costs one rank-``r`` LoRA, as in PEFT's per-sample adapters.

With ``combine="weights"`` the gates mix parameters (Polytropon, MHR, C-Poly):
``A_t = Σ_e g_e A_e`` and ``B_t = Σ_e g_e B_e`` per sample, then ``h = W x + s B_t M_t A_t x``;
with ``heads = H`` the input features of ``A`` and the output features of ``B`` are cut into
``H`` blocks and each block has gates of its own (MHR).

A batch may mix tasks: the layer gathers each sample's gates (and mixer) by its task id and
never splits the batch. Inputs are ``(N, …, in)``; every position of a sample shares its task.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from manytask.adapters import bases
from manytask.adapters.alignment import alignment_loss
from manytask.adapters.context import TaskContext
from manytask.adapters.routers import TaskRouter, build_router
from manytask.adapters.spec import AdapterSpec
from manytask.errors import ConfigError
from manytask.nn.gates import Gate


class AdapterLayer(nn.Module):
    """A frozen ``Linear`` or ``Conv1D`` with a multi-task low-rank adapter beside it.

    Args:
        base: the layer to adapt; its parameters are frozen.
        spec: the adapter design.
        context: where the task ids of the current batch are read.
        name: the layer's name in the model, for error messages.
    """

    def __init__(self, base: nn.Module, spec: AdapterSpec, context: TaskContext, name: str):
        super().__init__()
        if not bases.is_adaptable(base):
            raise ConfigError(
                f"module '{name}' is a {type(base).__name__}; adapters wrap {bases.SUPPORTED}"
            )
        self.base = base
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.spec = spec
        self.context = context
        self.name = name
        self.in_features, self.out_features = bases.features(base)
        heads = spec.router.heads
        if spec.combine == "weights" and (self.in_features % heads or self.out_features % heads):
            raise ConfigError(
                f"module '{name}' has {self.in_features} inputs and {self.out_features} outputs; "
                f"heads={heads} must divide both"
            )
        experts, rank = spec.num_experts, spec.rank
        weight = base.weight
        assert isinstance(weight, Tensor)
        device, dtype = weight.device, weight.dtype
        down_experts = 1 if spec.share_down else experts
        self.down = nn.Parameter(
            torch.empty(down_experts, rank, self.in_features, device=device, dtype=dtype)
        )
        self.up = nn.Parameter(
            torch.empty(experts, self.out_features, rank, device=device, dtype=dtype)
        )
        self.mixer: nn.Parameter | None = None
        if spec.mixer != "none":
            count = spec.num_tasks if spec.mixer == "per_task" else 1
            shape = (count, rank) if spec.mixer_diagonal else (count, rank, rank)
            self.mixer = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.router = build_router(spec, self.in_features, self.out_features)
        if self.router is not None:
            self.router.to(device=device, dtype=dtype)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        if not spec.train_experts:
            self.down.requires_grad_(False)
            self.up.requires_grad_(False)
        self._balance: Tensor | None = None
        self._alignment: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``A`` like :class:`torch.nn.Linear` (``U(±1/√fan_in)``, per head block with MHR) or
        normal; ``B`` zero or ``U(±1/√r)``; the mixer identity or ``U(±1/√r)``."""
        spec = self.spec
        with torch.no_grad():
            if spec.down_init == "normal":
                self.down.normal_(0.0, spec.down_std)
            else:
                fan_in = self.in_features // spec.router.heads
                self.down.uniform_(-1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))
            if spec.up_init == "zeros":
                self.up.zero_()
            else:
                self.up.uniform_(-1.0 / math.sqrt(spec.rank), 1.0 / math.sqrt(spec.rank))
            if self.mixer is not None:
                if spec.mixer_init == "identity":
                    if spec.mixer_diagonal:
                        self.mixer.fill_(1.0)
                    else:
                        self.mixer.copy_(torch.eye(spec.rank).expand_as(self.mixer))
                else:
                    bound = 1.0 / math.sqrt(spec.rank)
                    self.mixer.uniform_(-bound, bound)

    # forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ConfigError(
                f"adapter layer '{self.name}' needs inputs (batch, …, {self.in_features}); "
                f"got shape {tuple(x.shape)}"
            )
        result: Tensor = self.base(x)
        batch = x.shape[0]
        aligning = self.training and self.spec.align_weight > 0
        task_ids = None
        if self.spec.routes_by_task or (aligning and self.context.current is not None):
            task_ids = self.context.for_batch(batch, self.name).to(x.device)
        delta, codes = self.delta(x, task_ids)
        self._balance = self.router.auxiliary_loss() if isinstance(self.router, Gate) else None
        self._alignment = None
        if aligning:
            if task_ids is None:
                raise ConfigError(
                    f"adapter layer '{self.name}': the alignment loss compares tasks, so the "
                    "training forward needs task ids (adapted(..., task_ids=ids))"
                )
            term = alignment_loss(codes[:, :, 0], task_ids, self.spec.num_tasks)
            self._alignment = None if term is None else self.spec.align_weight * term
        return result + delta.to(result.dtype)

    def delta(self, x: Tensor, task_ids: Tensor | None) -> tuple[Tensor, Tensor]:
        """The adapter's output ``s Σ_e g_e B_e M A_e x`` for ``x`` of shape ``(N, …, in)``, and
        the codes ``A x`` of shape ``(N, L, E_A, r)`` (``A`` mixed per sample with
        ``combine="weights"``; only the sample's own expert, ``E_A = 1``, with one-hot task
        gates)."""
        spec = self.spec
        batch = x.shape[0]
        raw = x.reshape(batch, -1, self.in_features)
        flat = self.dropout(raw)  # the adapters' input; a token router reads ``raw``
        down = self.down.to(flat.dtype)
        up = self.up.to(flat.dtype)
        if spec.combine == "weights":
            assert isinstance(self.router, TaskRouter)
            gates = self.router(self._rows(task_ids, batch, flat)).to(flat.dtype)  # (N, H, E)
            heads = spec.router.heads
            experts, rank = down.shape[0], spec.rank
            blocks_in = down.view(experts, rank, heads, self.in_features // heads)
            blocks_out = up.view(experts, heads, self.out_features // heads, rank)
            mixed_down = torch.einsum("nhe,erhd->nrhd", gates, blocks_in).reshape(
                batch, rank, self.in_features
            )
            mixed_up = torch.einsum("nhe,ehor->nhor", gates, blocks_out).reshape(
                batch, self.out_features, rank
            )
            codes = torch.einsum("nli,nri->nlr", flat, mixed_down).unsqueeze(2)
            codes_mixed = self._mix(codes, task_ids)
            out = torch.einsum("nler,nor->nlo", codes_mixed, mixed_up)
        elif self._selects_one_expert():
            # one-hot task gates: Σ_e [e = t] B_e M A_e x = B_t M A_t x, so gather each sample's
            # own pair and skip the other tasks' products (T·r ranks per token down to r)
            rows = self._rows(task_ids, batch, flat)
            codes = torch.bmm(flat, down[rows].transpose(1, 2)).unsqueeze(2)  # (N, L, 1, r)
            codes_mixed = self._mix(codes, task_ids)
            out = torch.bmm(codes_mixed.squeeze(2), up[rows].transpose(1, 2))
        else:
            codes = torch.einsum("nli,eri->nler", flat, down)  # (N, L, E_A, r)
            codes_mixed = self._mix(codes, task_ids)
            gates = self._output_gates(raw, task_ids)
            if gates is None:
                out = torch.einsum("nler,eor->nlo", codes_mixed, up)
            elif gates.dim() == 4:  # one gate per output feature: (N, 1, E, out)
                codes_all = codes_mixed.expand(-1, -1, spec.num_experts, -1)
                out = torch.einsum("nler,eor,nleo->nlo", codes_all, up, gates)
            else:  # (N, 1 or L, E): scale the codes, then one contraction over (expert, rank)
                out = torch.einsum("nler,eor->nlo", codes_mixed * gates.unsqueeze(-1), up)
        out = spec.scaling * out
        return out.reshape(*x.shape[:-1], self.out_features), codes

    def _selects_one_expert(self) -> bool:
        """Whether the gates are a fixed one-hot choice of expert ``t`` for task ``t`` (one LoRA
        per task) over experts that each have their own ``A``."""
        router = self.router
        return (
            isinstance(router, TaskRouter)
            and router.spec.transform == "fixed"
            and not router.spec.per_feature
            and not self.spec.share_down
        )

    def _mix(self, codes: Tensor, task_ids: Tensor | None) -> Tensor:
        """``M z`` for codes ``(N, L, E_A, r)``: the mixer of each sample's task, or the shared
        one."""
        if self.mixer is None:
            return codes
        mixer = self.mixer.to(codes.dtype)
        if self.spec.mixer == "per_task":
            assert task_ids is not None
            chosen = mixer[task_ids]
            if self.spec.mixer_diagonal:
                return codes * chosen[:, None, None, :]
            return torch.einsum("nler,nsr->nles", codes, chosen)
        if self.spec.mixer_diagonal:
            return codes * mixer[0]
        return torch.einsum("nler,sr->nles", codes, mixer[0])

    def _rows(self, task_ids: Tensor | None, batch: int, like: Tensor) -> Tensor:
        """The task-table rows to read: the task ids, or row 0 of a table shared by all tasks."""
        if task_ids is not None:
            return task_ids
        assert not self.spec.routes_by_task
        return torch.zeros(batch, dtype=torch.long, device=like.device)

    def _output_gates(self, flat: Tensor, task_ids: Tensor | None) -> Tensor | None:
        """The gates of the experts' outputs: from the task ids, or from the layer's input
        before dropout (as HydraLoRA's authors route: dropout acts on the adapters' path)."""
        router = self.router
        if router is None:
            return None
        if isinstance(router, TaskRouter):
            rows = self._rows(task_ids, flat.shape[0], flat)
            gates: Tensor = router(rows).to(flat.dtype)  # (N, 1, E[, out])
            return gates
        batch, length = flat.shape[0], flat.shape[1]
        token_gates: Tensor = router(flat.reshape(batch * length, self.in_features))
        return token_gates.reshape(batch, length, -1).to(flat.dtype)

    # training terms ---------------------------------------------------------------------
    def balance_loss(self) -> Tensor | None:
        """The router's load-balancing term from the last training forward, or ``None``."""
        return self._balance

    def alignment_term(self) -> Tensor | None:
        """The weighted alignment loss from the last training forward, or ``None``."""
        return self._alignment

    # merging ----------------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self, task: int | None, chunk: int = 1024) -> Tensor:
        """This task's update ``ΔW`` (``(out, in)``) such that ``W x + ΔW x`` is the layer's
        output in evaluation mode.

        It is read off the layer itself: the adapter is linear in ``x`` once the gates do not
        depend on ``x``, so its output on the unit vectors ``e_i`` is the column ``ΔW e_i``.
        Token-routed adapters have no such matrix and are refused.
        """
        if not self.spec.mergeable:
            raise ConfigError(
                f"adapter '{self.spec.method}' routes every token by its input "
                "(h = Wx + Σ_e g_e(x) B_e A_e x with g depending on x), so a task's adapter is "
                "not a fixed matrix and cannot be merged into the base weight exactly; serve "
                "the adapted model instead"
            )
        if self.spec.routes_by_task and task is None:
            raise ConfigError(
                f"adapter '{self.spec.method}' gives each task its own update; name the task "
                f"to merge (one of {list(self.context.task_names)})"
            )
        was_training = self.training
        self.train(False)
        try:
            weight = self.base.weight
            assert isinstance(weight, Tensor)
            eye = torch.eye(self.in_features, device=weight.device, dtype=self.down.dtype)
            ids = None if task is None else torch.tensor([task], device=weight.device)
            columns = []
            for start in range(0, self.in_features, chunk):
                units = eye[start : start + chunk].unsqueeze(0)  # one sample, one token per e_i
                out, _ = self.delta(units, ids)
                columns.append(out[0])
            return torch.cat(columns).t()
        finally:
            self.train(was_training)

    def extra_repr(self) -> str:
        spec = self.spec
        return (
            f"method={spec.method}, in={self.in_features}, out={self.out_features}, "
            f"experts={spec.num_experts}, rank={spec.rank}"
        )
