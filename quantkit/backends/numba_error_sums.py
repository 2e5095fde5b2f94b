"""The error-sum primitives shared by the numba calibration kernels and the row sweep.

The arithmetic of :mod:`quantkit.reference` for one float32 alpha (``scale_inv``), the exact
truncation to int64 that keeps fixed-point loops vectorised (``trunc_i64``), the fixed-point units
(``unit_inverse``, ``search_unit``), the search's error sum ``sse_search`` and the tie rule
``better``, and the float32 constants they compare in. This module imports no other kernel
module, so every kernel module can import it.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .._constants import MIN_POSITIVE_ALPHA, QMAX

#: float32 forms of the constants every kernel compares in.
Q = np.float32(QMAX)
Q64 = float(QMAX)  # the float64 form
ZERO = np.float32(0.0)
MIN_ALPHA = np.float32(MIN_POSITIVE_ALPHA)  # smaller positive alphas are not legal
ABS_MASK = np.int32(0x7FFFFFFF)  # the float32 bits of |x|: x's bits & ABS_MASK
#: Ratio between the points of the coarse geometric scans from amax down (the small-array search
#: and the histogram model's search).
COARSE_RATIO = 2.0 ** (-1.0 / 8.0)
_MAGIC = 6755399441055744.0  # 1.5 * 2^52: its ulp is 1
_MAGIC_BITS = 0x4338000000000000


@intrinsic
def _bits_f64(typingctx, x):
    """The int64 bit pattern of a float64 (a register move)."""
    sig = types.int64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


@njit(cache=True, inline="always")
def trunc_i64(d):
    """``np.int64(d)`` (truncation toward zero) of a float64 with ``|d| < 2^51``, exactly, in a form
    that vectorises without AVX-512: ``trunc(d) + 1.5 * 2^52`` is exact and holds the integer in
    its low mantissa bits, so its bit pattern minus that of 1.5 * 2^52 is ``trunc(d)``. (AVX2 has no
    float-to-int64 conversion; ``np.int64(d)`` compiles to one scalar conversion per element.)"""
    return _bits_f64(np.trunc(d) + _MAGIC) - _MAGIC_BITS


@njit(cache=True, inline="always")
def scale_inv(alpha):
    """(scale, inv_scale) of reference.py for one float32 alpha: 0 or >= MIN_POSITIVE_ALPHA."""
    a = np.float32(alpha)
    scale = np.float32(a / Q)
    inv = np.float32(Q / a) if a > ZERO else ZERO
    return scale, inv


@njit(cache=True, inline="always")
def quantization_error(v, scale, inv):
    """The exact float32 error ``v - min(rint(v * inv), 127) * scale`` of one |x| value ``v``
    (``scale``, ``inv`` from scale_inv): the expression of every error-sum kernel."""
    return v - min(np.rint(v * inv), Q) * scale


@njit(cache=True)
def unit_inverse(amax, n):
    """``2^k / amax^2`` with ``k = min(50, 62 - ceil(log2 n))``: fixed-point units per e^2."""
    lg = 0
    while (1 << lg) < n:
        lg += 1
    k = min(50, 62 - lg)
    a = np.float64(amax)
    return np.ldexp(1.0, k) / (a * a)


@njit(cache=True)
def search_unit(amax, n):
    """The power of two ``p = 2^m`` that scales errors in the search kernels (``sse_search*``).

    With ``h = min(25, (62 - ceil(log2 n)) // 2)`` and ``2^E <= amax < 2^(E+1)``, ``m = h - 1 - E``
    (kept within float32's normal powers of two), so every ``|e * p| <= amax * p < 2^h``: an
    element adds less than ``2^(2h)`` and ``n`` of them less than ``2^62``. Multiplying by a power
    of two is exact, and scaling x by ``2^j`` scales p by ``2^-j``, so ``e * p`` (and every sum)
    does not change: the search is exactly scale-invariant.
    """
    lg = 0
    while (1 << lg) < n:
        lg += 1
    h = min(25, (62 - lg) // 2)
    e = ((np.int32(np.array([np.float32(amax)]).view(np.int32)[0]) >> 23) & 0xFF) - 127
    m = min(max(h - 1 - e, -126), 127)
    return np.array([np.int32((m + 127) << 23)], np.int32).view(np.float32)[0]


@njit(cache=True)
def sse_search(ax, alpha, p):
    """Fixed-point sum of e^2 used by the search: ``sum int64(float32(e * p)^2)`` over |x| values
    ``ax`` (e the exact float32 error, p = search_unit(amax, n); one unit is ``p^-2``).

    The square is rounded to float32 (relative error <= 2^-24 per element) and truncated to an
    integer (< 1 unit, about 2^-34 of a typical rounding error); integer addition keeps the loop
    vectorised and the sum independent of order.
    """
    scale, inv = scale_inv(alpha)
    p = np.float32(p)
    acc = 0
    for i in range(ax.size):
        v = ax[i]
        t = quantization_error(v, scale, inv) * p
        acc += trunc_i64(np.float64(t * t))
    return acc


@njit(cache=True)
def better(s, a, best_s, best_a):
    """Lower error wins; on a tie the larger alpha (fewer clipped values)."""
    return s < best_s or (s == best_s and a > best_a)
