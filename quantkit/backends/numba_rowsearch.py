"""The exact-MSE alpha search for one row (or small tensor) of continuous values.

Problem.  v_i = |x_i| > 0 (zeros removed), amax = max v.  For a float32 alpha,

    scale = float32(alpha / 127), inv = float32(127 / alpha)
    q_i = min(rint(v_i * inv), 127),  e_i = v_i - q_i * scale   (float32)
    SSE(alpha) = sum e_i^2

Find alpha in (0, amax] minimising SSE, within 0.1% of a dense brute force.  The entry point is
``search_row(v, amax)``, for arrays that the piecewise search (at most 512 distinct values) does not
take; ``distinct_exceeds`` is a cheap proof of more than 512 distinct values that skips counting
them.

1. **Trend** (``trend_global``).  The smooth model
   of the error at step s = alpha / 127, with c = 1/sqrt(12),

      M(s) = sum_{v > (127+c) s} (v - 127 s)^2 + N_mid s^2 / 12 + sum_{v <= (8+c) s} (v - q s)^2

   (clipped values exactly, rounding noise s^2/12 in between, the values with codes 0..8 exactly:
   their density changes too much within a cell for s^2/12 -- heavy tails put most values there --
   and their exact error varies slowly with s).  The seams sit where the exact error of a value
   equals s^2/12, so M is continuous; with seams at 127 s / 8.5 s instead, M jumped by s^2/12 per
   crossing value and its minimum was biased 2-6% high at n = 65536.  dM/ds = s g(s),

       g(s) = -254 sum_clip (v/s - 127) + N_mid / 6 - 2 sum_low q (v/s - q),

   one vectorised pass with int64 fixed-point sums.  Coarse scan of M (``model_g_error_clip``)
   from amax/127 down by 2^(-1/8) until its clip part (a lower bound of M at all smaller s)
   reaches the best M; every local minimum (top end with g <= 0, or a - to + sign change of g; a
   finer scan where the lowest coarse point is unexplained: two roots within one step, multimodal
   data, or where a step's change of M disagrees with the trapezoid integral of s^2 g: a narrow
   dip of values piled near one magnitude, as GELU outputs near their minimum) near the best is
   refined by Illinois regula falsi on g in t = ln(s / s_top) to ``tol``; a runner-up within 3% of
   the best model error is swept too.  Measured: the brute-force optimum lies within +-2.4% of the
   minimum found on every row tested (the benchmark weight, all-MiniLM-L6-v2, the test
   distributions) but one Normal row of 16384 values had it just beyond 3%, so the window is +-4%.

1b. **Piles** (``pile_magnitude``, ``_pile_centres``).  Values piled within about 1% above code 8
   (GELU's or SiLU's minimum, a saturated level) make dips where the grid passes through them,
   at alpha = 127 p / q (p the pile's magnitude, q an integer), which the trend cannot place:
   the sweep of step 2 also runs around the alignments within +-15% of the trend's alpha.

2. **Event sweep** (``sweep``).  On [alpha_t / (1 + W), min(alpha_t (1 + W), amax)], W = 4%, take
   M = 534 points
   equally spaced in u = 1/s = 127/alpha: u_j = u0 + j du.  In real arithmetic q_i(u) =
   min(rint(v_i u), 127) steps from k-1 to k at u = (k - 1/2)/v_i.  With B = sum q v, C = sum q^2,

       SSE(s) = A - 2 s B + s^2 C,     A = sum v^2 (the same at every grid point: dropped),

   so the error at every grid point follows from the codes at u0 (a vectorised pass) plus the code
   changes ("events") in the window: event (i, k) adds v_i to B and 2k - 1 to C from grid index
   ceil(((k - 1/2)/v_i - u0)/du) on (difference arrays, then a prefix sum).  O(n + events + M);
   events per value ~ 2 W q_i (about 0.95 per value for W = 3% on the benchmark weight).
   A loop over each value's own events mispredicts about once per value on fresh rows, so
   ``sweep`` runs the events in rounds over an in-place compacted list, branch-free.  All sums
   int64 fixed point (units powers of two from amax or the window: exact, order-free,
   scale-invariant).  The sweep equals the float32
   error to ~5e-6 relative near the minimum (tests/backends/test_numba_rowsearch.py), far below
   the 1e-3 goal.

3. **Exact decision.**  The K lowest grid points are evaluated with quantkit's exact float32
   ``sse_search``; the lowest exact error wins, ties to the larger alpha.

Scale invariance: every grid and iteration works on dimensionless numbers (t = ln(s / s_top), u0/du,
cells) or on float64 products of amax with constants; every unit is a power of two from amax's or
the window's exponent: x * 2^k gives alpha * 2^k bit for bit (tested; normal range).

"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .numba_error_sums import MIN_ALPHA, Q, Q64, better, search_unit, sse_search, trunc_i64

_MIN_ALPHA_F64 = float(MIN_ALPHA)
_C = 0.28867513459481287  # 1/sqrt(12): where the exact error of a value equals s^2/12
_T_EXACT = 8.0 + _C  # values below this many steps enter the trend model exactly
_T_CLIP = Q64 + _C  # values above this many steps enter it as clipped
_WIDTH = 0.04   # the sweep covers alpha_t / 1.04 .. alpha_t * 1.04 (module docstring, step 1)
_POINTS = 534   # grid points of the sweep, equally spaced in 1 / alpha (about 0.015% apart)
_EXACT = 2      # lowest sweep points checked with the exact float32 error
_TOL = 0.01     # the trend minimum to 1% (relative step): the sweep's window absorbs the rest
# Piles (pile_magnitude): float32 bits >> 17 bin |x| by 1/64 of a binade (0.8-1.6% wide) over the
# 5 binades below max|x|; the fullest bin is a pile when it holds at least _PILE_MIN values and
# _PILE_SHARE of them, and _PILE_RATIO times the mean of the bins 2-8 away on either side.
_PILE_SHIFT = 17
_PILE_KEYS = 5 * 64
_PILE_MIN = 64
_PILE_SHARE = 0.01
_PILE_RATIO = 4.0
_PILE_REACH = 0.15     # a pile's alignments within +-15% of the trend's alpha are swept ...
_PILE_MAX_CODE = 64.0  # ... where the pile's code there is at most 64 (finer alignments lie within
#                        the trend's own window of +-4%; at code 26 one 4.8% away did not) ...
_PILE_SWEEPS = 3       # ... at most this many of them, the nearest to the trend's alpha first


@njit(cache=True)
def _pow2_units(amax):
    """``v_units``: the power of two with amax * v_units in [2^39, 2^40), the fixed-point scale of
    sums of v (v counts ``trunc(v * v_units)`` units; 2^16 values of at most QMAX * amax * v_units
    cannot overflow int64)."""
    e = np.int64(math.frexp(np.float64(amax))[1]) - 1  # 2^e <= amax < 2^(e+1)
    return np.ldexp(1.0, 39 - e)


@njit(cache=True)
def model_g(v, s, v_units):
    """g(s) = M'(s) / s of the smooth model (module docstring, step 1); one vectorised pass.

    M(s) = sum_{v > 127 s} (v - 127 s)^2 + N_mid s^2 / 12 + sum_{v <= T s} (v - q s)^2 with the
    values below T = 8.5 steps (codes 0..8) taken exactly (q = rint(v / s)): their density changes
    too much within a cell for s^2/12 (heavy tails, where most values get codes 0..3), and their
    exact error varies slowly with s (it decorrelates over a relative change 1/q).

        g = -254 * sum_clip (v/s - 127) + N_mid / 6 - 2 * sum_low q (v/s - q)

    Sums are int64 fixed point (clipped v in units of 1 / v_units, q (v/s - q) in units 2^-20).
    """
    hi = np.float32(min(_T_CLIP * s, 3.0e38))
    lo = np.float32(min(_T_EXACT * s, 3.0e38))
    u = np.float32(1.0 / s)
    s1 = 0
    ncl = 0
    nmid = 0
    low = 0
    f20 = np.float32(1048576.0)
    for i in range(v.size):
        x = v[i]
        c = x > hi
        s1 += trunc_i64(np.float64(x) * v_units) if c else np.int64(0)
        ncl += np.int64(c)
        nmid += np.int64((x > lo) & (x <= hi))
        y = x * u
        q = np.rint(y)
        low += trunc_i64(np.float64(q * (y - q) * f20)) if x <= lo else np.int64(0)
    g = -2.0 * Q64 * (s1 / v_units / s - Q64 * ncl) + nmid / 6.0 - 2.0 * low / 1048576.0
    return g, ncl, nmid


@njit(cache=True)
def model_g_error_clip(v, s, v_units):
    """(g, M, clip) of the smooth model at s in one vectorised pass: g as model_g, the model
    error M(s) itself and its clip part sum_{v > (127 + c) s} (v - 127 s)^2 (a lower bound of M
    at every smaller s, since clipping only grows).  Squares in int64 units of
    (2^-20 v_units)^-2."""
    hi = np.float32(min(_T_CLIP * s, 3.0e38))
    lo = np.float32(min(_T_EXACT * s, 3.0e38))
    u = np.float32(1.0 / s)
    top = np.float64(Q64 * s)
    sq = v_units * 2.0 ** -20
    sf = np.float32(s)
    sqf = np.float32(sq)
    s1 = 0
    s2 = 0
    ncl = 0
    nmid = 0
    low = 0
    lowsq = 0
    f20 = np.float32(1048576.0)
    for i in range(v.size):
        x = v[i]
        c = x > hi
        x64 = np.float64(x)
        s1 += trunc_i64(x64 * v_units) if c else np.int64(0)
        dd = (x64 - top) * sq
        s2 += trunc_i64(dd * dd) if c else np.int64(0)
        ncl += np.int64(c)
        isl = x <= lo
        nmid += np.int64((x > lo) & (x <= hi))
        y = x * u
        q = np.rint(y)
        low += trunc_i64(np.float64(q * (y - q) * f20)) if isl else np.int64(0)
        e = (x - q * sf) * sqf
        lowsq += trunc_i64(np.float64(e * e)) if isl else np.int64(0)
    g = -2.0 * Q64 * (s1 / v_units / s - Q64 * ncl) + nmid / 6.0 - 2.0 * low / 1048576.0
    clip = s2 / (sq * sq)
    m = clip + nmid * s * s / 12.0 + lowsq / (sq * sq)
    return g, m, clip


@njit(cache=True)
def trend_global(v, amax, v_units, tol):
    """Global minimum of the smooth model (robust to several local minima: multimodal data).

    Coarse scan of M from s_top = amax/127 down by 2^(-1/8) (one pass each, ``model_g_error_clip``),
    stopped when the clip part (a lower bound of M at every smaller s) reaches the best M seen.
    Local minima: the top end if g(s_top) <= 0, and every coarse interval where g changes sign
    from - (below) to + (above).  The interval next to the lowest coarse M (and any other whose
    end values are within 10% of it) is refined by Illinois on g in t = ln(s / s_top) to ``tol``;
    the refined minimum with the lowest M wins.  Returns (alpha float64, second alpha or
    -1: a runner-up minimum within 3% of the best model error, which the caller may sweep too).
    """
    s_top = np.float64(amax) / Q64
    step = -0.125 * np.log(2.0)
    ts = np.empty(400)
    gs = np.empty(400)
    ms = np.empty(400)
    nk = 0
    best_m = np.inf
    for k in range(400):
        t = k * step
        s = s_top * np.exp(t)
        if s * Q64 < _MIN_ALPHA_F64:
            break
        g, m, clip = model_g_error_clip(v, s, v_units)
        ts[nk] = t
        gs[nk] = g
        ms[nk] = m
        nk += 1
        best_m = min(best_m, m)
        if clip >= best_m:
            break
    # the lowest coarse point must be explained by a nearby minimum (the top end with g <= 0, or a
    # sign change of g next to it); else M has a minimum the coarse grid skipped over (two roots
    # of g within one step: multimodal data): scan the two steps around it 8 times finer. A
    # coarse step near the lowest M whose change of M disagrees with the integral of dM/dt = s^2 g
    # by the trapezoid rule (by more than half of it and 0.5% of the lowest M) hides the same:
    # a dip narrower than the step (values piled near one magnitude, as GELU outputs near their
    # minimum): scan it 8 times finer.
    kb = np.argmin(ms[:nk])
    explained = (kb == 0 and gs[0] <= 0.0) or (kb > 0 and gs[kb] <= 0.0 and gs[kb - 1] > 0.0) or \
        (kb + 1 < nk and gs[kb + 1] <= 0.0 and gs[kb] > 0.0)
    fine = step / 8.0
    starts = np.empty(nk + 1)  # t of each interval to scan (from its larger-s end), 16 steps long
    counts = np.empty(nk + 1, np.int64)
    n_scan = 0
    if not explained:
        starts[0] = ts[kb] - step if kb > 0 else 0.0
        counts[0] = 17
        n_scan = 1
    for k in range(1, nk):
        if min(ms[k], ms[k - 1]) > 1.1 * ms[kb]:
            continue
        if not explained and (k == kb or k == kb + 1):
            continue  # inside the scan above
        s0 = s_top * np.exp(ts[k - 1])
        s1 = s_top * np.exp(ts[k])
        pred = 0.5 * (s0 * s0 * gs[k - 1] + s1 * s1 * gs[k]) * (ts[k - 1] - ts[k])
        if abs((ms[k - 1] - ms[k]) - pred) > 0.5 * abs(pred) + 0.005 * ms[kb]:
            starts[n_scan] = ts[k - 1]
            counts[n_scan] = 8
            n_scan += 1
    if n_scan:
        cap = nk + 16 * n_scan
        tt = np.empty(cap)
        gg = np.empty(cap)
        mm = np.empty(cap)
        tt[:nk] = ts[:nk]
        gg[:nk] = gs[:nk]
        mm[:nk] = ms[:nk]
        extra = 0
        for r in range(n_scan):
            for i in range(1, counts[r]):
                t = starts[r] + i * fine
                if t >= 0.0 or i == 8:
                    continue
                if s_top * np.exp(t) * Q64 < _MIN_ALPHA_F64:
                    continue
                g, m, clip = model_g_error_clip(v, s_top * np.exp(t), v_units)
                tt[nk + extra] = t
                gg[nk + extra] = g
                mm[nk + extra] = m
                extra += 1
        nk += extra
        order = np.argsort(-tt[:nk])
        ts = tt[order]
        gs = gg[order]
        ms = mm[order]
    # candidate minima: (kind, index); kind 0 = top end, 1 = bracket (ts[k], ts[k-1])
    cand_t = np.empty(nk + 1)
    cand_m = np.empty(nk + 1)
    n_cand = 0
    if gs[0] <= 0.0:
        cand_t[n_cand] = 0.0
        cand_m[n_cand] = ms[0]
        n_cand += 1
    best_end = np.inf
    for k in range(1, nk):
        if gs[k] <= 0.0 and gs[k - 1] > 0.0:
            best_end = min(best_end, min(ms[k], ms[k - 1]))
    for k in range(1, nk):
        if gs[k] <= 0.0 and gs[k - 1] > 0.0:
            if min(ms[k], ms[k - 1]) > 1.1 * min(best_end, ms[0] if gs[0] <= 0.0 else np.inf):
                continue
            t_lo = ts[k]
            t_hi = ts[k - 1]
            g_lo = gs[k]
            g_hi = gs[k - 1]
            m_last = min(ms[k], ms[k - 1])
            side = 0
            for _ in range(60):
                if t_hi - t_lo <= tol:
                    break
                t = (t_lo * g_hi - t_hi * g_lo) / (g_hi - g_lo)
                w = t_hi - t_lo
                t = min(max(t, t_lo + 0.05 * w), t_hi - 0.05 * w)
                g, _, _ = model_g(v, s_top * np.exp(t), v_units)  # g only: a cheaper pass
                if g <= 0.0:
                    t_lo = t
                    g_lo = g
                    if side == -1:
                        g_hi *= 0.5
                    side = -1
                else:
                    t_hi = t
                    g_hi = g
                    if side == 1:
                        g_lo *= 0.5
                    side = 1
            cand_t[n_cand] = 0.5 * (t_lo + t_hi)
            cand_m[n_cand] = m_last
            n_cand += 1
    if n_cand == 0:  # no sign change seen (should not happen): the lowest coarse point
        j = np.argmin(ms[:nk])
        return min(Q64 * (s_top * np.exp(ts[j])), np.float64(amax)), -1.0
    if n_cand > 1:  # several local minima: compare the model error at each (rare)
        for i in range(n_cand):
            if cand_t[i] < 0.0:
                _, cand_m[i], _ = model_g_error_clip(v, s_top * np.exp(cand_t[i]), v_units)
    j = np.argmin(cand_m[:n_cand])
    a1 = min(Q64 * (s_top * np.exp(cand_t[j])), np.float64(amax))
    a2 = -1.0
    m2 = np.inf
    for i in range(n_cand):
        if i != j and cand_m[i] <= 1.03 * cand_m[j] and cand_m[i] < m2:
            m2 = cand_m[i]
            a2 = min(Q64 * (s_top * np.exp(cand_t[i])), np.float64(amax))
    return a1, a2


@njit(cache=True, error_model="numpy")  # no zero-division branch: lets pass 1 vectorise
def sweep(v, a_lo, a_hi, points, v_units, next_event, event_step, packed, events_left):
    """The exact error (real arithmetic, see the module docstring, step 2) at ``points`` grid points
    over [a_lo, a_hi], equally spaced in 127 / alpha; returns the sse (float64 [points]) minus
    sum v^2 (``v_units``: the fixed-point scale of _pow2_units).

    Each event (i, k) adds v_i to B and 2k - 1 to C; both go into ONE int64 per grid cell,
    ``(round(v_i * pb) << 24) + (2k - 1)``: a cell receives at most one event per value (a value's
    breakpoints are ~(points - 1) / events_i cells apart), so its C part stays below n * 253 < 2^24
    (n <= 65536) and its B part below 2^39 with pb = 2^(38 - E - ceil(log2 n)), amax < 2^(E+1).
    Events are processed in rounds over a compacted list of the values that still have events
    left (no data-dependent branches: a loop over each value's own events mispredicts about once
    per value, which costs more than the events themselves on fresh rows).
    next_event, event_step: float64 scratch (each value's next event position in cells, and the
    cells between its events), packed: int64 (its packed increment), events_left: int32 (n entries
    at least; separate arrays, so that the compiler sees they do not alias and vectorises pass 1).

    Returns (sse, B, C): with B[j] = sum q v and C[j] = sum q^2 at grid point j, the error of the
    codes of point j is lowest at s = B[j] / C[j] (the vertex of their parabola).
    """
    n = v.size
    u0 = Q64 / a_hi
    u1 = Q64 / a_lo
    du = (u1 - u0) / (points - 1)
    inv_du = 1.0 / du
    c = u0 * inv_du
    e_hi = np.int64(math.frexp(a_hi)[1])  # a_hi < 2^e_hi
    pb = np.ldexp(1.0, 37 - e_hi)  # values with events are < 1.004 a_hi: v * pb < 2^38
    u0f = np.float32(u0)
    u1f = np.float32(u1)
    b0 = 0
    c0 = 0
    # pass 1 (vectorised): codes at both ends, B and C at u0, each value's event state: position
    # of its next event in cells (float32: 600 cells to ~4e-5 of a cell), its step, the packed
    # increment and the number of events left
    for i in range(n):
        x = v[i]
        qa = min(np.rint(x * u0f), Q)
        qb = min(np.rint(x * u1f), Q)
        x64 = np.float64(x)
        b0 += trunc_i64(qa * (x64 * v_units))
        c0 += trunc_i64(np.float64(qa * qa))
        ne = np.int32(qb - qa)
        events_left[i] = ne
        w = inv_du / x64
        event_step[i] = w
        # values without events: a spare cell beyond the grid (spread over 64: no chain of
        # read-modify-writes on one cell), so the first round needs no branch
        next_event[i] = (qa + 0.5) * w - c if ne > 0 else np.float64(points + 1 + (i & 63))
        packed[i] = (trunc_i64(np.rint(x64 * pb)) << 24) + np.int64(2 * qa + 1)
    cnt = n
    # rounds: every value with events left adds its next event; the list is compacted in place
    db = np.zeros(points + 65, np.int64)
    dc = np.zeros(points + 65, np.int64)
    mask = (1 << 24) - 1
    while cnt > 0:
        new = 0
        for e in range(cnt):
            t = next_event[e]
            j = min(max(np.int64(np.ceil(t)), 0), points + 64)
            pk = packed[e]
            db[j] += pk >> 24
            dc[j] += pk & mask
            rem = events_left[e] - 1
            next_event[new] = t + event_step[e]
            event_step[new] = event_step[e]
            packed[new] = pk + 2
            events_left[new] = rem
            new += np.int64(rem > 0)
        cnt = new
    sse = np.empty(points)
    bq = np.empty(points)
    cq = np.empty(points)
    bc = 0
    cc = c0
    for j in range(points):  # the prefix sums alone: the loop below then vectorises
        cc += dc[j]
        bc += db[j]
        bq[j] = bc
        cq[j] = cc
    bb = np.float64(b0) / v_units
    inv_pb = 1.0 / pb  # pb is a power of two: x * inv_pb == x / pb
    for j in range(points):
        s = 1.0 / (u0 + j * du)
        b = bb + bq[j] * inv_pb
        sse[j] = s * (s * cq[j] - 2.0 * b)
        bq[j] = b
    return sse, bq, cq


@njit(cache=True)
def lowest(vals, k):
    """Indices of the k lowest entries (ascending), by insertion: O(len * k)."""
    k = min(k, vals.size)
    idx = np.full(k, -1, np.int64)
    best = np.full(k, np.inf)
    for j in range(vals.size):
        x = vals[j]
        if x < best[k - 1]:
            p = k - 1
            while p > 0 and best[p - 1] > x:
                best[p] = best[p - 1]
                idx[p] = idx[p - 1]
                p -= 1
            best[p] = x
            idx[p] = j
    return idx


@njit(cache=True)
def _popcount(w):
    """Set bits of a uint64."""
    w = w - ((w >> np.uint64(1)) & np.uint64(0x5555555555555555))
    m2 = np.uint64(0x3333333333333333)
    w = (w & m2) + ((w >> np.uint64(2)) & m2)
    w = (w + (w >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((w * np.uint64(0x0101010101010101)) >> np.uint64(56))


@njit(cache=True)
def _distinct_keys(bits, m, shift):
    """Number of distinct 16-bit keys ``(bits[i] >> shift) & 0xFFFF`` among the first m entries
    of an int32 view (a 65536-bit table filled branch-free, then a popcount per word: of the
    words the keys touched when they are fewer than the table's 1024)."""
    table = np.zeros(1024, np.uint64)
    for i in range(m):
        key = (bits[i] >> shift) & 0xFFFF
        table[key >> 6] |= np.uint64(1) << np.uint64(key & 63)
    count = 0
    if m < 1024:  # fewer keys than words: count the words the keys touched, each once
        for i in range(m):
            k = ((bits[i] >> shift) & 0xFFFF) >> 6
            count += _popcount(table[k])
            table[k] = np.uint64(0)
        return count
    for k in range(1024):
        count += _popcount(table[k])
    return count


@njit(cache=True)
def distinct_exceeds(ax, limit):
    """True if ``ax`` (finite float32 >= 0) certainly has more than ``limit`` distinct values:
    more than ``limit`` distinct keys (the low 16 bits of the float bits) among its first
    min(n, limit + 128) values (continuous data: about limit + 125 distinct keys). Different keys
    are different values, so True is a proof; False means "unknown" (bfloat16 data, integers, few
    values): count exactly then (``_distinct``).
    """
    n = ax.size
    if n <= limit:
        return False
    return _distinct_keys(ax.view(np.int32), min(n, limit + 128), 0) > limit


@njit(cache=True)
def clustered(ax):
    """True if the first min(n, 1024) values of ``ax`` (finite float32 >= 0) fall into fewer than
    85% as many distinct buckets of relative width 2^-11 (exponent and top 11 mantissa bits) as
    there are values: point masses, values piled in tight clusters (integers with a little noise),
    or float16 data with many exact repeats.

    Continuous rows fill 0.89 to 1.0 of their buckets (the benchmark weight, all-MiniLM-L6-v2),
    integers with noise of 0.01 about 0.4. On clustered data the exact error has deep dips where
    the rounding grid meets the clusters, which can lie beyond the sweep window around the smooth
    model's minimum (10% lower error at 3.5% below max|x| on such a row), so those rows take the
    exact scan of numba_small_search._search_continuous instead (numba_small_search decides).
    """
    m = min(ax.size, 1024)
    count = _distinct_keys(ax.view(np.int32), m, 12)
    return count < 0.85 * m


@njit(cache=True)
def pile_magnitude(v, amax):
    """The mean magnitude of the values piled near one magnitude (0.0 when there is no pile).

    Values piled within about 1% (the minimum of GELU or SiLU outputs, a saturated level) have
    an exact error with dips where the rounding grid passes through them, at alpha = 127 p / q
    for the pile's magnitude p and integer codes q; the smooth trend, exact only for codes up to
    8, cannot place them (it missed the optimum by up to 12% on GELU channels whose pile sat at
    codes 8-14). Binning as in _PILE_SHIFT's comment; the pile's magnitude is the mean of the
    values in its bin and its two neighbours.
    """
    bits = v.view(np.int32)
    top = np.empty(1, np.float32)
    top[0] = np.float32(amax)
    k_lo = (top.view(np.int32)[0] >> _PILE_SHIFT) - _PILE_KEYS + 1
    counts = np.zeros(_PILE_KEYS, np.int64)
    for i in range(bits.size):
        k = (bits[i] >> _PILE_SHIFT) - k_lo
        if 0 <= k < _PILE_KEYS:
            counts[k] += 1
    best = -1
    for b in range(_PILE_KEYS):
        if counts[b] < max(_PILE_MIN, _PILE_SHARE * v.size):
            continue
        around = 0
        seen = 0
        for d in range(2, 9):
            for c in (b - d, b + d):
                if 0 <= c < _PILE_KEYS:
                    around += counts[c]
                    seen += 1
        if counts[b] * seen >= _PILE_RATIO * max(around, seen) and (
                best < 0 or counts[b] > counts[best]):
            best = b
    if best < 0:
        return 0.0
    total = 0.0
    m = 0
    for i in range(bits.size):
        k = (bits[i] >> _PILE_SHIFT) - k_lo
        if best - 1 <= k <= best + 1:
            total += np.float64(v[i])
            m += 1
    return total / m


@njit(cache=True)
def _pile_centres(v, amax, a_t):
    """Alphas where the grid passes through the row's pile (pile_magnitude), within _PILE_REACH
    of the trend's alpha ``a_t`` (those above max|x| as max|x|) and more than 2% from it, at most
    _PILE_SWEEPS, nearest first (empty without a pile, or where the pile's code at ``a_t``
    exceeds _PILE_MAX_CODE)."""
    out = np.empty(_PILE_SWEEPS)
    m = 0
    p = pile_magnitude(v, amax) if a_t > 0.0 else 0.0
    code = Q64 * p / a_t if a_t > 0.0 else 0.0
    if p <= 0.0 or code > _PILE_MAX_CODE or code < 1.0:
        return out[:0]
    q_lo = max(1, int(np.ceil(code / (1.0 + _PILE_REACH))))
    q_hi = int(np.floor(code * (1.0 + _PILE_REACH)))
    qs = np.arange(q_lo, q_hi + 1)
    order = np.argsort(np.abs(qs - code))
    for j in order:
        # an alignment above max|x| still has its dip's lower side below it: the window at the top
        a = min(Q64 * p / qs[j], np.float64(amax))
        if abs(a / a_t - 1.0) > 0.02 and m < _PILE_SWEEPS and not np.any(out[:m] == a):
            out[m] = a
            m += 1
    return out[:m]


@njit(cache=True)
def search_row(v, amax):
    """The alpha in (0, amax] minimising the exact error of the |x| values ``v`` (> 0, finite, at
    least one; continuous data: more than 512 distinct values, else the piecewise search is exact).

    The smooth model's global minimum (trend_global), an event sweep over +-4% around it at 534
    points (and around a runner-up minimum of the model within 3%), then the exact float32 error
    (sse_search) of the two lowest sweep points and of the vertices of their codes' parabolas
    decides, on a tie the larger alpha.
    """
    width = _WIDTH
    m = _POINTS
    k_exact = _EXACT
    tol = _TOL
    n = v.size
    next_event = np.empty(n)
    event_step = np.empty(n)
    packed = np.empty(n, np.int64)
    events_left = np.empty(n, np.int32)
    v_units = _pow2_units(amax)
    a_t, a_2 = trend_global(v, amax, v_units, tol)
    unit = search_unit(amax, n)
    best_a = np.float32(0.0)
    best_s = np.iinfo(np.int64).max
    a64 = np.float64(amax)
    piles = _pile_centres(v, amax, a_t)
    for w_i in range(2 + piles.size):
        centre = a_t if w_i == 0 else a_2 if w_i == 1 else piles[w_i - 2]
        if centre <= 0.0:
            continue
        a_hi = min(centre * (1.0 + width), a64)
        a_lo = max(centre / (1.0 + width), _MIN_ALPHA_F64)
        if a_lo >= a_hi:
            a_lo = a_hi * 0.5
        sse, bq, cq = sweep(v, a_lo, a_hi, m, v_units, next_event, event_step, packed, events_left)
        idx = lowest(sse, k_exact)
        u0 = Q64 / a_hi
        du = (Q64 / a_lo - u0) / (m - 1)
        for t in range(idx.size):
            j = idx[t]
            a = np.float32(a_hi) if j == 0 else np.float32(Q64 / (u0 + j * du))
            # the vertex of the parabola of point j's codes (their lowest error), when it lies
            # within the window: on short rows a piece of constant codes spans several points
            a_v = np.float32(min(max(Q64 * bq[j] / cq[j], a_lo), a_hi)) if cq[j] > 0 else a
            for c in range(2):
                a_c = a if c == 0 else a_v
                if not a_c >= MIN_ALPHA or (c == 1 and a_v == a):
                    continue
                s = sse_search(v, a_c, unit)
                if better(s, a_c, best_s, best_a):
                    best_s = s
                    best_a = a_c
    return best_a

