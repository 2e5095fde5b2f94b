"""quantkit._arrays: array kinds, float32 views, and the argument checks every entry point uses."""

import numpy as np
import pytest
import torch

from quantkit import _arrays
from quantkit._constants import MIN_POSITIVE_ALPHA


def test_kind_of():
    assert _arrays.kind_of(np.zeros(2)) == _arrays.NUMPY
    assert _arrays.kind_of(torch.zeros(2)) == _arrays.TORCH_CPU
    with pytest.raises(TypeError, match="device meta"):
        _arrays.kind_of(torch.zeros(2, device="meta"))
    with pytest.raises(TypeError, match="list"):
        _arrays.kind_of([1.0])
    with pytest.raises(TypeError, match="^x must be a NumPy array or a torch tensor, got list"):
        _arrays.kind_of([1.0], "x")


def test_float32_numpy_is_zero_copy_for_float32_and_converts_other_floats():
    x = np.arange(4, dtype=np.float32)
    assert _arrays.float32_numpy(x) is x
    t = torch.arange(4, dtype=torch.float32)
    assert np.shares_memory(_arrays.float32_numpy(t), t.numpy())
    for dtype in (np.float16, np.float64):
        assert _arrays.float32_numpy(x.astype(dtype)).dtype == np.float32
    assert _arrays.float32_numpy(t.bfloat16()).dtype == np.float32
    with pytest.raises(TypeError, match="y must be a floating-point array"):
        _arrays.float32_numpy(np.arange(3), "y")
    with pytest.raises(TypeError, match="floating-point tensor"):
        _arrays.float32_numpy(torch.arange(3))


def test_wrap_like():
    a = np.ones(3, np.float32)
    assert _arrays.wrap_like(a, _arrays.NUMPY) is a
    t = _arrays.wrap_like(a, _arrays.TORCH_CPU)
    assert isinstance(t, torch.Tensor) and np.shares_memory(t.numpy(), a)


def test_axis_and_block_size_checks():
    assert _arrays.normalize_axis(-1, 3) == 2
    with pytest.raises(ValueError, match="out of range"):
        _arrays.normalize_axis(3, 3)
    with pytest.raises(TypeError):
        _arrays.normalize_axis(True, 3)
    assert _arrays.check_block_size(64) == 64
    for bad in (32, 96, 8192):
        with pytest.raises(ValueError, match="power of two"):
            _arrays.check_block_size(bad)
    with pytest.raises(TypeError):
        _arrays.check_block_size(64.0)
    assert _arrays.n_blocks(129, 64) == 3 and _arrays.n_blocks(128, 64) == 2


def test_granularity():
    assert _arrays.granularity((4, 5), None, None) == (None, None, ())
    assert _arrays.granularity((4, 5), -1, None) == (1, None, (5,))
    assert _arrays.granularity((4, 50), None, 64) == (None, 64, (4,))
    with pytest.raises(ValueError, match="not both"):
        _arrays.granularity((4, 5), 0, 64)


def test_alpha_array():
    assert _arrays.alpha_array(2, ()).dtype == np.float32
    assert _arrays.alpha_array(torch.tensor([1.0, 0.0]), (2,)).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="scalar"):
        _arrays.alpha_array([1.0], ())
    with pytest.raises(ValueError, match="finite"):
        _arrays.alpha_array(1e39, ())
    with pytest.raises(ValueError, match=">= 0"):
        _arrays.alpha_array([1.0, -1.0], (2,))
    with pytest.raises(ValueError, match="at least"):
        _arrays.alpha_array(MIN_POSITIVE_ALPHA / 2, ())
    with pytest.raises(TypeError, match="bool"):
        _arrays.alpha_array(True, ())


def test_nonfinite_error_names_count_and_first_index():
    x = np.zeros((2, 3), np.float32)
    x[1, 2] = np.nan
    x[0, 1] = np.inf
    message = str(_arrays.nonfinite_error(x, 2, "w"))
    assert message.startswith("w has 2 non-finite value(s)") and "(0, 1)" in message


def test_float64_beyond_float32_range_is_named_as_such():
    """A finite float64 value that float32 cannot hold is refused as out of range, not reported
    as a NaN/Inf of the input; NumPy and torch alike. Values that round to FLT_MAX pass."""
    import torch

    from quantkit import calibrate, quantize

    top = float(np.finfo(np.float32).max)
    for x in (np.array([1.0, -1e39, 2.0]), torch.tensor([[1.0, 5e38]], dtype=torch.float64)):
        with pytest.raises(ValueError, match="beyond float32's range"):
            quantize(x, 1.0)
        with pytest.raises(ValueError, match="beyond float32's range"):
            calibrate(x)
    assert calibrate(np.array([1.0, top * (1 + 2.0 ** -25)]), "max") <= top
