"""What gradient-based methods need, computed once: per-task gradients, Gramians, and the way
back into the parameters.

**Parameter mode.** :func:`shared_jacobian` runs one backward pass per task and copies the
gradient of the shared parameters into row ``i`` of one preallocated ``(T, P)`` buffer ``J``.
The backward passes use ``Tensor.backward`` (not ``autograd.grad``), so every other parameter —
the task heads — accumulates its own task's gradient in ``.grad`` on the way, and no extra pass
is needed for them. On a CPU a loop of backward passes is faster than a batched (vmap) one;
the loop is also what every device supports.

**Feature mode.** When the model hands each task head its own view of the shared
representation ``Z`` (``model(x, return_features=True)`` returns those views, as manytask's
architectures do), :func:`one_pass_feature_backward` needs a single backward pass of
``Σᵢ Lᵢ``: a hook on each view records that task's gradient ``∂Lᵢ/∂Z``, and a hook on ``Z``
itself — which runs once every view's gradient is known — computes the direction from them and
replaces the gradient that flows into the encoder. Heads receive their own tasks' gradients,
the encoder receives ``∂Z/∂θ · dZ``; the cost is that of equal weighting plus the method's rule.
When every head begins with a narrow linear map of its view (:class:`LinearHeads` finds it in
the autograd graph), the hooks record the gradients of those maps' outputs instead, and the
method receives the rows as factors (:class:`LinearHeadRows`), whose Gramian costs a small
fraction of the rows'. From a size where that pays, the pass is split in two at ``Z``: the
heads' pass, which never forms the products ``δᵢ Mᵢᵀ`` that a plain backward sums into
``∂L/∂Z`` only to have them replaced, then the encoder's pass from ``Z`` with the direction
(see :func:`_factored_backward`). For a representation given any other way,
:func:`feature_jacobian` differentiates each loss with respect to ``Z`` (through the heads
only) and :func:`backward_through_features` runs the one backward pass through the encoder.

Nothing here reads a value back to the host.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence, Sized
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from manytask.errors import ConfigError


def stash_gradients(params: Sequence[nn.Parameter]) -> list[Tensor | None]:
    """Take the current ``.grad`` of ``params`` aside (set to None) and return them."""
    stash = [p.grad for p in params]
    for p in params:
        p.grad = None
    return stash


def jacobian_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-task gradients are gathered in for parameters or features of ``dtype``:
    float64 for float64 (a float32 Jacobian of a float64 model loses the directions of nearly
    opposite gradients, where methods like Nash-MTL are decided), float32 for the rest
    (float32, and the half-precision types, whose gradients are summed in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class RowBuffer:
    """The memory of a ``(T, n)`` Jacobian (float32, or float64 for a float64 model; see
    :func:`jacobian_dtype`), kept from one step to the next.

    A fresh allocation of a few megabytes on every step pays a page fault on the first touch of
    every page: on a CPU, stacking 40 feature gradients of 256 × 256 took 1.8 ms that way, as
    long as the rest of a small encoder's step. The matrix a step gets is valid until the next
    step asks for one; a method must not keep it (none does: directions and states are new
    tensors).
    """

    def __init__(self) -> None:
        self._data: Tensor | None = None

    def get(
        self, rows: int, columns: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        size = rows * columns
        data = self._data
        if data is None or data.numel() < size or data.device != device or data.dtype != dtype:
            self._data = data = torch.empty(size, dtype=dtype, device=device)
        return data[:size].view(rows, columns)


#: on a CPU, the Gramian of a Jacobian with at least this many columns is a sum of
#: ``_GRAMIAN_CHUNKS`` products of column blocks (see :func:`gramian`)
_CHUNKED_GRAMIAN_COLUMNS = 1 << 15
_GRAMIAN_CHUNKS = 8


def gramian(jacobian: Tensor) -> Tensor:
    """``G = J Jᵀ`` for a ``(T, P)`` Jacobian.

    On a CPU with many columns, ``J`` is cut into 8 blocks of columns and ``G`` is the sum of the
    blocks' Gramians, taken as one batched product: the CPU BLAS behind ``torch.mm`` runs a
    short, wide product like ``(10, P) @ (P, 10)`` on about one core, while the batched product
    spreads the blocks over the cores. On 2 cores it took 0.15 instead of 0.27 ms for
    ``(10, 65536)`` and 3.5 instead of 8.5 ms for ``(10, 10⁶)``, and about the same time from
    20 rows on (``benchmarks/balance_speed.py`` measures the steps). The result equals ``J Jᵀ``
    up to the order of the float32 sums.
    """
    rows, columns = jacobian.shape
    if jacobian.device.type != "cpu" or columns < _CHUNKED_GRAMIAN_COLUMNS:
        return jacobian @ jacobian.T
    width = columns // _GRAMIAN_CHUNKS
    cut = width * _GRAMIAN_CHUNKS
    blocks = jacobian[:, :cut].reshape(rows, _GRAMIAN_CHUNKS, width).transpose(0, 1)
    total = torch.bmm(blocks, blocks.transpose(1, 2)).sum(dim=0)
    if cut < columns:
        rest = jacobian[:, cut:]
        total += rest @ rest.T
    return total


def shared_jacobian(
    losses: Sequence[Tensor], shared: Sequence[nn.Parameter], buffer: RowBuffer | None = None
) -> Tensor:
    """``J[i] = ∇_shared Lᵢ`` as a ``(T, P)`` tensor (float32, or float64 when a shared
    parameter is float64), one backward pass per task (written into ``buffer`` when one is
    given).

    The shared parameters' ``.grad`` must be None on entry (see :func:`stash_gradients`) and are
    None again on return; every other parameter accumulates ``Σᵢ ∇Lᵢ`` as after
    ``sum(losses).backward()``.
    """
    if not shared:
        raise ConfigError(
            "this method needs the shared parameters: call backward(losses, "
            "shared=model.shared_parameters())"
        )
    sizes = [p.numel() for p in shared]
    buffer = buffer or RowBuffer()
    dtype = functools.reduce(torch.promote_types, {jacobian_dtype(p.dtype) for p in shared})
    jacobian = buffer.get(len(losses), sum(sizes), shared[0].device, dtype)
    last = len(losses) - 1
    for i, loss in enumerate(losses):
        loss.backward(retain_graph=i < last)
        offset = 0
        for p, n in zip(shared, sizes, strict=True):
            row = jacobian[i, offset : offset + n]
            if p.grad is None:
                row.zero_()
            else:
                row.copy_(p.grad.reshape(-1))
                p.grad = None
            offset += n
    return jacobian


def set_shared_gradients(
    shared: Sequence[nn.Parameter], direction: Tensor, stash: Sequence[Tensor | None]
) -> None:
    """``p.grad = stash + direction[slice of p]``: what a plain backward would have left."""
    offset = 0
    for p, old in zip(shared, stash, strict=True):
        n = p.numel()
        piece = direction[offset : offset + n].view_as(p).to(p.dtype)
        p.grad = piece.clone() if old is None else old + piece
        offset += n


def as_feature_list(features: Tensor | Sequence[Tensor] | None) -> list[Tensor]:
    """The shared representation(s) as a list, checked to carry a graph."""
    if features is None:
        raise ConfigError(
            "this method runs in feature mode and needs the shared representation: call "
            "backward(losses, features=z) with z from model(x, return_features=True)"
        )
    items = [features] if isinstance(features, Tensor) else list(features)
    for z in items:
        if not z.requires_grad:
            raise ConfigError(
                "the shared representation passed as features= is detached from the graph "
                "(requires_grad is False); pass the tensor the task heads consumed"
            )
    return items


def are_task_views(features: Sequence[Tensor], tasks: int) -> bool:
    """True when ``features`` are one view per task of a single representation tensor."""
    if len(features) != tasks:
        return False
    base = features[0]._base
    return base is not None and base.requires_grad and all(f._base is base for f in features)


class LinearHeadRows:
    """The per-task gradients of a ``(B, D)`` representation ``Z`` kept as factors: task ``i``'s
    head begins with a linear map ``Z Mᵢ`` (``Mᵢ`` of shape ``(D, hᵢ)``, an ``nn.Linear``'s
    transposed weight), so ``∂Lᵢ/∂Z = δᵢ Mᵢᵀ`` with ``δᵢ = ∂Lᵢ/∂(Z Mᵢ)`` of shape ``(B, hᵢ)``.

    The Gramian is then ``Gᵢⱼ = ⟨δᵢᵀδⱼ, MᵢᵀMⱼ⟩`` (the sum over the entries of the elementwise
    product), which costs ``H²(B + D)`` for ``H = Σ hᵢ`` instead of ``T²·B·D`` for the
    ``(T, B·D)`` matrix of rows; ``Jᵀw = Σ wᵢ δᵢ Mᵢᵀ`` is one ``(B, H) @ (H, D)`` product. With
    one linear output per task (regression, a binary attribute) at ``T = 40``, ``B = D = 256``,
    that is 0.8 M instead of 105 M multiply-adds for the Gramian, and the rows are never
    stacked. ``deltas`` is ``[δ₁ … δ_T]`` side by side, ``maps`` is ``[M₁ … M_T]``.
    """

    def __init__(self, deltas: Tensor, maps: Tensor, widths: Sequence[int]) -> None:
        self.deltas = deltas
        self.maps = maps
        self.widths = tuple(widths)

    def unscaled(self, scale: Tensor) -> LinearHeadRows:
        """The rows of a loss multiplied by ``scale`` (an AMP loss scale), divided by it."""
        return LinearHeadRows(self.deltas / scale, self.maps, self.widths)

    def gramian(self) -> Tensor:
        products = (self.deltas.T @ self.deltas) * (self.maps.T @ self.maps)
        tasks = len(self.widths)
        if products.shape[0] == tasks:  # one column per task
            return products
        owner = torch.repeat_interleave(
            torch.arange(tasks, device=products.device),
            torch.tensor(self.widths, device=products.device),
        )
        # block sums: rows of a task, then columns of a task
        by_row = products.new_zeros(tasks, products.shape[1]).index_add_(0, owner, products)
        return products.new_zeros(tasks, tasks).index_add_(1, owner, by_row)

    def weighted_sum(self, weights: Tensor) -> Tensor:
        """``Jᵀw``, flattened like a row of ``J``."""
        per_column = weights.to(self.deltas.dtype)
        if self.deltas.shape[1] != len(self.widths):
            per_column = torch.repeat_interleave(
                per_column, torch.tensor(self.widths, device=per_column.device)
            )
        return ((self.deltas * per_column) @ self.maps.T).reshape(-1)

    def dense(self) -> Tensor:
        """The ``(T, B·D)`` rows themselves (for methods that read them): with one column per
        task, the outer products ``δᵢ mᵢᵀ`` as one broadcast product (40 heads on a
        256 × 256 representation: 0.7 against 2 ms for forty products and a stack)."""
        tasks = len(self.widths)
        if self.deltas.shape[1] == tasks:  # the factors made contiguous (B·T and D·T
            # numbers), so that the product is laid out row by row (it follows its inputs)
            deltas, maps = self.deltas.T.contiguous(), self.maps.T.contiguous()
            return (deltas[:, :, None] * maps[:, None, :]).reshape(tasks, -1)
        pieces = zip(
            self.deltas.split(self.widths, dim=1), self.maps.split(self.widths, dim=1), strict=True
        )
        return torch.stack([(delta @ m.T).reshape(-1) for delta, m in pieces])


#: what a method receives in feature mode: the ``(T, |Z|)`` rows, or their linear-head factors
FeatureRows = Tensor | LinearHeadRows


def rows_gramian(rows: FeatureRows) -> Tensor:
    """``J Jᵀ`` of the rows in either form."""
    return rows.gramian() if isinstance(rows, LinearHeadRows) else gramian(rows)


def rows_weighted_sum(rows: FeatureRows, weights: Tensor) -> Tensor:
    """``Jᵀw`` of the rows in either form, flattened like a row."""
    if isinstance(rows, LinearHeadRows):
        return rows.weighted_sum(weights)
    return weights.to(rows.dtype) @ rows


def rows_unscaled(rows: FeatureRows, scale: Tensor) -> FeatureRows:
    """The rows of losses multiplied by an AMP loss ``scale``, divided by it."""
    return rows.unscaled(scale) if isinstance(rows, LinearHeadRows) else rows / scale


def _factors_are_cheaper(nodes: Sequence[Any], base: Tensor) -> bool:
    """``H²(B + D) < T²·B·D``: the factored Gramian costs less than the dense one."""
    width: int = sum(node._saved_mat2.shape[1] for node in nodes)
    samples, features = base.shape
    return width * width * (samples + features) < len(nodes) ** 2 * samples * features


class HeadGraph(NamedTuple):
    """What :class:`LinearHeads` found in the graph below the losses."""

    #: each task's first matrix-product node, the one that consumes its view
    nodes: list[Any]
    #: the gradient edge of every leaf that the losses reach without passing through a view
    #: (the heads' parameters): its ``AccumulateGrad`` node
    leaves: list[GradientEdge]


class LinearHeads:
    """Finds, from the autograd graph, whether every task's head begins with a linear map of its
    view of the representation, and remembers a model whose heads do not.

    A view qualifies when, in the graph below the losses, exactly one operation consumes it and
    that operation is a matrix product with the view on the left (``nn.Linear`` and ``x @ W``
    on a 2-D representation: ``addmm`` or ``mm``): then the gradient that reaches the view is
    exactly ``δ Mᵀ`` (see :class:`LinearHeadRows`). Anything else (a view read twice or by
    another task, a non-linear first operation, a representation of more than two dimensions)
    leaves the rows dense, as do heads so wide that factors would cost more (see
    :func:`_factors_are_cheaper`). The search visits every node between the losses and the
    views, about 0.1 ms for 40 one-layer heads; a model found unsuitable once is not searched
    again, since a model's heads keep their structure from one step to the next (the search
    decides only how the rows are kept, never the result).

    ``entangled`` records a model in which a leaf above the views also feeds ``Z`` (a head
    that reads an earlier layer of the encoder as well): its heads' pass would reach the
    encoder, so such a model keeps the single pass (see :func:`_factored_backward`).
    """

    def __init__(self) -> None:
        self.unsuitable = False
        self.entangled = False

    def find(self, losses: Sequence[Tensor], views: Sequence[Tensor]) -> HeadGraph | None:
        """Each view's matrix-product node and the heads' leaves where the factors are the
        cheaper form, or None (and the model is remembered as unsuitable)."""
        if self.unsuitable:
            return None
        found = self._consumers(losses, views)
        if found is None or not _factors_are_cheaper(found.nodes, views[0]):
            self.unsuitable = True
            return None
        return found

    @staticmethod
    def _consumers(losses: Sequence[Tensor], views: Sequence[Tensor]) -> HeadGraph | None:
        base = views[0]._base
        if base is None or base.dim() != 2:
            return None
        index = {view.grad_fn: i for i, view in enumerate(views)}
        found: list[Any] = [None] * len(views)
        leaves: list[GradientEdge] = []
        stop = base.grad_fn
        seen = set()
        pending = [loss.grad_fn for loss in losses if loss.grad_fn is not None]
        while pending:
            node = pending.pop()
            if node in seen:
                continue
            seen.add(node)
            if type(node).__name__ == "AccumulateGrad":  # a leaf: its .grad is written here
                leaves.append(GradientEdge(node, 0))
                continue
            for position, (child, _) in enumerate(node.next_functions):
                if child is None or child is stop:
                    continue
                i = index.get(child)
                if i is None:
                    if child not in seen:
                        pending.append(child)
                    continue
                kind = type(node).__name__
                left = (kind == "AddmmBackward0" and position == 1) or (
                    kind == "MmBackward0" and position == 0
                )
                if found[i] is not None or not left:
                    return None
                found[i] = node
        if any(node is None for node in found):
            return None
        return HeadGraph(found, leaves)


def one_pass_feature_backward(
    losses: Sequence[Tensor],
    views: Sequence[Tensor],
    combine: Callable[[FeatureRows], Tensor],
    buffer: RowBuffer | None = None,
    heads: LinearHeads | None = None,
    dense: bool = False,
) -> None:
    """One backward pass of ``Σᵢ Lᵢ`` in which the encoder receives ``combine(J_Z)``.

    ``views[i]`` is the view of the representation ``Z`` that task ``i``'s head consumed;
    ``combine`` maps the per-task gradients to the flattened direction for ``Z``. They come as
    the ``(T, |Z|)`` matrix (gathered in ``buffer`` when one is given) or, when ``heads`` is
    given and finds a linear first layer in every head, narrow enough that factors are the
    cheaper form, as :class:`LinearHeadRows`. A method that reads the rows themselves
    (``dense``) gets factors only where the pass is split (:func:`_factored_backward`), which
    spares the heads' own products: elsewhere a single pass forms those anyway.
    """
    base = views[0]._base
    assert base is not None
    wanted = not dense or (heads is not None and not heads.entangled and _splits(views, base))
    graph = heads.find(losses, views) if heads is not None and wanted else None
    if heads is not None and graph is not None:
        _factored_backward(losses, graph, base, combine, heads)
        return
    captured: list[Tensor | None] = [None] * len(views)

    def keep(index: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            captured[index] = grad

        return hook

    rows = buffer or RowBuffer()

    def replace(_total: Tensor) -> Tensor:
        jacobian = rows.get(len(captured), base.numel(), base.device, jacobian_dtype(base.dtype))
        if all(grad is not None for grad in captured):  # one copy kernel for all rows
            torch.stack([grad.reshape(-1) for grad in captured if grad is not None], out=jacobian)
        else:
            for row, grad in zip(jacobian, captured, strict=True):
                if grad is None:
                    row.zero_()
                else:
                    row.copy_(grad.reshape(-1))
        return combine(jacobian).view_as(base).to(base.dtype)

    handles = [view.register_hook(keep(i)) for i, view in enumerate(views)]
    _sum_backward(losses, [*handles, base.register_hook(replace)])


#: :func:`_factored_backward` splits its pass in two from this many entries of the heads'
#: products into ``Z`` (``T·B·D``); below it the second pass costs more than it saves. Measured
#: on a CPU: one-output heads on a 256 × 256 representation cross over between 4 and 6 heads
#: (262,144 and 393,216 entries), on a 128 × 128 one between 10 and 40.
_SPLIT_FROM = 3 << 17


def _splits(heads: Sized, base: Tensor) -> bool:
    """Whether the heads' products into ``Z`` are large enough to split the pass for."""
    return len(heads) * base.numel() >= _SPLIT_FROM


def _factored_backward(
    losses: Sequence[Tensor],
    graph: HeadGraph,
    base: Tensor,
    combine: Callable[[FeatureRows], Tensor],
    heads: LinearHeads,
) -> None:
    """:func:`one_pass_feature_backward` with the rows as :class:`LinearHeadRows`: a hook
    before each head's first product records ``δᵢ``, the gradient of its output.

    The backward pass is split at ``Z``. The heads' pass runs ``Σᵢ Lᵢ`` back to the heads'
    leaves and to the inputs of those products only (``inputs=``), so no head computes its
    product into ``Z``, ``δᵢ Mᵢᵀ``: ``T`` dense ``(B, D)`` products and their sum, which a
    plain backward forms and the direction would replace (with 40 one-output heads on a
    256 × 256 representation this took feature mode's own cost from 1.12–1.17 to 0.96–0.99×
    equal weighting's step). The encoder's pass then
    runs from ``Z`` with the direction. Every leaf receives what the single pass gives it.
    Where those products hold fewer than :data:`_SPLIT_FROM` entries, the second pass would
    cost more than it saves, and the single pass runs: a hook on ``Z`` replaces what arrives
    there with the direction. Should a leaf above the views also feed ``Z`` (a head reading an
    earlier encoder layer), the heads' pass reaches ``Z``; a hook there then lets nothing
    through, the encoder's pass adds the direction, and the model keeps the single pass from
    the next step on.
    """
    dtype = jacobian_dtype(base.dtype)
    pieces = []
    for node in graph.nodes:
        product = node._saved_mat2
        alpha = getattr(node, "_saved_alpha", 1)
        pieces.append(product if alpha == 1 else product * alpha)
    widths = [m.shape[1] for m in pieces]
    maps = torch.cat(pieces, dim=1).to(dtype)  # cast once, not per head
    deltas: list[Tensor | None] = [None] * len(graph.nodes)

    def keep(index: int) -> Callable[[tuple[Tensor | None, ...]], None]:
        def hook(grad_outputs: tuple[Tensor | None, ...]) -> None:
            deltas[index] = grad_outputs[0]

        return hook

    def direction() -> Tensor:
        columns = [
            base.new_zeros(base.shape[0], width) if delta is None else delta
            for delta, width in zip(deltas, widths, strict=True)
        ]
        rows = LinearHeadRows(torch.cat(columns, dim=1).to(dtype), maps, widths)
        return combine(rows).view_as(base).to(base.dtype)

    handles = [node.register_prehook(keep(i)) for i, node in enumerate(graph.nodes)]
    if heads.entangled or not _splits(graph.nodes, base):
        _sum_backward(losses, [*handles, base.register_hook(lambda _total: direction())])
        return
    reached: list[bool] = []

    def block(total: Tensor) -> Tensor:
        reached.append(True)
        return torch.zeros_like(total)

    handles.append(base.register_hook(block))
    # the heads' pass: the products' nodes are inputs so that they run (and their hooks)
    # even where a head's weight is frozen; their inputs from the views are never needed
    edges = [GradientEdge(node, 0) for node in graph.nodes]
    try:
        # the graph is kept: an entangled model's heads' pass runs encoder nodes
        torch.autograd.backward(
            torch.stack(list(losses)).sum(), inputs=[*graph.leaves, *edges], retain_graph=True
        )
    finally:
        for handle in handles:
            handle.remove()
    torch.autograd.backward(base, direction())
    if reached:
        heads.entangled = True


def _sum_backward(losses: Sequence[Tensor], handles: Sequence[Any]) -> None:
    """One backward pass of ``Σᵢ Lᵢ``, then the hooks in ``handles`` are removed."""
    try:
        torch.stack(list(losses)).sum().backward()
    finally:
        for handle in handles:
            handle.remove()


def feature_jacobian(losses: Sequence[Tensor], features: Sequence[Tensor]) -> Tensor:
    """``J_Z[i] = ∂Lᵢ/∂Z`` flattened over every sample and feature, as a ``(T, ΣZ)`` tensor."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, list(features), retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(z))
                    .reshape(-1)
                    .to(jacobian_dtype(z.dtype))
                    for g, z in zip(grads, features, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def backward_through_features(total: Tensor, features: Sequence[Tensor], direction: Tensor) -> None:
    """Back-propagate ``total`` with the gradient arriving at the features replaced by
    ``direction`` (flattened like :func:`feature_jacobian`)."""
    handles = []
    offset = 0
    for z in features:
        n = z.numel()
        piece = direction[offset : offset + n].view_as(z).to(z.dtype)
        handles.append(z.register_hook(lambda _grad, piece=piece: piece))
        offset += n
    try:
        total.backward()
    finally:
        for handle in handles:
            handle.remove()
