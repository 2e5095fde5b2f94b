"""Observer: a bounded, mergeable summary of many batches that yields alpha with the methods of
:func:`quantkit.calibrate`."""

from __future__ import annotations

import numbers

import numpy as np

from .. import _arrays
from . import _args
from ._args import MIN_ALPHA
from .entropy import entropy_bins_for


#: The "mse" model search (numba_histogram_model.model_minima) with a wider reach than calibrate's,
#: whose exact errors then decide between the minima it finds: with no data to decide, a dip of
#: piled values (GELU's minimum at codes 8-14, 1.5% wide) must be found by the model itself, also
#: between two coarse points 25-50% higher (the fine scan covers every coarse point within 2x of
#: the best) and between two fine points 10-15% above its bottom (every local minimum of the fine
#: scan within 15% of its lowest is refined, at most 8; the lowest refined one wins).
_RESCAN = 1.0
_REFINE_WITHIN = 0.15
_REFINED = 8


class Observer:
    """Accumulates batches and yields alpha, with the methods of :func:`calibrate`.

    The summary is, per channel, the exact running ``max |x|`` and a histogram of ``|x|`` with a
    bin per float32 exponent and 7 leading mantissa bits (relative width <= 2^-7) holding the
    count and the integer sums of the 16 low mantissa bits and of their squares: the exact count,
    mean and variance of each bin, in at most 32640 bins per channel (only non-empty bins are
    stored) whatever the number of batches. Every sum is an integer, so ``merge`` is exact and
    order-independent. alpha per method:

    * "max": the running ``max |x|``;
    * "percentile": ``np.percentile``'s rule on the binned values: the two order statistics
      around the rank, each placed inside its bin, interpolated linearly (equal to
      :func:`calibrate` within a bin's width, 2^-7 relative);
    * "entropy": the bins re-binned by their means to ``bins`` equal bins over [0, max], then the
      KL search of :func:`calibrate`;
    * "mse": the alpha in (0, max] minimising the model error of the histogram (each bin spread
      uniformly with its exact mean and variance, the error integrated exactly over the rounding
      cells it meets), searched wider than calibrate's model (_RESCAN, _REFINE_WITHIN): no exact
      errors of the data decide (the data is gone). From about 20K values per channel it is
      within 0.5% in MSE of calibrating the concatenated batches (0.003% at 100 batches of 16K
      values; GELU channels of 33700 tokens: 1-7 of 256 over 0.1%, worst 1.035); a few hundred
      or thousand values, whose exact error wiggles by about 0.9 / sqrt(n) around the model, or
      clustered data (piles, tanh saturation) can be 1-6% worse.

    Per channel (``axis``) every batch must have the same number of channels along ``axis``.
    """

    def __init__(self, method: str = "mse", *, axis=None, **options):
        self._opts = _args.check_method(method, options)
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, numbers.Integral)):
            raise TypeError(f"axis must be an int or None, got {type(axis).__name__}")
        self.method = method
        self.axis = None if axis is None else int(axis)
        self.updates = 0
        self.count = 0
        self._amax = None  # float32 per channel
        # per tensor a dense (3, HIST_BINS) array; per channel sparse: sorted int64 keys
        # (channel * HIST_BINS + bin) and their (3, m) sums. Rows: count, sum of residuals, squares
        self._keys = np.empty(0, np.int64)
        self._sums = np.empty((3, 0), np.int64)

    def __repr__(self):
        return (f"Observer(method={self.method!r}, axis={self.axis}, updates={self.updates}, "
                f"count={self.count})")

    def update(self, batch) -> "Observer":
        """Add one batch (NumPy array or CPU tensor of floats, finite, not empty). Returns self.

        NaN/Inf raise ValueError naming the update (0-based), the count and the first index.
        """
        index = self.updates
        kind = _arrays.kind_of(batch)
        _args.reject_cuda(kind, "Observer.update")
        x32 = _arrays.float32_numpy(batch, "batch")
        if x32.size == 0:
            raise ValueError(f"update {index}: batch is empty (shape {tuple(x32.shape)})")
        if self.axis is not None:
            axis = _arrays.normalize_axis(self.axis, x32.ndim)
            rows = _args.rows_of(x32, axis)
            if self._amax is not None and rows.shape[0] != self._amax.size:
                raise ValueError(f"update {index}: batch has {rows.shape[0]} channels along axis "
                                 f"{self.axis}; earlier batches had {self._amax.size}")
        else:
            rows = _args.flat_of(x32).reshape(1, -1)
        amax = np.empty(rows.shape[0], np.float32)
        bad = _args.data_kernels().absmax_rows(rows, amax)
        if bad:
            raise ValueError(f"update {index}: {_arrays.nonfinite_error(x32, int(bad), 'batch')}")
        keys, sums = _summarise(rows, per_tensor=self.axis is None)
        self._absorb(keys, sums, amax)
        self.updates += 1
        self.count += int(x32.size)
        return self

    def merge(self, other: "Observer") -> "Observer":
        """Add another Observer's summary (same method, options and axis). Returns self."""
        if not isinstance(other, Observer):
            raise TypeError(f"other must be an Observer, got {type(other).__name__}")
        if (other.method, other._opts, other.axis) != (self.method, self._opts, self.axis):
            raise ValueError("other must have the same method, options and axis to be merged")
        if other._amax is None:
            return self
        if self._amax is not None and self._amax.size != other._amax.size:
            raise ValueError(f"other has {other._amax.size} channels, this one {self._amax.size}")
        self._absorb(None if self.axis is None else other._keys, other._sums, other._amax)
        self.updates += other.updates
        self.count += other.count
        return self

    def _absorb(self, keys, sums, amax):
        self._amax = amax.copy() if self._amax is None else np.maximum(self._amax, amax)
        if keys is None:  # per tensor: a dense histogram
            self._sums = sums.copy() if self._sums.size == 0 else self._sums + sums
        else:
            self._keys, self._sums = _merge_sparse(self._keys, self._sums, keys, sums)

    def alpha(self):
        """alpha of everything seen so far: a float per tensor, a float32 array per channel."""
        if self._amax is None:
            raise ValueError("the Observer has seen no data; call update() first")
        k = _args.data_kernels()
        if self.axis is None:
            return float(self._alpha_of(np.arange(k.HIST_BINS), self._sums, self._amax[0]))
        channels = self._amax.size
        bounds = np.searchsorted(self._keys // k.HIST_BINS, np.arange(channels + 1))
        out = np.zeros(channels, np.float32)
        for c in range(channels):
            sl = slice(bounds[c], bounds[c + 1])
            out[c] = self._alpha_of(self._keys[sl] % k.HIST_BINS, self._sums[:, sl], self._amax[c])
        return out

    def _alpha_of(self, bins, sums, amax) -> np.float32:
        return _args.legal_alpha(self._alpha_raw(bins, sums, amax), amax)

    def _alpha_raw(self, bins, sums, amax) -> np.float32:
        if amax == 0 or self.method == "max":
            return np.float32(amax)
        k = _args.data_kernels()
        dense = np.zeros((3, k.HIST_BINS), np.int64)
        dense[:, bins] = sums
        _, cnt, mean, var, _, _ = k.histogram_moments(dense[0], dense[1], dense[2])
        if self.method == "percentile":
            return _histogram_percentile(cnt, mean, var, self._opts["percentile"], amax)
        if self.method == "entropy":
            nbins = entropy_bins_for(int(cnt.sum()), self._opts["bins"])
            lin = _rebin_linear(cnt, mean, var, np.float64(amax), nbins)
            i = k.entropy_threshold(lin)
            return np.float32(min(np.float64(amax) * i / nbins, np.float64(amax)))
        if amax < MIN_ALPHA:
            return np.float32(0)
        alphas, _ = k.model_minima(cnt, mean, var, amax, 0.0, _REFINE_WITHIN, _REFINED, _RESCAN)
        return np.float32(alphas[0])


def _summarise(rows: np.ndarray, per_tensor: bool):
    """Log histogram of |rows|: per tensor (one row) a dense (3, HIST_BINS) array; per channel
    (any number of rows, one too) sparse, as (sorted keys row * HIST_BINS + bin, (3, m) integer
    sums)."""
    k = _args.data_kernels()
    if per_tensor:
        dense = np.zeros((3, k.HIST_BINS), np.int64)
        k.histogram_log(rows.reshape(-1), _args.tasks(), dense[0], dense[1], dense[2])
        return None, dense
    bits = (rows.view(np.int32) & np.int32(0x7FFFFFFF)).astype(np.int64)
    keys = (np.arange(rows.shape[0], dtype=np.int64)[:, None] * k.HIST_BINS
            + (bits >> k.HIST_SHIFT)).reshape(-1)
    res = (bits & ((1 << k.HIST_SHIFT) - 1)).reshape(-1)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    res = res[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    sums = np.stack([np.diff(np.r_[starts, keys.size]),
                     np.add.reduceat(res, starts), np.add.reduceat(res * res, starts)])
    return keys[starts], sums.astype(np.int64)


def _merge_sparse(keys_a, sums_a, keys_b, sums_b):
    keys = np.concatenate([keys_a, keys_b])
    sums = np.concatenate([sums_a, sums_b], axis=1)
    uniq, inverse = np.unique(keys, return_inverse=True)
    out = np.zeros((3, uniq.size), np.int64)
    for j in range(3):
        np.add.at(out[j], inverse, sums[j])
    return uniq, out


def _rebin_linear(cnt, mean, var, amax, nbins):
    """Counts of the binned data (bin j uniform over mean_j +- sqrt(3 var_j)) in ``nbins`` equal
    bins over [0, amax]: differences of the piecewise-linear CDF at the bin edges."""
    edges = np.linspace(0.0, amax, nbins + 1)[1:-1]
    h = np.sqrt(3.0 * var)
    lo = mean - h
    cdf = np.zeros(edges.size)
    for j0 in range(0, cnt.size, 512):
        sl = slice(j0, j0 + 512)
        width = np.maximum(2.0 * h[sl], 1e-300)
        frac = np.clip((edges[:, None] - lo[None, sl]) / width[None, :], 0.0, 1.0)
        frac = np.where(h[None, sl] > 0, frac, (edges[:, None] >= mean[None, sl]).astype(float))
        cdf += frac @ cnt[sl]
    full = np.concatenate([[0.0], cdf, [cnt.sum()]])
    return np.maximum(np.diff(full), 0.0)


def _histogram_percentile(cnt, mean, var, p, amax) -> np.float32:
    """np.percentile's value at rank (n - 1) * p / 100 of the binned data: the order statistics
    at floor(rank) and the next, each placed inside its bin (bins spread uniformly over
    mean +- sqrt(3 var), the k-th of a bin's c values at fraction (k + 0.5) / c), interpolated
    linearly between them; at most amax. Neighbouring order statistics can lie in different bins
    far apart (heavy tails, few values), so the interpolation runs between them, not in one bin."""
    total = int(cnt.sum())
    rank = (total - 1) * p / 100.0
    cum = np.cumsum(cnt)

    def value_at(k):
        j = min(int(np.searchsorted(cum, k, side="right")), cnt.size - 1)
        h = np.sqrt(3.0 * var[j])
        return mean[j] - h + 2.0 * h * (k - (cum[j] - cnt[j]) + 0.5) / cnt[j]

    lo = int(np.floor(rank))
    value = value_at(lo)
    if rank > lo and lo + 1 < total:
        value = value + (rank - lo) * (value_at(lo + 1) - value)
    return np.float32(min(max(value, 0.0), np.float64(amax)))
