r"""Random loss weighting (RLW): fresh random weights on the simplex at every step.

Lin, Ye, Xu, Shi and Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
Multi-Task Learning", TMLR 2022, arXiv:2111.10603:

.. math::

    \tilde w \sim \mathcal{N}(0, I_T), \qquad w = \operatorname{softmax}(\tilde w),
    \qquad \mathcal{L} = \sum_i w_i L_i

Defaults: the standard normal with softmax normalisation, the distribution the paper
recommends and reports in its main tables. The weights are drawn from the balancer's own
``torch.Generator`` (its state is part of ``state_dict()``), seeded from ``seed`` or, when
``seed`` is None, from the global torch RNG at construction, so a run's seed fixes them.

Also registered as ``random``: the paper's random gradient weighting (its Algorithm 2, torchjd's
``Random`` aggregator) gives the shared parameters the same update, ``Σ wᵢ ∇Lᵢ``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from manytask import registry
from manytask.balance.base import LossWeighting
from manytask.balance.randomness import host_to_device, seeded_generator
from manytask.errors import ConfigError


@registry.register(
    "balancer", "rlw", "random loss weighting (Lin et al., TMLR 2022, arXiv:2111.10603)"
)
@registry.register(
    "balancer",
    "random",
    "random gradient weighting, softmax of N(0, I) (Lin et al., TMLR 2022; alias of rlw)",
)
class RandomLossWeighting(LossWeighting):
    """Random loss weighting with softmax-normalised Gaussian weights.

    Args:
        tasks: task names.
        seed: seed of the weight generator; None draws one from the global torch RNG.
    """

    def __init__(self, tasks: Sequence[str], seed: int | None = None) -> None:
        super().__init__(tasks)
        if seed is not None and seed < 0:
            raise ConfigError(f"rlw: seed must be ≥ 0, got {seed}")
        self.generator = seeded_generator(seed)

    def weights(self, losses: Tensor) -> Tensor:
        z = torch.randn(self.num_tasks, generator=self.generator)
        return host_to_device(torch.softmax(z, dim=0), losses.device).to(losses.dtype)

    def get_extra_state(self) -> Any:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        self.generator.set_state(state["generator"])
