"""The CUDA backend's C header and compiled library: the header's constants against
quantkit/_constants.py, the library's exported symbols against the header and the ctypes
declarations, its ABI version and its argument checks (no GPU needed)."""

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from quantkit import _constants
from quantkit.backends import cuda_library, cuda_optim, cuda_stats
from cuda_cases import _header_defines, _header_functions, _int


# ------------------------------------------------------------------------ header and library


def test_header_constants_match_python():
    defines = _header_defines()
    assert _int(defines["QK_QMAX"]) == _constants.QMAX
    assert _int(defines["QK_MIN_BLOCK_SIZE"]) == _constants.MIN_BLOCK_SIZE
    assert _int(defines["QK_MAX_BLOCK_SIZE"]) == _constants.MAX_BLOCK_SIZE
    assert _int(defines["QK_ABI_VERSION"]) == cuda_library.ABI_VERSION
    assert _int(defines["QK_MAX_HISTOGRAM_BINS"]) == cuda_stats.MAX_HISTOGRAM_BINS
    assert _int(defines["QK_MAX_SSE_CANDIDATES"]) == cuda_stats.MAX_SSE_CANDIDATES
    from quantkit.backends import numba_calib

    assert _int(defines["QK_LOG_HISTOGRAM_BINS"]) == cuda_stats.LOG_HISTOGRAM_BINS
    assert cuda_stats.LOG_HISTOGRAM_BINS == numba_calib.HIST_BINS
    assert _int(defines["QK_LOG_HISTOGRAM_SHIFT"]) == numba_calib.HIST_SHIFT
    min_alpha = defines["QK_MIN_POSITIVE_ALPHA"]
    assert re.fullmatch(r"[\d.e+-]+f", min_alpha), min_alpha
    assert np.float32(min_alpha[:-1]) == np.float32(_constants.MIN_POSITIVE_ALPHA)
    max_alpha = defines["QK_MAX_ALPHA"]
    assert re.fullmatch(r"[\d.e+-]+f", max_alpha), max_alpha
    assert np.float32(max_alpha[:-1]) == np.float32(_constants.MAX_ALPHA)


def test_ctypes_declarations_match_header():
    functions = _header_functions()
    assert len(functions) >= 13
    lib = type("FakeLib", (), {})()
    for name in functions:
        setattr(lib, name, type("Fn", (), {})())
    cuda_library.declare(lib)
    cuda_optim.declare(lib)            # the optimizer's entry points (csrc/optim.cu)
    for name, n_params in functions.items():
        assert len(getattr(lib, name).argtypes) == n_params, name


def _built_library() -> Path:
    path = cuda_library.library_path()
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
    assert lib.qk_abi_version() == cuda_library.ABI_VERSION
    lib.qk_error_string.restype = ctypes.c_char_p
    assert lib.qk_error_string(1) == b"invalid argument"


def test_library_rejects_bad_arguments_before_touching_cuda():
    """Argument errors come back as cudaErrorInvalidValue (1) without any CUDA call."""
    _built_library()
    cuda_library._reset_for_tests()
    lib = cuda_library.library()
    assert lib.qk_quantize_int8_f32(None, None, -1, None, None, 0, None) == 1
    assert lib.qk_quantize_int8_blockwise_f32(None, None, 10, 48, None, None, 0, None) == 1
    assert lib.qk_dequantize_int8_per_channel_f32(None, None, -2, 3, 4, None, 0, None) == 1
    assert lib.qk_abs_histogram_f32(None, 0, 0, 1.0, None, None, None, None, 0, None) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_no_gpu_means_not_available():
    assert not cuda_library.available()
    if cuda_library.library_path().is_file():
        assert cuda_library.device_count() == 0
