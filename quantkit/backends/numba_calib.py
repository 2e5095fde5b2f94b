"""numba kernels for calibration statistics: |x|max, |x| histograms, exact quantization MSE.

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
  error). All float32 (no conversion to float64 per element), about 12% faster than the form
  above; scaling x by 2^j scales p by 2^-j and leaves every sum unchanged.
* **float64** (``sse_f64_*``): exact float32 errors, squared and added in float64 in a fixed order;
  used for the public ``quantization_mse``, the report curve and the brute-force yardstick.

Every candidate alpha is 0 or at least MIN_POSITIVE_ALPHA, so ``inv`` is finite.

No kernel uses fast-math. Importing this module compiles nothing; kernels are cached on disk.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .._constants import MIN_POSITIVE_ALPHA, QMAX
from . import numba_rowsearch as _rows
from .numba_error_sums import better as _better
from .numba_error_sums import quantization_error, scale_inv, search_unit, sse_search, trunc_i64
from .numba_error_sums import unit_inverse

_CHUNK = 1 << 16
CHUNK = _CHUNK  # elements per chunk of the parallel kernels (scan_tail's chunk_max)
_Q = np.float32(QMAX)
_ZERO = np.float32(0.0)
_MIN_ALPHA = np.float32(MIN_POSITIVE_ALPHA)  # smaller positive alphas are not legal
_ABS_MASK = np.int32(0x7FFFFFFF)
_INF_BITS = np.int32(0x7F800000)

#: Histogram of |x|: bin = (float32 bits of |x|) >> 16, i.e. the exponent and the top 7 mantissa
#: bits. Relative bin width <= 2^-7; every finite float32 has a bin (index < 255 * 128).
HIST_SHIFT = 16
HIST_BINS = 255 << 7
_RES_MASK = np.int32((1 << HIST_SHIFT) - 1)

# Small-tensor search (``search_mse``), see docs/CALIBRATION.md.
_COARSE_RATIO = 2.0 ** (-1.0 / 8.0)    # geometric coarse grid from amax down, pruned by a bound
_LATTICE_MAX_DISTINCT = 512            # at most this many distinct |x|: exhaustive grid search
LATTICE_MAX_DISTINCT = _LATTICE_MAX_DISTINCT
_FINE_STEP = 1.001                     # ratio between neighbours of the fine scan
_LATTICE_WORK = 1 << 20                # element-evaluations for its grid (at least 2048 points)
_ROW_MIN = 16                          # from this many values, unclustered ones take the row sweep


# ------------------------------------------------------------------------------ |x|max, checks


@njit(parallel=True, cache=True)
def absmax_flat(x):
    """(max |x| over finite elements as float32, number of non-finite elements) of a flat array."""
    bits = x.view(np.int32)
    n = bits.size
    n_chunks = (n + _CHUNK - 1) // _CHUNK
    best = np.zeros(n_chunks, np.int32)
    bad = np.zeros(n_chunks, np.int64)
    for c in prange(n_chunks):
        lo = c * _CHUNK
        hi = min(lo + _CHUNK, n)
        bs = bits[lo:hi]
        m = np.int32(0)
        count = 0
        for i in range(hi - lo):
            b = bs[i] & _ABS_MASK
            finite = b < _INF_BITS
            count += not finite
            m = max(m, b if finite else np.int32(0))
        best[c] = m
        bad[c] = count
    return _float_of_bits(best.max()), bad.sum()


@njit(parallel=True, cache=True)
def absmax_rows(x, out):
    """out[r] = max |x[r, :]| over finite elements (float32); returns the non-finite count."""
    rows = x.shape[0]
    bad = np.zeros(rows, np.int64)
    best = np.zeros(rows, np.int32)
    for r in prange(rows):
        bs = x[r].view(np.int32)
        m = np.int32(0)
        count = 0
        for i in range(bs.size):
            b = bs[i] & _ABS_MASK
            finite = b < _INF_BITS
            count += not finite
            m = max(m, b if finite else np.int32(0))
        best[r] = m
        bad[r] = count
    out[:] = best.view(np.float32)
    return bad.sum()


# -------------------------------------------------------------------------- exact error kernels


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
def sse_search_bound(ax, alpha, p):
    """(sse_search, clip bound): the bound sums (|x| - 127*scale)^2 over |x| > 127*scale, in the
    same units.

    The bound is a lower bound of the error at every alpha' <= alpha (127*scale only shrinks, each
    such |x| is still clipped at least that far), which lets the coarse search stop early.
    """
    scale, inv = scale_inv(alpha)
    top = _Q * scale
    p = np.float32(p)
    acc = 0
    bound = 0
    for i in range(ax.size):
        v = ax[i]
        t = quantization_error(v, scale, inv) * p
        acc += trunc_i64(np.float64(t * t))
        d = max(v - top, _ZERO) * p
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
    n_chunks = (n + _CHUNK - 1) // _CHUNK
    part = np.zeros((n_chunks, k), np.int64)
    for c in prange(n_chunks):
        lo = c * _CHUNK
        hi = min(lo + _CHUNK, n)
        xs = x[lo:hi]
        for j in range(k):
            part[c, j] = _sse_fixed_signed(xs, alphas[j], unit_inv)
    out = np.zeros(k, np.int64)
    for c in range(n_chunks):
        for j in range(k):
            out[j] += part[c, j]
    return out


@njit(cache=True)
def _sse_f64_chunk(xs, scale, inv):
    """(sum e^2, sum e^2 over clipped |x| > 127.5*scale) in float64 for one chunk."""
    total = 0.0
    clipped = 0.0
    for i in range(xs.size):
        v = abs(xs[i])
        y = np.rint(v * inv)
        e = np.float64(v - min(y, _Q) * scale)
        total += e * e
        if y > _Q:
            clipped += e * e
    return total, clipped


@njit(parallel=True, cache=True)
def sse_f64_many(x, alphas):
    """(sse, clip_sse) float64 arrays, one entry per alpha, over a flat array; fixed sum order.

    An element counts as clipped when ``rint(|x| * inv) > 127``, i.e. the clamp changed its code.
    """
    n = x.size
    k = alphas.size
    n_chunks = (n + _CHUNK - 1) // _CHUNK
    tot = np.zeros((n_chunks, k))
    clp = np.zeros((n_chunks, k))
    for c in prange(n_chunks):
        lo = c * _CHUNK
        hi = min(lo + _CHUNK, n)
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


# ------------------------------------------------------------------ the search on a small array


@njit(cache=True)
def _distinct(ax, limit):
    """(values, counts) of the distinct |x| (sign ignored) if there are at most ``limit``, else
    empty arrays.

    Stops as soon as limit + 1 distinct values were seen, so continuous data costs little.
    """
    size = 1
    shift = 32
    while size < 2 * limit:
        size *= 2
        shift -= 1
    mask = size - 1
    keys = np.full(size, -1, np.int32)
    bits = ax.view(np.int32)
    used = 0
    for i in range(bits.size):
        b = bits[i] & _ABS_MASK
        # multiplicative hashing on the top bits of the low 32: every bit of b matters (values
        # with zero low mantissa bits, as integers and bfloat16 data have, spread out too)
        h = ((np.int64(b) * 2654435761) & 0xFFFFFFFF) >> shift
        while keys[h] != -1 and keys[h] != b:
            h = (h + 1) & mask
        if keys[h] == -1:
            used += 1
            if used > limit:
                return np.empty(0, np.float32), np.empty(0, np.int64)
            keys[h] = b
    # at most ``limit`` distinct values: count them in a second pass
    cnt = np.zeros(size, np.int64)
    for i in range(bits.size):
        b = bits[i] & _ABS_MASK
        h = ((np.int64(b) * 2654435761) & 0xFFFFFFFF) >> shift
        while keys[h] != b:
            h = (h + 1) & mask
        cnt[h] += 1
    vals = np.empty(used, np.int32)
    counts = np.empty(used, np.int64)
    j = 0
    for h in range(size):
        if keys[h] != -1:
            vals[j] = keys[h]
            counts[j] = cnt[h]
            j += 1
    return vals.view(np.float32), counts


@njit(cache=True)
def _count_nonzero(x):
    m = 0
    for i in range(x.size):
        m += np.int64(x[i] != 0)
    return m


@njit(cache=True)
def _abs_into(x, out):
    for i in range(x.size):
        out[i] = abs(x[i])


@njit(cache=True)
def nonzero_abs(x):
    """|x| of the non-zero elements of a flat array, in order."""
    m = _count_nonzero(x)
    if m == x.size:  # no zeros (the common case): a plain vectorised copy
        out = np.empty(m, np.float32)
        _abs_into(x, out)
        return out
    # branch-free compaction (zeros are often half of a ReLU row, at random): every |x| is
    # written at j, which only advances past non-zeros; one spare slot takes the last writes
    buf = np.empty(m + 1, np.float32)
    j = 0
    for i in range(x.size):
        v = x[i]
        buf[j] = abs(v)
        j += np.int64(v != 0)
    return buf[:m]


@njit(cache=True)
def _sse(values, counts, alpha, unit):
    """sse_search of the values, each counted counts[i] times (all once when counts is empty)."""
    if counts.size:
        return sse_search_weighted(values, counts, alpha, unit)
    return sse_search(values, alpha, unit)


@njit(cache=True)
def _sse_bound(values, counts, alpha, unit):
    if not counts.size:
        return sse_search_bound(values, alpha, unit)
    scale, inv = scale_inv(alpha)
    top = _Q * scale
    unit = np.float32(unit)
    acc = 0
    bound = 0
    for i in range(values.size):
        v = values[i]
        t = quantization_error(v, scale, inv) * unit
        acc += trunc_i64(np.float64(t * t)) * counts[i]
        d = max(v - top, _ZERO) * unit
        bound += trunc_i64(np.float64(d * d)) * counts[i]
    return acc, bound


@njit(cache=True)
def _scan(values, counts, lo, hi, npts, geometric, unit, best_a, best_s):
    """Exact error at ``npts`` alphas spread over [lo, hi]; returns the updated best."""
    for k in range(npts):
        t = k / (npts - 1) if npts > 1 else 0.0
        if geometric:
            a = np.float32(lo * (hi / lo) ** t)
        else:
            a = np.float32(lo + (hi - lo) * t)
        if not a >= _MIN_ALPHA:
            continue
        s = _sse(values, counts, a, unit)
        if _better(s, a, best_s, best_a):
            best_s = s
            best_a = a
    return best_a, best_s


@njit(cache=True)
def _search_lattice(values, counts, amax, unit):
    """Few distinct values: an exhaustive linear grid over (0, amax] (at least 2048 points, more
    when there are fewer values), then +-1 grid step refined twice (65 points) around each of the
    three lowest grid points."""
    a64 = np.float64(amax)
    grid = min(max(_LATTICE_WORK // values.size, 2048), 16384)
    alphas = np.empty(grid, np.float32)
    errs = np.empty(grid, np.int64)
    best_a = np.float32(amax)
    best_s = _sse(values, counts, best_a, unit)
    for g in range(grid):
        a = np.float32(a64 * (g + 1) / grid)
        alphas[g] = a
        errs[g] = _sse(values, counts, a, unit) if a >= _MIN_ALPHA else np.iinfo(np.int64).max
        if _better(errs[g], a, best_s, best_a):
            best_s = errs[g]
            best_a = a
    order = np.argsort(errs)
    for j in range(min(3, grid)):
        center = np.float64(alphas[order[j]])
        step = a64 / grid
        for _ in range(2):
            lo = max(center - step, step / 64)
            hi = min(center + step, a64)
            c_a, c_s = _scan(values, counts, lo, hi, 65, False, unit, np.float32(center),
                             _sse(values, counts, np.float32(center), unit))
            if _better(c_s, c_a, best_s, best_a):
                best_s = c_s
                best_a = c_a
            center = np.float64(c_a)
            step = (hi - lo) / 64
    return best_a


@njit(cache=True)
def _search_continuous(values, counts, amax, unit):
    """Coarse geometric scan pruned by the clip bound, then ever finer exact scans (search_mse)."""
    best_a = np.float32(amax)
    best_s, bound = _sse_bound(values, counts, best_a, unit)
    a = np.float64(amax)
    for _ in range(8 * 40):
        a *= _COARSE_RATIO
        af = np.float32(a)
        if not af >= _MIN_ALPHA:
            break
        s, bound = _sse_bound(values, counts, af, unit)
        if _better(s, af, best_s, best_a):
            best_s = s
            best_a = af
        if bound >= best_s:
            break
    a64 = np.float64(amax)
    # +-9% at 1% steps, remembering every point
    center = np.float64(best_a)
    lo = center / 1.09
    hi = min(center * 1.09, a64)
    npts = max(2, int(np.ceil(np.log(hi / lo) / np.log(1.01))) + 1)
    grid = np.empty(npts)
    errs = np.empty(npts, np.int64)
    for k in range(npts):
        af = np.float32(lo * (hi / lo) ** (k / (npts - 1)))
        grid[k] = af
        errs[k] = _sse(values, counts, af, unit)
        if _better(errs[k], af, best_s, best_a):
            best_s = errs[k]
            best_a = af
    # the window of points within max(4%, 3 * 0.9 / sqrt(n)) of the best (the exact error wiggles
    # by about 0.9 / sqrt(n) around its smooth trend), one grid step wider on each side
    n = counts.sum() if counts.size else values.size
    limit = best_s + np.int64(best_s * max(0.04, 2.7 / np.sqrt(n)))
    w_lo = np.float64(best_a)
    w_hi = np.float64(best_a)
    for k in range(npts):
        if errs[k] <= limit:
            w_lo = min(w_lo, grid[max(k - 1, 0)])
            w_hi = max(w_hi, grid[min(k + 1, npts - 1)])
    w_hi = min(w_hi, a64)
    fine = min(max(int(np.ceil(np.log(w_hi / w_lo) / np.log(_FINE_STEP))) + 1, 2), 200)
    ratio = (w_hi / w_lo) ** (1.0 / (fine - 1))
    grid = np.empty(fine)
    errs = np.empty(fine, np.int64)
    for k in range(fine):
        af = np.float32(w_lo * ratio ** k)
        grid[k] = af
        errs[k] = _sse(values, counts, af, unit)
        if _better(errs[k], af, best_s, best_a):
            best_s = errs[k]
            best_a = af
    # +-0.6 fine step at 1/5 of it around the three lowest points of the fine scan (the centre is
    # known; +-0.8 step, next to the known neighbours, measured to change no result)
    order = np.argsort(errs)
    for j in range(min(3, fine)):
        c = grid[order[j]]
        for i in range(-3, 4):
            if i == 0:
                continue
            af = np.float32(c * ratio ** (0.2 * i))
            if not af <= a64:
                continue
            s = _sse(values, counts, af, unit)
            if _better(s, af, best_s, best_a):
                best_s = s
                best_a = af
    return best_a


@njit(cache=True)
def search_mse_values(values, counts, amax):
    """The legal alpha in (0, amax] (>= MIN_POSITIVE_ALPHA) minimising the exact quantization
    error of the |x| values ``values`` (> 0), value i occurring counts[i] times (each once when
    counts is empty).

    The search runs on the values scaled by the power of two that puts amax in [1, 2) (exact for
    every value that stays normal; one that turns subnormal is so far below amax that its error is
    about itself at any legal alpha), so no fixed-point unit or float32 threshold of the search
    meets overflow or underflow whatever the magnitude of the data, and x * 2^k gives alpha * 2^k
    bit for bit. The alpha is scaled back (at least MIN_POSITIVE_ALPHA, at most amax).
    """
    return _search_normalised_in_place(values.copy(), counts, amax)


@njit(cache=True)
def _search_normalised_in_place(w, counts, amax):
    """search_mse_values on ``w``, which it scales in place (the caller's own buffer)."""
    e = np.int64(math.frexp(np.float64(amax))[1]) - 1  # 2^e <= amax < 2^(e+1)
    up = np.ldexp(1.0, -e)
    for i in range(w.size):
        w[i] = np.float32(np.float64(w[i]) * up)
    a = _search_mse_normalized(w, counts, np.float32(np.float64(amax) * up))
    a = np.float32(np.float64(a) * np.ldexp(1.0, e))
    return min(max(a, _MIN_ALPHA), np.float32(amax))


@njit(cache=True)
def _search_mse_normalized(values, counts, amax):
    """search_mse_values on values scaled so that amax is in [1, 2):

    1. At most 512 distinct values (discrete or already-quantized data, rows and blocks of fewer
       than 16 values or in tight clusters): an exhaustive linear grid over (0, amax], refined
       around its three lowest points.
    2. Otherwise, each value once (rows, blocks, small tensors; also 16..512 values that are not
       clustered, numba_rowsearch.clustered, whose exhaustive grid would cost 2^20 evaluations):
       numba_rowsearch.search_row, the smooth model's minimum, an event sweep of the exact error
       over +-4% of it, the two lowest sweep points and the vertices of their pieces decided by
       the exact float32 error.
    3. Weighted values (bfloat16 data, or a large array's distinct values), and values in tight
       clusters (numba_rowsearch.clustered, sent here, as the smooth model cannot
       place their dips): a coarse
       scan from amax down by 2^(-1/8), stopped as soon as the clip bound (a lower bound of the
       error at every smaller alpha) reaches the best error found; then exact scans ever finer
       around the best: +-9% at 1%, the near-optimal window at 0.1% (every 1% point within
       max(4%, 2.7 / sqrt(n)) of the best; at most 200 points), then 0.2, 0.4 and 0.6 of its step
       on each side of the three lowest points of that scan.
    Every decision is made on exact errors of the data (fixed-point sums, see module docstring).
    """
    n = counts.sum() if counts.size else values.size
    unit = search_unit(amax, n)
    if counts.size:
        if values.size <= _LATTICE_MAX_DISTINCT:
            return _search_lattice(values, counts, amax, unit)
        return _search_continuous(values, counts, amax, unit)
    if _ROW_MIN <= values.size <= _LATTICE_MAX_DISTINCT and not _rows.clustered(values):
        return _rows.search_row(values, amax)  # a short row of continuous values
    if not _rows.distinct_exceeds(values, _LATTICE_MAX_DISTINCT):
        distinct, dcounts = _distinct(values, _LATTICE_MAX_DISTINCT)
        if distinct.size:
            return _search_lattice(distinct, dcounts, amax, unit)
    if _rows.clustered(values):  # tight clusters: dips that the smooth model cannot place
        return _search_continuous(values, counts, amax, unit)
    return _rows.search_row(values, amax)


@njit(cache=True)
def search_mse_discrete(x, amax):
    """search_mse_values on the distinct non-zero |x| of a flat array with counts, if there are at
    most _LATTICE_MAX_DISTINCT of them (the exhaustive search); else -1."""
    values, counts = _distinct(x, _LATTICE_MAX_DISTINCT + 1)
    if values.size == 0:
        return np.float32(-1.0)
    keep = values != 0
    if keep.sum() > _LATTICE_MAX_DISTINCT:
        return np.float32(-1.0)
    return search_mse_values(values[keep], counts[keep], amax)


@njit(cache=True)
def search_mse(x, amax):
    """search_mse_values over the non-zero |x| of a flat array (zeros have no error at all); the
    gathered |x| is normalised in place, one copy fewer on the per-row path."""
    return _search_normalised_in_place(nonzero_abs(x), np.empty(0, np.int64), amax)


@njit(parallel=True, cache=True)
def search_mse_rows(x, amax, out):
    """out[r] = search_mse(x[r], amax[r]) for each row of a 2-D array (0 where amax is 0)."""
    for r in prange(x.shape[0]):
        if amax[r] > _ZERO:
            out[r] = search_mse(x[r], amax[r])
        else:
            out[r] = _ZERO


@njit(parallel=True, cache=True)
def search_mse_blocks(x, block_size, amax, out):
    """out[b] = search_mse over block b of a flat array (the last block may be short)."""
    n = x.size
    for b in prange(amax.size):
        lo = b * block_size
        hi = min(lo + block_size, n)
        if amax[b] > _ZERO:
            out[b] = search_mse(x[lo:hi], amax[b])
        else:
            out[b] = _ZERO


@njit(cache=True)
def bin_values(counts):
    """(values, counts) of the non-empty bins above bin 0, each bin's lowest value as float32:
    the exact distinct values when no value has more than 7 mantissa bits."""
    nz = np.nonzero(counts[1:])[0] + 1
    vals = np.empty(nz.size, np.int32)
    for j in range(nz.size):
        vals[j] = np.int32(nz[j]) << HIST_SHIFT
    return vals.view(np.float32), counts[nz].copy()


# ----------------------------------------------------------------------------- |x| histograms


@njit(parallel=True, cache=True)
def histogram_log(x, tasks, counts, sum_res, sum_res2):
    """Add |x| of a flat finite array to a log-spaced histogram (arrays of HIST_BINS entries).

    Bin b holds the floats whose bits >> 16 equal b; within it |x| = lo_b + res * ulp_b with the
    16-bit residual ``res`` = bits & 0xFFFF. The kernel adds, per bin, the count, the sum of res and
    the sum of res^2 as integers: exact, so histograms add (merge) in any order to the same result.
    ``tasks`` parallel pieces each fill a private table (use the number of threads).
    """
    bits = x.view(np.int32)
    n = bits.size
    c_t = np.zeros((tasks, HIST_BINS), np.int64)
    s_t = np.zeros((tasks, HIST_BINS), np.int64)
    q_t = np.zeros((tasks, HIST_BINS), np.int64)
    per = (n + tasks - 1) // tasks
    for t in prange(tasks):
        lo = min(t * per, n)
        hi = min(lo + per, n)
        bs = bits[lo:hi]
        ct = c_t[t]
        st = s_t[t]
        qt = q_t[t]
        for i in range(hi - lo):
            b = bs[i] & _ABS_MASK
            k = b >> HIST_SHIFT
            r = np.int64(b & _RES_MASK)
            ct[k] += 1
            st[k] += r
            qt[k] += r * r
    for t in range(tasks):
        counts += c_t[t]
        sum_res += s_t[t]
        sum_res2 += q_t[t]


@njit(parallel=True, cache=True)
def scan_flat(x, tasks, counts):
    """One pass over a flat array: a count histogram of |x| (HIST_BINS log bins, added to
    ``counts``), max |x| over finite elements, the number of non-finite elements, and the OR of the
    16 low mantissa bits of every |x| (0 when every value is a bfloat16: one value per bin), and
    the number of exact zeros.

    Four interleaved tables per task keep consecutive increments of one bin from waiting on
    each other. Returns (amax float32, non-finite count, zero count, low-bits OR).
    """
    bits = x.view(np.int32)
    n = bits.size
    table = np.zeros((tasks, 4, HIST_BINS), np.int32)
    best = np.zeros(tasks, np.int32)
    bad = np.zeros(tasks, np.int64)
    low = np.zeros(tasks, np.int32)
    zeros = np.zeros(tasks, np.int64)
    per = ((n + tasks - 1) // tasks + 3) // 4 * 4
    for t in prange(tasks):
        lo = min(t * per, n)
        hi = min(lo + per, n)
        bs = bits[lo:hi]
        m = hi - lo
        # max, non-finite count and low bits: a vectorised pass over the task's slice
        mx = np.int32(0)
        count = 0
        zero = 0
        orr = np.int32(0)
        for i in range(m):
            b = bs[i] & _ABS_MASK
            finite = b < _INF_BITS
            count += not finite
            zero += b == 0
            mx = max(mx, b if finite else np.int32(0))
            orr |= b & _RES_MASK
        best[t] = mx
        bad[t] = count
        zeros[t] = zero
        low[t] = orr
        if count:
            continue
        tb = table[t]
        top = m - m % 4
        for i in range(0, top, 4):
            tb[0, (bs[i] & _ABS_MASK) >> HIST_SHIFT] += 1
            tb[1, (bs[i + 1] & _ABS_MASK) >> HIST_SHIFT] += 1
            tb[2, (bs[i + 2] & _ABS_MASK) >> HIST_SHIFT] += 1
            tb[3, (bs[i + 3] & _ABS_MASK) >> HIST_SHIFT] += 1
        for i in range(top, m):
            tb[0, (bs[i] & _ABS_MASK) >> HIST_SHIFT] += 1
    for t in range(tasks):
        for j in range(4):
            tj = table[t, j]
            for k in range(HIST_BINS):
                counts[k] += tj[k]
    orr = np.int32(0)
    for t in range(tasks):
        orr |= low[t]
    return _float_of_bits(best.max()), bad.sum(), zeros.sum(), orr


_SAMPLE_PIECE = 256  # elements per sampled piece (sample_pieces): 1 KiB, prefetcher-friendly
SAMPLE_PIECE = _SAMPLE_PIECE


@njit(cache=True)
def sample_pieces(x, rate):
    """Every piece of _SAMPLE_PIECE consecutive elements whose index ``c`` has
    ``frac(c * 0.6180339887...) < 1 / rate`` (golden-ratio hashing: about one piece in ``rate``,
    spread evenly over the array without a period that strided data could alias), concatenated."""
    n = x.size
    pieces = n // _SAMPLE_PIECE
    limit = np.uint64((1 << 32) // rate)
    golden = np.uint64(0x9E3779B9)
    mask = np.uint64(0xFFFFFFFF)
    total = 0
    for c in range(pieces):
        total += (np.uint64(c) * golden) & mask < limit
    out = np.empty(total * _SAMPLE_PIECE, x.dtype)
    j = 0
    for c in range(pieces):
        if (np.uint64(c) * golden) & mask < limit:
            lo = c * _SAMPLE_PIECE
            for i in range(_SAMPLE_PIECE):
                out[j + i] = x[lo + i]
            j += _SAMPLE_PIECE
    return out


@njit(cache=True)
def _float_of_bits(b):
    """The float32 whose bit pattern is the int32 ``b``."""
    return np.array([b], np.int32).view(np.float32)[0]


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


@njit(cache=True)
def _group_stats(bs, tail_bits):
    """(max |x| bits, non-finite count, zero count, tail count) of an int32 view of floats."""
    mx = np.int32(0)
    count = np.int32(0)
    zero = np.int32(0)
    tail = np.int32(0)
    for i in range(bs.size):
        b = bs[i] & _ABS_MASK
        count += np.int32(b >= _INF_BITS)
        zero += np.int32(b == 0)
        mx = max(mx, b)
        tail += np.int32(b >= tail_bits)
    return mx, count, zero, tail


@njit(parallel=True, cache=True)
def scan_tail(x, tasks, tail_bin, tail_counts, chunk_max):
    """One pass over a flat array: the non-finite count, the zero count, max |x| of each chunk of
    _CHUNK elements (into ``chunk_max``, float32; meaningful when there is no NaN/Inf), and the
    count histogram of the |x| in bins >= ``tail_bin`` only (added to
    ``tail_counts[b - tail_bin]``).

    Vectorised statistics per group of 512 elements; only a group that holds a tail value is
    visited again, element by element, while in cache: a rare tail (a fraction of 1e-4 or less)
    costs little. Returns (non-finite count, zero count).
    """
    bits = x.view(np.int32)
    n = bits.size
    n_chunks = (n + _CHUNK - 1) // _CHUNK
    tail_bits = np.int32(tail_bin << HIST_SHIFT)
    nb = tail_counts.size
    table = np.zeros((tasks, nb), np.int64)
    bad = np.zeros(tasks, np.int64)
    zeros = np.zeros(tasks, np.int64)
    cmax = chunk_max.view(np.int32)
    per = (n_chunks + tasks - 1) // tasks
    for t in prange(tasks):
        count = 0
        zero = 0
        tb = table[t]
        for c in range(t * per, min((t + 1) * per, n_chunks)):
            lo = c * _CHUNK
            hi = min(lo + _CHUNK, n)
            mx = np.int32(0)
            for g in range(lo, hi, 512):
                grp = bits[g:min(g + 512, hi)]
                gm, gc, gz, gt = _group_stats(grp, tail_bits)
                mx = max(mx, gm)
                count += gc
                zero += gz
                if gt and not gc:
                    for i in range(grp.size):
                        b = grp[i] & _ABS_MASK
                        if b >= tail_bits:
                            tb[(b >> HIST_SHIFT) - tail_bin] += 1
            cmax[c] = mx
        bad[t] = count
        zeros[t] = zero
    for t in range(tasks):
        for b in range(nb):
            tail_counts[b] += table[t, b]
    return bad.sum(), zeros.sum()


@njit(parallel=True, cache=True)
def sse_chunked_many(x, alphas, chunk_max):
    """Exact sum of e^2 (float64) of a flat finite signed array at each alpha, in one pass.

    Chunk c (_CHUNK elements) is summed with sse_search in the unit of its own max |x|
    (``search_unit(chunk_max[c], _CHUNK)``: nothing overflows), scaled back by ``p^-2`` (exact),
    and the chunks are added in order: the same result for any number of threads, and exactly
    scale-invariant (x * 2^j gives sums * 4^j). A chunk stays in cache across the alphas.
    """
    n = x.size
    k = alphas.size
    n_chunks = (n + _CHUNK - 1) // _CHUNK
    part = np.zeros((n_chunks, k))
    for c in prange(n_chunks):
        lo = c * _CHUNK
        hi = min(lo + _CHUNK, n)
        xs = x[lo:hi]
        p = search_unit(chunk_max[c], _CHUNK)
        back = 1.0 / (np.float64(p) * np.float64(p))
        for j in range(k):
            part[c, j] = np.float64(_sse_search_signed(xs, alphas[j], p)) * back
    sse = np.zeros(k)
    for c in range(n_chunks):
        for j in range(k):
            sse[j] += part[c, j]
    return sse


@njit(cache=True)
def count_moments(counts, point_masses):
    """Non-empty bins of a count histogram as (count, mean, variance): each bin uniform over its
    range (mean at the centre, variance width^2 / 12), or a point mass at its lowest value when
    ``point_masses`` (every value has 7 mantissa bits or fewer, so it is its bin's lowest value)."""
    nz = np.nonzero(counts)[0]
    m = nz.size
    cnt = np.empty(m)
    mean = np.empty(m)
    var = np.empty(m)
    for j in range(m):
        lo, ulp = _bin_geometry(nz[j])
        width = 65536.0 * ulp
        cnt[j] = counts[nz[j]]
        if point_masses:
            mean[j] = lo
            var[j] = 0.0
        else:
            mean[j] = lo + 0.5 * width
            var[j] = width * width / 12.0
    return cnt, mean, var


@njit(cache=True)
def _bin_geometry(k):
    """(lo, ulp) of histogram bin k: its smallest value and the value of one residual step."""
    e = k >> 7
    mant7 = k & 127
    if e == 0:  # subnormals
        ulp = np.ldexp(1.0, -149)
        return mant7 * 65536.0 * ulp, ulp
    ulp = np.ldexp(1.0, e - 150)
    return np.ldexp(1.0 + mant7 / 128.0, e - 127), ulp


@njit(cache=True)
def histogram_moments(counts, sum_res, sum_res2):
    """Non-empty bins as (index, count, mean, variance, lo, hi) float64 arrays (exact moments)."""
    nz = np.nonzero(counts)[0]
    m = nz.size
    cnt = np.empty(m)
    mean = np.empty(m)
    var = np.empty(m)
    blo = np.empty(m)
    bhi = np.empty(m)
    for j in range(m):
        k = nz[j]
        lo, ulp = _bin_geometry(k)
        c = np.float64(counts[k])
        mr = sum_res[k] / c
        vr = max(sum_res2[k] / c - mr * mr, 0.0)
        cnt[j] = c
        mean[j] = lo + mr * ulp
        var[j] = vr * ulp * ulp
        blo[j] = lo
        bhi[j] = lo + 65536.0 * ulp
    return nz, cnt, mean, var, blo, bhi


@njit(cache=True)
def _cell_integral(p, q, level, s):
    """integral over [p, q] of (x - level*s)^2 dx."""
    c = level * s
    return ((q - c) ** 3 - (p - c) ** 3) / 3.0


@njit(cache=True)
def model_tables(cnt, mean, var):
    """Tables that let model_sse skip the bins a rounding step does not split.

    ``h = sqrt(3 var)`` (bin j is uniform over [mean - h, mean + h]); ``hi_run[j]`` the largest
    upper end among bins <= j and ``lo_min[j]`` the smallest lower end among bins >= j (both
    non-decreasing, so a binary search finds the bins wholly in cell 0 and the bins wholly clipped);
    prefix sums ``p0, p1, p2`` of ``cnt``, ``cnt * mean`` and ``cnt * (mean^2 + var)``.
    """
    m = cnt.size
    h = np.sqrt(3.0 * var)
    hi_run = np.empty(m)
    lo_min = np.empty(m)
    run = -np.inf
    for j in range(m):
        run = max(run, mean[j] + h[j])
        hi_run[j] = run
    run = np.inf
    for j in range(m - 1, -1, -1):
        run = min(run, mean[j] - h[j])
        lo_min[j] = run
    p0 = np.zeros(m + 1)
    p1 = np.zeros(m + 1)
    p2 = np.zeros(m + 1)
    for j in range(m):
        p0[j + 1] = p0[j] + cnt[j]
        p1[j + 1] = p1[j] + cnt[j] * mean[j]
        p2[j + 1] = p2[j] + cnt[j] * (mean[j] * mean[j] + var[j])
    return h, hi_run, lo_min, p0, p1, p2


@njit(cache=True)
def _model_sse(cnt, mean, var, tables, alpha, smooth_below):
    """model_sse with the tables of model_tables (see there); bins with mean < ``smooth_below``
    that a rounding step splits count s^2 / 12 per value (a smooth density, see model_search)."""
    h, hi_run, lo_min, p0, p1, p2 = tables
    m = cnt.size
    scale, inv = scale_inv(alpha)
    s = np.float64(scale)
    if s == 0.0:
        return p2[m]
    top = 127.0
    # bins wholly below s/2 keep code 0: error x, sum cnt * (mean^2 + var)
    a = np.searchsorted(hi_run, 0.5 * s)
    # bins wholly at or above 126.5 s are clipped to code 127: error x - 127 s
    b = max(np.searchsorted(lo_min, 126.5 * s), a)
    c = top * s
    total = p2[a] + (p2[m] - p2[b]) - 2.0 * c * (p1[m] - p1[b]) + c * c * (p0[m] - p0[b])
    # bins below smooth_below that a step splits: s^2 / 12 per value
    d = min(max(np.searchsorted(mean, smooth_below), a), b)
    total += (p0[d] - p0[a]) * s * s / 12.0
    for j in range(d, b):
        hj = h[j]
        mj = mean[j]
        if hj <= 1e-9 * s:
            level = min(np.floor(mj / s + 0.5), top)
            e = mj - level * s
            total += cnt[j] * e * e
            continue
        p = mj - hj
        q = mj + hj
        k0 = min(np.floor(p / s + 0.5), top)
        k1 = min(np.floor(q / s + 0.5), top)
        if k0 == k1:  # one cell: the second moment about its level
            e = mj - k0 * s
            total += cnt[j] * (e * e + var[j])
            continue
        if k1 - k0 > 8:  # many cells: the classic s^2 / 12 per value
            if q <= (top + 0.5) * s:
                total += cnt[j] * s * s / 12.0
                continue
        acc = 0.0
        k = k0
        while k <= k1:
            cell_lo = max(p, (k - 0.5) * s)
            cell_hi = q if k == top else min(q, (k + 0.5) * s)
            if cell_hi > cell_lo:
                acc += _cell_integral(cell_lo, cell_hi, k, s)
            k += 1.0
        total += cnt[j] * acc / (2.0 * hj)
    return total


@njit(cache=True)
def model_sse(cnt, mean, var, alpha):
    """Expected sum of e^2 for binned data: each bin is spread uniformly over [m - h, m + h] with
    h = sqrt(3 var) (matching the bin's exact mean and variance; a point mass when var = 0) and the
    error integrated exactly over the rounding cells that interval meets (cell 127 is unbounded).

    Bins wholly in cell 0 (error x) or wholly clipped (error x - 127 s) are added in closed form
    from prefix sums; only the bins between are visited."""
    return _model_sse(cnt, mean, var, model_tables(cnt, mean, var), alpha, 0.0)


@njit(cache=True)
def model_search(cnt, mean, var, amax, smooth_below=0.0):
    """The alpha in (0, amax] minimising model_sse: coarse geometric scan from amax (pruned once the
    error has grown 16x past the best), then geometric refinements around the best.

    With ``smooth_below > 0`` the bins below it are a sample of a smooth density: one that meets a
    rounding step (neither wholly in cell 0 nor wholly clipped) counts s^2 / 12 per value, the
    average over the phase of the step, instead of the exact integral over its narrow range, whose
    dependence on the step's phase would mirror the sample's count noise (a wiggle of about
    1 / sqrt(sample size) that would move the minimum)."""
    tables = model_tables(cnt, mean, var)
    a64 = np.float64(amax)
    best_a = np.float32(amax)
    best_s = _model_sse(cnt, mean, var, tables, best_a, smooth_below)
    a = a64
    for _ in range(8 * 40):
        a *= _COARSE_RATIO
        af = np.float32(a)
        if not af >= _MIN_ALPHA:
            break
        s = _model_sse(cnt, mean, var, tables, af, smooth_below)
        if s < best_s:
            best_s = s
            best_a = af
        elif s > 16.0 * best_s:
            break
    step = 1.0 / _COARSE_RATIO
    for _ in range(4):
        lo = np.float64(best_a) / step
        hi = min(np.float64(best_a) * step, a64)
        for k in range(17):
            af = np.float32(lo * (hi / lo) ** (k / 16.0))
            if not af >= _MIN_ALPHA:
                continue
            s = _model_sse(cnt, mean, var, tables, af, smooth_below)
            if s < best_s:
                best_s = s
                best_a = af
        step = (hi / lo) ** (1.0 / 16.0)
    return best_a


# ---------------------------------------------------------------------------------- entropy


@njit(cache=True)
def entropy_threshold(hist):
    """TensorRT's KL-divergence calibration (as in NVIDIA pytorch-quantization) on a histogram of
    |x| with equal bins over [0, amax]; returns the number of bins i to keep (threshold i * width).

    For each i in [128, bins]: the reference P is hist[:i] with the mass of hist[i:] added to bin
    i-1; the candidate Q merges hist[:i] into 128 equal groups (bin j in group floor(128 j / i)) and
    spreads each group's mass evenly over its non-empty bins. KL(P || Q) of the normalised
    distributions (infinite where Q = 0 < P); the largest i among the minima wins. As there, the
    zero bin is given the count of bin 1 first, so the peak of exact zeros does not dominate.
    """
    bins = hist.size
    nq = 128
    h = hist.astype(np.float64)
    if bins > 1:
        h[0] = h[1]
    tail = np.zeros(bins + 1)
    for i in range(bins - 1, -1, -1):
        tail[i] = tail[i + 1] + h[i]
    best_i = bins
    best_kl = np.inf
    group_mass = np.zeros(nq)
    group_nz = np.zeros(nq)
    for i in range(nq, bins + 1):
        group_mass[:] = 0.0
        group_nz[:] = 0.0
        for j in range(i):
            if h[j] != 0:
                g = (j * nq) // i
                group_mass[g] += h[j]
                group_nz[g] += 1.0
        qsum = group_mass.sum()
        psum = tail[0]
        if qsum <= 0 or psum <= 0:
            continue
        kl = 0.0
        for j in range(i):
            pj = h[j] + (tail[i] if j == i - 1 else 0.0)
            if pj <= 0:
                continue
            if h[j] == 0:
                kl = np.inf
                break
            g = (j * nq) // i
            qj = group_mass[g] / group_nz[g] / qsum
            pj /= psum
            kl += pj * np.log(pj / qj)
        if kl <= best_kl:
            best_kl = kl
            best_i = i
    return best_i


@njit(parallel=True, cache=True)
def histogram_linear(x, amax, bins):
    """Counts of |x| in ``bins`` equal bins over [0, amax] (|x| == amax in the last bin)."""
    n = x.size
    n_chunks = (n + _CHUNK - 1) // _CHUNK
    part = np.zeros((n_chunks, bins), np.int64)
    width_inv = bins / np.float64(amax)
    for c in prange(n_chunks):
        lo = c * _CHUNK
        hi = min(lo + _CHUNK, n)
        xs = x[lo:hi]
        ps = part[c]
        for i in range(hi - lo):
            k = int(abs(np.float64(xs[i])) * width_inv)
            ps[min(k, bins - 1)] += 1
    return part.sum(axis=0)


# the continuous-value search of a row (it uses the exact kernels above)
from . import numba_rowsearch as _rows  # noqa: E402
