"""The "mse" search of one flat array (a tensor, or one long row), the same policy on every device.

``search_flat(k, flat, n, nonfinite)`` decides how to search (the exact search of small arrays,
the sampled model of very large ones, bfloat16 values, few distinct values, the histogram model
verified on the data) and runs every pass over the data through ``k``, a :class:`FlatKernels` set:
:func:`numba_kernels` for host arrays, ``quantkit.calibration.gpu.cuda_kernels`` for CUDA tensors.
What works on summaries (histograms, moments, candidate lists) runs on the host in numba whichever
device holds the data. ``search_rows`` / ``search_blocks`` choose between the in-cache search of
every row or block (numba) and ``search_flat`` of each long row.

How the search works, and how close it gets to the brute-force optimum: docs/CALIBRATION.md.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _arrays
from .._constants import QMAX
from . import _args
from ._args import MIN_ALPHA

#: Arrays up to this size are searched exactly in cache (search_mse); larger ones via a histogram.
SMALL = 1 << 16
#: From this size on, "mse" per tensor models the bulk from a sample (_search_sampled).
SAMPLED_MIN = 1 << 23
SAMPLE_RATE = 256
#: The sampled path's sample holds at least this many values (a higher rate below 2^24 values).
SAMPLED_SAMPLE = 1 << 16
_SAMPLED_MARGIN = 0.03  # the exact search stays within 3% below the model's alpha
_GUESS_MARGIN = 0.1     # how far below the sample's first guess the exact tail may need to reach
#: A sample whose model with exact rounding cells dips more than this many noise units below its
#: value at the smooth model's alpha has structure a smooth bulk misses (_cell_model_gap).
_DIP_GAP = 1.5
#: Local minima of the histogram model within this of its lowest are decided by exact errors
#: (the dips of piled-up values, where the model ranks minima less than 1% apart wrongly).
MODEL_RIVALS = 0.02


class FlatScan(NamedTuple):
    """One pass over a flat array: max |x| over the finite elements (float32), the number of
    non-finite and of zero elements, ``low_bits`` (0 iff no value has a non-zero bit among its 16
    low mantissa bits) and the log histogram of |x| (``counts``, HIST_BINS int64 entries; with the
    sums of the low bits and of their squares where the kernel set makes them, else None).
    ``counts`` may be None where ``bad`` or ``amax < MIN_POSITIVE_ALPHA`` ended the pass early."""

    amax: np.float32
    bad: int
    zeros: int
    low_bits: int
    counts: object
    sum_res: object = None
    sum_res2: object = None


class FlatKernels(NamedTuple):
    """What the "mse" search of one flat array runs on the data, on the device holding it.

    * ``absmax(flat) -> (amax, bad)``: max |x| over the finite elements and the non-finite count;
    * ``scan(flat) -> FlatScan``;
    * ``sse_fixed_many(flat, alphas, unit_inv) -> int64 array``: the fixed-point error sums of
      the float32 ``alphas`` (the same bit for bit on every device);
    * ``search_exact(flat, amax, what) -> alpha``: the exact search on the data itself, for
      arrays with few (non-zero) values (``what`` describes them, for the device that cannot);
    * ``search_discrete(flat, amax, scan) -> alpha or None``: the exhaustive search of at most
      LATTICE_MAX_DISTINCT distinct |x|, or None where there are more;
    * ``sample_pieces(flat, rate)``, ``scan_tail(flat, tail_bin, tail, chunk_max)``,
      ``sse_chunked_many(flat, alphas, chunk_max)``: the sampled path of very large arrays
      (_search_sampled); None where the device has none (then the full histogram decides).
    """

    absmax: object
    scan: object
    sse_fixed_many: object
    search_exact: object
    search_discrete: object
    sample_pieces: object = None
    scan_tail: object = None
    sse_chunked_many: object = None


# ------------------------------------------------------------------------- the numba kernel set


def _numba_scan(flat) -> FlatScan:
    k = _args.data_kernels()
    counts = np.zeros(k.HIST_BINS, np.int64)
    amax, bad, zeros, low_bits = k.scan_flat(flat, _args.tasks(), counts)
    return FlatScan(amax, int(bad), int(zeros), int(low_bits), counts)


def _numba_search_exact(flat, amax, what):
    del what  # the data is on the host: every array can be searched exactly
    return _args.data_kernels().search_mse(flat, np.float32(amax))


def _numba_search_discrete(flat, amax, scan):
    alpha = _args.data_kernels().search_mse_discrete(flat, np.float32(amax))
    return np.float32(alpha) if alpha >= 0 else None


def _numba_scan_tail(flat, tail_bin, tail, chunk_max):
    return _args.data_kernels().scan_tail(flat, _args.tasks(), tail_bin, tail, chunk_max)


def numba_kernels() -> FlatKernels:
    """The kernel set of host arrays (NumPy, CPU tensors through ``.numpy()``)."""
    k = _args.data_kernels()
    return FlatKernels(k.absmax_flat, _numba_scan, k.sse_fixed_many, _numba_search_exact,
                       _numba_search_discrete, k.sample_pieces, _numba_scan_tail,
                       k.sse_chunked_many)


# ------------------------------------------------------------------------------------ the policy


def search_flat(k: FlatKernels, flat, n: int, nonfinite) -> np.float32:
    """MSE-optimal alpha of one flat array of ``n`` elements held where ``k`` runs.

    ``nonfinite(count)`` builds the ValueError raised for NaN/Inf (naming the caller's shape).
    """
    if n <= SMALL:
        amax, bad = k.absmax(flat)
        if bad:
            raise nonfinite(int(bad))
        amax = np.float32(amax)
        if amax < MIN_ALPHA:
            return np.float32(0)
        return np.float32(k.search_exact(flat, amax, f"a tensor of {n} <= {SMALL} values"))
    sample = None
    if k.sample_pieces is not None:
        sample = k.sample_pieces(flat, _sample_rate(n))
        if n >= SAMPLED_MIN:
            alpha = _search_sampled(k, flat, n, sample, nonfinite)
            if alpha is not None:
                return alpha
    scan = k.scan(flat)
    if scan.bad:
        raise nonfinite(int(scan.bad))
    amax = np.float32(scan.amax)
    if amax < MIN_ALPHA:
        return np.float32(0)
    nonzero = n - int(scan.zeros)
    if nonzero <= SMALL:  # mostly zeros: search the non-zero values exactly
        return np.float32(k.search_exact(flat, amax, f"a tensor with {nonzero} <= {SMALL} "
                                                     "non-zero values"))
    h = _args.host_kernels()
    if scan.low_bits == 0:  # at most 7 mantissa bits: the histogram holds the exact distinct values
        values, counts = h.bin_values(scan.counts)
        return np.float32(h.search_mse_values(values, counts, amax))
    if np.count_nonzero(scan.counts) <= h.LATTICE_MAX_DISTINCT + 1:  # maybe few distinct values
        alpha = k.search_discrete(flat, amax, scan)
        if alpha is not None:
            return np.float32(alpha)
    return _search_histogram(k, flat, n, amax, scan.counts, int(scan.low_bits), nonzero, sample)


def _sample_rate(n: int) -> int:
    """One value in this many goes into the sample: SAMPLE_RATE, or fewer from SAMPLED_MIN on
    where that would leave the sampled path fewer than SAMPLED_SAMPLE values (its test of a
    smooth bulk, step 1 of _search_sampled, needs them)."""
    if n < SAMPLED_MIN:
        return SAMPLE_RATE
    return max(1, min(SAMPLE_RATE, n // SAMPLED_SAMPLE))


def _search_histogram(k: FlatKernels, flat, n: int, amax: np.float32, counts: np.ndarray,
                      low_bits: int, nonzero: int, sample=None):
    """MSE-optimal alpha of a large flat array from its count histogram, verified on the data.

    1. The model error of the histogram (each bin uniform over its range, or a point mass when
       every value has at most 7 mantissa bits; rounding cells integrated exactly) is minimised
       over (0, amax].
    2. Exact errors of the data decide (_decide_exact), with the dips of piled-up values
       (_pile_candidates, from ``sample``, a host array of some of the values) among the
       candidates.

    ``k`` is the FlatKernels of the device holding ``flat`` and ``n`` the element count of
    ``flat``; ``sample`` is None where the kernel set has no sample_pieces.
    """
    h = _args.host_kernels()
    cnt, mean, var = h.count_moments(counts, low_bits == 0)
    minima, _ = h.model_minima(cnt, mean, var, amax, 0.0, MODEL_RIVALS, 4)
    a_max = float(amax)
    unit_inv = h.unit_inverse(amax, n)

    def evaluate(alphas):
        return k.sse_fixed_many(flat, alphas, unit_inv)

    # the model's local minima within MODEL_RIVALS of its lowest all go to the exact decision
    centres = [float(a) for a in minima]
    extra, dense = (), False
    if sample is not None:
        extra = _pile_candidates(h, sample, counts, centres[0], a_max)
        dense = _clustered_sample(h, sample)
    return np.float32(_decide_exact(evaluate, centres, nonzero, a_max, extra, dense))


def _clustered_sample(k, sample: np.ndarray) -> bool:
    """numba_rowsearch.clustered on the first non-zero |x| of each piece of the sample (at most
    1024; one per piece, as neighbours in sorted or smooth data are close without being
    clustered): values in tight clusters, whose exact error has dips that a model cannot place."""
    ax = np.abs(sample[::k.SAMPLE_PIECE])
    ax = ax[ax != 0][:1024]
    if ax.size < 64:
        return False
    from ..backends.numba_rowsearch import clustered

    return bool(clustered(np.ascontiguousarray(ax)))


def _decide_exact(evaluate, centres, nonzero: int, top: float, extra=(), dense=False) -> float:
    """Exact errors of the data decide around the model's alpha (``evaluate(alphas)``: exact error
    sums, one pass over the data per call). ``centres``: the model's alpha first, then rival
    minima of a model (dips of piled-up values) that the exact errors decide between: the
    largest arrays search around each from the first pass on, the others take the best of them
    (one pass) as the model's alpha.

    The exact MSE wiggles around the smooth model by about 0.9 / sqrt(nonzero) (rounding errors
    decorrelate as alpha moves), so the scan is as wide and as dense as that asks for and the
    size affords: for 2^24 non-zero values and more, _exact_search from the model's
    alpha +-0.05% (plus max|x| when the model's alpha is within 3% of it); for fewer, up to 41
    points over up to +-2%, then 11 points at a fifth of that step around the best. ``extra`` alphas
    (_pile_candidates: where the grid meets piled-up values) join the first evaluation; for the
    largest arrays the best of them is refined over +-0.1% at 0.02% and competes with the rest.
    ``dense`` (clustered values) takes the wide scan at any size. The lowest exact error wins (on
    a tie the larger alpha).
    """
    def best_of(center, steps, extra=()):
        cands = _candidates(center, steps, top, extra)
        return float(cands[np.lexsort((-cands, evaluate(cands)))[0]])

    wiggle = 0.9 / np.sqrt(nonzero)
    half = int(min(20, max(2, (1 << 25) // nonzero)))  # points on each side
    if dense:  # clustered values (_clustered_sample): the wide scan, whatever the size
        half = max(half, 20)
    model_alpha, rivals = float(centres[0]), [float(c) for c in centres[1:]]
    near_top = ((top,) if max([model_alpha, *rivals]) > 0.97 * top else ()) + tuple(extra)
    if half <= 2:
        best = _exact_search(evaluate, model_alpha, 0.001, top, near_top, rivals)  # +-0.05%
        if extra:  # lumpy data: the dips, refined around the best one (+-0.1% at 0.02%)
            dip = best_of(extra[0], [0.0], extra[1:])
            dip = best_of(dip, [0.0002 * j for j in range(-5, 6)])
            pair = np.array(sorted({np.float32(best), np.float32(dip)}), np.float32)
            best = float(pair[np.lexsort((-pair, evaluate(pair)))[0]])
        return best
    if rivals:
        model_alpha = best_of(model_alpha, [0.0], rivals)
    width = min(0.02, max(0.003, 8 * wiggle))
    best = best_of(model_alpha, [width * j / half for j in range(-half, half + 1)], near_top)
    step = width / half
    return best_of(best, [step * j / 5 for j in range(-5, 6)])


def _candidates(center: float, steps, top: float, extra=()) -> np.ndarray:
    """float32 alphas ``center * (1 + d)`` (at most ``top``) and ``extra``, sorted, positive."""
    cands = {np.float32(min(center * (1.0 + d), top)) for d in steps}
    cands.update(np.float32(e) for e in extra)
    return np.array(sorted(c for c in cands if c > 0), np.float32)


def _exact_search(evaluate, center: float, step: float, top: float, extra=(), rivals=()) -> float:
    """Exact errors of the data decide around a model's alpha, for arrays so large (2^24 non-zero
    values and more) that the exact MSE wiggles by less than 0.02% and the model is accurate.

    ``evaluate(alphas)`` returns the exact error sums at a float32 array of alphas (one pass over
    the data per call). First the pair ``center * (1 +- step / 2)`` (at most ``top``), the same
    pair around each of ``rivals`` (other minima of a model) and ``extra``; then, while the
    steepest rise from the best (relative error per relative alpha, over the points of the
    search) times the step exceeds 0.01% (a minimum sharper than the step, e.g. values crowded
    just below max|x| such as tanh or sigmoid outputs, where the model's bins of relative width
    2^-7 cannot follow the curve; at 0.1% a sigmoid array stopped 0.09% above the optimum), the
    step is cut by 3 and the best's neighbours at that step are added. The lowest exact error
    wins, on a tie the larger alpha.
    """
    known: dict = {}

    def run(alphas):
        new = sorted({float(np.float32(a)) for a in alphas if 0 < a <= top} - known.keys())
        if new:
            arr = np.array(new, np.float32)
            known.update(zip(arr.tolist(), np.asarray(evaluate(arr), np.float64).tolist()))

    def best():
        return min(known, key=lambda a: (known[a], -a))

    run([a for c in (center, *rivals) for a in (c * (1 - step / 2), min(c * (1 + step / 2), top))]
        + list(extra))
    extras = {float(np.float32(e)) for e in extra}
    for _ in range(16):
        b = best()
        # the steepest relative rise per relative distance seen from the best (the extra points
        # aside) bounds how much lower the error can be within one step of it
        slope = max(((known[a] / known[b] - 1) / abs(a / b - 1) for a in known
                     if a != b and a not in extras and known[b] > 0), default=0.0)
        if slope * step <= 1e-4 or step < 2.0 ** -20:
            break
        step /= 3
        run([b * (1 - step), min(b * (1 + step), top)])
    return best()


def _pile_candidates(k, sample: np.ndarray, counts: np.ndarray, around: float, top) -> tuple:
    """Extra exact candidates for data with point masses or tight clusters, or ().

    A log-histogram bin (``counts``), or two adjacent ones, holding at least 64 values and 8 times
    more than each neighbour marks values piled on a point (padding values, a saturated level,
    integers with a little noise). Their error vanishes where the rounding grid passes through
    the point, so the exact MSE has narrow dips that a smooth model does not see and a narrow
    exact scan misses:
    at ``alpha = 127 * v / j`` for the pile's value ``v`` (its mean in ``sample``) and integers
    ``j``. Those alphas within 15% of ``around`` (for the two largest piles, at most 16) join the
    candidates that the exact errors of all the data decide between.
    """
    # a pile fills one bin, or two when its value sits on a bin edge (pile_bins)
    piles, singles = k.pile_bins(np.ascontiguousarray(counts, np.int64))
    if piles.size == 0:
        return ()
    bins = np.abs(sample).view(np.int32) >> k.HIST_SHIFT
    out = []
    for b, single in zip(piles.tolist(), singles.tolist()):
        member = bins == b
        if not single:
            member |= bins == b + 1
        members = np.abs(sample[member]).astype(np.float64)
        if members.size == 0:
            continue
        v = float(members.mean())
        j_lo = max(1, int(np.ceil(QMAX * v / min(1.15 * around, float(top)))))
        j_hi = int(np.floor(QMAX * v / (0.85 * around)))
        out += [QMAX * v / j for j in range(j_lo, min(j_hi, j_lo + 7) + 1)]
    return tuple(a for a in out if 0 < a <= float(top))[:16]


def _search_sampled(k: FlatKernels, flat, n: int, sample: np.ndarray, nonfinite):
    """MSE-optimal alpha of a very large flat array (at least SAMPLED_MIN values), or None when
    the data needs the full-histogram path: NaN/Inf (it raises there), few distinct values,
    bfloat16 values, mostly zeros, values in tight clusters, values piled near one magnitude
    (dips in the error, step 1), or an optimum among the top 1/4096 of the values.

    The rounding error of the bulk of the values is about s^2 / 12 each whatever their exact
    distribution; the clipping error needs the tail exactly. So:

    1. ``sample`` (sample_pieces: one piece of 256 values in _sample_rate(n), spread by
       golden-ratio hashing; the caller keeps it for the fallback) gets the full log histogram,
       and its model alpha ``a_s``. The tail threshold ``T`` is the lower of the histogram bin
       holding the sample's top 1/4096 (so the tail costs the pass little) and the bin 10% and
       _SAMPLED_MARGIN below ``a_s`` (a guess from the sample's few largest values), as long as
       that tail holds at most 1/256 of the sample. Where the sample's model with exact rounding
       cells falls more than _DIP_GAP times the sample's noise (1 / sqrt(its non-zero count)) below
       its error at ``a_s`` within +-20% of it, the bulk is not smooth (piled values: GELU,
       SiLU outputs) and the full histogram decides (_cell_model_gap; again at ``a_c``, step 3).
    2. One pass over all the data (scan_tail): NaN/Inf and zero counts, the max of every chunk,
       and the exact histogram of the |x| >= T.
    3. The model (model_search) of the exact tail plus the sample's bulk below T, scaled to the
       exact count there and taken as a smooth density (s^2 / 12 per value that a step splits):
       ``a_c``. It stands only if ``a_c`` lies above T (every value that the candidates clip or
       round near the top is in the exact tail) and that model with exact cells shows no dips
       near it.
    4. Exact errors of the data decide (_decide_exact with sse_chunked_many).
    """
    h = _args.host_kernels()
    counts_s = np.zeros(h.HIST_BINS, np.int64)
    amax_s, bad_s, zeros_s, low_s = h.scan_flat(sample, 1, counts_s)
    nonzero_s = sample.size - int(zeros_s)
    if (bad_s or low_s == 0 or amax_s < MIN_ALPHA or nonzero_s * _sample_rate(n) <= 4 * SMALL
            or np.count_nonzero(counts_s) <= h.LATTICE_MAX_DISTINCT + 1
            or _clustered_sample(h, sample)):
        return None
    above = np.cumsum(counts_s[::-1])[::-1]  # above[b] = sample count in bins >= b
    tail_bin = int(np.searchsorted(-above, -(sample.size // 4096), side="left"))
    cnt, mean, var = h.count_moments(counts_s, False)
    a_s = float(h.model_search(cnt, mean, var, amax_s, np.inf))  # a smooth model: a first guess
    # a_s rests on the sample's few largest values; a tail reaching _GUESS_MARGIN below it (at
    # most 1/256 of the values) lets a_c stand where the true optimum lies above a low guess
    guess = a_s * (1 - _GUESS_MARGIN) * (1 - _SAMPLED_MARGIN) * ((QMAX - 0.5) / QMAX)
    guess_bin = int(np.array([guess], np.float32).view(np.int32)[0]) >> h.HIST_SHIFT
    if guess_bin < tail_bin and above[guess_bin] <= sample.size // 256:
        tail_bin = guess_bin
    tail_bin = max(tail_bin, 1)
    t_value = float(np.array([tail_bin << h.HIST_SHIFT], np.int32).view(np.float32)[0])

    def stands(alpha):  # every value the exact search can clip or round near the top is >= T
        return alpha * (1 - _SAMPLED_MARGIN) * ((QMAX - 0.5) / QMAX) >= t_value

    if not stands(a_s * 0.97):
        return None
    # values piled near some magnitude (the minimum of GELU or SiLU outputs) make dips in the
    # error that a smooth bulk cannot show: when the sample's own model with exact rounding cells,
    # over a_s +-20% at 1% steps, falls below its error at a_s by more than _DIP_GAP times
    # the sample's noise, the full histogram decides (tested after the cheaper test above)
    if _cell_model_gap(h, cnt, mean, var, a_s, amax_s, nonzero_s) > _DIP_GAP:
        return None
    tail = np.zeros(h.HIST_BINS - tail_bin, np.int64)
    chunk_max = np.zeros((n + h.CHUNK - 1) // h.CHUNK, np.float32)
    bad, zeros = k.scan_tail(flat, tail_bin, tail, chunk_max)
    if bad:
        raise nonfinite(int(bad))
    amax = np.float32(chunk_max.max())
    below_full = n - int(zeros) - int(tail.sum())
    bulk = counts_s.copy()
    bulk[0] = 0
    bulk[tail_bin:] = 0
    below_sample = int(bulk.sum())
    if amax < MIN_ALPHA or n - int(zeros) <= 4 * SMALL or below_sample == 0:
        return None
    c1, m1, v1 = h.count_moments(bulk, False)
    exact_tail = np.zeros(h.HIST_BINS, np.int64)
    exact_tail[tail_bin:] = tail
    c2, m2, v2 = h.count_moments(exact_tail, False)
    cnt_c = np.concatenate([c1 * (below_full / below_sample), c2])
    mean_c = np.concatenate([m1, m2])
    var_c = np.concatenate([v1, v2])
    a_c = float(h.model_search(cnt_c, mean_c, var_c, amax, t_value))
    if not stands(a_c):
        return None
    if _cell_model_gap(h, cnt_c, mean_c, var_c, a_c, amax, nonzero_s) > _DIP_GAP:
        return None
    return np.float32(_decide_exact(lambda a: k.sse_chunked_many(flat, a, chunk_max), [a_c],
                                    n - int(zeros), float(amax),
                                    _pile_candidates(h, sample, counts_s, a_c, amax)))


def _cell_model_gap(h, cnt, mean, var, alpha: float, top, sample_nonzero: int) -> float:
    """How far the histogram model with exact rounding cells falls below its value at ``alpha``
    over alpha * (1 + j / 100), j = -20..20 (at most ``top``), relative to that minimum and in
    units of the noise of a sample of ``sample_nonzero`` values (1 / sqrt of it). A gap of a few
    units: the error has dips that a smooth model of the bulk cannot place (_search_sampled)."""
    grid = np.minimum(alpha * (1 + 0.01 * np.arange(-20, 21)), float(top)).astype(np.float32)
    cells = h.model_sse_many(cnt, mean, var, grid, 0.0)
    if not cells.min() > 0:  # a model error of zero: no smooth bulk at all
        return np.inf
    return float((cells[20] / cells.min() - 1) * np.sqrt(sample_nonzero))


# ------------------------------------------------------------------------ rows and blocks


def search_host_flat(flat: np.ndarray, x32=None, name="x") -> np.float32:
    """search_flat of a host array; NaN/Inf are reported against ``x32``'s shape (``flat``'s
    when x32 is None)."""
    shaped = flat if x32 is None else x32
    return search_flat(numba_kernels(), flat, flat.size,
                       lambda bad: _arrays.nonfinite_error(shaped, bad, name))


def search_rows(rows: np.ndarray, amax: np.ndarray) -> np.ndarray:
    """The MSE-optimal alpha of each row of a 2-D C-contiguous host array (``amax``: its max |x|,
    checked finite): rows of at most SMALL values in cache, in parallel; longer ones one by one."""
    out = np.zeros(rows.shape[0], np.float32)
    if rows.shape[1] <= SMALL:
        _args.data_kernels().search_mse_rows(rows, _searchable(amax), out)
    else:
        for r in range(rows.shape[0]):
            out[r] = search_host_flat(rows[r])
    return out


def search_blocks(flat: np.ndarray, block_size: int, amax: np.ndarray) -> np.ndarray:
    """The MSE-optimal alpha of each block of a flat host array (the last block may be short)."""
    out = np.zeros(amax.size, np.float32)
    _args.data_kernels().search_mse_blocks(flat, block_size, _searchable(amax), out)
    return out


def _searchable(amax: np.ndarray) -> np.ndarray:
    """max |x| with the entries below MIN_POSITIVE_ALPHA set to 0 (their alpha is 0)."""
    return np.where(amax < MIN_ALPHA, 0, amax).astype(np.float32)
