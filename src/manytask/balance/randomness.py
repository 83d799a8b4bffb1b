"""Random numbers for balancing methods: reproducible, identical on every rank, no stalls.

Methods draw from their own CPU ``torch.Generator`` (its state goes into ``state_dict()``), so
a run is reproducible and every rank of a distributed run — seeded alike — draws the same
numbers. Draws move to the device through pinned memory, which does not block the host.
"""

from __future__ import annotations

import torch
from torch import Tensor


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded by ``seed`` or, when None, by the global torch RNG."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def host_to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """Move a freshly drawn CPU tensor to ``device`` without stalling the host: a plain copy
    from pageable memory waits for the CUDA stream, a copy from pinned memory does not."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
