"""numba kernels for the statistics of calibration data: |x|max with the NaN/Inf count, the
log histogram of |x| (with the sums of the low mantissa bits), the one-pass scans of large arrays,
the sample of a very large array, and the linear histogram of the entropy method.

Log histogram of |x|: bin = (float32 bits of |x|) >> HIST_SHIFT, i.e. the exponent and the top 7
mantissa bits. Relative bin width <= 2^-7; every finite float32 has a bin (index < HIST_BINS).

No kernel uses fast-math. Importing this module compiles nothing; kernels are cached on disk.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .._constants import HIST_BINS, HIST_SHIFT
from .numba_chunks import chunk_bounds, chunk_count
from .numba_error_sums import ABS_MASK

_INF_BITS = np.int32(0x7F800000)
_RES_MASK = np.int32((1 << HIST_SHIFT) - 1)
SAMPLE_PIECE = 256  # elements per sampled piece (sample_pieces): 1 KiB, prefetcher-friendly


@njit(cache=True)
def _float_of_bits(b):
    """The float32 whose bit pattern is the int32 ``b``."""
    return np.array([b], np.int32).view(np.float32)[0]


@njit(parallel=True, cache=True)
def absmax_flat(x):
    """(max |x| over finite elements as float32, number of non-finite elements) of a flat array."""
    bits = x.view(np.int32)
    n = bits.size
    n_chunks = chunk_count(n)
    best = np.zeros(n_chunks, np.int32)
    bad = np.zeros(n_chunks, np.int64)
    for c in prange(n_chunks):
        lo, hi = chunk_bounds(c, n)
        bs = bits[lo:hi]
        m = np.int32(0)
        count = 0
        for i in range(hi - lo):
            b = bs[i] & ABS_MASK
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
            b = bs[i] & ABS_MASK
            finite = b < _INF_BITS
            count += not finite
            m = max(m, b if finite else np.int32(0))
        best[r] = m
        bad[r] = count
    out[:] = best.view(np.float32)
    return bad.sum()


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
            b = bs[i] & ABS_MASK
            k = b >> HIST_SHIFT
            r = np.int64(b & _RES_MASK)
            ct[k] += 1
            st[k] += r
            qt[k] += r * r
    for t in range(tasks):
        counts += c_t[t]
        sum_res += s_t[t]
        sum_res2 += q_t[t]


@njit(cache=True)
def bin_values(counts):
    """(values, counts) of the non-empty bins above bin 0, each bin's lowest value as float32:
    the exact distinct values when no value has more than 7 mantissa bits."""
    nz = np.nonzero(counts[1:])[0] + 1
    vals = np.empty(nz.size, np.int32)
    for j in range(nz.size):
        vals[j] = np.int32(nz[j]) << HIST_SHIFT
    return vals.view(np.float32), counts[nz].copy()


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
            b = bs[i] & ABS_MASK
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
            tb[0, (bs[i] & ABS_MASK) >> HIST_SHIFT] += 1
            tb[1, (bs[i + 1] & ABS_MASK) >> HIST_SHIFT] += 1
            tb[2, (bs[i + 2] & ABS_MASK) >> HIST_SHIFT] += 1
            tb[3, (bs[i + 3] & ABS_MASK) >> HIST_SHIFT] += 1
        for i in range(top, m):
            tb[0, (bs[i] & ABS_MASK) >> HIST_SHIFT] += 1
    for t in range(tasks):
        for j in range(4):
            tj = table[t, j]
            for k in range(HIST_BINS):
                counts[k] += tj[k]
    orr = np.int32(0)
    for t in range(tasks):
        orr |= low[t]
    return _float_of_bits(best.max()), bad.sum(), zeros.sum(), orr


@njit(cache=True)
def sample_pieces(x, rate):
    """Every piece of SAMPLE_PIECE consecutive elements whose index ``c`` has
    ``frac(c * 0.6180339887...) < 1 / rate`` (golden-ratio hashing: about one piece in ``rate``,
    spread evenly over the array without a period that strided data could alias), concatenated."""
    n = x.size
    pieces = n // SAMPLE_PIECE
    limit = np.uint64((1 << 32) // rate)
    golden = np.uint64(0x9E3779B9)
    mask = np.uint64(0xFFFFFFFF)
    total = 0
    for c in range(pieces):
        total += (np.uint64(c) * golden) & mask < limit
    out = np.empty(total * SAMPLE_PIECE, x.dtype)
    j = 0
    for c in range(pieces):
        if (np.uint64(c) * golden) & mask < limit:
            lo = c * SAMPLE_PIECE
            for i in range(SAMPLE_PIECE):
                out[j + i] = x[lo + i]
            j += SAMPLE_PIECE
    return out


@njit(cache=True)
def _group_stats(bs, tail_bits):
    """(max |x| bits, non-finite count, zero count, tail count) of an int32 view of floats."""
    mx = np.int32(0)
    count = np.int32(0)
    zero = np.int32(0)
    tail = np.int32(0)
    for i in range(bs.size):
        b = bs[i] & ABS_MASK
        count += np.int32(b >= _INF_BITS)
        zero += np.int32(b == 0)
        mx = max(mx, b)
        tail += np.int32(b >= tail_bits)
    return mx, count, zero, tail


@njit(parallel=True, cache=True)
def scan_tail(x, tasks, tail_bin, tail_counts, chunk_max):
    """One pass over a flat array: the non-finite count, the zero count, max |x| of each chunk of
    CHUNK elements (into ``chunk_max``, float32; meaningful when there is no NaN/Inf), and the
    count histogram of the |x| in bins >= ``tail_bin`` only (added to
    ``tail_counts[b - tail_bin]``).

    Vectorised statistics per group of 512 elements; only a group that holds a tail value is
    visited again, element by element, while in cache: a rare tail (a fraction of 1e-4 or less)
    costs little. Returns (non-finite count, zero count).
    """
    bits = x.view(np.int32)
    n = bits.size
    n_chunks = chunk_count(n)
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
            lo, hi = chunk_bounds(c, n)
            mx = np.int32(0)
            for g in range(lo, hi, 512):
                grp = bits[g:min(g + 512, hi)]
                gm, gc, gz, gt = _group_stats(grp, tail_bits)
                mx = max(mx, gm)
                count += gc
                zero += gz
                if gt and not gc:
                    for i in range(grp.size):
                        b = grp[i] & ABS_MASK
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
def histogram_linear(x, amax, bins):
    """Counts of |x| in ``bins`` equal bins over [0, amax] (|x| == amax in the last bin)."""
    n = x.size
    n_chunks = chunk_count(n)
    part = np.zeros((n_chunks, bins), np.int64)
    width_inv = bins / np.float64(amax)
    for c in prange(n_chunks):
        lo, hi = chunk_bounds(c, n)
        xs = x[lo:hi]
        ps = part[c]
        for i in range(hi - lo):
            k = int(abs(np.float64(xs[i])) * width_inv)
            ps[min(k, bins - 1)] += 1
    return part.sum(axis=0)
