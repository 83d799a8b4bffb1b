"""Gradient-based methods: each maps per-task gradients (or their Gramian) to a direction.

Every module here registers its methods when :mod:`manytask.balance` is imported.
"""
