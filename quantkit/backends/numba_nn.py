"""numba kernels for quantkit.nn on the CPU: per-row activation codes and the fused rescale.

``quantize_rows_absmax_numba(x)`` gives, for every row i of a float32 matrix, in one read of
the row (it stays in cache between the two loops)::

    alpha[i] = max_j |x[i, j]|            (0 when below MIN_POSITIVE_ALPHA, MAX_ALPHA above it)
    codes[i] = clamp(rint(x[i] * float32(127 / alpha[i])), -127, 127)   (0 where alpha == 0)
    scale[i] = float32(alpha[i] / 127)

exactly :func:`quantkit.reference.quantize_per_channel` (axis 0) with the ``"max"`` alpha of
:func:`quantkit.calibrate`. The maximum is taken over the IEEE bits with the sign cleared
(an integer maximum, which vectorizes and orders finite floats as their magnitudes); bits at
or above those of +Inf mark a row holding NaN or Inf, and such a row is reported, not quantized.

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

from .._constants import MAX_ALPHA, MIN_POSITIVE_ALPHA, QMAX

_ABS_MASK = np.int32(0x7FFFFFFF)
_INF_BITS = np.int32(0x7F800000)
_MIN_ALPHA = np.float32(MIN_POSITIVE_ALPHA)
_MAX_ALPHA = np.float32(MAX_ALPHA)
_QMAX = np.float32(QMAX)
_LOW = np.float32(-QMAX)


@njit(cache=True, inline="always")
def _magnitude_from_bits(top):
    """The float32 whose bits are ``top`` (sign clear, finite); 0 for zero and subnormals."""
    exponent = top >> 23
    if exponent == 0:
        return np.float32(0)
    significand = np.float64((top & 0x7FFFFF) | 0x800000)
    return np.float32(significand * 2.0 ** (exponent - 150))   # exact: 24 bits times 2^k


@njit(parallel=True, cache=True)
def _quantize_rows_absmax(x, bits, codes, scale):
    """Per-row |x|max codes (module docstring); returns the number of rows holding NaN/Inf."""
    m, n = x.shape
    bad = np.zeros(m, np.int64)
    for i in prange(m):
        b = bits[i]
        top = np.int32(0)
        for j in range(n):
            top = max(top, b[j] & _ABS_MASK)
        if top >= _INF_BITS:
            bad[i] = 1
            continue
        alpha = _magnitude_from_bits(top)
        if alpha < _MIN_ALPHA:
            alpha = np.float32(0)
        alpha = min(alpha, _MAX_ALPHA)   # FLT_MAX: 127 * scale would overflow
        scale[i] = alpha / _QMAX
        inv = _QMAX / alpha if alpha > 0 else np.float32(0)
        xs = x[i]
        qs = codes[i]
        for j in range(n):
            y = np.rint(xs[j] * inv)
            qs[j] = np.int8(min(max(y, _LOW), _QMAX))
    return bad.sum()


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
    C-contiguous float32 (M, N), which may be acc's own memory (``acc.view(np.float32)``): each
    element is read before its own result is written, and no other.
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


def quantize_rows_absmax_numba(x: np.ndarray):
    """``(codes, scale, bad_rows)`` of C-contiguous float32 ``x`` (M, N), module docstring.

    Rows holding NaN/Inf are counted in ``bad_rows`` and their codes and scale are left
    unwritten; the caller raises before using them.
    """
    m, n = x.shape
    codes = np.empty((m, n), np.int8)
    scale = np.zeros(m, np.float32)
    bad = _quantize_rows_absmax(x, x.view(np.int32), codes, scale) if m else 0
    return codes, scale, int(bad)
