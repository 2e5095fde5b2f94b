"""Kernel backends: ``numba_cpu`` (NumPy arrays and CPU tensors) and ``cuda`` (CUDA tensors)."""
