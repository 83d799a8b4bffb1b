"""The registered adapter methods: each is a function of its parameters that returns an
:class:`~manytask.adapters.spec.AdapterSpec` (registry kind ``"adapter"``).

Importing this package registers them all; ``manytask list adapters`` shows them.
"""

from manytask.adapters.methods import (
    align_lora,
    lora,
    moslora,
    mtl_lora,
    multilora,
    poly,
    routed,
    scalearn,
)

__all__ = [
    "align_lora",
    "lora",
    "moslora",
    "mtl_lora",
    "multilora",
    "poly",
    "routed",
    "scalearn",
]
