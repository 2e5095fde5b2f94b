"""The numba kernels against the NumPy reference, bit for bit, through the public calls."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import alphas, strided, tensor_and_alpha

from quantkit import dequantize, quantize, reference
from quantkit.backends import numba_cpu


def _assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a, b), f"{np.count_nonzero(a != b)} elements differ"


@given(case=tensor_and_alpha(), data=st.data())
def test_per_tensor_matches_reference(case, data):
    x, alpha = case
    x = data.draw(strided(x))
    q = quantize(x, alpha)
    _assert_same(q.data, reference.quantize_per_tensor(x, alpha))
    _assert_same(q.scale, reference.scale_from_alpha(alpha))
    _assert_same(dequantize(q), reference.dequantize_per_tensor(q.data, q.scale))


@given(case=tensor_and_alpha(), data=st.data())
def test_per_channel_matches_reference(case, data):
    x, alpha = case
    x = data.draw(strided(x))
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    channels = x.shape[axis]
    alpha_c = np.array(data.draw(st.lists(alphas, min_size=channels, max_size=channels)),
                       np.float32)
    alpha_c[data.draw(st.integers(0, channels - 1))] = 0.0  # an all-zero-scale channel
    q = quantize(x, alpha_c, axis=axis)
    _assert_same(q.data, reference.quantize_per_channel(x, alpha_c, axis % x.ndim))
    _assert_same(q.scale, reference.scale_from_alpha(alpha_c))
    _assert_same(dequantize(q), reference.dequantize_per_channel(q.data, q.scale, axis % x.ndim))


@given(case=tensor_and_alpha(max_side=40), block_size=st.sampled_from([64, 128, 1024, 4096]),
       data=st.data())
def test_blockwise_matches_reference(case, block_size, data):
    x, _ = case
    x = data.draw(strided(x))
    blocks = -(-x.size // block_size)
    alpha_b = np.array(data.draw(st.lists(alphas, min_size=blocks, max_size=blocks)), np.float32)
    q = quantize(x, alpha_b, block_size=block_size)
    _assert_same(q.data, reference.quantize_blockwise(x, alpha_b, block_size))
    _assert_same(dequantize(q), reference.dequantize_blockwise(q.data, q.scale, block_size))


@pytest.mark.parametrize("shape,axis", [((3, 1000), 0), ((1000, 3), 1), ((5, 300, 7), 1),
                                        ((2, 3, 600), 2), ((4096,), 0), ((7, 512), 1)])
def test_per_channel_both_kernel_paths(shape, axis):
    """Long rows use the row kernel, short ones the column kernel; both equal the reference."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32) * 3
    alpha = rng.uniform(0.5, 4, shape[axis]).astype(np.float32)
    for view in (x, np.asfortranarray(x), x[..., ::-1]):
        q = quantize(view, alpha, axis=axis)
        _assert_same(q.data, reference.quantize_per_channel(view, alpha, axis))
        _assert_same(dequantize(q), reference.dequantize_per_channel(q.data, q.scale, axis))


@pytest.mark.parametrize("n", [1, 31, 64, 65, (1 << 16) + 7, 3 * (1 << 16)])
def test_sizes_around_chunk_and_block_edges(n):
    rng = np.random.default_rng(n)
    x = rng.laplace(size=n).astype(np.float32)
    _assert_same(quantize(x, 2.5).data, reference.quantize_per_tensor(x, 2.5))
    alpha_b = reference.absmax_per_block(x, 64)
    _assert_same(quantize(x, alpha_b, block_size=64).data,
                 reference.quantize_blockwise(x, alpha_b, 64))


def test_large_tensor_matches_reference():
    x = np.random.default_rng(7).standard_t(3, size=(1 << 22) + 3).astype(np.float32)
    _assert_same(quantize(x, 6.0).data, reference.quantize_per_tensor(x, 6.0))


def test_exact_ties_round_half_to_even():
    alpha = np.float32(127.0)  # inv = 1 exactly
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5], np.float32)
    assert quantize(x, alpha).data.tolist() == [0, 2, 2, 0, -2, -2, 126, -126]


def test_plus_minus_alpha_and_beyond_saturate_at_127():
    x = np.array([3.0, -3.0, 3.0001, -1e30, 3.4e38], np.float32)
    assert quantize(x, 3.0).data.tolist() == [127, -127, 127, -127, 127]


def test_codes_are_never_minus_128():
    x = np.full(1000, -np.finfo(np.float32).max, np.float32)
    assert quantize(x, 1.0).data.min() == -127


def test_nonfinite_counted_in_every_kernel():
    x = np.ones((4, 300), np.float32)
    x[1, 5] = np.nan
    x[3, 7] = -np.inf
    for kwargs, alpha in [({}, 1.0), ({"axis": 0}, np.ones(4)), ({"axis": 1}, np.ones(300)),
                          ({"block_size": 64}, np.ones(19))]:
        with pytest.raises(ValueError, match=r"2 non-finite .* index \(1, 5\)"):
            quantize(x, alpha, **kwargs)


def test_nonfinite_detected_even_with_alpha_zero():
    x = np.array([0.0, np.inf], np.float32)
    with pytest.raises(ValueError, match="non-finite"):
        quantize(x, 0.0)


def test_dense_permutation_keeps_layout_of_transposed_input():
    w = np.random.default_rng(2).standard_normal((64, 32)).astype(np.float32)
    q = quantize(w.T, 2.0)
    assert q.data.shape == (32, 64) and q.data.flags.f_contiguous
    _assert_same(q.data, reference.quantize_per_tensor(w.T, 2.0))


def test_out_buffer_is_used_and_returned():
    x = np.linspace(-2, 2, 1001, dtype=np.float32)
    out = np.empty(x.shape, np.int8)
    q = quantize(x, 2.0, out=out)
    assert q.data is out
    _assert_same(out, reference.quantize_per_tensor(x, 2.0))
    values = np.empty(x.shape, np.float32)
    assert dequantize(q, out=values) is values
    _assert_same(values, reference.dequantize_per_tensor(out, q.scale))


def test_backend_dense_permutation_helper():
    a = np.zeros((2, 3, 4), np.float32)
    assert numba_cpu._dense_permutation(a) == (0, 1, 2)
    assert numba_cpu._dense_permutation(a.transpose(2, 0, 1)) == (1, 2, 0)
    assert numba_cpu._dense_permutation(a[:, :, ::2]) is None
    assert numba_cpu._dense_permutation(a[::-1]) is None
