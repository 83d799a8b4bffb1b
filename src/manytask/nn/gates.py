r"""Gates: map a gate input ``(B, d)`` to weights over ``E`` experts ``(B, E)``.

A mixture reads the weights as :math:`h = \sum_e w_e\,f_e(x)` (see :func:`mix`). Some gates
add a term to the training objective (a load-balancing or entropy penalty): after each forward
pass :meth:`Gate.auxiliary_loss` returns it (a scalar tensor with a graph), or ``None`` when the
gate has none. The architectures sum their gates' terms in ``model.auxiliary_loss()``; add that
to the task losses when you train.

- :class:`SoftmaxGate` — MMoE (Ma et al., KDD 2018).
- :class:`NoisyTopKGate` — sparse noisy top-k gating with importance and load losses
  (Shazeer et al., ICLR 2017, arXiv:1701.06538).
- :class:`DSelectKGate` — DSelect-k (Hazimeh et al., NeurIPS 2021, arXiv:2106.03760).
- :class:`HierarchicalGate` and :class:`FeatureGate` — HoME's gates (Wang et al., 2024,
  arXiv:2408.05430).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from manytask.errors import ConfigError


def mix(weights: Tensor, experts: Tensor) -> Tensor:
    """``Σₑ weights[:, e] · experts[:, e]``: ``(B, E)`` weights, ``(B, E, d)`` experts →
    ``(B, d)``."""
    return torch.einsum("be,bed->bd", weights, experts)


def cv_squared(values: Tensor) -> Tensor:
    """Squared coefficient of variation ``Var(v) / mean(v)²`` (population variance); zero for
    a single value."""
    if values.numel() < 2:
        return values.sum() * 0.0
    values = values.float()
    return values.var(unbiased=False) / (values.mean() ** 2 + 1e-10)


class Gate(nn.Module):
    """A gate: ``forward(x) → (B, num_experts)`` weights, and an optional auxiliary loss.

    ``reads_input`` is False for gates whose weights do not depend on ``x`` (a static
    DSelect-k gate uses ``x`` only for its batch size).
    """

    num_experts: int
    reads_input: bool = True

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        if num_experts < 1:
            raise ConfigError(f"a gate needs num_experts ≥ 1, got {num_experts}")
        self.num_experts = num_experts
        self._aux: Tensor | None = None

    def auxiliary_loss(self) -> Tensor | None:
        """The gate's term for the training objective from the last forward pass, or None."""
        return self._aux


class SoftmaxGate(Gate):
    r"""The MMoE gate :math:`g(x) = \mathrm{softmax}(W x)`.

    Ma, Zhao, Yi, Chen, Hong and Chi, "Modeling Task Relationships in Multi-task Learning with
    Multi-gate Mixture-of-Experts", KDD 2018: a linear map without bias, then a softmax over
    the experts. No auxiliary loss.
    """

    def __init__(self, in_features: int, num_experts: int) -> None:
        super().__init__(num_experts)
        self.linear = nn.Linear(in_features, num_experts, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.linear(x), dim=-1)


class NoisyTopKGate(Gate):
    r"""Noisy top-k gating with its load-balancing loss.

    Shazeer, Mirhoseini, Maziarz, Davis, Le, Hinton and Dean, "Outrageously Large Neural
    Networks: The Sparsely-Gated Mixture-of-Experts Layer", ICLR 2017, arXiv:1701.06538, §2.1
    and Appendix A:

    .. math::

        H(x)_i &= (x W_g)_i + \epsilon_i \cdot \mathrm{softplus}((x W_{noise})_i),
            \quad \epsilon_i \sim \mathcal{N}(0, 1) \\
        G(x) &= \mathrm{softmax}(\mathrm{KeepTopK}(H(x), k))

    (``KeepTopK`` sets every logit outside the top ``k`` to :math:`-\infty`, so exactly ``k``
    weights per row are non-zero and they sum to 1). The noise is drawn in training mode only;
    in evaluation :math:`H = x W_g`.

    Auxiliary loss :math:`w_{imp}\,CV(\mathrm{Importance})^2 + w_{load}\,CV(\mathrm{Load})^2`
    over the batch ``X``: :math:`\mathrm{Importance}_i = \sum_{x} G(x)_i` and
    :math:`\mathrm{Load}_i = \sum_x P(x, i)` with the smooth load estimator

    .. math::

        P(x, i) = \Phi\!\left(\frac{(x W_g)_i - \mathrm{kth\_excluding}(H(x), k, i)}
                  {\mathrm{softplus}((x W_{noise})_i)}\right),

    where ``kth_excluding`` is the k-th largest component of :math:`H(x)` other than ``i`` and
    :math:`\Phi` the standard normal CDF. Without noise (evaluation, ``noise=False``) the load is
    the number of samples routed to each expert (no gradient). With ``k = E`` every expert gets
    every sample and the load term is zero.

    Defaults: :math:`W_g = W_{noise} = 0` at initialisation, as the paper prescribes (no signal and
    some noise at the start, so that the experts start equally loaded), and
    :math:`w_{imp} = w_{load} = 0.1`, a setting the paper evaluates in Appendix A.
    ``noise_epsilon = 0.01`` is added to the noise standard deviation so that the division in
    :math:`P` is safe; the paper's formula has no such term (tensor2tensor, the TensorFlow
    library of the paper's authors, adds the same 0.01). ``k = 2``: manytask's choice.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: int = 2,
        w_importance: float = 0.1,
        w_load: float = 0.1,
        noise: bool = True,
        noise_epsilon: float = 1e-2,
    ) -> None:
        super().__init__(num_experts)
        if not 1 <= k <= num_experts:
            raise ConfigError(f"top_k must be in [1, num_experts={num_experts}], got {k}")
        if w_importance < 0 or w_load < 0:
            raise ConfigError(
                f"w_importance and w_load must be ≥ 0, got {w_importance} and {w_load}"
            )
        if noise_epsilon < 0:
            raise ConfigError(f"noise_epsilon must be ≥ 0, got {noise_epsilon}")
        self.k = k
        self.w_importance = w_importance
        self.w_load = w_load
        self.noise = noise
        self.noise_epsilon = noise_epsilon
        self.w_gate = nn.Parameter(torch.zeros(in_features, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(in_features, num_experts))

    def forward(self, x: Tensor) -> Tensor:
        clean = x @ self.w_gate
        noisy = self.training and self.noise
        if noisy:
            std = F.softplus(x @ self.w_noise) + self.noise_epsilon
            logits = clean + torch.randn_like(clean) * std
        else:
            logits = clean
        top = min(self.k + 1, self.num_experts)
        top_values, top_index = logits.topk(top, dim=1)
        kept = torch.softmax(top_values[:, : self.k], dim=1)
        weights = torch.zeros_like(logits).scatter(1, top_index[:, : self.k], kept)
        importance = weights.sum(0)
        if noisy and self.k < self.num_experts:
            selected = torch.zeros_like(logits, dtype=torch.bool).scatter(
                1, top_index[:, : self.k], True
            )
            # kth_excluding(H, k, i): the (k+1)-th value for a selected i, the k-th otherwise
            threshold = torch.where(
                selected, top_values[:, self.k : self.k + 1], top_values[:, self.k - 1 : self.k]
            )
            load = torch.special.ndtr((clean - threshold) / std).sum(0)
        elif self.k < self.num_experts:
            load = (weights > 0).sum(0).to(weights.dtype)
        else:
            load = torch.ones_like(importance)
        self._aux = self.w_importance * cv_squared(importance) + self.w_load * cv_squared(load)
        return weights

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, k={self.k}, noise={self.noise}"


def smooth_step(t: Tensor, gamma: float = 1.0) -> Tensor:
    r"""The cubic smooth-step of DSelect-k (Hazimeh et al. 2021):

    .. math::

        S(t) = \begin{cases} 0 & t \le -\gamma/2 \\
        -\frac{2}{\gamma^3} t^3 + \frac{3}{2\gamma} t + \frac12 & -\gamma/2 < t < \gamma/2 \\
        1 & t \ge \gamma/2 \end{cases}

    continuously differentiable, and exactly 0 or 1 outside ``[-γ/2, γ/2]``.
    """
    if gamma <= 0:
        raise ConfigError(f"gamma must be > 0, got {gamma}")
    cubic = -2.0 / gamma**3 * t**3 + 3.0 / (2.0 * gamma) * t + 0.5
    return torch.where(
        t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic)
    )


class DSelectKGate(Gate):
    r"""DSelect-k: a differentiable gate that selects at most ``k`` of ``E`` experts.

    Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong and Chi, "DSelect-k:
    Differentiable Selection in the Mixture of Experts with Applications to Multi-Task
    Learning", NeurIPS 2021, arXiv:2106.03760.

    Experts are indexed by binary codes of :math:`m = \lceil \log_2 E \rceil` bits
    (:math:`\ell(j)` = the code of expert ``j``). Each of the ``k`` single-expert selectors
    holds :math:`z^{(i)} \in \mathbb{R}^m` and puts weight

    .. math::

        r(z^{(i)})_j = \prod_{l=1}^{m} S(z^{(i)}_l)^{[\ell(j)_l = 1]}\,
                                    (1 - S(z^{(i)}_l))^{[\ell(j)_l = 0]}

    on expert ``j`` (:func:`smooth_step` ``S`` with parameter ``γ``); once every
    :math:`z^{(i)}_l` is outside ``[-γ/2, γ/2]`` the selector picks exactly one expert. The gate
    is :math:`w = \sum_{i=1}^{k} \mathrm{softmax}(\alpha)_i\, r(z^{(i)})`. Per-sample
    (``in_features`` given, the default in manytask's architectures): :math:`z^{(i)}(x)` and
    :math:`\alpha(x)` are affine maps of the gate input. Static (``in_features=None``): ``z`` and
    ``α`` are free parameters, the same weights for every sample.

    Auxiliary loss: the entropy regulariser :math:`\lambda \sum_i H(r(z^{(i)}))`, which pushes
    each selector to a single expert (averaged over the batch in the per-sample case; the
    reference implementation sums over the batch). When ``E`` is not a power of two some codes
    name no expert, so the weights sum to less than one; as in the authors' implementation a
    penalty :math:`\sum_i 1 / (\sum_{j<E} r(z^{(i)})_j + 10^{-6})`
    (batch-averaged; the :math:`10^{-6}` is ours, so that a selector saturated on unreachable
    codes gives :math:`10^6` instead of the reference's infinity) keeps each selector's mass on
    real experts, and the weights then sum to 1.

    Defaults: ``γ = 1``, ``z`` (weights and biases) uniform in ``±γ/100`` and the ``α``
    logits uniform in ``±0.05``: the authors' reference implementation
    (google-research/dselect_k_moe). ``λ = 1e-6``: the value of that implementation's
    ``EntropyRegularizer`` (which its gate leaves off unless one is passed; and since manytask
    averages over the batch where it sums, the same λ weighs a sample ``B`` times less).
    ``k = 2``: manytask's choice.

    Note: LibMTL's ``DSelect_k`` architecture accepts ``kgamma`` but calls its smooth-step
    without it, so it always runs with ``γ = 1``. Here ``γ`` is used everywhere: in ``S``, and in
    the initialisation range of ``z``.
    """

    def __init__(
        self,
        num_experts: int,
        k: int = 2,
        in_features: int | None = None,
        gamma: float = 1.0,
        entropy_weight: float = 1e-6,
    ) -> None:
        super().__init__(num_experts)
        if num_experts < 2:
            raise ConfigError(f"DSelect-k needs num_experts ≥ 2, got {num_experts}")
        if not 1 <= k <= num_experts:
            raise ConfigError(f"k must be in [1, num_experts={num_experts}], got {k}")
        if gamma <= 0:
            raise ConfigError(f"gamma must be > 0, got {gamma}")
        if entropy_weight < 0:
            raise ConfigError(f"entropy_weight must be ≥ 0, got {entropy_weight}")
        self.k = k
        self.gamma = gamma
        self.entropy_weight = entropy_weight
        self.num_bits = math.ceil(math.log2(num_experts))
        self.power_of_two = num_experts == 2**self.num_bits
        codes = [
            [(j >> (self.num_bits - 1 - bit)) & 1 == 1 for bit in range(self.num_bits)]
            for j in range(num_experts)
        ]
        self.codes: Tensor
        self.register_buffer("codes", torch.tensor(codes, dtype=torch.bool), persistent=False)
        self.reads_input = in_features is not None
        self.z_proj: nn.Linear | None = None
        self.w_proj: nn.Linear | None = None
        self.z: nn.Parameter | None = None
        self.w: nn.Parameter | None = None
        if in_features is not None:
            self.z_proj = nn.Linear(in_features, k * self.num_bits)
            self.w_proj = nn.Linear(in_features, k)
        else:
            self.z = nn.Parameter(torch.empty(k, self.num_bits))
            self.w = nn.Parameter(torch.empty(k))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.gamma / 100
        for p in self.z_params():
            nn.init.uniform_(p, -bound, bound)
        for p in self.w_params():
            nn.init.uniform_(p, -0.05, 0.05)

    def z_params(self) -> list[Tensor]:
        if self.z_proj is not None:
            return [self.z_proj.weight, self.z_proj.bias]
        assert self.z is not None
        return [self.z]

    def w_params(self) -> list[Tensor]:
        if self.w_proj is not None:
            return [self.w_proj.weight, self.w_proj.bias]
        assert self.w is not None
        return [self.w]

    def selectors(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(r, α)``: the selectors' weights over the experts ``(B, k, E)`` and the softmax
        weights of the selectors ``(B, k)``."""
        batch = x.shape[0]
        if self.z_proj is not None and self.w_proj is not None:
            z = self.z_proj(x).view(batch, self.k, self.num_bits)
            alpha = torch.softmax(self.w_proj(x), dim=-1)
        else:
            assert self.z is not None and self.w is not None
            z = self.z.unsqueeze(0).expand(batch, -1, -1)
            alpha = torch.softmax(self.w, dim=-1).unsqueeze(0).expand(batch, -1)
        s = smooth_step(z, self.gamma).unsqueeze(2)  # (B, k, 1, m)
        r = torch.where(self.codes, s, 1.0 - s).prod(dim=-1)  # (B, k, E)
        return r, alpha

    def forward(self, x: Tensor) -> Tensor:
        r, alpha = self.selectors(x)
        weights = torch.einsum("bk,bke->be", alpha, r)
        # a static gate's selectors are the same for every row: count them once
        rows = r if self.reads_input else r[:1]
        entropy = -(rows * torch.log(rows + 1e-6)).sum(dim=(1, 2)).mean()
        aux = self.entropy_weight * entropy
        if not self.power_of_two:
            aux = aux + (1.0 / (rows.sum(dim=-1) + 1e-6)).sum(dim=1).mean()
        self._aux = aux
        return weights

    def extra_repr(self) -> str:
        kind = "per-sample" if self.reads_input else "static"
        return f"num_experts={self.num_experts}, k={self.k}, gamma={self.gamma}, {kind}"


class HierarchicalGate(Gate):
    r"""HoME's gate over the experts one unit can see, with a self-gate on its own experts.

    Wang, Cao, Fu, Gai and Zhou, "HoME: Hierarchy of Multi-Gate Experts for Multi-Task Learning
    at Kuaishou", arXiv:2408.05430, 2024. The hierarchy mask decides which experts a gate sees
    (the architecture passes only those, in the order ``[others…, own…]``, the unit's own
    experts last). The weights are

    .. math::

        w(x) = \mathrm{softmax}(W x) + [0, \dots, 0, s(x)], \qquad
        s(x) = \begin{cases} \sigma(W_s x) & \text{one own expert} \\
                             \mathrm{softmax}(W_s x) & \text{several} \end{cases}

    — the self-gate ``s`` adds a path from the unit's own experts that does not compete with
    the shared ones, so a data-sparse task cannot starve its own experts of gradient. With
    ``own = 0`` or ``self_gate=False`` this is the plain softmax gate.
    """

    def __init__(
        self, in_features: int, num_experts: int, own: int = 0, self_gate: bool = True
    ) -> None:
        super().__init__(num_experts)
        if not 0 <= own <= num_experts:
            raise ValueError(f"own must be in [0, {num_experts}], got {own}")
        self.own = own
        self.linear = nn.Linear(in_features, num_experts, bias=False)
        self.self_linear = nn.Linear(in_features, own) if self_gate and own > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        weights = torch.softmax(self.linear(x), dim=-1)
        if self.self_linear is None:
            return weights
        logits = self.self_linear(x)
        own = torch.sigmoid(logits) if self.own == 1 else torch.softmax(logits, dim=-1)
        return weights + F.pad(own, (self.num_experts - self.own, 0))


class FeatureGate(nn.Module):
    r"""HoME's feature-gate: a private, re-weighted copy of the input for each expert.

    .. math::

        x_e = x \odot 2\,\sigma(x A_e B_e), \qquad A_e \in \mathbb{R}^{d \times r},\;
        B_e \in \mathbb{R}^{r \times d}

    (Wang et al. 2024, arXiv:2408.05430: a LoRA-style low-rank map per expert; the factor 2 keeps
    the mean scale at 1). Input ``(B, d)``, output ``(B, E, d)`` for an
    :class:`~manytask.nn.experts.ExpertBank`. ``A`` starts like a :class:`torch.nn.Linear`
    weight and ``B`` small (normal, std 0.01), so that the gate starts close to the identity and
    both factors receive gradient from the first step (manytask's choice; the paper does not
    state an initialisation).
    """

    def __init__(self, in_features: int, num_experts: int, rank: int) -> None:
        super().__init__()
        if rank < 1:
            raise ConfigError(f"feature_gate_rank must be ≥ 1 (0 disables the gate), got {rank}")
        self.num_experts = num_experts
        self.down = nn.Parameter(torch.empty(num_experts, in_features, rank))
        self.up = nn.Parameter(torch.empty(num_experts, rank, in_features))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.down, -bound, bound)
        nn.init.normal_(self.up, std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        low = torch.einsum("bd,edr->ber", x, self.down)
        scores = torch.einsum("ber,erd->bed", low, self.up)
        return x.unsqueeze(1) * (2.0 * torch.sigmoid(scores))
