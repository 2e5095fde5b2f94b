"""numba kernels for quantkit.nn on the CPU: the fused rescale of an int8 x int8 matrix product.

``rescale_int32_numba(acc, s_x, s_w, bias)`` computes, for every row i and column j::

    y[i, j] = float32(acc[i, j]) * (s_x[i] * s_w[j]) + bias[j]

with each operation a float32 operation rounded once, in that order (no fused multiply-add: no
``fastmath``), so it equals the torch expression ``acc.float().mul_(s_x[:, None] * s_w).add_(bias)``
bit for bit while reading the int32 accumulator once and writing the output once (torch's three
element-wise passes move about 4x the memory). Compiled on first call and cached on disk.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def _rescale_rows(acc, s_x, s_w, bias, out):
    m, n = acc.shape
    for i in prange(m):
        a = acc[i]
        o = out[i]
        s = s_x[i]
        for j in range(n):
            o[j] = np.float32(a[j]) * (s * s_w[j]) + bias[j]


def rescale_int32_numba(acc: np.ndarray, s_x: np.ndarray, s_w: np.ndarray, bias=None,
                        out=None) -> np.ndarray:
    """``float32(acc) * (s_x[:, None] * s_w[None, :]) + bias``; bias None means zeros.

    acc: C-contiguous int32 (M, N); s_x float32 (M,); s_w, bias float32 (N,); out: optional
    C-contiguous float32 (M, N).
    """
    m, n = acc.shape
    if out is None:
        out = np.empty((m, n), np.float32)
    if bias is None:
        bias = np.zeros(n, np.float32)
    if m and n:
        _rescale_rows(np.ascontiguousarray(acc), np.ascontiguousarray(s_x, np.float32),
                      np.ascontiguousarray(s_w, np.float32), np.ascontiguousarray(bias, np.float32),
                      out)
    return out
