"""MTAN: a shared CNN with task-specific soft-attention modules at every stage.

Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019,
arXiv:1803.10704.

The shared backbone has S stages; stage ``j`` runs a few ``3×3 conv → BN → ReLU`` layers on
the pooled output of stage ``j − 1``. Let ``uʲ`` be the output of its first layer and ``pʲ``
that of its last. Task ``i`` has an attention module per stage that turns the shared features
into a soft mask and applies it::

    a_i¹ = h_i¹(g_i¹(u¹))
    a_iʲ = h_iʲ(g_iʲ([uʲ ; f_iʲ(â_iʲ⁻¹)]))        j ≥ 2
    â_iʲ = a_iʲ ⊙ pʲ

``g`` is ``1×1 conv → BN → ReLU``, ``h`` is ``1×1 conv → BN → sigmoid`` (so ``a ∈ (0, 1)``),
``[· ; ·]`` is channel concatenation and ``f`` is ``3×3 conv → BN → ReLU → max-pool 2``,
which brings the task's previous attended features to the next stage's resolution and width.
Task ``i``'s head reads ``â_iˢ``: global average pooling, then a :class:`TaskHead`.

**Scaled down from the paper.** The paper attaches the modules to SegNet (a VGG-16 encoder
with five stages of 64–512 channels and 2–3 convolutions each, plus a mirrored decoder) for
dense prediction. Here there is no decoder (the tasks predict one value or class per image),
the default backbone has three stages of 16, 32, 64 channels (a quarter of VGG-16's first
three stages) with two convolutions each (VGG-16's first stages have two), and the heads pool
globally instead of predicting per pixel. Defaults work on Multi-Fashion ``(1, 28, 28)``.

**Deviation: ``f`` is per task.** The paper describes ``fʲ`` as one feature extractor shared
by all tasks. A shared ``fʲ`` would be a shared parameter that only ever reads task-specific
features, so no shared representation could separate the tasks' gradients (feature-mode
balancing would miss it). Each task has its own ``f_iʲ`` here, which keeps a clean cut.

**What is shared.** The backbone is shared; the attention modules, the ``f`` layers and the
head of task ``i`` are task ``i``'s. ``return_features=True`` returns per-task views of one
tensor holding every stage's ``uʲ`` and ``pʲ``, flattened and concatenated per sample
(``(B, Σⱼ 2·Cⱼ·Hⱼ·Wⱼ)``); each task slices its view back into stages. These are all the task
parts read from the backbone, so every path from a shared parameter to an output passes
through them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from manytask import registry
from manytask.columns import Columns
from manytask.errors import ConfigError
from manytask.nn.base import MultiTaskModel
from manytask.nn.heads import TaskHead
from manytask.task import TaskSet

Stage = tuple[Tensor, Tensor]  # (u, p): first and last layer outputs of one backbone stage


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """``conv k×k (same padding, no bias) → BatchNorm → ReLU``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def attention_mask(in_channels: int, channels: int) -> nn.Sequential:
    """``h ∘ g``: ``1×1 conv → BN → ReLU → 1×1 conv → BN → sigmoid``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 1, bias=False),
        nn.BatchNorm2d(channels),
        nn.Sigmoid(),
    )


class TaskAttention(nn.Module):
    """One task's part of MTAN: an attention mask per stage, the ``f`` layers between stages
    and the head."""

    def __init__(
        self, channels: Sequence[int], output_dim: int, head_hidden: Sequence[int] = ()
    ) -> None:
        super().__init__()
        self.masks = nn.ModuleList(
            [attention_mask(c if j == 0 else 2 * c, c) for j, c in enumerate(channels)]
        )
        self.bridges = nn.ModuleList(
            [
                nn.Sequential(conv_bn_relu(channels[j - 1], channels[j]), nn.MaxPool2d(2))
                for j in range(1, len(channels))
            ]
        )
        self.head = TaskHead(channels[-1], output_dim, head_hidden)

    def forward(self, stages: Sequence[Stage]) -> Tensor:
        attended: Tensor | None = None
        for j, (u, p) in enumerate(stages):
            if attended is None:
                mask = self.masks[j](u)
            else:
                mask = self.masks[j](torch.cat([u, self.bridges[j - 1](attended)], dim=1))
            attended = mask * p
        assert attended is not None
        out: Tensor = self.head(attended.mean(dim=(2, 3)))
        return out


class MTAN(MultiTaskModel):
    """Shared CNN backbone with per-task attention (see the module docstring).

    Args:
        tasks: the tasks; each gets attention modules and a head.
        input_shape: ``(C, H, W)`` of one image.
        channels: width of each backbone stage.
        convs_per_stage: ``3×3 conv → BN → ReLU`` layers per stage (≥ 2: ``u`` is the first
            layer's output, ``p`` the last's).
        head_hidden: hidden widths of every head.
    """

    def __init__(
        self,
        tasks: TaskSet,
        input_shape: Sequence[int],
        channels: Sequence[int] = (16, 32, 64),
        convs_per_stage: int = 2,
        head_hidden: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(
                f"mtan needs image inputs (C, H, W); this dataset gives {tuple(input_shape)}"
            )
        if not channels or min(channels) < 1:
            raise ConfigError(f"mtan channels needs at least one width ≥ 1, got {list(channels)}")
        if convs_per_stage < 2:
            raise ConfigError(
                "mtan convs_per_stage must be ≥ 2 (attention reads the first layer of a stage "
                f"and masks the last), got {convs_per_stage}"
            )
        c, h, w = input_shape
        if h >> (len(channels) - 1) < 1 or w >> (len(channels) - 1) < 1:
            raise ConfigError(
                f"too many mtan stages ({len(channels)}) for {tuple(input_shape)} inputs: each "
                "stage after the first halves the resolution"
            )
        self.task_names = tuple(tasks.names)
        # stage j: first[j] gives uʲ, rest[j] turns it into pʲ
        self.first = nn.ModuleList()
        self.rest = nn.ModuleList()
        for out in channels:
            self.first.append(conv_bn_relu(c, out))
            self.rest.append(
                nn.Sequential(*[conv_bn_relu(out, out) for _ in range(convs_per_stage - 1)])
            )
            c = out
        self.pool = nn.MaxPool2d(2)
        self.tasks = nn.ModuleDict(
            {
                name: TaskAttention(channels, task.output_dim, head_hidden)
                for name, task in tasks.items()
            }
        )

    def backbone(self, x: Tensor) -> list[Stage]:
        """``(uʲ, pʲ)`` of every stage of the shared backbone."""
        stages: list[Stage] = []
        for j, (first, rest) in enumerate(zip(self.first, self.rest, strict=True)):
            if j > 0:
                x = self.pool(x)
            u = first(x)
            x = rest(u)
            stages.append((u, x))
        return stages

    def forward(  # type: ignore[override]
        self, x: Tensor, return_features: bool = False
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], list[Tensor]]:
        stages = self.backbone(x)
        if not return_features:
            return {name: part(stages) for name, part in self.tasks.items()}
        flat = [t for stage in stages for t in stage]
        shapes = [t.shape[1:] for t in flat]
        base = torch.cat([t.flatten(1) for t in flat], dim=1)
        views = [base.view_as(base) for _ in self.task_names]
        outputs = {
            name: part(_unflatten(view, shapes))
            for (name, part), view in zip(self.tasks.items(), views, strict=True)
        }
        return outputs, views

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.first.parameters()
        yield from self.rest.parameters()

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        if name not in self.tasks:
            raise ConfigError(f"unknown task '{name}'; tasks are: {', '.join(self.task_names)}")
        return self.tasks[name].parameters()


def _unflatten(flat: Tensor, shapes: Sequence[torch.Size]) -> list[Stage]:
    """Slice a ``(B, Σ sizes)`` tensor back into the stages' ``(u, p)`` pairs."""
    sizes = [s.numel() for s in shapes]
    pieces = [
        piece.reshape(-1, *shape)
        for piece, shape in zip(flat.split(sizes, dim=1), shapes, strict=True)
    ]
    return [(pieces[k], pieces[k + 1]) for k in range(0, len(pieces), 2)]


@registry.register(
    "architecture",
    "mtan",
    "MTAN: shared CNN, per-task soft-attention masks at every stage (Liu et al. 2019)",
)
def mtan(
    tasks: TaskSet,
    input_shape: Sequence[int],
    columns: Columns | None = None,
    channels: list[int] = [16, 32, 64],  # noqa: B006 - read-only default
    convs_per_stage: int = 2,
    head_hidden: list[int] = [],  # noqa: B006
) -> MTAN:
    """MTAN: ``â_iʲ = σ-mask_iʲ([uʲ ; f_iʲ(â_iʲ⁻¹)]) ⊙ pʲ`` on every stage of a shared CNN.

    Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention", arXiv:1803.10704.

    Image inputs only. Defaults: ``channels = [16, 32, 64]`` is a quarter of the widths of
    the first three stages of the paper's VGG-16/SegNet backbone (64, 128, 256);
    ``convs_per_stage = 2`` as in VGG-16's first two stages; ``head_hidden = []`` (a linear
    head after global average pooling) as in shared-bottom.
    """
    if columns is not None:
        raise ConfigError("mtan needs image inputs (C, H, W); it cannot read tabular columns")
    return MTAN(tasks, input_shape, channels, convs_per_stage, head_hidden)
