"""Small solvers for balancing methods, written for torch on the tensors' device.

They work in float64 on the tiny ``(T, T)`` problems. On accelerators the iterative ones run
a fixed number of iterations (a convergence test would read a value back to the host inside a
training step); on a CPU, where reading a value costs no synchronisation, they stop once
converged, and the loops of the min-norm, Nash and small non-negative QP solvers run in numpy
(:mod:`.backend`), whose small operations cost a fraction of torch's.
"""
