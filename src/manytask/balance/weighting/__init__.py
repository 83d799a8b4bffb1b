"""Loss-weighting methods: each maps the task losses of a step to weights.

Every module here registers its methods when :mod:`manytask.balance` is imported.
"""
