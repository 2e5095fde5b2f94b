"""The reference itself: the formulas of docs/DESIGN.md section 1, checked on hand-made cases."""

import numpy as np

from quantkit import reference
from quantkit._constants import MIN_POSITIVE_ALPHA, QMAX


def test_scale_and_inverse_are_float32_quotients():
    alpha = np.array([1.0, 3.0, 0.1, 127.0, 0.0], np.float32)
    assert np.array_equal(reference.scale_from_alpha(alpha), alpha / np.float32(QMAX))
    inv = reference.inv_scale_from_alpha(alpha)
    assert inv.dtype == np.float32
    assert np.array_equal(inv[:4], np.float32(QMAX) / alpha[:4]) and inv[4] == 0


def test_min_positive_alpha_is_the_smallest_with_a_finite_inverse():
    smallest = np.float32(MIN_POSITIVE_ALPHA)
    assert np.isfinite(reference.inv_scale_from_alpha(smallest))
    below = np.nextafter(smallest, np.float32(0))
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.float32(QMAX) / below)
    x = np.array([0.0, smallest, -smallest, smallest / 2], np.float32)
    assert reference.quantize_per_tensor(x, smallest).tolist() == [0, 127, -127, 64]


def test_per_tensor_by_hand():
    x = np.array([0.0, 0.49, 0.5, 0.51, 1.5, 2.5, -2.5, 200.0, -200.0], np.float32)
    assert reference.quantize_per_tensor(x, 127.0).tolist() == [0, 0, 0, 1, 2, 2, -2, 127, -127]
    q = np.array([-127, 0, 1, 127], np.int8)
    assert reference.dequantize_per_tensor(q, np.float32(0.5)).tolist() == [-63.5, 0, 0.5, 63.5]


def test_per_channel_and_blockwise_by_hand():
    x = np.array([[1.0, -1.0], [1.0, 0.5]], np.float32)
    assert reference.quantize_per_channel(x, np.array([1.0, 2.0]), 0).tolist() == [[127, -127],
                                                                                   [64, 32]]
    assert reference.quantize_per_channel(x, np.array([1.0, 2.0]), 1).tolist() == [[127, -64],
                                                                                   [127, 32]]
    flat = np.concatenate([np.full(64, 1.0), np.full(10, 1.0)]).astype(np.float32)
    codes = reference.quantize_blockwise(flat, np.array([1.0, 2.0], np.float32), 64)
    assert codes[:64].tolist() == [127] * 64 and codes[64:].tolist() == [64] * 10
    assert reference.absmax_per_block(flat * -3, 64).tolist() == [3.0, 3.0]


def test_count_nonfinite():
    assert reference.count_nonfinite(np.array([1, np.nan, np.inf, -np.inf, 0], np.float32)) == 3
