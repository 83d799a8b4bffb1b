"""Data-free merging rules: each module registers its rules (kind ``merge_rule``) on import.

Shared pieces live in their own modules: :mod:`.task_vectors` (task vectors, per-model
weights), :mod:`.sparsify` (top-k, band, DARE, MagPrune and n:m masks), :mod:`.signs` (sign
election, disjoint mean and sum), :mod:`.combine` (the ways task vectors are combined, and the
sparsify-then-combine rule skeleton) and :mod:`.param_checks` (parameter errors). The table of
rules, formulas and defaults is in ``docs/merge-rules.md``.
"""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
