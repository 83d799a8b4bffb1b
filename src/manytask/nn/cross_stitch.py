"""Cross-stitch networks: one column per task, the columns' activations mixed after every layer.

Misra, Shrivastava, Gupta and Hebert, "Cross-stitch Networks for Multi-task Learning",
CVPR 2016, arXiv:1604.03539.

Each task ``t`` has its own column of layers. After layer ``l`` the activations ``h₁ … h_T``
of the T columns are replaced by learned linear combinations (a *cross-stitch unit*)::

    h̃ₛˡ = Σₜ αˡ[s, t] · hₜˡ          (αˡ ∈ ℝ^{T×T}, one matrix per layer)

and column ``s`` feeds ``h̃ₛˡ`` to its next layer. Column ``s``'s last mixed activations go to
task ``s``'s head. The paper writes the two-task unit as ``[x̃_A; x̃_B] = [[α_AA, α_AB];
[α_BA, α_BB]] [x_A; x_B]`` and initialises it with ``α_same = 0.9``, ``α_different = 0.1``
(its ablation of initialisations, Sec. 4.1); for T tasks this module keeps the rows summing
to one: ``α[s, s] = α_same`` and ``α[s, t] = (1 − α_same)/(T − 1)`` for ``t ≠ s``.

The columns run batched: the T columns' weights are stacked into one ``(T, in, out)`` tensor
and applied with one batched matrix product (a grouped convolution for CNN columns), and a
unit mixes all columns with one product, so no layer loops over tasks in Python.

**What is shared.** Through the units every column's layers reach every task's output, so all
column layers and all units but the last are shared. The last unit (after the last column
layer) is split by rows: row ``s`` only forms task ``s``'s input, so it belongs to task ``s``
together with its head. ``return_features=True`` returns views of the stacked last column
activations ``Z = [h₁ᴸ; …; h_Tᴸ]`` (shape ``(T, B, F)``); task ``s`` reads its view, mixes it
with its row of the last unit and applies its head. Every path from a shared parameter to an
output passes through ``Z``.

**Deviations from the paper.** The paper stitches two AlexNets initialised from single-task
training, with units after the pooling and fully connected layers, and scales the learning
rate of the units up relative to the rest (Sec. 4.1); here the columns are manytask's MLP or
small CNN encoder trained from scratch, and the units use the optimiser's rate (use
:meth:`CrossStitchNetwork.stitch_parameters` for a parameter group of their own). Tabular
inputs are embedded once, by an input layer shared by the columns.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from manytask import registry
from manytask.columns import Columns
from manytask.errors import ConfigError
from manytask.nn.base import MultiTaskModel
from manytask.nn.encoders import activation as make_activation
from manytask.nn.heads import TaskHead
from manytask.nn.inputs import input_layer
from manytask.task import TaskSet


def stitch_init(tasks: int, alpha_same: float) -> Tensor:
    """The ``(T, T)`` initial unit: ``alpha_same`` on the diagonal, the rest of each row split
    evenly off the diagonal (rows sum to one; a single task gets ``[[1]]``)."""
    if tasks == 1:
        return torch.ones(1, 1)
    other = (1.0 - alpha_same) / (tasks - 1)
    return torch.full((tasks, tasks), other).fill_diagonal_(alpha_same)


def cross_stitch(alpha: Tensor, columns: Tensor) -> Tensor:
    """Mix stacked column activations: ``out[s] = Σₜ alpha[s, t] · columns[t]``.

    ``columns`` is ``(T, …)``; one matrix product mixes every sample and feature.
    """
    return (alpha @ columns.reshape(columns.shape[0], -1)).view_as(columns)


class ColumnLinear(nn.Module):
    """T linear layers applied as one: weights ``(T, in, out)``, biases ``(T, 1, out)``.

    ``forward`` takes ``(B, in)`` (every column reads the same input) or ``(T, B, in)`` (column
    ``t`` reads slice ``t``) and returns ``(T, B, out)``. Initialised like ``nn.Linear``.
    """

    def __init__(self, columns: int, in_features: int, out_features: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(
            torch.empty(columns, in_features, out_features).uniform_(-bound, bound)
        )
        self.bias = nn.Parameter(torch.empty(columns, 1, out_features).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:  # the same input for every column: broadcast it
            return torch.matmul(x, self.weight) + self.bias
        return torch.baddbmm(self.bias, x, self.weight)


class CrossStitchNetwork(MultiTaskModel):
    """T columns (MLP or CNN), a cross-stitch unit after every layer, a head per task.

    Args:
        tasks: the tasks; column ``t`` and head ``t`` belong to the ``t``-th task.
        input_shape: shape of one input sample (after ``front``, see below).
        front: the input layer (shared by the columns) and the width of its output; None for
            raw inputs of ``input_shape`` (images for CNN columns, anything for MLP columns).
        column: ``"mlp"`` or ``"cnn"``.
        hidden: MLP column widths (one unit after each layer).
        channels: CNN column blocks ``conv k×k → act → max-pool 2`` (one unit after each).
        kernel_size: CNN convolution size (odd, ``same`` padding).
        fc: width of the CNN column's final linear layer (one unit after it).
        activation: relu, gelu, silu or tanh.
        alpha_same: initial diagonal of every unit (see :func:`stitch_init`).
        head_hidden: hidden widths of every task head.
    """

    def __init__(
        self,
        tasks: TaskSet,
        input_shape: Sequence[int],
        front: tuple[nn.Module, int] | None = None,
        column: str = "mlp",
        hidden: Sequence[int] = (256, 128),
        channels: Sequence[int] = (16, 32),
        kernel_size: int = 5,
        fc: int = 128,
        activation: str = "relu",
        alpha_same: float = 0.9,
        head_hidden: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha_same <= 1.0:
            raise ConfigError(
                f"cross_stitch alpha_same must be in [0, 1] (the paper uses 0.9), got {alpha_same}"
            )
        self.task_names = tuple(tasks.names)
        n = len(self.task_names)
        self.act = make_activation(activation)
        self.front: nn.Module = front[0] if front is not None else nn.Identity()
        self.column = column
        self.conv: nn.ModuleList = nn.ModuleList()
        self.pool = nn.MaxPool2d(2)
        self.linear: nn.ModuleList = nn.ModuleList()
        if column == "cnn":
            width = self._build_cnn(n, input_shape, channels, kernel_size, fc)
            units = len(channels)  # one after each conv block; the last, after fc, is per task
        elif column == "mlp":
            if not hidden or min(hidden) < 1:
                raise ConfigError(
                    f"cross_stitch hidden needs at least one width ≥ 1, got {list(hidden)}"
                )
            width = front[1] if front is not None else math.prod(input_shape)
            for size in hidden:
                self.linear.append(ColumnLinear(n, width, size))
                width = size
            units = len(hidden) - 1
        else:
            raise ConfigError(f"cross_stitch column must be 'mlp' or 'cnn', got '{column}'")
        init = stitch_init(n, alpha_same)
        self.stitch = nn.ParameterList([nn.Parameter(init.clone()) for _ in range(units)])
        self.last_stitch = nn.ParameterDict(
            {name: nn.Parameter(init[t].clone()) for t, name in enumerate(self.task_names)}
        )
        self.heads = nn.ModuleDict(
            {name: TaskHead(width, task.output_dim, head_hidden) for name, task in tasks.items()}
        )

    def _build_cnn(
        self,
        n: int,
        input_shape: Sequence[int],
        channels: Sequence[int],
        kernel_size: int,
        fc: int,
    ) -> int:
        if len(input_shape) != 3:
            raise ConfigError(
                "cross_stitch cnn columns need image inputs (C, H, W); "
                f"this dataset gives {tuple(input_shape)} (use column: mlp)"
            )
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"cross_stitch kernel_size must be odd and ≥ 1, got {kernel_size}")
        if fc < 1 or any(c < 1 for c in channels):
            raise ConfigError(
                f"cross_stitch channels and fc must be ≥ 1, got {list(channels)} and {fc}"
            )
        c, h, w = input_shape
        for i, out in enumerate(channels):
            # block 1 reads the one input for all columns; later blocks are grouped by column
            conv = nn.Conv2d(
                c if i == 0 else n * c,
                n * out,
                kernel_size,
                padding=kernel_size // 2,
                groups=1 if i == 0 else n,
            )
            self.conv.append(conv)
            c, h, w = out, h // 2, w // 2
        if h < 1 or w < 1:
            raise ConfigError(
                f"too many cross_stitch cnn blocks ({len(channels)}) for "
                f"{tuple(input_shape)} inputs"
            )
        self.linear.append(ColumnLinear(n, c * h * w, fc))
        return fc

    def columns_forward(self, x: Tensor) -> Tensor:
        """The last activations of every column, ``(T, B, F)``, before the last unit."""
        n = len(self.task_names)
        x = self.front(x)
        if self.column == "cnn":
            batch = x.shape[0]
            for conv, alpha in zip(self.conv, self.stitch, strict=True):
                x = self.pool(self.act(conv(x)))  # (B, T·C, H, W): column t's C channels, t-th
                mixed = torch.einsum("st,btn->bsn", alpha, x.reshape(batch, n, -1))
                x = mixed.reshape(x.shape)
            # (T, B, C·H·W); without conv blocks every column reads the one flattened input
            x = x.reshape(batch, n, -1).transpose(0, 1) if len(self.conv) else x.flatten(1)
        elif x.dim() != 2:
            x = x.flatten(1)
        h: Tensor = self.act(self.linear[0](x))
        if self.column == "cnn":
            return h
        for layer, alpha in zip(self.linear[1:], self.stitch, strict=True):
            h = self.act(layer(cross_stitch(alpha, h)))
        return h

    def forward(  # type: ignore[override]
        self, x: Tensor, return_features: bool = False
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], list[Tensor]]:
        z = self.columns_forward(x)
        heads = list(self.heads.values())
        if not return_features:
            alpha = torch.stack([self.last_stitch[name] for name in self.task_names])
            mixed = cross_stitch(alpha, z)
            return {name: head(mixed[t]) for t, (name, head) in enumerate(self.heads.items())}
        if z._base is not None:  # the views must share one base that is not itself a view
            z = z.clone()
        # each task reads its own view of every column's last activations (see module doc)
        views = [z.view_as(z) for _ in self.task_names]
        outputs = {
            name: head(torch.einsum("t,tbf->bf", self.last_stitch[name], view))
            for name, head, view in zip(self.task_names, heads, views, strict=True)
        }
        return outputs, views

    def stitch_parameters(self) -> Iterator[nn.Parameter]:
        """Every cross-stitch unit (shared and last), e.g. for a learning-rate group."""
        yield from self.stitch
        yield from self.last_stitch.values()

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.front.parameters()
        yield from self.conv.parameters()
        yield from self.linear.parameters()
        yield from self.stitch

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        if name not in self.heads:
            raise ConfigError(f"unknown task '{name}'; tasks are: {', '.join(self.task_names)}")
        yield self.last_stitch[name]
        yield from self.heads[name].parameters()


@registry.register(
    "architecture",
    "cross_stitch",
    "cross-stitch networks: a column per task, learned T×T mixing after each layer "
    "(Misra et al. 2016)",
)
def cross_stitch_network(
    tasks: TaskSet,
    input_shape: Sequence[int],
    columns: Columns | None = None,
    column: str = "auto",
    hidden: list[int] = [256, 128],  # noqa: B006 - read-only default
    channels: list[int] = [16, 32],  # noqa: B006
    kernel_size: int = 5,
    fc: int = 128,
    activation: str = "relu",
    alpha_same: float = 0.9,
    head_hidden: list[int] = [],  # noqa: B006
    embedding_dim: int = 8,
) -> CrossStitchNetwork:
    """Cross-stitch network: ``h̃ₛˡ = Σₜ αˡ[s, t] hₜˡ`` after every layer of T task columns.

    Misra et al., "Cross-stitch Networks for Multi-task Learning", arXiv:1604.03539.

    ``column``: ``mlp``, ``cnn`` or ``auto`` (cnn for image inputs, mlp otherwise). Defaults:
    ``hidden`` (mlp) and ``channels``/``kernel_size``/``fc`` (cnn) are those of manytask's
    ``mlp`` and ``cnn`` encoders, so each column is one shared-bottom encoder;
    ``alpha_same = 0.9`` (off-diagonal ``0.1/(T − 1)``) generalises the paper's best two-task
    initialisation (0.9, 0.1) of its Sec. 4.1 ablation; ``embedding_dim`` (tabular inputs, one
    embedding shared by the columns) and ``head_hidden`` are shared-bottom's defaults.
    """
    if column == "auto":
        column = "cnn" if columns is None and len(input_shape) == 3 else "mlp"
    if column == "cnn" and columns is not None:
        raise ConfigError("cross_stitch cnn columns need image inputs; tables use column: mlp")
    front = input_layer(input_shape, columns, embedding_dim) if columns is not None else None
    return CrossStitchNetwork(
        tasks,
        input_shape,
        front=front,
        column=column,
        hidden=hidden,
        channels=channels,
        kernel_size=kernel_size,
        fc=fc,
        activation=activation,
        alpha_same=alpha_same,
        head_hidden=head_hidden,
    )
