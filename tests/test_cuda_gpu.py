"""The CUDA backend on a CUDA device (tests marked ``gpu``, run with ``pytest --gpu``): every
kernel bit for bit with quantkit.reference, and calibrate on CUDA tensors equal to the CPU's."""

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import alphas, tensor_and_alpha

import quantkit
from quantkit import _arrays, ops, reference
from quantkit.backends import cuda_quantize, cuda_stats
from cuda_cases import (DEVICE, LAYOUTS, MSE_CASES, SIZES, UNSUPPORTED, _calibration_data,
                        _check_dequantize_offset, _cpu, _dequantize, _histogram_reference, _layout,
                        _quantize, _random, _same, gpu)


@gpu
@settings(max_examples=60, deadline=None)
@given(case=tensor_and_alpha(), how=st.sampled_from(LAYOUTS))
def test_gpu_per_tensor_matches_reference(case, how):
    x, alpha = case
    q = _quantize(_layout(x, how), alpha)
    assert q.data.is_cuda and q.scale.is_cuda
    _same(q.data, reference.quantize_per_tensor(x, alpha))
    _same(q.scale, reference.scale_from_alpha(alpha), "scale")
    _same(_dequantize(q), reference.dequantize_per_tensor(_cpu(q.data), _cpu(q.scale)),
          "values")


@gpu
@settings(max_examples=60, deadline=None)
@given(case=tensor_and_alpha(), how=st.sampled_from(LAYOUTS), data=st.data())
def test_gpu_per_channel_matches_reference(case, how, data):
    x, _ = case
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    channels = x.shape[axis]
    alpha = np.array(data.draw(st.lists(alphas, min_size=channels, max_size=channels)), np.float32)
    alpha[data.draw(st.integers(0, channels - 1))] = 0.0
    q = _quantize(_layout(x, how), alpha, axis=axis)
    _same(q.data, reference.quantize_per_channel(x, alpha, axis % x.ndim))
    _same(q.scale, reference.scale_from_alpha(alpha), "scale")
    _same(_dequantize(q),
          reference.dequantize_per_channel(_cpu(q.data), _cpu(q.scale), axis % x.ndim), "values")


@gpu
@settings(max_examples=60, deadline=None)
@given(case=tensor_and_alpha(max_side=40), how=st.sampled_from(LAYOUTS), data=st.data())
def test_gpu_blockwise_matches_reference(case, how, data):
    x, _ = case
    block = data.draw(st.sampled_from([64, 128, 256, 1024, 4096]))
    n_blocks = _arrays.n_blocks(x.size, block)
    alpha = np.array(data.draw(st.lists(alphas, min_size=n_blocks, max_size=n_blocks)), np.float32)
    q = _quantize(_layout(x, how), alpha, block_size=block)
    _same(q.data, reference.quantize_blockwise(x, alpha, block))
    _same(_dequantize(q), reference.dequantize_blockwise(_cpu(q.data), _cpu(q.scale), block),
          "values")
    _same(cuda_quantize.absmax(_layout(x, how), block_size=block),
          reference.absmax_per_block(x, block), "absmax")


@gpu
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("how", ["plain", "offset"])
def test_gpu_odd_sizes_every_granularity(n, how):
    x = _random(n, seed=n)
    alpha = np.float32(3.0)
    xt = _layout(x, how)
    q = _quantize(xt, alpha)
    _same(q.data, reference.quantize_per_tensor(x, alpha))
    _check_dequantize_offset(q, reference.dequantize_per_tensor(_cpu(q.data), _cpu(q.scale)))
    for block in (64, 4096):
        a = reference.absmax_per_block(x, block)
        _same(cuda_quantize.absmax(xt, block_size=block), a, "absmax per block")
        q = _quantize(xt, a, block_size=block)
        _same(q.data, reference.quantize_blockwise(x, a, block))
        expected = reference.dequantize_blockwise(_cpu(q.data), _cpu(q.scale), block)
        _same(_dequantize(q), expected, "values")
        _check_dequantize_offset(q, expected)
    _same(cuda_quantize.absmax(xt), np.float32(np.abs(x).max()), "absmax")
    # per channel on 2-D views of the same data, both axes, rows long and short
    for rows in (1, 7, 257):
        m = (n // rows) * rows
        if m == 0:
            continue
        x2 = x[:m].reshape(rows, -1)
        for axis in (0, 1):
            a = np.abs(x2).max(axis=1 - axis).astype(np.float32)
            t2 = _layout(x2, how)
            _same(cuda_quantize.absmax(t2, axis=axis), a, "absmax per channel")
            q = _quantize(t2, a, axis=axis)
            _same(q.data, reference.quantize_per_channel(x2, a, axis))
            expected = reference.dequantize_per_channel(_cpu(q.data), _cpu(q.scale), axis)
            _same(_dequantize(q), expected, "values")
            _check_dequantize_offset(q, expected)


@gpu
def test_gpu_ties_round_half_to_even():
    k = np.arange(-140, 141, dtype=np.float32)
    x = np.concatenate([k + np.float32(0.5), k, -(k + np.float32(0.5))])  # inv = 1: exact ties
    q = _quantize(_layout(x, "plain"), 127.0)
    _same(q.data, reference.quantize_per_tensor(x, 127.0))
    assert _cpu(q.data)[np.searchsorted(x[:281], 0.5)] == 0  # 0.5 -> 0, 1.5 -> 2
    assert _cpu(q.data)[np.searchsorted(x[:281], 1.5)] == 2


@gpu
def test_gpu_alpha_zero_and_extreme_alphas():
    x = _random(10_000)
    alpha = np.array([0.0, 3.7321948e-37, 1e-36, 3.4e38], np.float32)
    x2 = x.reshape(4, -1)
    q = _quantize(_layout(x2, "plain"), alpha, axis=0)
    _same(q.data, reference.quantize_per_channel(x2, alpha, 0))
    assert not _cpu(q.data)[0].any()
    values = _cpu(_dequantize(q))
    assert np.array_equal(values[0], np.zeros_like(values[0]))


@gpu
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("n", [1, 31, 2**20 + 7])
def test_gpu_nonfinite_is_detected_with_the_cpu_message(bad, n):
    x = _random(n)
    where = [n - 1] if n < 8 else [3, n // 2, n - 1]
    x[where] = bad
    with pytest.raises(ValueError) as expected:
        ops.quantize(x, 3.0)
    for how in ("plain", "offset"):
        for call in (lambda t: _quantize(t, 3.0),
                     lambda t: _quantize(t, np.ones(_arrays.n_blocks(n, 64)), block_size=64),
                     lambda t: cuda_quantize.absmax(t),
                     lambda t: cuda_stats.abs_histogram(t, 64, 4.0)):
            with pytest.raises(ValueError) as got:
                call(_layout(x, how))
            assert str(got.value) == str(expected.value)


@gpu
def test_gpu_public_api_dispatches_cuda_tensors():
    x = _random(5000).reshape(50, 100)
    t = torch.from_numpy(x).to(DEVICE)
    q = quantkit.quantize(t, np.abs(x).max(axis=0), axis=1)
    assert q.data.is_cuda
    _same(q.data, reference.quantize_per_channel(x, np.abs(x).max(axis=0), 1))
    assert quantkit.dequantize(q).is_cuda


@gpu
def test_gpu_out_buffers_and_half_inputs():
    x = _random(4096).reshape(64, 64)
    t = torch.from_numpy(x).to(DEVICE)
    out = torch.empty(64, 64, dtype=torch.int8, device=DEVICE)
    q = _quantize(t, 3.0, out=out)
    assert q.data is out
    _same(out, reference.quantize_per_tensor(x, 3.0))
    values = torch.empty(64, 64, dtype=torch.float32, device=DEVICE)
    assert _dequantize(q, out=values) is values
    with pytest.raises(ValueError, match="contiguous"):
        _quantize(t, 3.0, out=torch.empty(64, 64, dtype=torch.int8, device=DEVICE).t()[:, :])
    with pytest.raises(ValueError):
        _quantize(t, 3.0, out=torch.empty(64, 63, dtype=torch.int8, device=DEVICE))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        th = t.to(dtype)
        _same(_quantize(th, 3.0).data, reference.quantize_per_tensor(_cpu(th.float()), 3.0))


@gpu
def test_gpu_runs_on_the_current_stream():
    x = _random(2**20 + 7)
    t = torch.from_numpy(x).to(DEVICE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        q = _quantize(t, 3.0)
        values = _dequantize(q)
    torch.cuda.current_stream().wait_stream(stream)
    _same(q.data, reference.quantize_per_tensor(x, 3.0))
    _same(values, reference.dequantize_per_tensor(_cpu(q.data), _cpu(q.scale)), "values")


@gpu
def test_gpu_absmax_per_channel_every_axis():
    x = _random(3 * 5 * 7 * 11).reshape(3, 5, 7, 11)
    for axis in range(4):
        other = tuple(k for k in range(4) if k != axis)
        for how in ("plain", "transpose", "sliced"):
            _same(cuda_quantize.absmax(_layout(x, how), axis=axis), np.abs(x).max(axis=other),
                  "absmax")
    assert float(cuda_quantize.absmax(torch.zeros(0, device=DEVICE))) == 0.0
    assert cuda_quantize.absmax(torch.zeros(3, 0, device=DEVICE), axis=0).tolist() == [0.0] * 3
    assert cuda_quantize.absmax(torch.zeros(3, 0, device=DEVICE), axis=1).shape == (0,)
    assert cuda_quantize.absmax(torch.zeros(0, device=DEVICE), block_size=64).shape == (0,)


@gpu
@pytest.mark.parametrize("bins", [1, 100, 2048, 2049, 65536])
@pytest.mark.parametrize("n", [31, 2**20 + 7])
def test_gpu_abs_histogram(bins, n):
    x = _random(n, seed=bins)
    hi = float(np.abs(x).max()) * 0.9  # some values beyond hi: they land in the last bin
    for how in ("plain", "offset"):
        counts, sums, sumsq = cuda_stats.abs_histogram(_layout(x, how), bins, hi)
        c, s, s2 = _histogram_reference(x, bins, hi)
        _same(counts, c, "counts")
        np.testing.assert_allclose(_cpu(sums), s, rtol=1e-10, atol=0)
        np.testing.assert_allclose(_cpu(sumsq), s2, rtol=1e-10, atol=0)


@gpu
@pytest.mark.parametrize("n", [1, 31, 2**20 + 7])
@pytest.mark.parametrize("how", ["plain", "offset"])
def test_gpu_calibration_kernels_equal_numba_calib(n, how):
    from quantkit.backends import numba_calib

    x = _random(n, seed=n + 1) * np.float32(0.37)
    x[: min(n, 5)] = np.float32([0.0, -0.0, 1e-40, -3e-39, 65504.0])[: min(n, 5)]  # subnormals too
    t = _layout(x, how)
    k = cuda_stats  # absmax_flat, histogram_log, sse_fixed_many: calibration.FlatKernels
    amax, bad = k.absmax_flat(t)
    expected_amax, expected_bad = numba_calib.absmax_flat(x)
    assert (amax, bad) == (np.float32(expected_amax), int(expected_bad))

    got = [np.zeros(numba_calib.HIST_BINS, np.int64) for _ in range(3)]
    k.histogram_log(t, 1, *got)
    expected = [np.zeros(numba_calib.HIST_BINS, np.int64) for _ in range(3)]
    numba_calib.histogram_log(x, 2, *expected)
    for g, e, what in zip(got, expected, ("counts", "sum_res", "sum_res2")):
        _same(g, e, what)

    unit_inv = numba_calib.unit_inverse(max(amax, np.float32(1)), n)  # amax is 0 when n == 1
    alphas = np.float32(amax) * np.linspace(0.05, 1.0, 21).astype(np.float32)  # two passes
    alphas = np.concatenate([alphas, np.float32([0.0, 3.7321948e-37])])
    _same(k.sse_fixed_many(t, alphas, unit_inv), numba_calib.sse_fixed_many(x, alphas, unit_inv),
          "sse")


@gpu
def test_gpu_over_two_to_the_31_elements():
    """A tensor past 2^31 elements (64-bit indexing), checked against torch's own arithmetic."""
    n = 2**31 + 33
    free, _ = torch.cuda.mem_get_info()
    if free < 30 * 2**30:
        pytest.skip(f"needs about 30 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    x = torch.randn(n, device=DEVICE) * 2
    alpha = np.float32(5.0)
    inv = float(reference.inv_scale_from_alpha(alpha))
    q = _quantize(x, alpha)
    expected = torch.clamp(torch.round(x * inv), -127, 127).to(torch.int8)
    assert torch.equal(q.data, expected)
    del expected
    values = _dequantize(q)
    assert torch.equal(values, q.data.to(torch.float32) * float(q.scale))
    del values
    assert float(cuda_quantize.absmax(x)) == float(x.abs().max())
    blocks = cuda_quantize.absmax(x, block_size=4096)
    assert blocks.shape == (_arrays.n_blocks(n, 4096),)
    assert float(blocks[-1]) == float(x[-(n % 4096):].abs().max())
    x[n - 2] = float("nan")
    with pytest.raises(ValueError, match=rf"1 non-finite value\(s\).*at index \({n - 2},\)"):
        _quantize(x, alpha)


@gpu
def test_gpu_torch_ops():
    from torch.library import opcheck

    import quantkit._torch_ops  # noqa: F401 - registers torch.ops.quantkit

    x = torch.from_numpy(_random(6 * 300).reshape(6, 300)).to(DEVICE)
    alpha = x.abs().amax(dim=1)
    opcheck(torch.ops.quantkit.quantize_int8.default, (x, alpha), {"axis": 0})
    codes, scale = torch.ops.quantkit.quantize_int8(x, alpha, 0)
    opcheck(torch.ops.quantkit.dequantize_int8.default, (codes, scale), {"axis": 0})
    opcheck(torch.ops.quantkit.absmax.default, (x,), {"block_size": 64})
    _same(codes, reference.quantize_per_channel(_cpu(x), _cpu(alpha), 0))

    def roundtrip(t, a):
        c, s = torch.ops.quantkit.quantize_int8(t, a, 0)
        return torch.ops.quantkit.dequantize_int8(c, s, 0)

    compiled = torch.compile(roundtrip, fullgraph=True)
    assert torch.equal(compiled(x, alpha), roundtrip(x, alpha))


# ------------------------------------------------------------- calibrate on a real GPU


@gpu
@pytest.mark.parametrize("kind", MSE_CASES)
def test_gpu_calibrate_mse_per_tensor_equals_cpu(kind):
    x = _calibration_data(kind, n=2**20 + 7, seed=11)
    expected = quantkit.calibrate(x)
    for t in (torch.from_numpy(x).to(DEVICE), _layout(x.reshape(-1, 1), "transpose")):
        got = quantkit.calibrate(t)
        assert isinstance(got, float) and got == expected, kind


@gpu
def test_gpu_calibrate_max_equals_cpu():
    x = _random(300 * 70, seed=2).reshape(300, 70)
    t = torch.from_numpy(x).to(DEVICE)
    assert quantkit.calibrate(t, "max") == quantkit.calibrate(x, "max")
    for kwargs in (dict(axis=0), dict(axis=1), dict(axis=-1), dict(block_size=64)):
        got = quantkit.calibrate(t, "max", **kwargs)
        assert got.device == t.device and got.dtype == torch.float32
        _same(got, quantkit.calibrate(x, "max", **kwargs), f"max {kwargs}")
        got_t = quantkit.calibrate(t.t(), "max", **kwargs)
        _same(got_t, quantkit.calibrate(np.ascontiguousarray(x.T), "max", **kwargs),
              f"max {kwargs} transposed")


@gpu
@pytest.mark.parametrize("kwargs,what", UNSUPPORTED, ids=str)
def test_gpu_calibrate_unsupported_raises_clearly(kwargs, what):
    t = torch.randn(700, 100, device=DEVICE)
    with pytest.raises(NotImplementedError, match=re.escape(what)):
        quantkit.calibrate(t, **kwargs)
    with pytest.raises(NotImplementedError, match="4096 <= 65536"):
        quantkit.calibrate(torch.randn(4096, device=DEVICE))

