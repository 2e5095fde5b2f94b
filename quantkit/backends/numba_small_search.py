"""numba search of the MSE-optimal alpha of a small array (a tensor of at most 65536 values, a row,
a block), on the exact errors of its values; the one place that chooses how to search them
(_search_mse_normalized): the exact piecewise search of few distinct values, the row sweep of
numba_rowsearch for continuous values, or the exact scan of weighted and clustered values
(docs/CALIBRATION.md).

No kernel uses fast-math. Importing this module compiles nothing; kernels are cached on disk.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .numba_error_sums import (ABS_MASK, COARSE_RATIO, MIN_ALPHA, Q, Q64, ZERO, better,
                               quantization_error, scale_inv, search_unit, sse_search, trunc_i64)
from .numba_rowsearch import clustered, distinct_exceeds, lowest, search_row
from .numba_sse import sse_search_bound, sse_search_weighted

LATTICE_MAX_DISTINCT = 512  # at most this many distinct |x|: the exact piecewise search
_FINE_STEP = 1.001          # ratio between neighbours of the fine scan
_ROW_MIN = 16               # from this many values, unclustered ones take the row sweep
_ULPS = 8                   # float32 alphas tried on each side of a piece's minimum
_PIECES = 4                 # pieces whose minima the exact float32 error decides between


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
        b = bits[i] & ABS_MASK
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
        b = bits[i] & ABS_MASK
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
    top = Q * scale
    unit = np.float32(unit)
    acc = 0
    bound = 0
    for i in range(values.size):
        v = values[i]
        t = quantization_error(v, scale, inv) * unit
        acc += trunc_i64(np.float64(t * t)) * counts[i]
        d = max(v - top, ZERO) * unit
        bound += trunc_i64(np.float64(d * d)) * counts[i]
    return acc, bound


@njit(cache=True)
def _clip_window_low(values, counts, limit):
    """The smallest alpha whose clip error ``sum_{v > alpha} c (v - alpha)^2`` (a lower bound of
    the error at alpha and at every smaller alpha) is below ``limit``; 0 if there is none.

    The clip error is a decreasing quadratic in alpha between consecutive values, so walking the
    values from the largest down and solving one quadratic per interval finds it exactly."""
    order = np.argsort(-values)
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    for j in range(order.size):
        i = order[j]
        c = np.float64(counts[i]) if counts.size else 1.0
        v = np.float64(values[i])
        s0 += c
        s1 += c * v
        s2 += c * v * v
        below = np.float64(values[order[j + 1]]) if j + 1 < order.size else 0.0
        # on [below, v_j]: clip(a) = s0 a^2 - 2 s1 a + s2, decreasing; root of clip(a) = limit
        if s0 * below * below - 2.0 * s1 * below + s2 >= limit:
            disc = max(s1 * s1 - s0 * (s2 - limit), 0.0)
            return max((s1 - np.sqrt(disc)) / s0, below)
    return 0.0


@njit(cache=True)
def _search_pieces(values, counts, amax, unit):
    """Few distinct values: the exact minimum over every alpha where it can lie.

    In u = 1 / s (s = alpha / 127) each value's code min(rint(v u), 127) is constant between its
    breakpoints u = (k - 1/2) / v, and with the codes fixed the error is a parabola in s,
    ``E(s) = A - 2 s B + s^2 C`` (A = sum c v^2, B = sum c q v, C = sum c q^2), lowest at the
    vertex s = B / C clamped to the piece. Only alphas between amax and the point where the clip
    error (a lower bound of the error there and at every smaller alpha) reaches the error at amax
    can win (_clip_window_low); the breakpoints there, sorted, cut that window into pieces, and
    each event updates B and C. The ``_PIECES`` lowest pieces' minima (real arithmetic) and the
    ``_ULPS`` float32 alphas on each side of each (float32 rounding of the scale and of
    ``q * scale`` moves the exact error by up to ~1e-4 of itself where the values are few and
    their errors small) are decided by the exact float32 error, on a tie the larger alpha; amax
    itself is a candidate.
    """
    a64 = np.float64(amax)
    best_a = np.float32(amax)
    best_s = _sse(values, counts, best_a, unit)
    e_top = np.float64(best_s) / (np.float64(unit) * np.float64(unit))
    a_low = max(_clip_window_low(values, counts, 1.001 * e_top + 1e-30 * a64 * a64),
                np.float64(MIN_ALPHA))
    if a_low >= a64:
        return best_a
    u_top = Q64 / a64
    u_end = Q64 / a_low
    d = values.size
    q0 = np.empty(d, np.int64)   # each value's code at amax and at the window's low end
    q1 = np.empty(d, np.int64)
    for i in range(d):
        v = np.float64(values[i])
        q0[i] = np.int64(min(np.rint(v * u_top), Q64))
        q1[i] = np.int64(min(np.rint(v * u_end), Q64))
    events = np.int64((q1 - q0).sum())
    ev_u = np.empty(events)
    ev_i = np.empty(events, np.int64)
    e = 0
    a_sum = 0.0
    b = 0.0
    c = 0.0
    for i in range(d):
        v = np.float64(values[i])
        w = np.float64(counts[i]) if counts.size else 1.0
        a_sum += w * v * v
        b += w * q0[i] * v
        c += w * q0[i] * q0[i]
        for k in range(q0[i] + 1, q1[i] + 1):
            ev_u[e] = (k - 0.5) / v
            ev_i[e] = i
            e += 1
    order = np.argsort(ev_u)
    code = q0.copy()
    piece_e = np.full(events + 1, np.inf)   # each piece's lowest error (real arithmetic), at s
    piece_s = np.zeros(events + 1)
    u_left = u_top
    for j in range(events + 1):
        u_right = ev_u[order[j]] if j < events else u_end
        if u_right > u_left:
            s_lo = 1.0 / u_right
            s_hi = 1.0 / u_left
            s = min(max(b / c, s_lo), s_hi) if c > 0.0 else s_hi
            piece_e[j] = a_sum - 2.0 * s * b + s * s * c
            piece_s[j] = s
            u_left = u_right
        if j < events:
            i = ev_i[order[j]]
            w = np.float64(counts[i]) if counts.size else 1.0
            code[i] += 1
            b += w * np.float64(values[i])
            c += w * np.float64(2 * code[i] - 1)
    bits = np.empty(1, np.float32)
    for j in lowest(piece_e, _PIECES):
        if j < 0 or piece_e[j] == np.inf:
            break
        bits[0] = np.float32(min(max(Q64 * piece_s[j], a_low), a64))
        centre = bits.view(np.int32)[0]
        for k in range(-_ULPS, _ULPS + 1):
            bits.view(np.int32)[0] = centre + k
            a = bits[0]
            if not (a >= MIN_ALPHA and a <= amax):
                continue
            s_t = _sse(values, counts, a, unit)
            if better(s_t, a, best_s, best_a):
                best_s = s_t
                best_a = a
    return best_a


@njit(cache=True)
def _search_continuous(values, counts, amax, unit):
    """Coarse geometric scan pruned by the clip bound, then ever finer exact scans (search_mse)."""
    best_a = np.float32(amax)
    best_s, bound = _sse_bound(values, counts, best_a, unit)
    a = np.float64(amax)
    for _ in range(8 * 40):
        a *= COARSE_RATIO
        af = np.float32(a)
        if not af >= MIN_ALPHA:
            break
        s, bound = _sse_bound(values, counts, af, unit)
        if better(s, af, best_s, best_a):
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
        if better(errs[k], af, best_s, best_a):
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
        if better(errs[k], af, best_s, best_a):
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
            if better(s, af, best_s, best_a):
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
    return _search_normalized_in_place(values.copy(), counts, amax)


@njit(cache=True)
def _search_normalized_in_place(w, counts, amax):
    """search_mse_values on ``w``, which it scales in place (the caller's own buffer)."""
    e = np.int64(math.frexp(np.float64(amax))[1]) - 1  # 2^e <= amax < 2^(e+1)
    up = np.ldexp(1.0, -e)
    for i in range(w.size):
        w[i] = np.float32(np.float64(w[i]) * up)
    a = _search_mse_normalized(w, counts, np.float32(np.float64(amax) * up))
    a = np.float32(np.float64(a) * np.ldexp(1.0, e))
    return min(max(a, MIN_ALPHA), np.float32(amax))


@njit(cache=True)
def _search_mse_normalized(values, counts, amax):
    """search_mse_values on values scaled so that amax is in [1, 2):

    1. At most 512 distinct values (discrete or already-quantized data, rows and blocks of fewer
       than 16 values or in tight clusters): the exact minimum over the pieces of constant codes
       (_search_pieces).
    2. Otherwise, each value once (rows, blocks, small tensors; also 16..512 values that are not
       clustered, numba_rowsearch.clustered):
       numba_rowsearch.search_row, the smooth model's minimum, an event sweep of the exact error
       over +-4% of it, the two lowest sweep points and the vertices of their pieces decided by
       the exact float32 error.
    3. Weighted values (bfloat16 data, or a large array's distinct values), and values in tight
       clusters (numba_rowsearch.clustered, sent here, as the smooth model cannot
       place their dips; clustered values take the better, by exact error, of this and the row
       sweep of step 2, since repeated values also mark a row clustered and this scan's 1% grid
       can miss a narrow minimum there: 1.06-1.18 of the optimum on MiniLM activation rows): a
       coarse scan from amax down by 2^(-1/8), stopped as soon as the clip bound (a lower bound of
       the error at every smaller alpha) reaches the best error found; then exact scans ever finer
       around the best: +-9% at 1%, the near-optimal window at 0.1% (every 1% point within
       max(4%, 2.7 / sqrt(n)) of the best; at most 200 points), then 0.2, 0.4 and 0.6 of its step
       on each side of the three lowest points of that scan.
    Every decision is made on exact errors of the data (fixed-point sums, see module docstring).
    """
    n = counts.sum() if counts.size else values.size
    unit = search_unit(amax, n)
    if counts.size:
        if values.size <= LATTICE_MAX_DISTINCT:
            return _search_pieces(values, counts, amax, unit)
        return _search_continuous(values, counts, amax, unit)
    if _ROW_MIN <= values.size <= LATTICE_MAX_DISTINCT and not clustered(values):
        return search_row(values, amax)  # a short row of continuous values
    if not distinct_exceeds(values, LATTICE_MAX_DISTINCT):
        distinct, dcounts = _distinct(values, LATTICE_MAX_DISTINCT)
        if distinct.size:
            return _search_pieces(distinct, dcounts, amax, unit)
    if clustered(values):  # tight clusters: dips that the smooth model cannot place
        # repeated values (activations of padding or repeated tokens) mark a row clustered without
        # dips far from the model's minimum, and there the scan's 1% grid can miss a narrow
        # minimum the row sweep finds: the lower exact error of the two decides
        a_scan = _search_continuous(values, counts, amax, unit)
        a_row = search_row(values, amax)
        s_scan = _sse(values, counts, a_scan, unit)
        s_row = _sse(values, counts, a_row, unit)
        return a_row if better(s_row, a_row, s_scan, a_scan) else a_scan
    return search_row(values, amax)


@njit(cache=True)
def search_mse_discrete(x, amax):
    """search_mse_values on the distinct non-zero |x| of a flat array with counts, if there are at
    most LATTICE_MAX_DISTINCT of them (the exact piecewise search); else -1."""
    values, counts = _distinct(x, LATTICE_MAX_DISTINCT + 1)
    if values.size == 0:
        return np.float32(-1.0)
    keep = values != 0
    if keep.sum() > LATTICE_MAX_DISTINCT:
        return np.float32(-1.0)
    return search_mse_values(values[keep], counts[keep], amax)


@njit(cache=True)
def search_mse(x, amax):
    """search_mse_values over the non-zero |x| of a flat array (zeros have no error at all); the
    gathered |x| is the function's own array, so it is normalized in place."""
    return _search_normalized_in_place(nonzero_abs(x), np.empty(0, np.int64), amax)


@njit(parallel=True, cache=True)
def search_mse_rows(x, amax, out):
    """out[r] = search_mse(x[r], amax[r]) for each row of a 2-D array (0 where amax is 0)."""
    for r in prange(x.shape[0]):
        if amax[r] > ZERO:
            out[r] = search_mse(x[r], amax[r])
        else:
            out[r] = ZERO


@njit(parallel=True, cache=True)
def search_mse_blocks(x, block_size, amax, out):
    """out[b] = search_mse over block b of a flat array (the last block may be short)."""
    n = x.size
    for b in prange(amax.size):
        lo = b * block_size
        hi = min(lo + block_size, n)
        if amax[b] > ZERO:
            out[b] = search_mse(x[lo:hi], amax[b])
        else:
            out[b] = ZERO
