"""CUDA backend: the compiled csrc library (``quantkit/_libquantkit_cuda.so``), through ctypes.

The library is built ahead of time by ``setup.py`` when ``nvcc`` is found (never on first use). It
is loaded on the first CUDA call, not on import, and importing this module initialises no CUDA. If
the library is missing, cannot be loaded or cannot run on this machine, a CUDA input gets a
RuntimeError that says how to build it; CPU work is unaffected.

Every function takes CUDA torch tensors, runs on the tensor's device and on torch's current stream
there, and returns CUDA tensors. Multipliers and scales are computed on the host by
:mod:`quantkit.reference` (so every backend uses the same float32 values) and copied to the device;
the kernels only multiply. Quantize and the statistics count non-finite inputs in the same pass; the
wrapper reads back that one count (8 bytes, a synchronisation) and raises ValueError if it is not 0.

Layouts: as in the numba backend, an input that is a permutation of a dense tensor (a transpose, a
``W.t()`` view) is processed in place and the result keeps its layout; any other strides are copied
to C order first; blockwise always works on the C-order flattening.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import numpy as np
import torch

from .. import _arrays, reference
from .._constants import HIST_BINS, MIN_POSITIVE_ALPHA, QMAX

#: Must equal QK_ABI_VERSION in csrc/quantkit.h.
ABI_VERSION = 1
#: Largest bin count of :func:`abs_histogram` (QK_MAX_HISTOGRAM_BINS in csrc/quantkit.h).
MAX_HISTOGRAM_BINS = 1 << 20
#: Bins of :func:`abs_histogram_log` (QK_LOG_HISTOGRAM_BINS; the numba kernels' HIST_BINS).
LOG_HISTOGRAM_BINS = HIST_BINS
#: Candidates per pass of :func:`sse_fixed_many` (QK_MAX_SSE_CANDIDATES).
MAX_SSE_CANDIDATES = 16

LIBRARY_NAME = "_libquantkit_cuda.so"
#: Where setup.py puts the library; the environment variable QUANTKIT_CUDA_LIBRARY overrides it.
LIBRARY_PATH = Path(__file__).resolve().parent.parent / LIBRARY_NAME

BUILD_HINT = ("Build it on a machine with nvcc (CUDA toolkit) on PATH: `pip install -e .` (or "
              "`pip install .`) compiles csrc/ into quantkit/_libquantkit_cuda.so, as does "
              "`python3 csrc/build.py`. Or move the tensor to the CPU with .cpu().")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

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


def _declare(lib) -> None:
    """ctypes signatures of the C ABI (csrc/quantkit.h)."""
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
                _declare(lib)
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


def _check(code: int, what: str) -> None:
    if code == 0:
        return
    message = f"quantkit's CUDA {what} failed: {error_string(code)} (cudaError {code})"
    if code in _ERROR_ADVICE:
        message += f"; {_ERROR_ADVICE[code]}"
    raise RuntimeError(message)


def device_count() -> int:
    """CUDA devices the library's runtime sees; RuntimeError if the library is missing."""
    count = ctypes.c_int(0)
    code = library().qk_device_count(ctypes.byref(count))
    if code in (35, 100):  # no driver / no device: none usable, not an error here
        return 0
    _check(code, "device query")
    return count.value


def available() -> bool:
    """True when the library loads and sees at least one GPU (never raises)."""
    try:
        return device_count() > 0
    except RuntimeError:
        return False


# --------------------------------------------------------------------- argument checking
# Pure functions of shapes, dtypes and host values: they run the same checks as quantkit.ops and
# are tested on the CPU.


def _require_cuda(t, name: str):
    if not _arrays.is_torch_tensor(t) or t.device.type != "cuda":
        raise TypeError(f"{name} must be a CUDA torch tensor, got "
                        + (f"a tensor on {t.device}" if _arrays.is_torch_tensor(t)
                           else type(t).__name__))


def _check_float(x, name: str = "x") -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/"
                        f"float64), got {x.dtype}")


def _numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def channel_view(shape: tuple, axis: int) -> tuple:
    """(outer, channels, inner) sizes of ``shape`` around ``axis``."""
    return _numel(shape[:axis]), int(shape[axis]), _numel(shape[axis + 1:])


def dense_permutation(t):
    """Axes order ``perm`` with ``t.permute(perm)`` contiguous, or None when there is none."""
    if t.is_contiguous():
        return tuple(range(t.dim()))
    strides, shape = t.stride(), t.shape
    perm = tuple(sorted(range(t.dim()), key=lambda k: (-strides[k], -shape[k])))
    return perm if t.permute(perm).is_contiguous() else None


def _inverse(perm) -> tuple:
    return tuple(int(i) for i in np.argsort(perm))


def _dense(t, *, keep_layout: bool):
    """(a contiguous tensor holding t's elements, perm) with ``t == dense.permute(inverse(perm))``.

    Without ``keep_layout`` (a caller's ``out``, blockwise) the identity order is used.
    """
    identity = tuple(range(t.dim()))
    perm = dense_permutation(t) if keep_layout else None
    if perm is None:
        return t.contiguous(), identity
    return t.permute(perm), perm


def check_out(out, shape: tuple, dtype, device, name: str = "out"):
    """The caller's output tensor, after checking it is a contiguous CUDA tensor that fits."""
    if out is None:
        return None
    _require_cuda(out, name)
    if out.device != device:
        raise ValueError(f"{name} is on {out.device}, the input on {device}")
    if out.dtype != dtype or tuple(out.shape) != tuple(shape) or not out.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)}, got "
                         f"{out.dtype} {tuple(out.shape)}" + ("" if out.is_contiguous()
                                                              else " (not contiguous)"))
    return out


def prepare_quantize(x, alpha, axis=None, block_size=None):
    """Checks for :func:`quantize`: returns (axis, block_size, inv_scale, scale) as float32 NumPy.

    ``x`` only needs ``shape`` and ``dtype`` here (any device); alpha may live anywhere.
    """
    _check_float(x)
    axis, block_size, alpha_shape = _arrays.granularity(tuple(x.shape), axis, block_size)
    alpha32 = _arrays.alpha_array(alpha, alpha_shape)
    return (axis, block_size, reference.inv_scale_from_alpha(alpha32),
            reference.scale_from_alpha(alpha32))


def nonfinite_error(x, count: int, name: str = "x") -> ValueError:
    """The error of :func:`quantkit._arrays.nonfinite_error`, found on the device (no host copy)."""
    flat_bad = ~torch.isfinite(x.reshape(-1))
    first = int(torch.argmax(flat_bad.to(torch.uint8)))  # argmax returns the first maximum
    index = tuple(int(i) for i in np.unravel_index(first, tuple(x.shape))) if x.dim() else ()
    value = np.float32(x.reshape(-1)[first].item())
    return ValueError(f"{name} has {count} non-finite value(s) (NaN or Inf); the first is "
                      f"{value} at index {index}")


# ------------------------------------------------------------------------------- launching


def _stream(device) -> int:
    """torch's current stream on ``device`` (a cudaStream_t as an int; 0 is the default stream)."""
    return torch.cuda.current_stream(device).cuda_stream


def _index(device) -> int:
    """The CUDA device number of ``device`` (a CUDA tensor's device always has one)."""
    return device.index if device.index is not None else 0


def _device_array(a: np.ndarray, device):
    """A float32 host array as a 1-D device tensor (at least one element)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(-1)).to(device)


def _as_float32(x):
    x = x.detach()
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def _read_count(counter) -> int:
    return int(counter.item())  # synchronises with the stream


def _check_finite(code: int, what: str, counter, x32) -> None:
    """After a launch that counts non-finite inputs: its error code, then the count (ValueError
    naming the first NaN/Inf of ``x32`` when there are any)."""
    _check(code, what)
    bad = _read_count(counter)
    if bad:
        raise nonfinite_error(x32, bad)


# ------------------------------------------------------------------------------ public API


def quantize(x, alpha, *, axis=None, block_size=None, out=None) -> tuple:
    """int8 codes of the CUDA tensor ``x`` (see :func:`quantkit.quantize`), computed on its device.

    Returns ``(codes, scale)``: int8 codes of x's shape and the float32 scales, CUDA tensors on x's
    device (``quantkit.ops.quantize`` wraps them in a QTensor).
    """
    _require_cuda(x, "x")
    axis, block_size, inv, scale = prepare_quantize(x, alpha, axis, block_size)
    device = x.device
    x32 = _as_float32(x)
    out = check_out(out, tuple(x32.shape), torch.int8, device)
    lib = library()
    dense, perm = _dense(x32, keep_layout=out is None and block_size is None)
    codes = out if out is not None else torch.empty(dense.shape, dtype=torch.int8, device=device)
    n = dense.numel()
    if n > 0:
        inv_d = _device_array(inv, device)
        counter = torch.empty(1, dtype=torch.int64, device=device)
        args = (counter.data_ptr(), _index(device), _stream(device))
        if axis is not None:
            outer, channels, inner = channel_view(tuple(dense.shape), perm.index(axis))
            code = lib.qk_quantize_int8_per_channel_f32(dense.data_ptr(), codes.data_ptr(), outer,
                                                        channels, inner, inv_d.data_ptr(), *args)
        elif block_size is not None:
            code = lib.qk_quantize_int8_blockwise_f32(dense.data_ptr(), codes.data_ptr(), n,
                                                      block_size, inv_d.data_ptr(), *args)
        else:
            code = lib.qk_quantize_int8_f32(dense.data_ptr(), codes.data_ptr(), n,
                                            inv_d.data_ptr(), *args)
        _check_finite(code, "quantize", counter, x32)
    data = out if out is not None else codes.permute(_inverse(perm))
    return data, torch.from_numpy(scale).to(device)


def dequantize(data, scale, *, axis=None, block_size=None, out=None):
    """float32 values ``float32(data) * scale`` of int8 codes held on a CUDA device.

    ``scale`` fits the granularity (``axis`` normalized to be >= 0, or ``block_size``), as a
    QTensor's does (``quantkit.ops.dequantize`` passes a QTensor's fields).
    """
    _require_cuda(data, "q.data")
    _require_cuda(scale, "q.scale")
    device = data.device
    if scale.device != device:
        raise ValueError(f"q.scale is on {scale.device}, q.data on {device}")
    out = check_out(out, tuple(data.shape), torch.float32, device)
    lib = library()
    dense, perm = _dense(data, keep_layout=out is None and block_size is None)
    values = out if out is not None else torch.empty(dense.shape, dtype=torch.float32,
                                                     device=device)
    n = dense.numel()
    if n > 0:
        scale = scale.detach().to(torch.float32).contiguous().reshape(-1)
        args = (_index(device), _stream(device))
        if axis is not None:
            outer, channels, inner = channel_view(tuple(dense.shape), perm.index(axis))
            code = lib.qk_dequantize_int8_per_channel_f32(dense.data_ptr(), values.data_ptr(),
                                                          outer, channels, inner,
                                                          scale.data_ptr(), *args)
        elif block_size is not None:
            code = lib.qk_dequantize_int8_blockwise_f32(dense.data_ptr(), values.data_ptr(), n,
                                                        block_size, scale.data_ptr(), *args)
        else:
            code = lib.qk_dequantize_int8_f32(dense.data_ptr(), values.data_ptr(), n,
                                              scale.data_ptr(), *args)
        _check(code, "dequantize")
    return out if out is not None else values.permute(_inverse(perm))


def absmax(x, *, axis=None, block_size=None):
    """max |x| per tensor (0-d), per channel along ``axis`` or per block, as float32 on x's device.

    The "max" calibration statistic, computed without copying ``x`` to the host. Non-finite
    values raise ValueError (as quantize does). An empty slice has |x|max 0.
    """
    _require_cuda(x, "x")
    _check_float(x)
    axis, block_size, out_shape = _arrays.granularity(tuple(x.shape), axis, block_size)
    device = x.device
    x32 = _as_float32(x)
    lib = library()
    dense, perm = _dense(x32, keep_layout=block_size is None)
    result = torch.empty(_numel(out_shape), dtype=torch.float32, device=device)
    counter = torch.empty(1, dtype=torch.int64, device=device)
    args = (result.data_ptr(), counter.data_ptr(), _index(device), _stream(device))
    n = dense.numel()
    if axis is not None:
        outer, channels, inner = channel_view(tuple(dense.shape), perm.index(axis))
        code = lib.qk_absmax_per_channel_f32(dense.data_ptr(), outer, channels, inner, *args)
    elif block_size is not None:
        code = lib.qk_absmax_blockwise_f32(dense.data_ptr(), n, block_size, *args)
    else:
        code = lib.qk_absmax_f32(dense.data_ptr(), n, *args)
    _check_finite(code, "absmax", counter, x32)
    return result.reshape(out_shape)


def histogram_inv_width(bins: int, hi) -> np.float32:
    """The bin multiplier ``float32(bins) / float32(hi)`` of the histogram kernel, checked."""
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)):
        raise TypeError(f"bins must be an int, got {type(bins).__name__}")
    if not 1 <= int(bins) <= MAX_HISTOGRAM_BINS:
        raise ValueError(f"bins must be in [1, {MAX_HISTOGRAM_BINS}], got {bins}")
    hi32 = np.float32(hi)
    if not (np.isfinite(hi32) and hi32 > 0):
        raise ValueError(f"hi must be finite and > 0 in float32, got {hi!r}")
    with np.errstate(over="ignore"):
        inv_width = np.float32(int(bins)) / hi32
    if not np.isfinite(inv_width):
        raise ValueError(f"hi={hi!r} is too small for {bins} bins (bins / hi overflows float32)")
    return np.float32(inv_width)


def abs_histogram(x, bins: int, hi):
    """Histogram of ``a = |x|`` over ``bins`` equal bins of ``[0, hi)``, on x's device.

    Bin of ``a``: ``t = float32(a * float32(bins / hi))``, ``floor(t)`` if ``t < bins``, else the
    last bin (``a >= hi`` lands in the last bin). Returns ``(counts, sums, sumsq)`` CUDA tensors of
    ``bins`` entries: int64 counts (exact), float64 sums of ``a`` and of ``a * a`` (added in an
    unspecified order: equal to a float64 reference up to rounding, not bit for bit). Non-finite
    values raise ValueError.
    """
    _require_cuda(x, "x")
    _check_float(x)
    inv_width = histogram_inv_width(bins, hi)
    bins = int(bins)
    device = x.device
    x32 = _as_float32(x)
    lib = library()
    dense, _ = _dense(x32, keep_layout=True)  # the order of elements does not matter
    counts = torch.empty(bins, dtype=torch.int64, device=device)
    sums = torch.empty(bins, dtype=torch.float64, device=device)
    sumsq = torch.empty(bins, dtype=torch.float64, device=device)
    counter = torch.empty(1, dtype=torch.int64, device=device)
    code = lib.qk_abs_histogram_f32(dense.data_ptr(), dense.numel(), bins, float(inv_width),
                                    counts.data_ptr(), sums.data_ptr(), sumsq.data_ptr(),
                                    counter.data_ptr(), _index(device), _stream(device))
    _check_finite(code, "histogram", counter, x32)
    return counts, sums, sumsq


# ------------------------------------------------------------- the "mse" calibration's kernels
# GPU versions of the numba_calib kernels behind calibration's per-tensor "mse" search. Both sum
# integers, so they equal the CPU kernels bit for bit whatever the order of the additions.


def abs_histogram_log(x):
    """Log histogram of ``|x|`` on x's device: ``(counts, sum_res, sum_res2)``, int64 CUDA tensors.

    Bin ``bits(|x|) >> 16`` (LOG_HISTOGRAM_BINS bins), residual ``r = bits(|x|) & 0xFFFF``; per bin
    the count, the sum of r and the sum of r^2, exactly as ``numba_calib.histogram_log``.
    Non-finite values raise ValueError.
    """
    _require_cuda(x, "x")
    _check_float(x)
    device = x.device
    x32 = _as_float32(x)
    lib = library()
    dense, _ = _dense(x32, keep_layout=True)
    counts, sum_res, sum_res2 = (torch.empty(LOG_HISTOGRAM_BINS, dtype=torch.int64, device=device)
                                 for _ in range(3))
    counter = torch.empty(1, dtype=torch.int64, device=device)
    code = lib.qk_abs_histogram_log_f32(dense.data_ptr(), dense.numel(), counts.data_ptr(),
                                        sum_res.data_ptr(), sum_res2.data_ptr(),
                                        counter.data_ptr(), _index(device), _stream(device))
    _check_finite(code, "log histogram", counter, x32)
    return counts, sum_res, sum_res2


def candidate_scales(alphas) -> tuple:
    """(scale, inv_scale) float32 arrays of candidate alphas, as ``numba_calib.scale_inv``.

    ``scale = float32(a / 127)``, ``inv = float32(127 / a)``, 0 where a == 0. Each alpha must be 0
    or at least MIN_POSITIVE_ALPHA (so inv is finite), as everywhere in quantkit.
    """
    a = np.asarray(alphas, dtype=np.float32).reshape(-1)
    tiny = (a > 0) & (a < np.float32(MIN_POSITIVE_ALPHA))
    if not (np.isfinite(a).all() and (a >= 0).all()) or tiny.any():
        raise ValueError(f"candidate alphas must be finite and 0 or >= {MIN_POSITIVE_ALPHA}")
    q = np.float32(QMAX)
    scale = (a / q).astype(np.float32)
    inv = np.zeros_like(a)
    np.divide(q, a, out=inv, where=a > 0)
    return scale, inv


def sse_fixed_many(x, alphas, unit_inv: float) -> np.ndarray:
    """Fixed-point error sums of x for each candidate alpha, as ``numba_calib.sse_fixed_many``.

    For each finite element, ``a = |x|``, ``e = a - min(rint(a * inv), 127) * scale`` in float32 and
    ``int64(float64(e)^2 * unit_inv)`` summed as integers. Returns an int64 NumPy array (one entry
    per alpha; MAX_SSE_CANDIDATES alphas per pass over x). Non-finite values raise ValueError.
    """
    _require_cuda(x, "x")
    _check_float(x)
    unit_inv = float(unit_inv)
    if not (np.isfinite(unit_inv) and unit_inv >= 0):
        raise ValueError(f"unit_inv must be finite and >= 0, got {unit_inv!r}")
    scale, inv = candidate_scales(alphas)
    device = x.device
    x32 = _as_float32(x)
    lib = library()
    dense, _ = _dense(x32, keep_layout=True)
    scale_d, inv_d = _device_array(scale, device), _device_array(inv, device)
    sums = torch.empty(max(1, scale.size), dtype=torch.int64, device=device)
    counter = torch.empty(1, dtype=torch.int64, device=device)
    for lo in range(0, scale.size, MAX_SSE_CANDIDATES):
        k = min(MAX_SSE_CANDIDATES, scale.size - lo)
        code = lib.qk_sse_fixed_many_f32(dense.data_ptr(), dense.numel(),
                                         scale_d[lo:].data_ptr(), inv_d[lo:].data_ptr(), k,
                                         unit_inv, sums[lo:].data_ptr(), counter.data_ptr(),
                                         _index(device), _stream(device))
        _check_finite(code, "error sums", counter, x32)
    return sums[: scale.size].cpu().numpy()


def absmax_flat(flat) -> tuple:
    """(max |x| over the finite elements as float32, number of non-finite elements) of a CUDA
    tensor in any layout, as ``numba_calib.absmax_flat``; two scalars come back to the host."""
    _require_cuda(flat, "x")
    x32 = _as_float32(flat)
    dense, _ = _dense(x32, keep_layout=True)
    out = torch.empty(1, dtype=torch.float32, device=flat.device)
    counter = torch.empty(1, dtype=torch.int64, device=flat.device)
    code = library().qk_absmax_f32(dense.data_ptr(), dense.numel(), out.data_ptr(),
                                   counter.data_ptr(), _index(flat.device), _stream(flat.device))
    _check(code, "absmax")
    return np.float32(out.item()), _read_count(counter)


def histogram_log(flat, tasks, counts, sum_res, sum_res2) -> None:
    """Adds the log histogram of |flat| (a CUDA tensor) into the int64 NumPy arrays, as
    ``numba_calib.histogram_log`` does (``tasks`` is unused). Non-finite values raise ValueError."""
    del tasks
    for host, device_sums in zip((counts, sum_res, sum_res2), abs_histogram_log(flat)):
        host += device_sums.cpu().numpy()
