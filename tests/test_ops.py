"""The public quantize/dequantize: kinds, dtypes, properties and every kind of bad input."""

import numpy as np
import pytest
import torch
from hypothesis import given
from strategies import tensor_and_alpha

from quantkit import QTensor, dequantize, quantize, reference

# ----------------------------------------------------------------------------------- properties


@given(case=tensor_and_alpha())
def test_error_within_half_step_inside_the_range(case):
    x, alpha = case
    q = quantize(x, alpha)
    x_hat = dequantize(q)
    inside = np.abs(x) <= alpha
    step = np.float64(q.scale)
    err = np.abs(x.astype(np.float64) - x_hat.astype(np.float64))
    # half a step, plus float32 rounding of the product x * inv (relative 2^-24 of 127 steps)
    assert np.all(err[inside] <= step / 2 + step * 127 * 2.0**-23 + 1e-45)


@given(case=tensor_and_alpha())
def test_requantizing_the_dequantized_values_gives_the_codes_back(case):
    x, alpha = case
    if not 1e-30 < alpha < 1e30:  # x_hat = q*scale must not underflow/overflow
        return
    q = quantize(x, alpha)
    again = quantize(dequantize(q), alpha)
    assert np.array_equal(again.data, q.data)


@given(case=tensor_and_alpha())
def test_codes_stay_in_narrow_range(case):
    x, alpha = case
    codes = quantize(x, alpha).data
    assert codes.min(initial=0) >= -127 and codes.max(initial=0) <= 127


def test_alpha_zero_gives_zero_codes_zero_scale_exact_zeros():
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    q = quantize(x, 0.0)
    assert not q.data.any() and q.scale == 0 and not dequantize(q).any()
    qc = quantize(x, np.array([1.0, 0.0, 2.0]), axis=0)
    assert not qc.data[1].any() and not dequantize(qc)[1].any() and qc.data[0].any()


def test_empty_input_returns_empty_qtensor():
    for x in (np.zeros((0,), np.float32), np.zeros((3, 0), np.float32)):
        q = quantize(x, 1.0)
        assert q.data.shape == x.shape and q.data.dtype == np.int8
        assert dequantize(q).shape == x.shape
    q = quantize(np.zeros((0, 4), np.float32), np.ones(0), axis=0)
    assert q.scale.shape == (0,)
    q = quantize(np.zeros((0,), np.float32), np.ones(0), block_size=64)
    assert q.data.size == 0


def test_zero_dimensional_input():
    q = quantize(np.array(1.5, np.float32), 3.0)
    assert q.data.shape == () and int(q.data) == 64


# ----------------------------------------------------------------------------- kinds and dtypes


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_numpy_float_dtypes_are_converted_to_float32_first(dtype):
    x = np.linspace(-3, 3, 301).astype(dtype)
    q = quantize(x, 2.0)
    assert np.array_equal(q.data, reference.quantize_per_tensor(x.astype(np.float32), 2.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_torch_input_gives_torch_output(dtype):
    x = torch.linspace(-3, 3, 301).to(dtype)
    q = quantize(x, 2.0)
    assert isinstance(q.data, torch.Tensor) and q.data.dtype == torch.int8
    assert isinstance(q.scale, torch.Tensor) and q.scale.dtype == torch.float32
    expected = reference.quantize_per_tensor(x.float().numpy(), 2.0)
    assert np.array_equal(q.data.numpy(), expected)
    x_hat = dequantize(q)
    assert isinstance(x_hat, torch.Tensor) and x_hat.dtype == torch.float32
    assert np.array_equal(x_hat.numpy(), reference.dequantize_per_tensor(expected, q.scale.numpy()))


def test_torch_non_contiguous_and_requires_grad():
    w = torch.randn(40, 70, requires_grad=True)
    alpha = torch.full((40,), 2.0)
    q = quantize(w.t(), alpha, axis=1)
    assert np.array_equal(q.data.numpy(),
                          reference.quantize_per_channel(w.detach().numpy().T, alpha.numpy(), 1))


def test_torch_alpha_for_numpy_input_and_back():
    x = np.random.default_rng(3).standard_normal((4, 100)).astype(np.float32)
    q = quantize(x, torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), axis=0)
    assert isinstance(q.scale, np.ndarray)
    assert np.array_equal(q.data, reference.quantize_per_channel(x, [1, 2, 3, 4], 0))


def test_inputs_are_never_modified():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((16, 300)).astype(np.float32)
    alpha = np.abs(x).max(axis=1)
    x_copy, alpha_copy = x.copy(), alpha.copy()
    q = quantize(x, alpha, axis=0)
    codes = q.data.copy()
    dequantize(q)
    assert np.array_equal(x, x_copy) and np.array_equal(alpha, alpha_copy)
    assert np.array_equal(q.data, codes)
    t = torch.from_numpy(x.copy())
    quantize(t, 3.0)
    assert torch.equal(t, torch.from_numpy(x_copy))


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("x,match", [
    (np.arange(10), "floating-point"),
    (np.array(["a", "b"]), "floating-point"),
    (np.array([1.0, None], dtype=object), "floating-point"),
    (np.ones(3, np.complex64), "floating-point"),
    ([1.0, 2.0], "NumPy array or a torch tensor"),
    (3.0, "NumPy array or a torch tensor"),
    (torch.arange(5), "floating-point"),
])
def test_bad_x_type(x, match):
    with pytest.raises(TypeError, match=match):
        quantize(x, 1.0)


@pytest.mark.parametrize("value,count", [(np.nan, 1), (np.inf, 1), (-np.inf, 3)])
def test_nonfinite_x_says_how_many_and_where(value, count):
    x = np.zeros((5, 6), np.float32)
    x.reshape(-1)[[13, 20, 29][:count]] = value
    with pytest.raises(ValueError, match=rf"x has {count} non-finite .* index \(2, 1\)"):
        quantize(x, 1.0)


@pytest.mark.parametrize("alpha,exc,match", [
    (-1.0, ValueError, ">= 0"),
    (float("nan"), ValueError, "finite"),
    (float("inf"), ValueError, "finite"),
    (1e39, ValueError, "finite in float32"),
    (1e-40, ValueError, "at least"),
    (1e-46, ValueError, "at least"),                       # rounds to 0 in float32: not taken as 0
    (float(np.finfo(np.float32).max), ValueError, "at most"),  # 127 * scale overflows
    ("1.0", TypeError, "real number"),
    (True, TypeError, "bool"),
    (None, TypeError, "real number"),
    (np.array([1.0, 2.0]), ValueError, "scalar for per-tensor"),
])
def test_bad_alpha_per_tensor(alpha, exc, match):
    with pytest.raises(exc, match=match):
        quantize(np.ones(4, np.float32), alpha)


def test_largest_alpha_dequantizes_finite():
    from quantkit._constants import MAX_ALPHA

    big = np.finfo(np.float32).max
    x = np.array([big, -big, 1.0, 0.0], np.float32)
    q = quantize(x, MAX_ALPHA)
    assert np.isfinite(dequantize(q)).all()
    assert np.nextafter(np.float32(MAX_ALPHA), np.float32(np.inf)) == big


@pytest.mark.parametrize("method", ["max", "percentile", "mse", "entropy"])
def test_calibrate_caps_alpha_at_the_largest_legal_one(method):
    """Data whose max |x| is FLT_MAX: every granularity's alpha is legal and dequantizes finite."""
    from quantkit import calibrate
    from quantkit._constants import MAX_ALPHA

    big = np.finfo(np.float32).max
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32) * np.float32(1e37)
    x[:, 7] = big
    x[1, 9] = -big
    for kwargs in ({}, {"axis": 0}, {"block_size": 64}):
        alpha = calibrate(x, method, **kwargs)
        assert np.all(np.asarray(alpha) <= np.float32(MAX_ALPHA)), (kwargs, alpha)
        assert np.isfinite(dequantize(quantize(x, alpha, **kwargs))).all(), kwargs


def test_zero_d_input_keeps_its_shape_blockwise():
    import torch

    for x in (np.array(1.5, np.float32), torch.tensor(1.5)):
        q = quantize(x, [2.0], block_size=64)
        assert tuple(q.data.shape) == () and tuple(dequantize(q).shape) == ()
        assert float(dequantize(q)) == float(dequantize(quantize(x, 2.0)))


def test_read_only_out_is_refused():
    x = np.ones(4, np.float32)
    codes = np.empty(4, np.int8)
    codes.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        quantize(x, 2.0, out=codes)
    values = np.empty(4, np.float32)
    values.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        dequantize(quantize(x, 2.0), out=values)


def test_bad_alpha_per_channel_and_block():
    x = np.ones((3, 100), np.float32)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        quantize(x, np.ones(4), axis=0)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        quantize(x, 1.0, axis=0)
    with pytest.raises(ValueError, match="entry 1"):
        quantize(x, np.array([1.0, -2.0, 1.0]), axis=0)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        quantize(x, np.ones(4), block_size=64)


@pytest.mark.parametrize("axis,exc", [(2, ValueError), (-3, ValueError), (1.0, TypeError),
                                      (True, TypeError)])
def test_bad_axis(axis, exc):
    with pytest.raises(exc, match="axis"):
        quantize(np.ones((3, 4), np.float32), np.ones(3), axis=axis)


@pytest.mark.parametrize("block_size,exc", [(32, ValueError), (100, ValueError),
                                            (8192, ValueError), (64.0, TypeError)])
def test_bad_block_size(block_size, exc):
    with pytest.raises(exc, match="block_size"):
        quantize(np.ones(128, np.float32), np.ones(2), block_size=block_size)


def test_axis_and_block_size_together():
    with pytest.raises(ValueError, match="not both"):
        quantize(np.ones((2, 64), np.float32), np.ones(2), axis=0, block_size=64)


def test_bad_out_buffer():
    x = np.ones(10, np.float32)
    with pytest.raises(ValueError, match="out"):
        quantize(x, 1.0, out=np.empty(9, np.int8))
    with pytest.raises(ValueError, match="out"):
        quantize(x, 1.0, out=np.empty(10, np.int16))
    with pytest.raises(TypeError, match="out"):
        quantize(x, 1.0, out=torch.empty(10, dtype=torch.int8))


def test_dequantize_needs_a_qtensor():
    with pytest.raises(TypeError, match="QTensor"):
        dequantize(np.ones(3, np.int8))


def test_qtensor_checks_its_parts():
    with pytest.raises(TypeError, match="int8"):
        QTensor(np.ones(3, np.int16), np.array(1.0, np.float32))
    with pytest.raises(TypeError, match="float32"):
        QTensor(np.ones(3, np.int8), np.array(1.0))
    with pytest.raises(ValueError, match="shape"):
        QTensor(np.ones((2, 3), np.int8), np.ones(3, np.float32), axis=0)
    with pytest.raises(TypeError, match="same kind"):
        QTensor(np.ones(3, np.int8), torch.tensor(1.0))
    q = QTensor(np.ones((2, 130), np.int8), np.ones(5, np.float32), block_size=64)
    assert q.granularity == "block" and q.nbytes == 260 + 20
    assert "block_size=64" in repr(q)


def test_a_non_array_names_the_argument():
    from quantkit import calibrate

    for call in (lambda: quantize(np.float32(3.0), 1.0),
                 lambda: quantize([1.0, 2.0], 1.0),
                 lambda: calibrate(np.float32(3.0)),
                 lambda: calibrate([1.0], axis=0)):
        with pytest.raises(TypeError, match="x must be a NumPy array or a torch tensor"):
            call()
