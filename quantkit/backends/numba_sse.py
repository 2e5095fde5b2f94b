"""numba kernels for the exact quantization error of data at given alphas.

Every kernel that evaluates the quantization error uses the arithmetic of
:mod:`quantkit.reference` bit for bit::

    scale = float32(alpha / 127)          inv = float32(127 / alpha)  (0 if alpha == 0)
    q     = min(rint(|x| * inv), 127)     e   = |x| - q * scale       (all float32)

Working on ``|x|`` is exact: float32 negation commutes with the product, with ``rint`` (half to even
is symmetric) and with the clamp, so ``e(-x) = -e(x)``.

Three ways to add up ``e^2``:

* **fixed point** (``sse_fixed*``, the verification of large tensors and the brute force):
  ``int64(float64(e)^2 * unit_inv)`` summed as integers, with ``unit_inv = 2^k / amax^2`` and
  ``k = min(50, 62 - ceil(log2 n))`` so the sum cannot overflow (``|e| <= |x| <= amax``). Integer
  addition is associative, so LLVM vectorises the loop (a float sum does not vectorise without
  fast-math, which the project forbids), and the result is the same bit for bit whatever the
  chunking or the number of threads. Truncation costs at most one unit, ``amax^2 * 2^-k``, per
  element: about 1e-9 of the typical rounding error per element.
* **the search** (``sse_search*``): the same idea in float32,
  ``int64(float32(e * p)^2)`` with a power of two ``p`` (``search_unit``) that puts ``amax * p``
  just below ``2^h``, ``h = min(25, (62 - ceil(log2 n)) // 2)``. ``e * p`` is exact, the square is
  rounded to float32 (relative 2^-24) and truncated (< 1 unit, about 2^-34 of a typical rounding
  error). All float32 (no conversion to float64 per element: faster than the form above, see
  docs/CALIBRATION.md); scaling x by 2^j scales p by 2^-j and leaves every sum unchanged.
* **float64** (``sse_f64_*``): exact float32 errors, squared and added in float64 in a fixed order;
  used for the public ``quantization_mse``, the report curve and the brute-force yardstick.

Every candidate alpha is 0 or at least MIN_POSITIVE_ALPHA, so ``inv`` is finite.

No kernel uses fast-math. Importing this module compiles nothing; kernels are cached on disk.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .._constants import CHUNK
from .numba_chunks import chunk_bounds, chunk_count
from .numba_error_sums import (
    ZERO,
    Q,
    quantization_error,
    scale_inv,
    search_unit,
    trunc_i64,
)


@njit(cache=True)
def sse_fixed(ax, alpha, unit_inv):
    """Fixed-point sum of e^2 over |x| values ``ax`` for one alpha (see module docstring)."""
    scale, inv = scale_inv(alpha)
    acc = 0
    for i in range(ax.size):
        v = ax[i]
        e = np.float64(quantization_error(v, scale, inv))
        acc += trunc_i64(e * e * unit_inv)
    return acc


@njit(cache=True)
def _sse_fixed_signed(xs, alpha, unit_inv):
    """sse_fixed of a signed chunk (|x| taken in the loop)."""
    scale, inv = scale_inv(alpha)
    acc = 0
    for i in range(xs.size):
        v = abs(xs[i])
        e = np.float64(quantization_error(v, scale, inv))
        acc += trunc_i64(e * e * unit_inv)
    return acc


@njit(parallel=True, cache=True)
def sse_fixed_many(x, alphas, unit_inv):
    """sse_fixed of a flat signed array for several alphas in one pass (chunks stay in cache)."""
    n = x.size
    k = alphas.size
    n_chunks = chunk_count(n)
    part = np.zeros((n_chunks, k), np.int64)
    for c in prange(n_chunks):
        lo, hi = chunk_bounds(c, n)
        xs = x[lo:hi]
        for j in range(k):
            part[c, j] = _sse_fixed_signed(xs, alphas[j], unit_inv)
    out = np.zeros(k, np.int64)
    for c in range(n_chunks):
        for j in range(k):
            out[j] += part[c, j]
    return out


@njit(cache=True)
def sse_search_bound(ax, alpha, p):
    """(sse_search, clip bound): the bound sums (|x| - 127*scale)^2 over |x| > 127*scale, in the
    same units.

    The bound is a lower bound of the error at every alpha' <= alpha (127*scale only shrinks, each
    such |x| is still clipped at least that far), which lets the coarse search stop early.
    """
    scale, inv = scale_inv(alpha)
    top = Q * scale
    p = np.float32(p)
    acc = 0
    bound = 0
    for i in range(ax.size):
        v = ax[i]
        t = quantization_error(v, scale, inv) * p
        acc += trunc_i64(np.float64(t * t))
        d = max(v - top, ZERO) * p
        bound += trunc_i64(np.float64(d * d))
    return acc, bound


@njit(cache=True)
def sse_search_weighted(values, counts, alpha, p):
    """sse_search over distinct |x| ``values`` occurring ``counts`` times (the same integer sum)."""
    scale, inv = scale_inv(alpha)
    p = np.float32(p)
    acc = 0
    for i in range(values.size):
        v = values[i]
        t = quantization_error(v, scale, inv) * p
        acc += trunc_i64(np.float64(t * t)) * counts[i]
    return acc


@njit(cache=True)
def _sse_search_signed(xs, alpha, p):
    """sse_search of a signed chunk (|x| taken in the loop)."""
    scale, inv = scale_inv(alpha)
    p = np.float32(p)
    acc = 0
    for i in range(xs.size):
        v = abs(xs[i])
        t = quantization_error(v, scale, inv) * p
        acc += trunc_i64(np.float64(t * t))
    return acc


@njit(parallel=True, cache=True)
def sse_chunked_many(x, alphas, chunk_max):
    """Exact sum of e^2 (float64) of a flat finite signed array at each alpha, in one pass.

    Chunk c (CHUNK elements) is summed with sse_search in the unit of its own max |x|
    (``search_unit(chunk_max[c], CHUNK)``: nothing overflows), scaled back by ``p^-2`` (exact),
    and the chunks are added in order: the same result for any number of threads, and exactly
    scale-invariant (x * 2^j gives sums * 4^j). A chunk stays in cache across the alphas.
    """
    n = x.size
    k = alphas.size
    n_chunks = chunk_count(n)
    part = np.zeros((n_chunks, k))
    for c in prange(n_chunks):
        lo, hi = chunk_bounds(c, n)
        xs = x[lo:hi]
        p = search_unit(chunk_max[c], CHUNK)
        back = 1.0 / (np.float64(p) * np.float64(p))
        for j in range(k):
            part[c, j] = np.float64(_sse_search_signed(xs, alphas[j], p)) * back
    sse = np.zeros(k)
    for c in range(n_chunks):
        for j in range(k):
            sse[j] += part[c, j]
    return sse


@njit(cache=True)
def _sse_f64_chunk(xs, scale, inv):
    """(sum e^2, sum e^2 over clipped |x| > 127.5*scale) in float64 for one chunk."""
    total = 0.0
    clipped = 0.0
    for i in range(xs.size):
        v = abs(xs[i])
        y = np.rint(v * inv)
        e = np.float64(v - min(y, Q) * scale)
        total += e * e
        if y > Q:
            clipped += e * e
    return total, clipped


@njit(parallel=True, cache=True)
def sse_f64_many(x, alphas):
    """(sse, clip_sse) float64 arrays, one entry per alpha, over a flat array; fixed sum order.

    An element counts as clipped when ``rint(|x| * inv) > 127``, i.e. the clamp changed its code.
    """
    n = x.size
    k = alphas.size
    n_chunks = chunk_count(n)
    tot = np.zeros((n_chunks, k))
    clp = np.zeros((n_chunks, k))
    for c in prange(n_chunks):
        lo, hi = chunk_bounds(c, n)
        xs = x[lo:hi]
        for j in range(k):
            scale, inv = scale_inv(alphas[j])
            t, cl = _sse_f64_chunk(xs, scale, inv)
            tot[c, j] = t
            clp[c, j] = cl
    out_t = np.zeros(k)
    out_c = np.zeros(k)
    for c in range(n_chunks):
        for j in range(k):
            out_t[j] += tot[c, j]
            out_c[j] += clp[c, j]
    return out_t, out_c


@njit(parallel=True, cache=True)
def sse_f64_rows(x, alphas, out_t, out_c):
    """Per row r of a 2-D array: float64 (sse, clip_sse) at alphas[r]."""
    for r in prange(x.shape[0]):
        scale, inv = scale_inv(alphas[r])
        t, c = _sse_f64_chunk(x[r], scale, inv)
        out_t[r] = t
        out_c[r] = c
