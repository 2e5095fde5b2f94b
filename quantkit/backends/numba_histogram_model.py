"""numba model of the quantization error of a histogram: each bin's values spread uniformly with
the bin's exact mean and variance (or a point mass), the error integrated exactly over the rounding
cells; its minimum over alpha (model_search) is the "mse" search's model alpha for large arrays
and for the Observer.

No kernel uses fast-math. Importing this module compiles nothing; kernels are cached on disk.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .numba_error_sums import COARSE_RATIO, MIN_ALPHA, Q64, scale_inv


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
def pile_bins(counts):
    """The (at most two) heaviest piles of a count histogram, as (bins int64, single bool): a bin
    b holding at least 64 values and more than 8 times each neighbour (single), or else the pair
    b, b + 1 holding that many against the bins on either side of the pair; heaviest first (its
    count or the pair's), on equal weight the lower bin. Bins 1 .. size - 3 are examined."""
    top_b = np.full(2, -1, np.int64)
    top_w = np.full(2, -1, np.int64)
    top_s = np.zeros(2, np.bool_)
    for b in range(1, counts.size - 2):
        cb = counts[b]
        cn = counts[b + 1]
        if cb + cn < 64:  # neither a single pile nor a pair can start here
            continue
        single = cb >= 64 and cb > 8 * max(counts[b - 1], cn)
        if single:
            w = cb
        else:
            w = cb + cn
            if not w > 8 * max(counts[b - 1], counts[b + 2]):
                continue
        if w > top_w[0]:
            top_b[1], top_w[1], top_s[1] = top_b[0], top_w[0], top_s[0]
            top_b[0], top_w[0], top_s[0] = b, w, single
        elif w > top_w[1]:
            top_b[1], top_w[1], top_s[1] = b, w, single
    m = np.int64(top_b[0] >= 0) + np.int64(top_b[1] >= 0)
    return top_b[:m].copy(), top_s[:m].copy()


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
    top = Q64
    # bins wholly below s/2 keep code 0: error x, sum cnt * (mean^2 + var)
    a = np.searchsorted(hi_run, 0.5 * s)
    # bins wholly at or above (QMAX - 1/2) s are clipped to code QMAX: error x - QMAX s
    b = max(np.searchsorted(lo_min, (top - 0.5) * s), a)
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


_FINE_RATIO = 2.0 ** (-1.0 / 32.0)  # the scan of the region near the coarse minimum (~2.2%)


@njit(cache=True)
def _refine(cnt, mean, var, tables, smooth_below, a64, centre, ratio, rounds):
    """(alpha, model error): ``rounds`` geometric refinements of 17 points over
    [centre * ratio, centre / ratio] (at most amax), each 16 times finer than the last."""
    best_a = np.float32(centre)
    best_s = _model_sse(cnt, mean, var, tables, best_a, smooth_below)
    step = 1.0 / ratio
    for _ in range(rounds):
        lo = np.float64(best_a) / step
        hi = min(np.float64(best_a) * step, a64)
        for k in range(17):
            af = np.float32(lo * (hi / lo) ** (k / 16.0))
            if not af >= MIN_ALPHA:
                continue
            s = _model_sse(cnt, mean, var, tables, af, smooth_below)
            if s < best_s:
                best_s = s
                best_a = af
        step = (hi / lo) ** (1.0 / 16.0)
    return best_a, best_s


@njit(cache=True)
def model_minima(cnt, mean, var, amax, smooth_below, within, count, rescan=0.1):
    """The local minima of model_sse over (0, amax] whose model error is within ``within``
    (relative) of the lowest: (alphas float32, errors float64), lowest error first, at most
    ``count``.

    1. Coarse geometric scan from amax down by 2^(-1/8), stopped once the error has grown 16x past
       the best.
    2. The region where the coarse error is within ``rescan`` (10%) of the best, one coarse step
       wider on each side, scanned again by 2^(-1/32): values piled near one magnitude (the
       minimum of GELU or SiLU, a saturated level) make narrow dips where the rounding grid meets
       them, a few percent wide and 10-20% apart in alpha, which the coarse scan steps over.
    3. Every local minimum of that scan (the ends included) within ``within`` + 1% of its lowest
       point is refined by three geometric rounds of 17 points (to ~0.005%); those within
       ``within`` of the lowest refined error are returned.

    ``smooth_below``: see model_search.
    """
    tables = model_tables(cnt, mean, var)
    a64 = np.float64(amax)
    ca = np.empty(8 * 40 + 1)
    cs = np.empty(8 * 40 + 1)
    ca[0] = a64
    cs[0] = _model_sse(cnt, mean, var, tables, np.float32(amax), smooth_below)
    nc = 1
    best = cs[0]
    a = a64
    for _ in range(8 * 40):
        a *= COARSE_RATIO
        af = np.float32(a)
        if not af >= MIN_ALPHA:
            break
        s = _model_sse(cnt, mean, var, tables, af, smooth_below)
        ca[nc] = np.float64(af)
        cs[nc] = s
        nc += 1
        if s < best:
            best = s
        elif s > 16.0 * best:
            break
    hi = 0.0
    lo = np.inf
    for j in range(nc):
        if cs[j] <= (1.0 + rescan) * best:
            hi = max(hi, ca[j] / COARSE_RATIO)
            lo = min(lo, ca[j] * COARSE_RATIO)
    hi = min(hi, a64)
    lo = max(lo, np.float64(MIN_ALPHA))
    nf = max(2, np.int64(np.ceil(np.log(lo / hi) / np.log(_FINE_RATIO))) + 1)
    fa = np.empty(nf)
    fs = np.empty(nf)
    for j in range(nf):
        af = np.float32(hi * (lo / hi) ** (j / (nf - 1)))
        fa[j] = np.float64(af)
        fs[j] = _model_sse(cnt, mean, var, tables, af, smooth_below)
    fbest = fs.min()
    ratio = (lo / hi) ** (1.0 / (nf - 1))
    out_a = np.empty(count, np.float32)
    out_s = np.empty(count)
    m = 0
    for j in np.argsort(fs):
        if m == count or fs[j] > (1.0 + within + 0.01) * fbest:
            break
        if (j > 0 and fs[j - 1] < fs[j]) or (j + 1 < nf and fs[j + 1] < fs[j]):
            continue  # not a local minimum of the scan
        a_r, s_r = _refine(cnt, mean, var, tables, smooth_below, a64, fa[j], ratio, 3)
        out_a[m] = a_r
        out_s[m] = s_r
        m += 1
    order = np.argsort(out_s[:m])
    out_a = out_a[:m][order]
    out_s = out_s[:m][order]
    keep = out_s <= (1.0 + within) * out_s[0]
    return out_a[keep], out_s[keep]


@njit(cache=True)
def model_sse_many(cnt, mean, var, alphas, smooth_below):
    """model_sse (with ``smooth_below``, see model_search) at each float32 alpha of ``alphas``."""
    tables = model_tables(cnt, mean, var)
    out = np.empty(alphas.size)
    for j in range(alphas.size):
        out[j] = _model_sse(cnt, mean, var, tables, alphas[j], smooth_below)
    return out


@njit(cache=True)
def model_search(cnt, mean, var, amax, smooth_below=0.0):
    """The alpha in (0, amax] minimising model_sse: the lowest of model_minima.

    With ``smooth_below > 0`` the bins below it are a sample of a smooth density: one that meets a
    rounding step (neither wholly in cell 0 nor wholly clipped) counts s^2 / 12 per value, the
    average over the phase of the step, instead of the exact integral over its narrow range, whose
    dependence on the step's phase would mirror the sample's count noise (a wiggle of about
    1 / sqrt(sample size) that would move the minimum)."""
    return model_minima(cnt, mean, var, amax, smooth_below, 0.0, 1)[0][0]
