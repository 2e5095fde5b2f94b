"""The CUDA backend's loader and its Python wrappers' checks without a GPU: the loader's error
paths, and the wrappers' argument checks (the same errors as quantkit.ops)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from strategies import alphas

import quantkit
from quantkit import _arrays, ops, reference
from quantkit.backends import cuda_layout, cuda_library, cuda_quantize, cuda_stats
from cuda_cases import ROOT, _dequantize, _quantize


# --------------------------------------------------------------------------------- loader


@pytest.fixture
def library_at(monkeypatch):
    """Point the loader at another path for one test."""
    def point(path):
        monkeypatch.setenv("QUANTKIT_CUDA_LIBRARY", str(path))
        cuda_library._reset_for_tests()

    yield point
    cuda_library._reset_for_tests()


def test_missing_library_raises_with_build_instructions(library_at, tmp_path):
    library_at(tmp_path / "absent.so")
    with pytest.raises(RuntimeError, match=r"not built .*nvcc.*pip install"):
        cuda_library.library()
    assert not cuda_library.available()


def test_unloadable_library_raises_with_build_instructions(library_at, tmp_path):
    bogus = tmp_path / "bogus.so"
    bogus.write_bytes(b"not a shared object")
    library_at(bogus)
    with pytest.raises(RuntimeError, match=r"cannot be loaded.*nvcc"):
        cuda_library.library()


def test_importing_the_backend_starts_no_cuda():
    code = ("import torch, quantkit, quantkit._torch_ops, quantkit.calibration.gpu; "
            "from quantkit.backends import cuda_library as c, cuda_quantize, cuda_stats; "
            "print(torch.cuda.is_initialized(), c._library is None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.split() == ["False", "True"]


# ------------------------------------------------------------------------ argument checks


def test_wrappers_want_cuda_tensors():
    x = torch.ones(4)
    for call in (lambda: cuda_quantize.quantize(x, 1.0), lambda: cuda_quantize.absmax(x),
                 lambda: cuda_stats.abs_histogram(x, 8, 1.0),
                 lambda: cuda_quantize.quantize(x.numpy(), 1.0)):
        with pytest.raises(TypeError, match="must be a CUDA torch tensor"):
            call()
    q = ops.quantize(x, 1.0)
    with pytest.raises(TypeError, match="must be a CUDA torch tensor"):
        cuda_quantize.dequantize(q.data, q.scale)
    with pytest.raises(TypeError, match="must be a QTensor"):
        ops.dequantize(x)

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
        cuda_layout.prepare_quantize(x, alpha, **kwargs)
    assert str(got.value) == str(expected.value)


def test_quantize_rejects_integer_input_like_ops():
    x = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(TypeError) as expected:
        ops.quantize(x, 1.0)
    with pytest.raises(TypeError) as got:
        cuda_layout.prepare_quantize(x, 1.0)
    assert str(got.value) == str(expected.value)


def test_prepare_quantize_gives_the_reference_multipliers():
    alpha = np.array([0.0, 1.0, 3.0, 1e-36], np.float32)
    axis, block_size, inv, scale = cuda_layout.prepare_quantize(torch.zeros(2, 4), alpha, axis=-1)
    assert (axis, block_size) == (1, None)
    assert np.array_equal(inv, reference.inv_scale_from_alpha(alpha))
    assert np.array_equal(scale, reference.scale_from_alpha(alpha))
    assert cuda_layout.prepare_quantize(torch.zeros(130), np.ones(3), block_size=64)[1] == 64


def test_channel_view():
    assert cuda_layout.channel_view((2, 3, 4, 5), 0) == (1, 2, 60)
    assert cuda_layout.channel_view((2, 3, 4, 5), 2) == (6, 4, 5)
    assert cuda_layout.channel_view((2, 3, 4, 5), 3) == (24, 5, 1)
    assert cuda_layout.channel_view((7,), 0) == (1, 7, 1)


def test_dense_permutation():
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert cuda_layout.dense_permutation(x) == (0, 1, 2)
    assert cuda_layout.dense_permutation(x.transpose(0, 2)) == (2, 1, 0)
    perm = cuda_layout.dense_permutation(x.permute(1, 2, 0))
    assert x.permute(1, 2, 0).permute(perm).is_contiguous()
    assert cuda_layout.dense_permutation(x[:, :, ::2]) is None
    for view in (x, x.transpose(0, 2), x.permute(1, 2, 0), x[:, 1:, ::2]):
        dense, perm = cuda_layout.as_dense(view, keep_layout=True)
        assert dense.is_contiguous()
        assert torch.equal(dense.permute(cuda_layout.inverse_permutation(perm)), view)


def test_histogram_argument_checks():
    assert cuda_stats.histogram_inv_width(2048, 4.0) == np.float32(512.0)
    for bins, hi, error in [(0, 1.0, ValueError), (True, 1.0, TypeError), (2.0, 1.0, TypeError),
                            (cuda_stats.MAX_HISTOGRAM_BINS + 1, 1.0, ValueError),
                            (8, 0.0, ValueError), (8, float("inf"), ValueError),
                            (8, -1.0, ValueError), (2048, 1e-45, ValueError)]:
        with pytest.raises(error):
            cuda_stats.histogram_inv_width(bins, hi)


def test_candidate_scales_match_numba_calib():
    from quantkit.backends import numba_calib

    alphas = np.array([0.0, 3.7321948e-37, 1e-30, 0.1, 1.0, 3.0, 127.0, 3.4e38], np.float32)
    scale, inv = cuda_stats.candidate_scales(alphas)
    for a, s, i in zip(alphas, scale, inv):
        expected = numba_calib.scale_inv(a)
        assert (s, i) == (np.float32(expected[0]), np.float32(expected[1])), a
    for bad in ([1.0, float("nan")], [-1.0], [1e-38]):
        with pytest.raises(ValueError):
            cuda_stats.candidate_scales(bad)


def test_calibration_kernels_delegate_host_functions():
    """The GPU search runs its passes over the data on the device and the host model of numba."""
    from quantkit import calibration
    from quantkit.backends import numba_calib

    assert cuda_stats.LOG_HISTOGRAM_BINS == numba_calib.HIST_BINS
    assert calibration._args.host_kernels().model_search is numba_calib.model_search
    k = calibration.gpu.cuda_kernels()
    assert isinstance(k, calibration.FlatKernels)
    assert k.absmax is cuda_stats.absmax_flat and k.sse_fixed_many is cuda_stats.sse_fixed_many
    assert k.sample_pieces is None and k.scan_tail is None and k.sse_chunked_many is None


def test_nonfinite_error_matches_the_cpu_message():
    x = torch.zeros(3, 4, 5)
    x[1, 2, 3] = float("-inf")
    x[2, 0, 0] = float("nan")
    expected = _arrays.nonfinite_error(x.numpy(), 2)
    assert str(cuda_library.nonfinite_error(x, 2)) == str(expected)
    assert "(1, 2, 3)" in str(expected)

