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


def test_quantization_mse_by_hand():
    x = np.array([0.5, 2.0, -200.0], np.float32)  # alpha 127: scale 1, codes 0, 2, -127
    assert reference.quantization_mse(x, 127.0) == (0.25 + 0.0 + 73.0 ** 2) / 3
    assert reference.quantization_mse(x, 127.0, counts=[2, 1, 1]) == (0.5 + 73.0 ** 2) / 4
    assert reference.quantization_mse(x, 200.0) == np.mean(
        (x - reference.dequantize_per_tensor(reference.quantize_per_tensor(x, 200.0),
                                             reference.scale_from_alpha(200.0))
         ).astype(np.float64) ** 2)


def test_brute_force_mse_is_the_lowest_error_it_tried():
    x = np.random.default_rng(0).standard_t(3, 3000).astype(np.float32)
    amax = np.float32(np.abs(x).max())
    alpha, mse = reference.brute_force_mse(x, grid=300)
    assert 0 < alpha < amax and mse == reference.quantization_mse(x, alpha)
    assert mse <= reference.quantization_mse(x, amax)
    for k in (1, 30, 60, 100, 200, 299):  # alphas of the grid, evaluated directly
        assert mse <= reference.quantization_mse(x, np.float32(amax * k / 300))
    # each refinement can only lower the error it returns
    errors = [reference.brute_force_mse(x, grid=300, refinements=r)[1] for r in range(4)]
    assert errors == sorted(errors, reverse=True)


def test_brute_force_mse_finds_the_alpha_of_already_quantized_values():
    step = reference.scale_from_alpha(np.float32(1.27))
    x = np.arange(-127, 128, dtype=np.float32) * step  # codes times one step: alpha 1.27 is exact
    alpha, mse = reference.brute_force_mse(x)
    assert mse == 0.0 and reference.quantization_mse(x, alpha) == 0.0
    assert reference.brute_force_mse(np.zeros(5, np.float32)) == (0.0, 0.0)


def test_brute_force_mse_with_counts_equals_the_repeated_values():
    rng = np.random.default_rng(1)
    values = np.unique(np.abs(rng.standard_normal(40)).astype(np.float32))
    counts = rng.integers(1, 20, values.size)
    _, weighted = reference.brute_force_mse(values, grid=500, counts=counts)
    _, repeated = reference.brute_force_mse(np.repeat(values, counts), grid=500)
    assert abs(weighted - repeated) <= 1e-12 * repeated
