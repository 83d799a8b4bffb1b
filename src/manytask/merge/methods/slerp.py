r"""SLERP: spherical linear interpolation between two models' weights.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985 (the interpolation
formula), as used for model merging on each tensor flattened to a vector. With
:math:`\cos\Omega = \langle v_0, v_1 \rangle / (\lVert v_0\rVert \lVert v_1\rVert)`:

.. math::

    \operatorname{slerp}(v_0, v_1; t) =
    \frac{\sin((1 - t)\Omega)}{\sin\Omega}\, v_0 + \frac{\sin(t\Omega)}{\sin\Omega}\, v_1 .

When the two tensors are nearly colinear (:math:`|\cos\Omega|` above ``dot_threshold``) or one
is zero, :math:`\sin\Omega \approx 0` and the rule falls back to linear interpolation
:math:`(1 - t) v_0 + t v_1`, the limit of the formula as :math:`\Omega \to 0`. No base model is
used; exactly two task models are merged.

Defaults: ``t = 0.5`` (the midpoint, both models weighted alike); ``dot_threshold = 0.9995``
(our choice: below it :math:`\sin\Omega > 0.03`, far from the cancellation in float32; the
same value many merging tools use).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from manytask.merge.methods.param_checks import check_range
from manytask.merge.rule import MergeRule
from manytask.registry import register


def slerp(first: Tensor, second: Tensor, t: float, dot_threshold: float) -> Tensor:
    """Spherical interpolation of two tensors of one shape, linear when nearly colinear."""
    norms = float(first.norm()) * float(second.norm())
    cosine = float(torch.dot(first.reshape(-1), second.reshape(-1))) / norms if norms else 1.0
    if abs(cosine) > dot_threshold:
        return torch.lerp(first, second, t)
    omega = math.acos(max(-1.0, min(1.0, cosine)))
    sine = math.sin(omega)
    return first * (math.sin((1.0 - t) * omega) / sine) + second * (math.sin(t * omega) / sine)


@register(
    "merge_rule",
    "slerp",
    "spherical linear interpolation of two models, linear when nearly colinear (Shoemake, 1985)",
)
class Slerp(MergeRule):
    """SLERP between exactly two task models.

    Args:
        t: interpolation position in [0, 1] (0 gives the first model, 1 the second).
        dot_threshold: |cos Ω| above which the rule interpolates linearly, in (0, 1].
    """

    needs_base: ClassVar[bool] = False
    min_models: ClassVar[int] = 2
    max_models: ClassVar[int | None] = 2

    def __init__(self, t: float = 0.5, dot_threshold: float = 0.9995) -> None:
        self.t = check_range("slerp", "t", t, 0.0, 1.0)
        self.dot_threshold = check_range(
            "slerp", "dot_threshold", dot_threshold, 0.0, 1.0, low_open=True
        )

    def merge_tensor(
        self,
        name: str,
        base: Tensor | None,
        models: Sequence[Tensor],
        generator: torch.Generator,
    ) -> Tensor:
        self.check_models(len(models))
        return slerp(models[0], models[1], self.t, self.dot_threshold)
