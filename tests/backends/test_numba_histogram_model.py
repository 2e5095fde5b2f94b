"""Summaries of the log histogram (quantkit.backends.numba_histogram_model) against NumPy
statements of what they compute."""

import numpy as np
import pytest

from quantkit.backends import numba_histogram_model as hm


def _piles_numpy(counts):
    """pile_bins in NumPy: every bin b in 1 .. size - 3 holding >= 64 values and more than 8 times
    each neighbour (single), else the pair b, b + 1 against the bins beside the pair; the two
    heaviest, on equal weight the lower bin."""
    c = np.asarray(counts, np.int64)
    pair = c[1:-2] + c[2:-1]
    single = (c[1:-2] >= 64) & (c[1:-2] > 8 * np.maximum(c[:-3], c[2:-1]))
    double = (pair >= 64) & (pair > 8 * np.maximum(c[:-3], c[3:])) & ~single
    piles = np.nonzero(single | double)[0] + 1
    weight = np.where(single[piles - 1], c[piles], pair[piles - 1])
    order = np.argsort(-weight, kind="stable")[:2]
    return piles[order], single[piles[order] - 1]


@pytest.mark.parametrize("seed", range(40))
def test_pile_bins_finds_the_two_heaviest_piles(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.choice([4, 5, 64, 4000]))
    counts = rng.poisson(rng.choice([0.3, 5.0, 40.0]), size).astype(np.int64)
    for _ in range(rng.integers(0, 6)):  # piles of one bin or across two, some of equal weight
        b = int(rng.integers(0, size))
        counts[b] += int(rng.choice([63, 64, 200, 200, 5000]))
        if rng.random() < 0.4 and b + 1 < size:
            counts[b + 1] += counts[b] // 2
    bins, singles = hm.pile_bins(counts)
    want_bins, want_singles = _piles_numpy(counts)
    assert bins.tolist() == want_bins.tolist()
    assert singles.tolist() == want_singles.tolist()


def test_pile_bins_edges():
    counts = np.zeros(10, np.int64)
    assert hm.pile_bins(counts)[0].size == 0
    counts[0] = counts[9] = 10_000          # bins 0 and size - 1 are never piles
    assert hm.pile_bins(counts)[0].size == 0
    counts[4] = 64      # exactly 64, neighbours empty: single at 4, and the pair (3, 4) as heavy
    bins, singles = hm.pile_bins(counts)
    assert bins.tolist() == [3, 4] and singles.tolist() == [False, True]
    counts[3] = counts[5] = 8    # 64 is not more than 8 * 8: only the pairs, of equal weight 72
    bins, singles = hm.pile_bins(counts)
    assert bins.tolist() == [3, 4] and singles.tolist() == [False, False]
    counts[3] = 9                # pair (3, 4): 73 > 8 * 8; pair (4, 5): 72 is not > 8 * 9
    bins, singles = hm.pile_bins(counts)
    assert bins.tolist() == [3] and singles.tolist() == [False]


def _dips(rng):
    """The log histogram of 2^20 GELU outputs, whose model error has dips where the rounding grid
    meets the values piled near GELU's minimum (-0.17): at alpha ~3.6 and ~4.1."""
    z = rng.standard_normal(1 << 20)
    x = (z * 0.5 * (1 + np.tanh(0.7978845608 * (z + 0.044715 * z ** 3)))).astype(np.float32)
    counts = np.zeros(1 << 15, np.int64)
    np.add.at(counts, np.abs(x).view(np.int32) >> 16, 1)
    return hm.count_moments(counts, False), float(np.abs(x).max())


def test_model_minima_are_local_minima_lowest_first():
    (cnt, mean, var), amax = _dips(np.random.default_rng(0))
    alphas, errors = hm.model_minima(cnt, mean, var, amax, 0.0, 0.05, 4)
    assert 1 < alphas.size <= 4 and np.all(np.diff(errors) >= 0)
    assert errors[-1] <= 1.05 * errors[0]
    for a, e in zip(alphas, errors):
        assert hm.model_sse(cnt, mean, var, a) == e
        for d in (0.995, 1.005):  # nothing lower just beside a minimum
            assert hm.model_sse(cnt, mean, var, np.float32(min(a * d, amax))) >= e
    # the lowest over a dense grid is the first minimum (to the grid's resolution)
    grid = np.linspace(0.2 * amax, amax, 4001).astype(np.float32)
    dense = hm.model_sse_many(cnt, mean, var, grid, 0.0)
    assert errors[0] <= dense.min() * (1 + 1e-9)
    assert hm.model_search(cnt, mean, var, amax) == alphas[0]
    one, _ = hm.model_minima(cnt, mean, var, amax, 0.0, 0.05, 1)
    assert one.tolist() == alphas[:1].tolist()


def test_model_sse_many_is_model_sse_at_each_alpha():
    (cnt, mean, var), amax = _dips(np.random.default_rng(1))
    alphas = np.linspace(0.1, amax, 37).astype(np.float32)
    got = hm.model_sse_many(cnt, mean, var, alphas, 0.0)
    assert got.tolist() == [hm.model_sse(cnt, mean, var, a) for a in alphas]
