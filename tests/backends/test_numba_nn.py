"""The numba kernels of the int8 Linear (quantkit.backends.numba_nn), bit for bit against what they
implement: the W8A8 rescale ``float32(acc) * (s_x[i] * s_w[j]) + bias[j]`` (each float32 operation
rounded once: NumPy's float32 arithmetic and the torch expression the torch paths would run), and
the per-row |x|max codes (quantkit.reference.quantize_per_channel along axis 0 at the legal alpha).
"""

import numpy as np
import pytest
import torch

from quantkit import reference
from quantkit._constants import MAX_ALPHA, MIN_POSITIVE_ALPHA, QMAX
from quantkit.backends import numba_nn

F32 = np.float32


def _bits(a) -> np.ndarray:
    """The IEEE bits of a float32 array (so -0.0 != 0.0 and NaNs compare by payload)."""
    return np.ascontiguousarray(a, F32).view(np.int32)


# ------------------------------------------------------------------------------------ rescale


def _rescale_numpy(acc, s_x, s_w, bias):
    """The definition in NumPy float32 (no fused multiply-add): one rounding per operation."""
    y = acc.astype(F32) * (s_x.astype(F32)[:, None] * s_w.astype(F32)[None, :])
    return y + (np.zeros(acc.shape[1], F32) if bias is None else bias.astype(F32))


def _rescale_torch(acc, s_x, s_w, bias):
    """The torch expression of the module docstring (matmul's path on a non-CPU device)."""
    y = torch.from_numpy(acc).float().mul_(torch.from_numpy(s_x)[:, None] * torch.from_numpy(s_w))
    return y.add_(torch.from_numpy(bias)).numpy() if bias is not None else y.numpy()


def _case(rng, m, n, scale_exponent=-4):
    """int32 products with exact float32 ties (odd values above 2^24) and the int32 extremes, and
    per-row / per-column scales spread over two decades around 10^scale_exponent."""
    acc = rng.integers(-(1 << 31), 1 << 31, (m, n), dtype=np.int64)
    small = rng.integers(-(1 << 20), 1 << 20, (m, n))
    acc = np.where(rng.random((m, n)) < 0.5, small, acc)
    ties = (1 << 24) + 2 * rng.integers(0, 1 << 20, (m, n)) + 1       # halfway between floats
    acc = np.where(rng.random((m, n)) < 0.1, ties * rng.choice([-1, 1], (m, n)), acc)
    acc.flat[:2] = [-(1 << 31), (1 << 31) - 1][: acc.size]
    s_x = (10.0 ** rng.uniform(scale_exponent - 1, scale_exponent + 1, m)).astype(F32)
    s_w = (10.0 ** rng.uniform(scale_exponent - 1, scale_exponent + 1, n)).astype(F32)
    bias = rng.standard_normal(n).astype(F32)
    return acc.astype(np.int32), s_x, s_w, bias


def _assert_rescale_exact(acc, s_x, s_w, bias):
    got = numba_nn.rescale_int32_numba(acc, s_x, s_w, bias)
    assert got.dtype == np.float32 and got.shape == acc.shape
    assert np.array_equal(_bits(got), _bits(_rescale_numpy(acc, s_x, s_w, bias)))
    if bias is not None:  # without a bias, torch adds nothing and numba adds +0.0 (see zeros)
        assert np.array_equal(_bits(got), _bits(_rescale_torch(acc, s_x, s_w, bias)))


@pytest.mark.parametrize("shape", [(1, 1), (1, 97), (97, 1), (7, 33), (64, 256), (300, 1000)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_rescale_is_the_float32_expression_bit_for_bit(shape, with_bias):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    acc, s_x, s_w, bias = _case(rng, *shape)
    _assert_rescale_exact(acc, s_x, s_w, bias if with_bias else None)


@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (300, 1000), (2048, 1536)])
def test_rescale_in_place_gives_the_same_bits(shape):
    """``out`` may be the int32 product's own memory (matmul rescales torch's products in place):
    the same bits as into a separate buffer, and the result lives in that memory."""
    rng = np.random.default_rng(shape[0] + 7 * shape[1])
    acc, s_x, s_w, bias = _case(rng, *shape)
    want = numba_nn.rescale_int32_numba(acc, s_x, s_w, bias)
    buf = acc.copy()
    got = numba_nn.rescale_int32_numba(buf, s_x, s_w, bias, out=buf.view(F32))
    assert np.shares_memory(got, buf)
    assert np.array_equal(_bits(got), _bits(want))


@pytest.mark.parametrize("scale_exponent", [-40, -20, 0, 15])
def test_rescale_at_extreme_scales(scale_exponent):
    """Products that underflow to subnormals or to 0, and that overflow to +-Inf."""
    rng = np.random.default_rng(scale_exponent + 100)
    acc, s_x, s_w, bias = _case(rng, 40, 50, scale_exponent)
    with np.errstate(over="ignore", under="ignore"):
        _assert_rescale_exact(acc, s_x, s_w, bias)
        _assert_rescale_exact(acc, s_x, s_w, bias * F32(1e-38))
    if scale_exponent == 15:
        assert np.isinf(numba_nn.rescale_int32_numba(acc, s_x, s_w, bias)).any()


def test_rescale_of_zeros():
    rng = np.random.default_rng(5)
    acc, s_x, s_w, bias = _case(rng, 9, 11)
    zeros = np.zeros_like(acc)
    _assert_rescale_exact(zeros, s_x, s_w, bias)
    _assert_rescale_exact(acc, np.zeros_like(s_x), s_w, bias)
    _assert_rescale_exact(acc, s_x, np.zeros_like(s_w), -bias)
    # no bias means a bias of +0.0: -0.0 products (a negative sum times a zero scale) become +0.0
    negative = -np.arange(1, acc.size + 1, dtype=np.int32).reshape(acc.shape)
    y = numba_nn.rescale_int32_numba(negative, s_x, np.zeros_like(s_w))
    assert np.array_equal(_bits(y), _bits(np.zeros(acc.shape, F32)))


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)])
def test_rescale_of_empty_products(shape):
    acc = np.zeros(shape, np.int32)
    s_x, s_w = np.ones(shape[0], F32), np.ones(shape[1], F32)
    got = numba_nn.rescale_int32_numba(acc, s_x, s_w, np.ones(shape[1], F32))
    assert got.shape == shape and got.dtype == np.float32


def test_rescale_layouts_and_out():
    """A transposed accumulator is read as its values; float64 scales are rounded to float32 once;
    ``out`` receives the result."""
    rng = np.random.default_rng(9)
    acc, s_x, s_w, bias = _case(rng, 30, 20)
    transposed = np.ascontiguousarray(acc.T).T
    assert not transposed.flags.c_contiguous
    expected = _rescale_numpy(acc, s_x, s_w, bias)
    out = np.full(acc.shape, np.nan, F32)
    got = numba_nn.rescale_int32_numba(transposed, s_x.astype(np.float64), s_w, bias, out=out)
    assert got is out and np.array_equal(_bits(out), _bits(expected))


@pytest.mark.slow
def test_rescale_at_model_size():
    rng = np.random.default_rng(11)
    acc, s_x, s_w, bias = _case(rng, 2048, 4096)
    _assert_rescale_exact(acc, s_x, s_w, bias)


# ------------------------------------------------------------------------------ per-row codes


def _legal_row_alpha(x):
    """max |row|, 0 below MIN_POSITIVE_ALPHA, MAX_ALPHA above it (calibrate's "max" alpha per
    row)."""
    alpha = np.abs(x).max(axis=1).astype(F32) if x.shape[1] else np.zeros(x.shape[0], F32)
    alpha[alpha < F32(MIN_POSITIVE_ALPHA)] = 0
    return np.minimum(alpha, F32(MAX_ALPHA))


def _assert_rows_exact(x):
    codes, scale, bad = numba_nn.quantize_rows_absmax_numba(np.ascontiguousarray(x, F32))
    alpha = _legal_row_alpha(x)
    assert bad == 0
    assert np.array_equal(codes, reference.quantize_per_channel(x, alpha, axis=0))
    assert np.array_equal(_bits(scale), _bits(reference.scale_from_alpha(alpha)))


def test_row_codes_of_random_rows_and_ties():
    rng = np.random.default_rng(2)
    halves = np.arange(-QMAX, QMAX + 1, dtype=F32) + F32(0.5)     # x * inv hits k + 0.5 exactly
    ties = np.concatenate([np.clip(halves, -QMAX, QMAX), [F32(QMAX)]]).astype(F32)
    x = np.stack([ties, -ties, ties * F32(2.0 ** -20), ties * F32(2.0 ** 100)])
    _assert_rows_exact(x)
    _assert_rows_exact(rng.standard_t(2, (300, 257)).astype(F32))
    _assert_rows_exact(rng.standard_normal((1, 1)).astype(F32))


def test_row_codes_of_zeros_and_extreme_magnitudes():
    edge = F32(MIN_POSITIVE_ALPHA)
    rng = np.random.default_rng(3)
    rows = [np.zeros(50, F32), np.full(50, -0.0, F32), np.full(50, F32(1e-45)),
            np.full(50, np.nextafter(edge, F32(0))), np.full(50, edge),
            np.full(50, np.finfo(F32).max), -np.full(50, np.finfo(F32).max)]
    rows += [(rng.standard_normal(50) * 10.0 ** e).astype(F32) for e in (-42, -38, -30, 0, 30, 37)]
    with np.errstate(over="ignore"):
        _assert_rows_exact(np.stack(rows))


@pytest.mark.parametrize("shape", [(0, 8), (4, 0), (0, 0)])
def test_row_codes_of_empty_arrays(shape):
    codes, scale, bad = numba_nn.quantize_rows_absmax_numba(np.zeros(shape, F32))
    assert codes.shape == shape and codes.dtype == np.int8 and bad == 0
    assert scale.shape == (shape[0],) and not scale.any()


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_row_codes_count_rows_holding_non_finite_values(bad_value):
    x = np.random.default_rng(4).standard_normal((6, 70)).astype(F32)
    x[1, 0] = bad_value
    x[4, 69] = bad_value
    x[4, 3] = bad_value
    codes, scale, bad = numba_nn.quantize_rows_absmax_numba(x)
    assert bad == 2
    good = [0, 2, 3, 5]
    alpha = _legal_row_alpha(x[good])
    assert np.array_equal(codes[good], reference.quantize_per_channel(x[good], alpha, axis=0))
    assert np.array_equal(scale[good], reference.scale_from_alpha(alpha))
