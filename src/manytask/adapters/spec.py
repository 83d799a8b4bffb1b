r"""The configuration of one multi-task adapter: which matrices exist, which are shared, where
the gates come from.

Every method of :mod:`manytask.adapters.methods` is a function that returns an
:class:`AdapterSpec`; the layer (:class:`~manytask.adapters.layer.AdapterLayer`) reads nothing
else. The rule the spec parameterises is

.. math::

    h = W x + s \sum_e g_e(x, t)\, B_e\, M_t\, A_e\, x

with ``E`` experts, rank ``r`` each, scaling ``s``, a router that produces the gates ``g`` and
an optional ``r × r`` mixer ``M`` (shared or one per task). With ``combine="weights"`` the
gates mix the parameters instead of the outputs (Polytropon's rule):
:math:`h = W x + s\, (\sum_e g_e B_e)\, M_t\, (\sum_e g_e A_e)\, x`.

A spec is plain data (numbers, strings, booleans) so that it is saved as JSON next to the
adapter weights and rebuilt exactly on load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from manytask.errors import ConfigError

GateSource = Literal["none", "task", "token"]
TaskTransform = Literal["fixed", "identity", "softmax", "relaxed_bernoulli"]
TableInit = Literal["onehot", "uniform", "normal"]
Combine = Literal["outputs", "weights"]
MixerKind = Literal["none", "shared", "per_task"]
MixerInit = Literal["identity", "kaiming_uniform"]
DownInit = Literal["kaiming_uniform", "normal"]
UpInit = Literal["zeros", "kaiming_uniform"]


def lora_scaling(method: str, alpha: float, rank: int) -> float:
    """LoRA's ``α / r``, with a clear error for a rank below 1."""
    if rank < 1:
        raise ConfigError(f"adapter '{method}': rank must be ≥ 1, got {rank}")
    return alpha / rank


@dataclass(frozen=True)
class RouterSpec:
    r"""Where the gates ``g`` come from.

    ``source="none"``: no gates (one expert, ``g = 1``).

    ``source="task"``: a table indexed by the task of each sample, ``(rows, heads, E)`` or, with
    ``per_feature``, ``(rows, heads, E, out_features)``; ``rows`` is the number of tasks, or 1
    when ``per_task=False`` (one learned row for every task). ``transform`` maps a row to gates:
    ``"fixed"`` (a one-hot table that is not learned: expert ``t`` for task ``t``),
    ``"identity"`` (the learned values themselves), ``"softmax"`` (``softmax(row / τ)`` over the
    experts) or ``"relaxed_bernoulli"`` (Polytropon: a relaxed Bernoulli sample with
    temperature ``τ`` in training, ``σ(row)`` in evaluation, then normalised to sum 1 over each
    group of experts). ``own_experts`` > 0 makes the last ``T · own_experts`` experts
    task-specific (C-Poly): task ``t`` may use only its own block of them, normalised as a group
    of its own. The table starts ``uniform`` in ``±init_scale`` around ``init_center``, or
    ``normal`` with mean ``init_center`` and standard deviation ``init_scale``.

    ``source="token"``: a linear router on each token's input. ``top_k = 0`` gives
    ``softmax(W_g x)`` over all experts; ``top_k = k`` keeps the ``k`` experts with the largest
    ``W_g x + b`` and puts ``softmax`` over their scores (without ``b``) on them. The bias ``b``
    is not learned by gradient: after each training forward it moves by
    ``bias_update_rate · sign(mean load − load_e)`` (auxiliary-loss-free balancing).
    ``balance_weight`` scales an auxiliary load-balancing loss. ``init_std > 0`` draws
    ``W_g`` from ``N(0, init_std²)``; 0 keeps :class:`torch.nn.Linear`'s initialisation.
    """

    source: GateSource = "none"
    # task tables
    transform: TaskTransform = "identity"
    per_task: bool = True
    per_feature: bool = False
    heads: int = 1
    temperature: float = 1.0
    init: TableInit = "uniform"
    init_center: float = 0.0
    init_scale: float = 0.0
    own_experts: int = 0
    # token routers
    top_k: int = 0
    bias_update_rate: float = 0.0
    balance_weight: float = 0.0
    init_std: float = 0.0

    def __post_init__(self) -> None:
        if self.source not in ("none", "task", "token"):
            raise ConfigError(
                f"router source must be 'none', 'task' or 'token', got '{self.source}'"
            )
        if self.transform not in ("fixed", "identity", "softmax", "relaxed_bernoulli"):
            raise ConfigError(
                "router transform must be 'fixed', 'identity', 'softmax' or "
                f"'relaxed_bernoulli', got '{self.transform}'"
            )
        if self.init not in ("onehot", "uniform", "normal"):
            raise ConfigError(
                f"router init must be 'onehot', 'uniform' or 'normal', got '{self.init}'"
            )
        if self.heads < 1:
            raise ConfigError(f"heads must be ≥ 1, got {self.heads}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.init_scale < 0 or self.init_std < 0:
            raise ConfigError("init_scale and init_std must be ≥ 0")
        if self.own_experts < 0:
            raise ConfigError(f"own_experts must be ≥ 0, got {self.own_experts}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be ≥ 0 (0: every expert), got {self.top_k}")
        if self.bias_update_rate < 0 or self.balance_weight < 0:
            raise ConfigError("bias_update_rate and balance_weight must be ≥ 0")


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter design: the expert bank, the mixer, the router and the extra loss.

    Args:
        method: the registered name that built this spec.
        num_tasks: ``T``, the number of tasks the adapter serves.
        rank: ``r`` of each expert.
        scaling: ``s`` in front of the adapter's output (LoRA's ``α / r``).
        num_experts: ``E``, the number of up-projections ``B_e``.
        share_down: one down-projection ``A`` for every expert (HydraLoRA, MTL-LoRA).
        combine: ``"outputs"`` mixes the experts' outputs; ``"weights"`` mixes their
            parameters first (Polytropon).
        mixer: none, one ``r × r`` matrix shared by all tasks (MoSLoRA) or one per task
            (MTL-LoRA's ``Λ_t``).
        mixer_diagonal: the mixer is diagonal (a vector of ``r`` values).
        mixer_init: ``"identity"`` or ``"kaiming_uniform"`` (``U(±1/√r)``).
        down_init: ``"kaiming_uniform"`` (``U(±1/√fan_in)``, as :class:`torch.nn.Linear`) or
            ``"normal"`` with standard deviation ``down_std``.
        up_init: ``"zeros"`` (the adapter starts as the identity) or ``"kaiming_uniform"``.
        dropout: dropout on the adapter's input, in ``[0, 1)``.
        router: where the gates come from (:class:`RouterSpec`).
        align_weight: weight of Align-LoRA's alignment loss between the tasks' projections
            ``A x`` (0: none).
        train_experts: whether ``A`` and ``B`` are trained (ScaLearn's second stage freezes
            them and learns only the gates).
    """

    method: str
    num_tasks: int
    rank: int
    scaling: float
    num_experts: int = 1
    share_down: bool = False
    combine: Combine = "outputs"
    mixer: MixerKind = "none"
    mixer_diagonal: bool = False
    mixer_init: MixerInit = "identity"
    down_init: DownInit = "kaiming_uniform"
    down_std: float = 0.0
    up_init: UpInit = "zeros"
    dropout: float = 0.0
    router: RouterSpec = field(default_factory=RouterSpec)
    align_weight: float = 0.0
    train_experts: bool = True

    def __post_init__(self) -> None:
        where = f"adapter '{self.method}'"
        if self.num_tasks < 1:
            raise ConfigError(f"{where} needs at least one task, got num_tasks={self.num_tasks}")
        if self.rank < 1:
            raise ConfigError(f"{where}: rank must be ≥ 1, got {self.rank}")
        if self.num_experts < 1:
            raise ConfigError(f"{where}: num_experts must be ≥ 1, got {self.num_experts}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}: dropout must be in [0, 1), got {self.dropout}")
        if self.align_weight < 0:
            raise ConfigError(f"{where}: align_weight must be ≥ 0, got {self.align_weight}")
        if self.down_init == "normal" and self.down_std <= 0:
            raise ConfigError(f"{where}: down_init='normal' needs down_std > 0")
        router = self.router
        if router.source == "none" and self.num_experts != 1:
            raise ConfigError(
                f"{where}: {self.num_experts} experts need a router (task or token); "
                "without one there is a single expert"
            )
        if self.combine == "weights" and router.source != "task":
            raise ConfigError(
                f"{where}: mixing the experts' parameters (combine='weights') needs gates from "
                "the task; per-token gates mix the outputs (combine='outputs')"
            )
        if self.combine == "outputs" and router.heads != 1:
            raise ConfigError(f"{where}: heads > 1 (MHR) needs combine='weights'")
        if router.per_feature and self.combine == "weights":
            raise ConfigError(f"{where}: per-feature gates need combine='outputs'")
        fixed = router.source == "task" and router.transform == "fixed"
        if fixed and self.num_experts != self.num_tasks:
            raise ConfigError(
                f"{where}: a fixed one-expert-per-task router needs num_experts = number of "
                f"tasks ({self.num_tasks}), got {self.num_experts}"
            )
        if router.own_experts:
            needed = self.num_tasks * router.own_experts
            if self.num_experts < needed:
                raise ConfigError(
                    f"{where}: {router.own_experts} task-specific experts for each of "
                    f"{self.num_tasks} tasks need num_experts ≥ {needed}"
                )
        if router.source == "token" and router.top_k > self.num_experts:
            raise ConfigError(
                f"{where}: top_k={router.top_k} is more than the {self.num_experts} experts"
            )

    @property
    def mergeable(self) -> bool:
        """True when a task's adapter does not depend on the input: it folds into ``W``."""
        return self.router.source != "token"

    @property
    def routes_by_task(self) -> bool:
        """True when the layer needs each sample's task id (a per-task table or mixer)."""
        per_task_gates = self.router.source == "task" and self.router.per_task
        return per_task_gates or self.mixer == "per_task"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterSpec:
        """Rebuild a spec saved by :meth:`to_dict`; unknown or missing keys are errors."""
        if not isinstance(data, dict) or not isinstance(data.get("router"), dict):
            raise ConfigError("an adapter spec must be a JSON object with a 'router' object")
        router_keys = {f.name for f in fields(RouterSpec)}
        spec_keys = {f.name for f in fields(cls)}
        unknown = set(data) - spec_keys
        unknown |= {f"router.{key}" for key in set(data["router"]) - router_keys}
        if unknown:
            raise ConfigError(
                f"unknown adapter spec keys {sorted(unknown)}; this file was written by a "
                "different manytask version"
            )
        router = RouterSpec(**data["router"])
        return cls(**{**data, "router": router})
