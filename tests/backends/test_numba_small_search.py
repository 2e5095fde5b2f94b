"""The small-array search (quantkit.backends.numba_small_search): the exact piecewise search of few
distinct values against a brute force of the exact float32 error, and its clip window."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit import reference
from quantkit.backends import numba_small_search as ss


def _mse(values, counts, alpha) -> float:
    """The exact quantization MSE of |x| ``values`` occurring ``counts`` times."""
    return reference.quantization_mse(values, alpha, counts)


def _brute(values, counts) -> float:
    """The lowest exact MSE over 4000 alphas on (0, amax], refined three times around the best."""
    return reference.brute_force_mse(values, grid=4000, refinements=3, counts=counts)[1]


def _search(values, counts):
    return ss.search_mse_values(values.astype(np.float32), counts.astype(np.int64),
                                np.float32(values.max()))


def _four_bit_block(rng, n=64):
    """|x| of a block of n weights on GGUF Q4_1-style grids: ``d * q + m`` per 32 values, q in
    0..15 (few distinct values in tight clusters, as SmolLM2's weights)."""
    parts = []
    for _ in range(max(1, n // 32)):
        d, m = rng.uniform(0.001, 0.01), rng.uniform(-0.08, -0.02)
        parts.append(d * rng.integers(0, 16, 32) + m)
    x = np.abs(np.concatenate(parts)[:n]).astype(np.float32)
    return x[x > 0]


@pytest.mark.parametrize("seed", range(12))
def test_piecewise_search_reaches_brute_force_on_four_bit_blocks(seed):
    rng = np.random.default_rng(seed)
    values, counts = np.unique(_four_bit_block(rng), return_counts=True)
    alpha = _search(values, counts)
    assert 0 < alpha <= values.max()
    assert _mse(values, counts, alpha) <= _brute(values, counts) * (1 + 1e-4)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(0, 2**32 - 1), st.sampled_from([1e-20, 1e-3, 1.0, 1e20]),
       st.booleans())
def test_piecewise_search_reaches_brute_force_on_discrete_values(distinct, seed, magnitude,
                                                                 outlier):
    rng = np.random.default_rng(seed)
    values = np.unique(np.abs(rng.standard_normal(distinct) * magnitude).astype(np.float32))
    values = values[values > 0]
    if outlier:  # one far value that clipping may sacrifice
        values = np.append(values, np.float32(values.max() * 30))
    counts = rng.integers(1, 50, values.size)
    alpha = _search(values, counts)
    assert np.float32(0) < alpha <= values.max()
    assert _mse(values, counts, alpha) <= _brute(values, counts) * (1 + 1e-4) + 1e-300


def test_piecewise_search_finds_the_grid_of_already_quantized_values():
    """Values that are int8 codes times one float32 step: the search finds an alpha whose error is
    at most the brute force's, a tiny fraction of the error at max|x|' neighbours."""
    step = reference.scale_from_alpha(np.float32(1.27))
    values = np.unique(np.append(np.arange(1, 128, 3), 127).astype(np.float32) * step)
    counts = np.ones(values.size)
    alpha = _search(values, counts)
    best = _brute(values, counts)
    assert _mse(values, counts, alpha) <= best
    assert best < 1e-6 * _mse(values, counts, values.max() * np.float32(0.99))


def test_clip_window_low_is_where_the_clip_error_reaches_the_limit():
    rng = np.random.default_rng(3)
    values = np.unique(rng.uniform(0.1, 2.0, 50)).astype(np.float32)
    counts = rng.integers(1, 9, values.size)
    v64 = values.astype(np.float64)

    def clip(a):
        over = v64 > a
        return float(np.dot(counts[over], (v64[over] - a) ** 2))

    for limit in (1e-6, 0.01, 1.0, 10.0):
        a = ss._clip_window_low(values, counts, limit)
        assert clip(a) == pytest.approx(limit, rel=1e-9)
        assert clip(a * (1 + 1e-6)) < limit
    assert ss._clip_window_low(values, counts, 1e30) == 0.0
