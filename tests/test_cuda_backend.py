"""The CUDA backend: its C header, library and Python wrappers.

Without a GPU (the default run) this checks what can be checked on the CPU: the header's constants
against quantkit/_constants.py, the compiled library's exported symbols against the header and the
ctypes declarations, the loader's error paths, and the wrappers' argument checks (the same errors as
quantkit.ops). The tests marked ``gpu`` (``pytest --gpu``) compare every kernel bit for bit with
quantkit.reference on a CUDA device.
"""

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import alphas, tensor_and_alpha

import quantkit
from quantkit import _arrays, _constants, ops, reference
from quantkit.backends import cuda

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "csrc" / "quantkit.h"


def _header_defines() -> dict:
    text = HEADER.read_text()
    return {m.group(1): m.group(2).strip() for m in
            re.finditer(r"^#define\s+(QK_\w+)\s+(.+?)\s*$", text, re.MULTILINE)}


def _header_functions() -> dict:
    """name -> number of parameters, for every QK_API function in the header."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.DOTALL)
    found = {}
    for m in re.finditer(r"QK_API\s+[\w\s\*]+?\b(qk_\w+)\s*\(([^)]*)\)\s*;", text):
        params = m.group(2).strip()
        found[m.group(1)] = 0 if params in ("", "void") else params.count(",") + 1
    return found


def _int(expr: str) -> int:
    assert re.fullmatch(r"[\d\s()<]+", expr), expr  # integers and shifts only
    return int(eval(expr))  # noqa: S307 - checked above


# ------------------------------------------------------------------------ header and library


def test_header_constants_match_python():
    defines = _header_defines()
    assert _int(defines["QK_QMAX"]) == _constants.QMAX
    assert _int(defines["QK_MIN_BLOCK_SIZE"]) == _constants.MIN_BLOCK_SIZE
    assert _int(defines["QK_MAX_BLOCK_SIZE"]) == _constants.MAX_BLOCK_SIZE
    assert _int(defines["QK_ABI_VERSION"]) == cuda.ABI_VERSION
    assert _int(defines["QK_MAX_HISTOGRAM_BINS"]) == cuda.MAX_HISTOGRAM_BINS
    assert _int(defines["QK_MAX_SSE_CANDIDATES"]) == cuda.MAX_SSE_CANDIDATES
    from quantkit.backends import numba_calib

    assert _int(defines["QK_LOG_HISTOGRAM_BINS"]) == cuda.LOG_HISTOGRAM_BINS
    assert cuda.LOG_HISTOGRAM_BINS == numba_calib.HIST_BINS
    assert _int(defines["QK_LOG_HISTOGRAM_SHIFT"]) == numba_calib.HIST_SHIFT
    min_alpha = defines["QK_MIN_POSITIVE_ALPHA"]
    assert re.fullmatch(r"[\d.e+-]+f", min_alpha), min_alpha
    assert np.float32(min_alpha[:-1]) == np.float32(_constants.MIN_POSITIVE_ALPHA)


def test_ctypes_declarations_match_header():
    functions = _header_functions()
    assert len(functions) >= 13
    lib = type("FakeLib", (), {})()
    for name in functions:
        setattr(lib, name, type("Fn", (), {})())
    cuda._declare(lib)
    for name, n_params in functions.items():
        assert len(getattr(lib, name).argtypes) == n_params, name


def _built_library() -> Path:
    path = cuda.library_path()
    if not path.is_file():
        pytest.skip(f"the CUDA library is not built ({path}); pip install -e . builds it with nvcc")
    return path


def test_library_exports_exactly_the_header_functions():
    path = _built_library()
    if shutil.which("nm") is None:
        pytest.skip("nm is not installed")
    out = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True,
                         check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.strip()}
    public = {name for name in exported if not name.startswith("_")}
    assert public == set(_header_functions())


def test_library_loads_and_reports_its_abi_version():
    path = _built_library()
    lib = ctypes.CDLL(str(path))
    assert lib.qk_abi_version() == cuda.ABI_VERSION
    lib.qk_error_string.restype = ctypes.c_char_p
    assert lib.qk_error_string(1) == b"invalid argument"


def test_library_rejects_bad_arguments_before_touching_cuda():
    """Argument errors come back as cudaErrorInvalidValue (1) without any CUDA call."""
    _built_library()
    cuda._reset_for_tests()
    lib = cuda.library()
    assert lib.qk_quantize_int8_f32(None, None, -1, None, None, 0, None) == 1
    assert lib.qk_quantize_int8_blockwise_f32(None, None, 10, 48, None, None, 0, None) == 1
    assert lib.qk_dequantize_int8_per_channel_f32(None, None, -2, 3, 4, None, 0, None) == 1
    assert lib.qk_abs_histogram_f32(None, 0, 0, 1.0, None, None, None, None, 0, None) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_no_gpu_means_not_available():
    assert not cuda.available()
    if cuda.library_path().is_file():
        assert cuda.device_count() == 0


# --------------------------------------------------------------------------------- loader


@pytest.fixture
def library_at(monkeypatch):
    """Point the loader at another path for one test."""
    def point(path):
        monkeypatch.setenv("QUANTKIT_CUDA_LIBRARY", str(path))
        cuda._reset_for_tests()

    yield point
    cuda._reset_for_tests()


def test_missing_library_raises_with_build_instructions(library_at, tmp_path):
    library_at(tmp_path / "absent.so")
    with pytest.raises(RuntimeError, match=r"not built .*nvcc.*pip install"):
        cuda.library()
    assert not cuda.available()


def test_unloadable_library_raises_with_build_instructions(library_at, tmp_path):
    bogus = tmp_path / "bogus.so"
    bogus.write_bytes(b"not a shared object")
    library_at(bogus)
    with pytest.raises(RuntimeError, match=r"cannot be loaded.*nvcc"):
        cuda.library()


def test_importing_the_backend_starts_no_cuda():
    code = ("import torch, quantkit, quantkit.backends.cuda as c, quantkit._torch_ops; "
            "print(torch.cuda.is_initialized(), c._library is None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.split() == ["False", "True"]


# ------------------------------------------------------------------------ argument checks


def test_wrappers_want_cuda_tensors():
    x = torch.ones(4)
    for call in (lambda: cuda.quantize(x, 1.0), lambda: cuda.absmax(x),
                 lambda: cuda.abs_histogram(x, 8, 1.0), lambda: cuda.quantize(x.numpy(), 1.0)):
        with pytest.raises(TypeError, match="must be a CUDA torch tensor"):
            call()
    q = ops.quantize(x, 1.0)
    with pytest.raises(TypeError, match="must be a CUDA torch tensor"):
        cuda.dequantize(q.data, q.scale)
    with pytest.raises(TypeError, match="must be a QTensor"):
        ops.dequantize(x)

def _quantize(x, alpha, **kwargs):
    """The CUDA backend's (codes, scale) as a QTensor, as quantkit.quantize returns them."""
    data, scale = cuda.quantize(x, alpha, **kwargs)
    axis, block_size, _ = _arrays.granularity(tuple(x.shape), kwargs.get("axis"),
                                              kwargs.get("block_size"))
    return quantkit.QTensor(data, scale, axis=axis, block_size=block_size)


def _dequantize(q, out=None):
    """The CUDA backend's dequantize of a QTensor's fields."""
    return cuda.dequantize(q.data, q.scale, axis=q.axis, block_size=q.block_size, out=out)



BAD_QUANTIZE_ARGS = [
    dict(alpha=[1.0, 2.0]),                       # per tensor wants a scalar
    dict(alpha=np.ones(3), axis=1),               # wrong channel count
    dict(alpha=np.ones(5), axis=2),               # axis out of range
    dict(alpha=np.ones(5), axis=1.0),             # axis not an int
    dict(alpha=1.0, axis=0, block_size=64),       # both granularities
    dict(alpha=np.ones(1), block_size=48),        # not a power of two
    dict(alpha=np.ones(1), block_size=8192),      # too large
    dict(alpha=np.ones(2), block_size=64),        # wrong block count
    dict(alpha=-1.0),                             # negative
    dict(alpha=float("nan")),                     # not finite
    dict(alpha=1e39),                             # overflows float32
    dict(alpha=1e-38),                            # 127 / alpha would overflow float32
    dict(alpha=True),                             # a bool
    dict(alpha="1"),                              # not a number
]


@pytest.mark.parametrize("kwargs", BAD_QUANTIZE_ARGS, ids=str)
def test_quantize_argument_errors_match_ops(kwargs):
    """prepare_quantize (the CUDA wrapper's checks) raises exactly what quantkit.ops raises."""
    x = torch.zeros(4, 5)
    kwargs = dict(kwargs)
    alpha = kwargs.pop("alpha")
    with pytest.raises((TypeError, ValueError)) as expected:
        ops.quantize(x, alpha, **kwargs)
    with pytest.raises(expected.type) as got:
        cuda.prepare_quantize(x, alpha, **kwargs)
    assert str(got.value) == str(expected.value)


def test_quantize_rejects_integer_input_like_ops():
    x = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(TypeError) as expected:
        ops.quantize(x, 1.0)
    with pytest.raises(TypeError) as got:
        cuda.prepare_quantize(x, 1.0)
    assert str(got.value) == str(expected.value)


def test_prepare_quantize_gives_the_reference_multipliers():
    alpha = np.array([0.0, 1.0, 3.0, 1e-36], np.float32)
    axis, block_size, inv, scale = cuda.prepare_quantize(torch.zeros(2, 4), alpha, axis=-1)
    assert (axis, block_size) == (1, None)
    assert np.array_equal(inv, reference.inv_scale_from_alpha(alpha))
    assert np.array_equal(scale, reference.scale_from_alpha(alpha))
    assert cuda.prepare_quantize(torch.zeros(130), np.ones(3), block_size=64)[1] == 64


def test_channel_view():
    assert cuda.channel_view((2, 3, 4, 5), 0) == (1, 2, 60)
    assert cuda.channel_view((2, 3, 4, 5), 2) == (6, 4, 5)
    assert cuda.channel_view((2, 3, 4, 5), 3) == (24, 5, 1)
    assert cuda.channel_view((7,), 0) == (1, 7, 1)


def test_dense_permutation():
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert cuda.dense_permutation(x) == (0, 1, 2)
    assert cuda.dense_permutation(x.transpose(0, 2)) == (2, 1, 0)
    perm = cuda.dense_permutation(x.permute(1, 2, 0))
    assert x.permute(1, 2, 0).permute(perm).is_contiguous()
    assert cuda.dense_permutation(x[:, :, ::2]) is None
    for view in (x, x.transpose(0, 2), x.permute(1, 2, 0), x[:, 1:, ::2]):
        dense, perm = cuda._dense(view, keep_layout=True)
        assert dense.is_contiguous()
        assert torch.equal(dense.permute(cuda._inverse(perm)), view)


def test_histogram_argument_checks():
    assert cuda.histogram_inv_width(2048, 4.0) == np.float32(512.0)
    for bins, hi, error in [(0, 1.0, ValueError), (True, 1.0, TypeError), (2.0, 1.0, TypeError),
                            (cuda.MAX_HISTOGRAM_BINS + 1, 1.0, ValueError), (8, 0.0, ValueError),
                            (8, float("inf"), ValueError), (8, -1.0, ValueError),
                            (2048, 1e-45, ValueError)]:
        with pytest.raises(error):
            cuda.histogram_inv_width(bins, hi)


def test_candidate_scales_match_numba_calib():
    from quantkit.backends import numba_calib

    alphas = np.array([0.0, 3.7321948e-37, 1e-30, 0.1, 1.0, 3.0, 127.0, 3.4e38], np.float32)
    scale, inv = cuda.candidate_scales(alphas)
    for a, s, i in zip(alphas, scale, inv):
        expected = numba_calib.scale_inv(a)
        assert (s, i) == (np.float32(expected[0]), np.float32(expected[1])), a
    for bad in ([1.0, float("nan")], [-1.0], [1e-38]):
        with pytest.raises(ValueError):
            cuda.candidate_scales(bad)


def test_calibration_kernels_delegate_host_functions():
    """The GPU search runs its passes over the data on the device and the host model of numba."""
    from quantkit import calibration
    from quantkit.backends import numba_calib

    assert cuda.LOG_HISTOGRAM_BINS == numba_calib.HIST_BINS
    assert calibration._args.host_kernels().model_search is numba_calib.model_search
    k = calibration.gpu.cuda_kernels()
    assert isinstance(k, calibration.FlatKernels)
    assert k.absmax is cuda.absmax_flat and k.sse_fixed_many is cuda.sse_fixed_many
    assert k.sample_pieces is None and k.scan_tail is None and k.sse_chunked_many is None


def test_nonfinite_error_matches_the_cpu_message():
    x = torch.zeros(3, 4, 5)
    x[1, 2, 3] = float("-inf")
    x[2, 0, 0] = float("nan")
    expected = _arrays.nonfinite_error(x.numpy(), 2)
    assert str(cuda.nonfinite_error(x, 2)) == str(expected)
    assert "(1, 2, 3)" in str(expected)


# =============================================================================== on a GPU

gpu = pytest.mark.gpu
DEVICE = "cuda"


def _cpu(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def _same(got, expected, what="codes"):
    got = _cpu(got) if isinstance(got, torch.Tensor) else np.asarray(got)
    expected = np.asarray(expected)
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    bad = np.count_nonzero(~((got == expected) | (np.isnan(got) & np.isnan(expected)))
                           if got.dtype.kind == "f" else got != expected)
    assert bad == 0, f"{what}: {bad} of {got.size} elements differ"


def _layout(x: np.ndarray, how: str):
    """x on the GPU as a tensor with the given memory layout (same values)."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    if how == "plain":
        return t.to(DEVICE)
    if how == "transpose" and x.ndim >= 2:
        return t.transpose(0, -1).contiguous().to(DEVICE).transpose(0, -1)
    if how == "sliced":
        wide = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=torch.float32, device=DEVICE)
        wide[..., ::2] = t.to(DEVICE)
        return wide[..., ::2]
    if how == "offset":  # storage offset of one element: not 16-byte aligned, the scalar path
        base = torch.zeros(x.size + 1, dtype=torch.float32, device=DEVICE)
        base[1:] = t.reshape(-1).to(DEVICE)
        return base[1:].reshape(x.shape)
    return t.to(DEVICE)


LAYOUTS = ["plain", "transpose", "sliced", "offset"]


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
    _same(cuda.absmax(_layout(x, how), block_size=block), reference.absmax_per_block(x, block),
          "absmax")


def _random(n, seed=0, alpha=3.0):
    """Normal data with exact ties, +-alpha and zeros mixed in."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    scale = np.float32(alpha) / np.float32(127)
    pick = rng.random(n)
    x = np.where(pick < 0.1, (rng.integers(-130, 130, n) + np.float32(0.5)) * scale, x)
    x = np.where(pick > 0.95, np.float32(alpha) * rng.choice([-1, 1, 0], n), x)
    return x.astype(np.float32)


SIZES = [1, 31, 2**20 + 7]


def _check_dequantize_offset(q, expected):
    """Dequantize the same codes from a view one byte into its storage (the element-wise path)."""
    base = torch.empty(q.data.numel() + 1, dtype=torch.int8, device=q.data.device)
    base[1:] = q.data.reshape(-1)
    shifted = quantkit.QTensor(base[1:].reshape(q.data.shape), q.scale, axis=q.axis,
                               block_size=q.block_size)
    _same(_dequantize(shifted), expected, "values from unaligned codes")


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
        _same(cuda.absmax(xt, block_size=block), a, "absmax per block")
        q = _quantize(xt, a, block_size=block)
        _same(q.data, reference.quantize_blockwise(x, a, block))
        expected = reference.dequantize_blockwise(_cpu(q.data), _cpu(q.scale), block)
        _same(_dequantize(q), expected, "values")
        _check_dequantize_offset(q, expected)
    _same(cuda.absmax(xt), np.float32(np.abs(x).max()), "absmax")
    # per channel on 2-D views of the same data, both axes, rows long and short
    for rows in (1, 7, 257):
        m = (n // rows) * rows
        if m == 0:
            continue
        x2 = x[:m].reshape(rows, -1)
        for axis in (0, 1):
            a = np.abs(x2).max(axis=1 - axis).astype(np.float32)
            t2 = _layout(x2, how)
            _same(cuda.absmax(t2, axis=axis), a, "absmax per channel")
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
                     lambda t: cuda.absmax(t), lambda t: cuda.abs_histogram(t, 64, 4.0)):
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
            _same(cuda.absmax(_layout(x, how), axis=axis), np.abs(x).max(axis=other), "absmax")
    assert float(cuda.absmax(torch.zeros(0, device=DEVICE))) == 0.0
    assert cuda.absmax(torch.zeros(3, 0, device=DEVICE), axis=0).tolist() == [0.0, 0.0, 0.0]
    assert cuda.absmax(torch.zeros(3, 0, device=DEVICE), axis=1).shape == (0,)
    assert cuda.absmax(torch.zeros(0, device=DEVICE), block_size=64).shape == (0,)


def _histogram_reference(x: np.ndarray, bins: int, hi: float):
    a = np.abs(x.astype(np.float32))
    inv_width = np.float32(bins) / np.float32(hi)
    t = a * inv_width  # float32 product, as the kernel
    b = np.where(t < np.float32(bins), np.floor(t), bins - 1).astype(np.int64)
    counts = np.bincount(b, minlength=bins)
    a64 = a.astype(np.float64)
    return counts, np.bincount(b, a64, bins), np.bincount(b, a64 * a64, bins)


@gpu
@pytest.mark.parametrize("bins", [1, 100, 2048, 2049, 65536])
@pytest.mark.parametrize("n", [31, 2**20 + 7])
def test_gpu_abs_histogram(bins, n):
    x = _random(n, seed=bins)
    hi = float(np.abs(x).max()) * 0.9  # some values beyond hi: they land in the last bin
    for how in ("plain", "offset"):
        counts, sums, sumsq = cuda.abs_histogram(_layout(x, how), bins, hi)
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
    k = cuda  # absmax_flat, histogram_log, sse_fixed_many: calibration.FlatKernels
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
    assert float(cuda.absmax(x)) == float(x.abs().max())
    blocks = cuda.absmax(x, block_size=4096)
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


# ======================================================= the kernels, emulated on the CPU
# csrc/*.cu compiled with g++ against csrc/host_emulation.h (python3 csrc/build.py --emulate): the
# same kernels, launchers and C ABI on host memory, with each block run as 256 threads (barriers
# for __syncthreads and warp shuffles). This checks the kernels' logic without a GPU: indexing,
# tails, both alignment paths, reductions and the arithmetic. It does not replace the GPU tests.


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    import importlib.util

    spec = importlib.util.spec_from_file_location("quantkit_csrc_build", ROOT / "csrc" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    path = build.build_emulation(tmp_path_factory.mktemp("emu") / "emulated.so", quiet=True)
    lib = ctypes.CDLL(str(path))
    cuda._declare(lib)
    return lib


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
    inv_width = cuda.histogram_inv_width(bins, hi)
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
    scale, inv = cuda.candidate_scales(alphas)
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
        for lo in range(0, alphas.size, cuda.MAX_SSE_CANDIDATES):
            k = min(cuda.MAX_SSE_CANDIDATES, alphas.size - lo)
            _ok(emu.qk_sse_fixed_many_f32(_ptr(xs), n, _ptr(scale[lo:]), _ptr(inv[lo:]), k,
                                          unit_inv, _ptr(sse[lo:]), _ptr(bad), 0, None))
        _same(sse.astype(np.int64), expected_sse, "sse")


# ------------------------------------------- the Python wrappers over the emulated kernels
# quantkit.backends.cuda run end to end on CPU tensors: only the device checks, the library and the
# stream are swapped for the emulation, so the wrappers' own logic (layouts, axes, out=, errors,
# readback) is exercised as it will be on a GPU.


@pytest.fixture
def emulated_backend(emu, monkeypatch):
    monkeypatch.setattr(cuda, "library", lambda: emu)
    monkeypatch.setattr(cuda, "_require_cuda", lambda t, name: None)
    monkeypatch.setattr(cuda, "_stream", lambda device: 0)
    return cuda


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
    _same(cuda.absmax(t), np.float32(np.abs(x).max()), "absmax")
    for axis in range(-len(shape), len(shape)):
        other = tuple(k for k in range(len(shape)) if k != axis % len(shape))
        alpha = np.abs(x).max(axis=other).astype(np.float32)
        _same(cuda.absmax(t, axis=axis), alpha, "absmax per channel")
        q = _quantize(t, alpha, axis=axis)
        assert q.axis == axis % len(shape)
        _same(q.data, reference.quantize_per_channel(x, alpha, axis % len(shape)))
        _same(_dequantize(q), reference.dequantize_per_channel(
            _cpu(q.data), _cpu(q.scale), axis % len(shape)), "values per channel")
    alpha = reference.absmax_per_block(x, 64)
    _same(cuda.absmax(t, block_size=64), alpha, "absmax per block")
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
                 lambda: cuda.absmax(torch.from_numpy(bad), axis=0),
                 lambda: cuda.abs_histogram(torch.from_numpy(bad), 10, 1.0),
                 lambda: cuda.abs_histogram_log(torch.from_numpy(bad)),
                 lambda: cuda.sse_fixed_many(torch.from_numpy(bad), [1.0], 1.0)):
        with pytest.raises(ValueError) as got:
            call()
        assert str(got.value) == str(expected.value)
    counts, sums, sumsq = cuda.abs_histogram(t, 50, 2.0)
    c, s, s2 = _histogram_reference(x.reshape(-1), 50, 2.0)
    _same(counts, c, "counts")
    np.testing.assert_allclose(sums.numpy(), s, rtol=1e-10)
    np.testing.assert_allclose(sumsq.numpy(), s2, rtol=1e-10)
    from quantkit.backends import numba_calib

    expected_log = [np.zeros(numba_calib.HIST_BINS, np.int64) for _ in range(3)]
    numba_calib.histogram_log(x.reshape(-1), 1, *expected_log)
    for got, want in zip(cuda.abs_histogram_log(t), expected_log):
        _same(got, want, "log histogram")
    alphas = np.linspace(0.5, 4.0, 40).astype(np.float32)  # three passes of 16 candidates
    unit_inv = numba_calib.unit_inverse(np.float32(np.abs(x).max()), x.size)
    _same(cuda.sse_fixed_many(t, alphas, unit_inv),
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


def _calibration_data(kind: str, n: int = 70_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "student_t2":  # heavy tails
        return rng.standard_t(2, n).astype(np.float32)
    if kind == "outliers":
        x = rng.standard_normal(n).astype(np.float32)
        x[rng.random(n) < 1e-3] *= np.float32(60)
        return x
    if kind == "bfloat16":  # at most 7 mantissa bits: the exact search on the histogram's bins
        x = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
        return x.bfloat16().float().numpy()
    if kind == "scaled_integers":  # few distinct values, one per bin: the exhaustive search
        return (rng.integers(-100, 101, n) * np.float32(1.37)).astype(np.float32)
    if kind == "zeros_and_subnormals":  # bin 0 holds zeros and subnormals: zeros counted on device
        x = rng.standard_normal(n + 20_000).astype(np.float32)
        x[:15_000] = 0.0
        x[15_000:15_100] = np.float32(1e-41)
        x[15_100:15_200] = np.float32(-0.0)
        return x
    raise AssertionError(kind)


MSE_CASES = ["normal", "student_t2", "outliers", "bfloat16", "scaled_integers",
             "zeros_and_subnormals"]


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


UNSUPPORTED = [
    (dict(method="mse", axis=0), 'method="mse" per channel'),
    (dict(method="mse", block_size=64), 'method="mse" per block'),
    (dict(method="percentile"), 'method="percentile" per tensor'),
    (dict(method="percentile", axis=1, percentile=99.0), 'method="percentile" per channel'),
    (dict(method="entropy"), 'method="entropy" per tensor'),
    (dict(method="entropy", block_size=128), 'method="entropy" per block'),
]


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
    monkeypatch.setattr(calibration._arrays, "kind_of", lambda x: _arrays.TORCH_CUDA)
    assert quantkit.calibrate(torch.ones(4), "percentile", axis=0) == 1.5
    assert seen == [("percentile", dict(axis=0, block_size=None, percentile=99.99))]


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
