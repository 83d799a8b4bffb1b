r"""Routers: the gates ``g`` of an adapter layer, from each sample's task or from each token.

- :class:`TaskRouter` — a table indexed by task id: fixed one-hot (one LoRA per task), learned
  values (MultiLoRA's scales, ScaLearn's ω), ``softmax(w_t / τ)`` (MTL-LoRA), or Polytropon's
  relaxed-Bernoulli allocation, per block of features for MHR and with task-specific skills for
  C-Poly. Gates are gathered per sample, so one batch may mix tasks.
- :class:`SoftTokenRouter` — ``softmax(W_g x)`` per token (MoLoRA, HydraLoRA); it is
  :class:`manytask.nn.gates.SoftmaxGate` with an optional importance loss.
- :class:`TopKTokenRouter` — top-``k`` experts per token with auxiliary-loss-free balancing
  (SMoRA).

Token routers subclass :class:`manytask.nn.gates.Gate`: after a training forward,
:meth:`~manytask.nn.gates.Gate.auxiliary_loss` returns their load-balancing term (or ``None``).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn
from torch.distributions import RelaxedBernoulli
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

from manytask import distributed
from manytask.adapters.spec import AdapterSpec, RouterSpec
from manytask.errors import ConfigError
from manytask.nn.gates import Gate, SoftmaxGate, cv_squared

#: added to the normaliser of Polytropon's allocation (the value of PEFT and the authors' code)
EPS = 1e-12


class TaskRouter(nn.Module):
    r"""Gates looked up from each sample's task.

    The table holds ``(rows, heads, E)`` values (``(rows, 1, E, out)`` per feature); row ``t``
    serves task ``t`` (a single row serves every task when ``per_task=False``). Output:
    ``(N, heads, E)`` or ``(N, 1, E, out)`` for ``N`` task ids. Transforms of a row ``w``:

    - ``fixed``: ``g = onehot(t)`` (a buffer, not learned);
    - ``identity``: ``g = w``;
    - ``softmax``: ``g = softmax(w / τ)`` over the experts;
    - ``relaxed_bernoulli``: ``u = RelaxedBernoulli(τ, logits=w).rsample()`` in training and
      ``u = σ(w)`` in evaluation, then ``g_e = u_e m_{t,e} / (Σ_{e' ∈ G(e)} u_{e'} m_{t,e'} + ε)``
      where ``G(e)`` is the group of expert ``e`` (shared skills, or task-specific skills) and
      ``m_{t,e}`` is 1 when task ``t`` may use expert ``e``.
    """

    def __init__(self, spec: RouterSpec, num_tasks: int, num_experts: int, out_features: int):
        super().__init__()
        self.spec = spec
        rows = num_tasks if spec.per_task else 1
        shape: tuple[int, ...] = (rows, spec.heads, num_experts)
        if spec.per_feature:
            shape = (*shape, out_features)
        self.table: Tensor
        if spec.transform == "fixed":
            onehot = torch.eye(num_tasks).view(num_tasks, 1, num_tasks)
            self.register_buffer("table", onehot)
        else:
            self.table = nn.Parameter(torch.empty(shape))
        own = spec.own_experts
        shared = num_experts - num_tasks * own
        groups = torch.zeros(num_experts, dtype=torch.long)
        allowed = torch.ones(num_tasks, num_experts, dtype=torch.bool)
        if own:
            groups[shared:] = 1
            owner = torch.arange(num_tasks * own) // own  # task of each task-specific expert
            allowed[:, shared:] = owner.unsqueeze(0) == torch.arange(num_tasks).unsqueeze(1)
        self.groups: Tensor
        self.allowed: Tensor
        self.register_buffer("groups", groups, persistent=False)
        self.register_buffer("allowed", allowed, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not isinstance(self.table, nn.Parameter):
            return
        spec = self.spec
        with torch.no_grad():
            if spec.init == "normal":
                self.table.normal_(spec.init_center, spec.init_scale)
            elif spec.init == "uniform":
                low, high = spec.init_center - spec.init_scale, spec.init_center + spec.init_scale
                self.table.uniform_(low, high)
            else:
                raise ConfigError("a learned task table starts 'uniform' or 'normal', not 'onehot'")

    def forward(self, task_ids: Tensor) -> Tensor:
        spec = self.spec
        if spec.per_task:
            rows = self.table[task_ids]
        else:
            rows = self.table.expand(task_ids.shape[0], *self.table.shape[1:])
        if spec.transform in ("fixed", "identity"):
            return rows
        if spec.transform == "softmax":
            return torch.softmax(rows / spec.temperature, dim=2)
        if self.training:
            temperature = torch.tensor(spec.temperature, device=rows.device, dtype=rows.dtype)
            units = RelaxedBernoulli(temperature, logits=rows).rsample()
        else:
            units = torch.sigmoid(rows)
        units = units * self.allowed[task_ids].unsqueeze(1).to(units.dtype)
        members = nn.functional.one_hot(self.groups).to(units.dtype)  # (E, groups)
        totals = torch.einsum("nhe,eg->nhg", units, members)
        return units / (torch.einsum("nhg,eg->nhe", totals, members) + EPS)


class SoftTokenRouter(SoftmaxGate):
    r"""``g(x) = softmax(W_g x)`` for every token, over all experts.

    With ``balance_weight = w > 0`` the training forward records the importance loss of
    Shazeer et al. (arXiv:1701.06538, §4), ``w · CV(Σ_x g(x))²`` over the batch's tokens.
    """

    def __init__(
        self, in_features: int, num_experts: int, balance_weight: float, init_std: float
    ) -> None:
        super().__init__(in_features, num_experts)
        self.balance_weight = balance_weight
        if init_std > 0:
            nn.init.normal_(self.linear.weight, std=init_std)

    def forward(self, x: Tensor) -> Tensor:
        weights = super().forward(x)
        if self.training and self.balance_weight > 0:
            self._aux = self.balance_weight * cv_squared(weights.sum(0))
        else:
            self._aux = None
        return weights


class TopKTokenRouter(Gate):
    r"""Top-``k`` routing per token with auxiliary-loss-free balancing.

    Scores ``s = W_g x``; the ``k`` experts with the largest ``s + b`` are kept and get
    ``softmax`` of their scores ``s`` (the bias ``b`` only chooses, it does not weigh). After each
    training step the bias moves towards balance:
    ``b_e ← b_e + u · sign(\bar c − c_e)``, where ``c_e`` counts the tokens routed to ``e`` and
    ``\bar c`` is the mean count (Wang, Gao, Zhao, Sun and Dai, "Auxiliary-Loss-Free Load
    Balancing Strategy for Mixture-of-Experts", arXiv:2408.15664, which sets ``u = 0.001``).
    The paper moves the bias once per training step, from the loads of that step's whole
    batch; so does this router, in any training loop: a training forward adds its loads to
    ``pending_load``, and every ``step()`` of a ``torch.optim`` optimizer that holds the
    router's weight then moves the bias by the loads gathered since the previous move (summed
    over the ranks under ``torch.distributed``) and starts a new count (a process-wide
    optimizer step hook, see :func:`torch.optim.optimizer.register_optimizer_step_post_hook`).
    So gradient accumulation counts every micro-batch of a step once, and an
    activation-checkpointed layer routes its recomputed forward with the bias of the first (its
    doubled loads do not change the signs). A router whose weight no ``torch.optim`` optimizer
    holds moves only when :meth:`move_bias` is called: a frozen router, another kind of
    optimizer, or a wrapper whose optimizer steps flattened copies of the parameters (FSDP
    without ``use_orig_params=True``, DeepSpeed ZeRO); call it after each step there.
    With ``balance_weight = w > 0`` the training forward also records the Switch Transformer
    loss ``w · E · Σ_e f_e P_e`` (Fedus, Zoph and Shazeer, arXiv:2101.03961, eq. 4): ``f_e`` the
    fraction of routing slots given to ``e``, ``P_e`` the mean router probability of ``e``.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        top_k: int,
        bias_update_rate: float,
        balance_weight: float,
        init_std: float,
    ) -> None:
        super().__init__(num_experts)
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.top_k = top_k
        self.bias_update_rate = bias_update_rate
        self.balance_weight = balance_weight
        self.linear = nn.Linear(in_features, num_experts, bias=False)
        if init_std > 0:
            nn.init.normal_(self.linear.weight, std=init_std)
        self.bias: Tensor
        self.register_buffer("bias", torch.zeros(num_experts))
        # tokens routed to each expert since the bias last moved (see the class docstring)
        self.pending_load: Tensor
        self.register_buffer("pending_load", torch.zeros(num_experts), persistent=False)
        _ROUTERS.add(self)
        _step_hook()

    def forward(self, x: Tensor) -> Tensor:
        scores = self.linear(x)
        chosen = (scores.detach() + self.bias).topk(self.top_k, dim=1).indices
        kept = torch.softmax(scores.gather(1, chosen), dim=1)
        weights = torch.zeros_like(scores).scatter(1, chosen, kept)
        self._aux = None
        if self.training:
            load = torch.bincount(chosen.flatten(), minlength=self.num_experts).to(scores.dtype)
            if self.bias_update_rate > 0:
                with torch.no_grad():
                    self.pending_load.add_(load)
            if self.balance_weight > 0:
                share = load / chosen.numel()
                probability = torch.softmax(scores, dim=1).mean(0)
                self._aux = self.balance_weight * self.num_experts * (share * probability).sum()
        return weights

    def __setstate__(self, state: dict[str, object]) -> None:
        super().__setstate__(state)
        _ROUTERS.add(self)  # a copy (copy.deepcopy) balances as its original does

    @torch.no_grad()
    def move_bias(self) -> None:
        """``b ← b + u · sign(c̄ − c)`` with the loads ``c`` gathered since the last move, then a
        new count (called after each optimizer step; no host sync: an empty count moves
        nothing)."""
        load = distributed.all_reduce_sum_(self.pending_load)
        self.bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))
        load.zero_()

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}"


#: every live top-k router, for the optimizer step hook
_ROUTERS: weakref.WeakSet[TopKTokenRouter] = weakref.WeakSet()
_HOOK: list[RemovableHandle] = []


def _step_hook() -> None:
    """Register, once per process, the hook that moves the routers' biases after a step."""
    if not _HOOK:
        _HOOK.append(register_optimizer_step_post_hook(_after_optimizer_step))


def _after_optimizer_step(optimizer: Optimizer, args: object, kwargs: object) -> None:
    """Move the bias of every balancing router whose weight ``optimizer`` has just stepped."""
    routers = [r for r in list(_ROUTERS) if r.bias_update_rate > 0]
    if not routers:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for router in routers:
        if id(router.linear.weight) in stepped:
            router.move_bias()


def build_router(spec: AdapterSpec, in_features: int, out_features: int) -> nn.Module | None:
    """The router a spec asks for (``None`` when the layer has a single ungated expert)."""
    router = spec.router
    if router.source == "none":
        return None
    if router.source == "task":
        return TaskRouter(router, spec.num_tasks, spec.num_experts, out_features)
    if router.top_k == 0:
        return SoftTokenRouter(
            in_features, spec.num_experts, router.balance_weight, router.init_std
        )
    return TopKTokenRouter(
        in_features,
        spec.num_experts,
        router.top_k,
        router.bias_update_rate,
        router.balance_weight,
        router.init_std,
    )
