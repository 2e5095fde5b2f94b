"""The CUDA kernels emulated on the CPU (csrc compiled with g++ against csrc/host_emulation.h by
``python3 csrc/build.py --emulate``), the Python wrappers over them, and calibrate_cuda through
them."""


import numpy as np
import pytest
import torch
from strategies import alphas

import quantkit
from quantkit import _arrays, ops, reference
from quantkit.backends import cuda_layout, cuda_library, cuda_quantize, cuda_stats
from cuda_cases import (MSE_CASES, UNSUPPORTED, _calibration_data, _cpu, _dequantize,
                        _histogram_reference, _quantize, _random, _same, emulated_library)


# ======================================================= the kernels, emulated on the CPU
# csrc/*.cu compiled with g++ against csrc/host_emulation.h (python3 csrc/build.py --emulate): the
# same kernels, launchers and C ABI on host memory, with each block run as 256 threads (barriers
# for __syncthreads and warp shuffles). This checks the kernels' logic without a GPU: indexing,
# tails, both alignment paths, reductions and the arithmetic. It does not replace the GPU tests.


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return emulated_library(tmp_path_factory.mktemp("emu"))


def _buffer(n, dtype, offset_bytes=0):
    """An n-element array whose data starts offset_bytes past a 64-byte boundary."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.zeros(n * itemsize + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset_bytes
    return raw[start:start + n * itemsize].view(dtype)


def _placed(x, offset_bytes):
    out = _buffer(x.size, x.dtype, offset_bytes)
    out[:] = x.reshape(-1)
    return out


def _ptr(a):
    return a.ctypes.data


def _ok(code):
    assert code == 0, f"cudaError {code}"


X_OFFSETS = [0, 4]        # 16-byte aligned float32 (vector path) or not (element path)
Q_OFFSETS = [0, 1, 4]     # codes: 16-byte aligned, unaligned (element path), 4-byte aligned
EMU_SIZES = [1, 31, 511, 512, 513, 5000, 2**16 + 7]


def _emu_quantize(emu, x, inv, *, channel_view=None, block_size=None, x_off=0, q_off=0):
    xs = _placed(x, x_off)
    q = _buffer(x.size, np.int8, q_off)
    inv_d = np.ascontiguousarray(np.atleast_1d(inv), np.float32)
    bad = np.full(1, 12345, np.uint64)
    if channel_view is not None:
        _ok(emu.qk_quantize_int8_per_channel_f32(_ptr(xs), _ptr(q), *channel_view, _ptr(inv_d),
                                                 _ptr(bad), 0, None))
    elif block_size is not None:
        _ok(emu.qk_quantize_int8_blockwise_f32(_ptr(xs), _ptr(q), x.size, block_size,
                                               _ptr(inv_d), _ptr(bad), 0, None))
    else:
        _ok(emu.qk_quantize_int8_f32(_ptr(xs), _ptr(q), x.size, _ptr(inv_d), _ptr(bad), 0, None))
    return q.reshape(x.shape).copy(), int(bad[0])


def _emu_dequantize(emu, q, scale, *, channel_view=None, block_size=None, q_off=0, x_off=0):
    qs = _placed(q, q_off)
    out = _buffer(q.size, np.float32, x_off)
    s = np.ascontiguousarray(np.atleast_1d(scale), np.float32)
    if channel_view is not None:
        _ok(emu.qk_dequantize_int8_per_channel_f32(_ptr(qs), _ptr(out), *channel_view, _ptr(s), 0,
                                                   None))
    elif block_size is not None:
        _ok(emu.qk_dequantize_int8_blockwise_f32(_ptr(qs), _ptr(out), q.size, block_size, _ptr(s),
                                                 0, None))
    else:
        _ok(emu.qk_dequantize_int8_f32(_ptr(qs), _ptr(out), q.size, _ptr(s), 0, None))
    return out.reshape(q.shape).copy()


@pytest.mark.parametrize("n", EMU_SIZES)
def test_emulated_per_tensor_matches_reference(emu, n):
    x = _random(n, seed=n)
    alpha = np.float32(3.0)
    inv, scale = reference.inv_scale_from_alpha(alpha), reference.scale_from_alpha(alpha)
    expected = reference.quantize_per_tensor(x, alpha)
    expected_values = reference.dequantize_per_tensor(expected, scale)
    for x_off in X_OFFSETS:
        for q_off in Q_OFFSETS:
            q, bad = _emu_quantize(emu, x, inv, x_off=x_off, q_off=q_off)
            _same(q, expected)
            assert bad == 0
            _same(_emu_dequantize(emu, q, scale, q_off=q_off, x_off=x_off), expected_values,
                  "values")


@pytest.mark.parametrize("outer,channels,inner", [(1, 7, 1), (5, 7, 1), (5, 3, 3), (2, 7, 4),
                                                  (3, 5, 16), (2, 3, 300), (1, 4, 1030),
                                                  (700, 3, 1), (60, 7, 3), (9, 5, 13),
                                                  (1, 1, 5000)])
def test_emulated_per_channel_matches_reference(emu, outer, channels, inner):
    x = _random(outer * channels * inner, seed=inner).reshape(outer, channels, inner)
    alpha = np.linspace(0.0, 4.0, channels).astype(np.float32)  # channel 0 has alpha 0
    inv, scale = reference.inv_scale_from_alpha(alpha), reference.scale_from_alpha(alpha)
    expected = reference.quantize_per_channel(x, alpha, 1)
    expected_values = reference.dequantize_per_channel(expected, scale, 1)
    view = (outer, channels, inner)
    for x_off in X_OFFSETS:
        for q_off in (0, 1):
            q, bad = _emu_quantize(emu, x, inv, channel_view=view, x_off=x_off, q_off=q_off)
            _same(q, expected)
            assert bad == 0
            values = _emu_dequantize(emu, q, scale, channel_view=view, q_off=q_off, x_off=x_off)
            _same(values, expected_values, "values")
    amax = np.zeros(channels, np.float32)
    bad = np.zeros(1, np.uint64)
    for x_off in X_OFFSETS:
        xs = _placed(x, x_off)
        _ok(emu.qk_absmax_per_channel_f32(_ptr(xs), outer, channels, inner, _ptr(amax), _ptr(bad),
                                          0, None))
        _same(amax, np.abs(x).max(axis=(0, 2)), "absmax")


@pytest.mark.parametrize("block_size", [64, 256, 4096])
@pytest.mark.parametrize("n", [1, 100, 5000, 70_000])
def test_emulated_blockwise_matches_reference(emu, block_size, n):
    x = _random(n, seed=n + block_size)
    amax = reference.absmax_per_block(x, block_size)
    amax[0] = 0.0
    inv, scale = reference.inv_scale_from_alpha(amax), reference.scale_from_alpha(amax)
    expected = reference.quantize_blockwise(x, amax, block_size)
    expected_values = reference.dequantize_blockwise(expected, scale, block_size)
    for x_off in X_OFFSETS:
        q, bad = _emu_quantize(emu, x, inv, block_size=block_size, x_off=x_off, q_off=x_off)
        _same(q, expected)
        values = _emu_dequantize(emu, q, scale, block_size=block_size, q_off=x_off, x_off=x_off)
        _same(values, expected_values, "values")
        got = np.zeros(amax.size, np.float32)
        count = np.zeros(1, np.uint64)
        xs = _placed(x, x_off)  # kept alive across the call
        _ok(emu.qk_absmax_blockwise_f32(_ptr(xs), n, block_size, _ptr(got), _ptr(count), 0, None))
        _same(got, reference.absmax_per_block(x, block_size), "absmax")


def test_emulated_ties_extremes_and_nonfinite(emu):
    k = np.arange(-140, 141, dtype=np.float32)
    x = np.concatenate([k + np.float32(0.5), k, -(k + np.float32(0.5)),
                        np.float32([0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38])])
    for alpha in (np.float32(127.0), np.float32(3.0), np.float32(3.7321948e-37),
                  np.float32(3.4e38), np.float32(0.0)):
        inv = reference.inv_scale_from_alpha(alpha)
        for x_off in X_OFFSETS:
            q, bad = _emu_quantize(emu, x, inv, x_off=x_off)
            _same(q, reference.quantize_per_tensor(x, alpha))
    bad_x = _random(5000)
    bad_x[[0, 17, 2500, 4999]] = [np.nan, np.inf, -np.inf, np.nan]
    for x_off in X_OFFSETS:
        _, bad = _emu_quantize(emu, bad_x, np.float32(1.0), x_off=x_off)
        assert bad == 4
        _, bad = _emu_quantize(emu, bad_x, np.ones(79, np.float32), block_size=64, x_off=x_off)
        assert bad == 4
        out = np.zeros(1, np.float32)
        count = np.zeros(1, np.uint64)
        xs = _placed(bad_x, x_off)
        _ok(emu.qk_absmax_f32(_ptr(xs), bad_x.size, _ptr(out), _ptr(count), 0, None))
        finite = bad_x[np.isfinite(bad_x)]
        assert (out[0], int(count[0])) == (np.abs(finite).max(), 4)


@pytest.mark.parametrize("bins", [1, 100, 2048, 4096])
def test_emulated_abs_histogram(emu, bins):
    x = _random(70_001, seed=bins)
    x[5] = np.nan
    hi = float(np.abs(x[np.isfinite(x)]).max()) * 0.9
    inv_width = cuda_stats.histogram_inv_width(bins, hi)
    finite = x[np.isfinite(x)]
    c, s, s2 = _histogram_reference(finite, bins, hi)
    for x_off in X_OFFSETS:
        counts = np.zeros(bins, np.uint64)
        sums = np.zeros(bins, np.float64)
        sumsq = np.zeros(bins, np.float64)
        bad = np.zeros(1, np.uint64)
        xs = _placed(x, x_off)
        _ok(emu.qk_abs_histogram_f32(_ptr(xs), x.size, bins, float(inv_width),
                                     _ptr(counts), _ptr(sums), _ptr(sumsq), _ptr(bad), 0, None))
        _same(counts.astype(np.int64), c, "counts")
        np.testing.assert_allclose(sums, s, rtol=1e-10, atol=0)
        np.testing.assert_allclose(sumsq, s2, rtol=1e-10, atol=0)
        assert int(bad[0]) == 1


@pytest.mark.parametrize("n", [1, 31, 70_001])
def test_emulated_calibration_kernels_equal_numba_calib(emu, n):
    from quantkit.backends import numba_calib

    x = _random(n, seed=n) * np.float32(0.37)
    x[: min(n, 5)] = np.float32([0.0, -0.0, 1e-40, -3e-39, 65504.0])[: min(n, 5)]
    expected = [np.zeros(numba_calib.HIST_BINS, np.int64) for _ in range(3)]
    numba_calib.histogram_log(x, 2, *expected)
    amax = np.float32(np.abs(x).max())
    unit_inv = numba_calib.unit_inverse(max(amax, np.float32(1)), n)
    alphas = np.concatenate([amax * np.linspace(0.05, 1.0, 21).astype(np.float32),
                             np.float32([0.0, 3.7321948e-37])]).astype(np.float32)
    scale, inv = cuda_stats.candidate_scales(alphas)
    expected_sse = numba_calib.sse_fixed_many(x, alphas, unit_inv)
    for x_off in X_OFFSETS:
        xs = _placed(x, x_off)
        got = [np.zeros(numba_calib.HIST_BINS, np.uint64) for _ in range(3)]
        bad = np.zeros(1, np.uint64)
        _ok(emu.qk_abs_histogram_log_f32(_ptr(xs), n, *(_ptr(g) for g in got), _ptr(bad), 0,
                                         None))
        for g, e in zip(got, expected):
            _same(g.astype(np.int64), e, "log histogram")
        sse = np.zeros(alphas.size, np.uint64)
        for lo in range(0, alphas.size, cuda_stats.MAX_SSE_CANDIDATES):
            k = min(cuda_stats.MAX_SSE_CANDIDATES, alphas.size - lo)
            _ok(emu.qk_sse_fixed_many_f32(_ptr(xs), n, _ptr(scale[lo:]), _ptr(inv[lo:]), k,
                                          unit_inv, _ptr(sse[lo:]), _ptr(bad), 0, None))
        _same(sse.astype(np.int64), expected_sse, "sse")


# ------------------------------------------- the Python wrappers over the emulated kernels
# quantkit.backends.cuda_* run end to end on CPU tensors: only the device checks, the library and
# the stream are swapped for the emulation, so the wrappers' own logic (layouts, axes, out=, errors,
# readback) is exercised as it will be on a GPU.


@pytest.fixture
def emulated_backend(emu, monkeypatch):
    monkeypatch.setattr(cuda_library, "library", lambda: emu)
    monkeypatch.setattr(cuda_layout, "require_cuda", lambda t, name: None)
    monkeypatch.setattr(cuda_library, "stream", lambda device: 0)


def _cpu_layout(x: np.ndarray, how: str):
    t = torch.from_numpy(np.ascontiguousarray(x))
    if how == "transpose" and x.ndim >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if how == "sliced":
        wide = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=torch.float32)
        wide[..., ::2] = t
        return wide[..., ::2]
    if how == "offset":
        base = torch.zeros(x.size + 1, dtype=torch.float32)
        base[1:] = t.reshape(-1)
        return base[1:].reshape(x.shape)
    return t


@pytest.mark.parametrize("how", ["plain", "transpose", "sliced", "offset"])
@pytest.mark.parametrize("shape", [(1,), (37,), (3, 5, 70), (40, 33), (1030, 3)])
def test_emulated_wrappers_match_reference(emulated_backend, how, shape):
    n = int(np.prod(shape))
    x = _random(n, seed=n).reshape(shape)
    t = _cpu_layout(x, how)
    q = _quantize(t, 3.0)
    _same(q.data, reference.quantize_per_tensor(x, 3.0))
    _same(_dequantize(q), reference.dequantize_per_tensor(_cpu(q.data), _cpu(q.scale)),
          "values")
    _same(cuda_quantize.absmax(t), np.float32(np.abs(x).max()), "absmax")
    for axis in range(-len(shape), len(shape)):
        other = tuple(k for k in range(len(shape)) if k != axis % len(shape))
        alpha = np.abs(x).max(axis=other).astype(np.float32)
        _same(cuda_quantize.absmax(t, axis=axis), alpha, "absmax per channel")
        q = _quantize(t, alpha, axis=axis)
        assert q.axis == axis % len(shape)
        _same(q.data, reference.quantize_per_channel(x, alpha, axis % len(shape)))
        _same(_dequantize(q), reference.dequantize_per_channel(
            _cpu(q.data), _cpu(q.scale), axis % len(shape)), "values per channel")
    alpha = reference.absmax_per_block(x, 64)
    _same(cuda_quantize.absmax(t, block_size=64), alpha, "absmax per block")
    q = _quantize(t, alpha, block_size=64)
    _same(q.data, reference.quantize_blockwise(x, alpha, 64))
    _same(_dequantize(q), reference.dequantize_blockwise(_cpu(q.data), _cpu(q.scale), 64),
          "values per block")


def test_emulated_wrappers_out_errors_and_statistics(emulated_backend):
    x = _random(4096).reshape(64, 64)
    t = torch.from_numpy(x)
    out = torch.empty(64, 64, dtype=torch.int8)
    q = _quantize(t.t(), 3.0, out=out)  # out= is C-ordered: the transposed input is copied
    assert q.data is out
    _same(out, reference.quantize_per_tensor(np.ascontiguousarray(x.T), 3.0))
    values = torch.empty(64, 64)
    assert _dequantize(q, out=values) is values
    _same(values, reference.dequantize_per_tensor(_cpu(out), np.float32(3.0) / np.float32(127)),
          "values")
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        th = t.to(dtype)
        _same(_quantize(th, 3.0).data, reference.quantize_per_tensor(_cpu(th.float()), 3.0))
    bad = x.copy()
    bad[7, 9] = np.inf
    with pytest.raises(ValueError) as expected:
        ops.quantize(bad, 3.0)
    for call in (lambda: _quantize(torch.from_numpy(bad), 3.0),
                 lambda: cuda_quantize.absmax(torch.from_numpy(bad), axis=0),
                 lambda: cuda_stats.abs_histogram(torch.from_numpy(bad), 10, 1.0),
                 lambda: cuda_stats.abs_histogram_log(torch.from_numpy(bad)),
                 lambda: cuda_stats.sse_fixed_many(torch.from_numpy(bad), [1.0], 1.0)):
        with pytest.raises(ValueError) as got:
            call()
        assert str(got.value) == str(expected.value)
    counts, sums, sumsq = cuda_stats.abs_histogram(t, 50, 2.0)
    c, s, s2 = _histogram_reference(x.reshape(-1), 50, 2.0)
    _same(counts, c, "counts")
    np.testing.assert_allclose(sums.numpy(), s, rtol=1e-10)
    np.testing.assert_allclose(sumsq.numpy(), s2, rtol=1e-10)
    from quantkit.backends import numba_calib

    expected_log = [np.zeros(numba_calib.HIST_BINS, np.int64) for _ in range(3)]
    numba_calib.histogram_log(x.reshape(-1), 1, *expected_log)
    for got, want in zip(cuda_stats.abs_histogram_log(t), expected_log):
        _same(got, want, "log histogram")
    alphas = np.linspace(0.5, 4.0, 40).astype(np.float32)  # three passes of 16 candidates
    unit_inv = numba_calib.unit_inverse(np.float32(np.abs(x).max()), x.size)
    _same(cuda_stats.sse_fixed_many(t, alphas, unit_inv),
          numba_calib.sse_fixed_many(x.reshape(-1), alphas, unit_inv), "sse")


# ---------------------------------------------------- calibrate on CUDA tensors (emulated)
# calibration.calibrate_cuda through the emulated kernels: the alphas must equal the CPU path's on
# the same data, and nothing may go through the host-side data path (float32_numpy, the numba
# kernels on the data): the tests make both fail once the CPU's expected alphas are computed.

from quantkit import calibration  # noqa: E402


def _fail_host_path(*args, **kwargs):
    raise AssertionError("the CUDA calibration path touched the host-side data path")


def _cpu_alpha(x, method="mse", **kwargs):
    """calibrate on the CPU, outside the fixture's guard (it is called before the guard is set)."""
    return calibration.calibrate(x, method, **kwargs)


@pytest.mark.parametrize("kind", MSE_CASES)
def test_emulated_calibrate_mse_per_tensor_equals_cpu(emulated_backend, monkeypatch, kind):
    x = _calibration_data(kind)
    expected = _cpu_alpha(x)
    assert isinstance(expected, float) and expected > 0
    monkeypatch.setattr(calibration._arrays, "float32_numpy", _fail_host_path)
    monkeypatch.setattr(calibration._args, "data_kernels", _fail_host_path)
    monkeypatch.setattr(calibration.mse, "numba_kernels", _fail_host_path)
    for t in (torch.from_numpy(x), torch.from_numpy(x.reshape(-1, 10)).t()):  # plain, transposed
        got = calibration.calibrate_cuda(t, "mse")
        assert isinstance(got, float)
        assert got == expected, kind


def test_emulated_calibrate_mse_half_input_equals_cpu(emulated_backend, monkeypatch):
    t = torch.from_numpy(_calibration_data("student_t2", seed=3)).to(torch.float16)
    expected = _cpu_alpha(t)
    monkeypatch.setattr(calibration._arrays, "float32_numpy", _fail_host_path)
    assert calibration.calibrate_cuda(t) == expected


@pytest.mark.parametrize("how", ["plain", "transpose", "sliced", "offset"])
@pytest.mark.parametrize("shape", [(1,), (37,), (3, 5, 70), (40, 33)])
def test_emulated_calibrate_max_equals_cpu(emulated_backend, monkeypatch, how, shape):
    n = int(np.prod(shape))
    x = _random(n, seed=n).reshape(shape)
    x.reshape(-1)[: min(n, 3)] = np.float32(1e-38)  # below MIN_POSITIVE_ALPHA: a channel may be 0
    t = _cpu_layout(x, how)
    expected = {"tensor": _cpu_alpha(x, "max"),
                "blocks": _cpu_alpha(torch.from_numpy(x), "max", block_size=64),
                "axes": [_cpu_alpha(torch.from_numpy(x), "max", axis=a)
                         for a in range(-len(shape), len(shape))]}
    monkeypatch.setattr(calibration._arrays, "float32_numpy", _fail_host_path)
    monkeypatch.setattr(calibration._args, "data_kernels", _fail_host_path)
    monkeypatch.setattr(calibration.mse, "numba_kernels", _fail_host_path)
    got = calibration.calibrate_cuda(t, "max")
    assert isinstance(got, float) and got == expected["tensor"]
    blocks = calibration.calibrate_cuda(t, "max", block_size=64)
    assert blocks.dtype == torch.float32 and blocks.device == t.device
    _same(blocks, _cpu(expected["blocks"]), "max per block")
    for a, want in zip(range(-len(shape), len(shape)), expected["axes"]):
        got = calibration.calibrate_cuda(t, "max", axis=a)
        assert got.dtype == torch.float32 and tuple(got.shape) == tuple(want.shape)
        _same(got, _cpu(want), "max per channel")


@pytest.mark.parametrize("kwargs,what", UNSUPPORTED, ids=str)
def test_emulated_calibrate_unsupported_raises_clearly(emulated_backend, monkeypatch, kwargs,
                                                       what):
    monkeypatch.setattr(calibration._arrays, "float32_numpy", _fail_host_path)
    t = torch.from_numpy(_calibration_data("normal").reshape(700, 100))
    with pytest.raises(NotImplementedError) as info:
        calibration.calibrate_cuda(t, **kwargs)
    assert isinstance(info.value, RuntimeError)  # callers catching RuntimeError still do
    message = str(info.value)
    assert what in message and "not implemented on the GPU" in message
    assert calibration.CUDA_SUPPORTED in message and "x.cpu()" in message


def test_emulated_calibrate_mse_needing_host_data_raises(emulated_backend, monkeypatch):
    rng = np.random.default_rng(5)
    small = rng.standard_normal(4096).astype(np.float32)
    sparse = np.zeros(200_000, np.float32)
    sparse[:60_000] = rng.standard_normal(60_000)
    narrow = rng.uniform(1.0, 2.0, 70_000).astype(np.float32)  # 128 bins, many values in each
    monkeypatch.setattr(calibration._arrays, "float32_numpy", _fail_host_path)
    monkeypatch.setattr(calibration._args, "data_kernels", _fail_host_path)
    monkeypatch.setattr(calibration.mse, "numba_kernels", _fail_host_path)
    for x, match in ((small, "4096 <= 65536 values"), (sparse, "60000 <= 65536 non-zero"),
                     (narrow, "at most 513 log-histogram bins")):
        with pytest.raises(NotImplementedError, match=match):
            calibration.calibrate_cuda(torch.from_numpy(x), "mse")
    # what needs no search still works: all zeros (and all below MIN_POSITIVE_ALPHA) give 0
    assert calibration.calibrate_cuda(torch.zeros(100), "mse") == 0.0
    assert calibration.calibrate_cuda(torch.full((100,), 1e-38), "mse") == 0.0


def test_emulated_calibrate_argument_errors_match_cpu(emulated_backend):
    bad = _calibration_data("normal").reshape(700, 100)
    bad[3, 7] = np.nan
    bad[5, 1] = np.inf
    for method, kwargs in (("mse", {}), ("max", {}), ("max", dict(axis=1)),
                           ("max", dict(block_size=64))):
        with pytest.raises(ValueError) as expected:
            calibration.calibrate(bad, method, **kwargs)
        with pytest.raises(ValueError) as got:
            calibration.calibrate_cuda(torch.from_numpy(bad), method, **kwargs)
        assert str(got.value) == str(expected.value)
    with pytest.raises(ValueError, match="empty"):
        calibration.calibrate_cuda(torch.zeros(0, 3))
    with pytest.raises(TypeError, match="floating-point"):
        calibration.calibrate_cuda(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="unknown"):
        calibration.calibrate_cuda(torch.ones(4), "minmax")
    with pytest.raises(TypeError, match="does not apply"):
        calibration.calibrate_cuda(torch.ones(4), "max", bins=10)
    with pytest.raises(ValueError, match="not both"):
        calibration.calibrate_cuda(torch.ones(64, 2), "max", axis=0, block_size=64)


def test_calibrate_dispatches_cuda_tensors_to_the_backend(monkeypatch):
    """quantkit.calibrate hands a CUDA tensor to the GPU path with checked options."""
    seen = []
    monkeypatch.setattr(calibration.gpu, "calibrate_on_gpu",
                        lambda x, method, axis, block_size, opts:
                        seen.append((method, dict(axis=axis, block_size=block_size, **opts)))
                        or 1.5)
    monkeypatch.setattr(calibration._arrays, "kind_of", lambda x, name=None: _arrays.TORCH_CUDA)
    assert quantkit.calibrate(torch.ones(4), "percentile", axis=0) == 1.5
    assert seen == [("percentile", dict(axis=0, block_size=None, percentile=99.99))]

