"""The compiled csrc library (``quantkit/_libquantkit_cuda.so``) through ctypes: loading it, its C
signatures, and the outcome of a launch (its error code, then its count of non-finite inputs).

The library is built ahead of time by ``setup.py`` when ``nvcc`` is found (never on first use). It
is loaded on the first CUDA call, not on import, and importing this module initialises no CUDA. If
the library is missing, cannot be loaded or cannot run on this machine, a CUDA input gets a
RuntimeError that says how to build it; CPU work is unaffected.

Every launch runs on torch's current stream of the tensor's device (:func:`stream`,
:func:`device_index`). Quantize and the statistics count non-finite inputs in the same pass; the
caller reads back that one count (8 bytes, a synchronisation) and raises ValueError if it is not 0
(:func:`check_finite`).
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import numpy as np
import torch

#: Must equal QK_ABI_VERSION in csrc/quantkit.h.
ABI_VERSION = 1

LIBRARY_NAME = "_libquantkit_cuda.so"
#: Where setup.py puts the library; the environment variable QUANTKIT_CUDA_LIBRARY overrides it.
LIBRARY_PATH = Path(__file__).resolve().parent.parent / LIBRARY_NAME

BUILD_HINT = ("Build it on a machine with nvcc (CUDA toolkit) on PATH: `pip install -e .` (or "
              "`pip install .`) compiles csrc/ into quantkit/_libquantkit_cuda.so, as does "
              "`python3 csrc/build.py`. Or move the tensor to the CPU with .cpu().")

# cudaError_t values with a more useful explanation than the runtime's string.
_ERROR_ADVICE = {
    35: "the NVIDIA driver is older than the CUDA runtime the library was built with; rebuild "
        "the library with an nvcc no newer than the driver supports",
    100: "no CUDA device is visible to the library",
    209: "the library has no kernels for this GPU's architecture; rebuild it with this machine's "
         "nvcc (python3 csrc/build.py --arch <sm>)",
    222: "the driver cannot JIT the library's PTX; rebuild it with this machine's nvcc",
}

_lock = threading.Lock()
_library = None


# ----------------------------------------------------------------------------- the library


def library_path() -> Path:
    return Path(os.environ.get("QUANTKIT_CUDA_LIBRARY") or LIBRARY_PATH)


def declare(lib) -> None:
    """ctypes signatures of the C ABI (csrc/quantkit.h) but the optimizer's (cuda_optim)."""
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    f32 = ctypes.c_float
    signatures = {
        "qk_device_count": [p],
        "qk_quantize_int8_f32": [p, p, i64, p, p, i32, p],
        "qk_quantize_int8_per_channel_f32": [p, p, i64, i64, i64, p, p, i32, p],
        "qk_quantize_int8_blockwise_f32": [p, p, i64, i64, p, p, i32, p],
        "qk_dequantize_int8_f32": [p, p, i64, p, i32, p],
        "qk_dequantize_int8_per_channel_f32": [p, p, i64, i64, i64, p, i32, p],
        "qk_dequantize_int8_blockwise_f32": [p, p, i64, i64, p, i32, p],
        "qk_absmax_f32": [p, i64, p, p, i32, p],
        "qk_absmax_per_channel_f32": [p, i64, i64, i64, p, p, i32, p],
        "qk_absmax_blockwise_f32": [p, i64, i64, p, p, i32, p],
        "qk_abs_histogram_f32": [p, i64, i64, f32, p, p, p, p, i32, p],
        "qk_abs_histogram_log_f32": [p, i64, p, p, p, p, i32, p],
        "qk_sse_fixed_many_f32": [p, i64, p, p, i64, ctypes.c_double, p, p, i32, p],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    lib.qk_abi_version.argtypes = []
    lib.qk_abi_version.restype = ctypes.c_int
    lib.qk_error_string.argtypes = [ctypes.c_int]
    lib.qk_error_string.restype = ctypes.c_char_p


def library():
    """The loaded library (ctypes.CDLL); RuntimeError with build instructions when unusable.

    Loading runs no CUDA call; the first kernel launch initialises the library's CUDA runtime.
    """
    global _library
    if _library is not None:
        return _library
    with _lock:
        if _library is None:
            path = library_path()
            if not path.is_file():
                raise RuntimeError(f"quantkit's CUDA library is not built ({path} does not exist). "
                                   + BUILD_HINT)
            try:
                lib = ctypes.CDLL(str(path))
                declare(lib)
            except (OSError, AttributeError) as exc:
                raise RuntimeError(f"quantkit's CUDA library at {path} cannot be loaded ({exc}). "
                                   + BUILD_HINT) from None
            version = lib.qk_abi_version()
            if version != ABI_VERSION:
                raise RuntimeError(f"quantkit's CUDA library at {path} has ABI version {version}, "
                                   f"this quantkit needs {ABI_VERSION}: it is stale. " + BUILD_HINT)
            _library = lib
    return _library


def _reset_for_tests() -> None:
    """Forget the loaded library (tests point QUANTKIT_CUDA_LIBRARY elsewhere)."""
    global _library
    with _lock:
        _library = None


def error_string(code: int) -> str:
    return library().qk_error_string(int(code)).decode()


def device_count() -> int:
    """CUDA devices the library's runtime sees; RuntimeError if the library is missing."""
    count = ctypes.c_int(0)
    code = library().qk_device_count(ctypes.byref(count))
    if code in (35, 100):  # no driver / no device: none usable, not an error here
        return 0
    check(code, "device query")
    return count.value


def available() -> bool:
    """True when the library loads and sees at least one GPU (never raises)."""
    try:
        return device_count() > 0
    except RuntimeError:
        return False


# ------------------------------------------------------------------------------- launching


def stream(device) -> int:
    """torch's current stream on ``device`` (a cudaStream_t as an int; 0 is the default stream)."""
    return torch.cuda.current_stream(device).cuda_stream


def device_index(device) -> int:
    """The CUDA device number of ``device`` (a CUDA tensor's device always has one)."""
    return device.index if device.index is not None else 0


def check(code: int, what: str) -> None:
    """RuntimeError naming ``what`` and the CUDA error when a launch returned ``code != 0``."""
    if code == 0:
        return
    message = f"quantkit's CUDA {what} failed: {error_string(code)} (cudaError {code})"
    if code in _ERROR_ADVICE:
        message += f"; {_ERROR_ADVICE[code]}"
    raise RuntimeError(message)


def read_count(counter) -> int:
    """The value of a one-element int64 device counter (synchronises with the stream)."""
    return int(counter.item())


def nonfinite_error(x, count: int, name: str = "x") -> ValueError:
    """The error of :func:`quantkit._arrays.nonfinite_error`, found on the device (no host copy)."""
    flat_bad = ~torch.isfinite(x.reshape(-1))
    first = int(torch.argmax(flat_bad.to(torch.uint8)))  # argmax returns the first maximum
    index = tuple(int(i) for i in np.unravel_index(first, tuple(x.shape))) if x.dim() else ()
    value = np.float32(x.reshape(-1)[first].item())
    return ValueError(f"{name} has {count} non-finite value(s) (NaN or Inf); the first is "
                      f"{value} at index {index}")


def check_finite(code: int, what: str, counter, x32) -> None:
    """After a launch that counts non-finite inputs: its error code, then the count (ValueError
    naming the first NaN/Inf of ``x32`` when there are any)."""
    check(code, what)
    bad = read_count(counter)
    if bad:
        raise nonfinite_error(x32, bad)
