"""Small solvers for balancing methods, written for torch on the tensors' device.

Each runs a fixed number of iterations (no convergence test that would read a value back to
the host inside a training step) and works in float64 on the tiny ``(T, T)`` problems.
"""
