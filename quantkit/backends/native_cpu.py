"""CPU backend for the int8 Linear: the csrc/cpu library (``_libquantkit_cpu.so``), via ctypes.

Two products, each with a portable C path (``"generic"``), an AVX2 + FMA path (``"avx2"``) and,
for the int8 x int8 products, an AVX-512 VNNI path (``"vnni"``; the weight-only product runs its
AVX2 kernel there), all giving identical bits (csrc/cpu/linear_int8.c states the arithmetic):

* :func:`gemm_s8s8s32`: ``C = A @ B.T`` exactly in int32, A (M, K) and B (N, K) int8 codes in
  [-127, 127];
* :func:`linear_w8a8_f32`: that product rescaled, ``Y = float32(C) * (s_x[:, None] * s_w) + bias``,
  without writing C to memory;
* :func:`linear_w8_f32`: ``Y = float32(X @ float32(W).T) * s + bias`` reading the int8 weight once
  (no float32 copy of it), float32 lane sums in a fixed order.

The library is built at install time by ``setup.py`` (``python3 csrc/build.py --cpu`` rebuilds
it). :func:`unavailable_reason` says why it cannot be used (not built, stale), and the caller
(:mod:`quantkit.matmul`) then chooses a torch-based product. Arrays are NumPy; the wrappers check
dtypes, shapes and strides and never modify their inputs.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import numpy as np

ABI_VERSION = 5
LIBRARY_PATH = Path(__file__).resolve().parent.parent / "_libquantkit_cpu.so"
BUILD_HINT = ("Reinstall quantkit with a C compiler present (pip install -e .) or run "
              "`python3 csrc/build.py --cpu` in its source tree.")
PATHS = {"generic": 0, "avx2": 1, "vnni": 2, "amx": 3}

#: Feature bits of qk_cpu_features().
FEATURE_AVX2 = 1
FEATURE_AVX512 = 2
FEATURE_AVX512_VNNI = 4
#: AMX-TILE and AMX-INT8, with the tile state granted to this process by the OS (Linux).
FEATURE_AMX_INT8 = 8
#: Rows of at most this many int8 values sum exactly in int32: -2^31 <= 128 * -(2^24), 127 * 2^24
#: < 2^31.
MAX_SUM_K = 1 << 24

_ERR_UNSUPPORTED = 1
_ERR_ARGUMENT = 2
_ERR_MEMORY = 3

_lock = threading.Lock()
_library = None
_failure = None


def library_path() -> Path:
    return Path(os.environ.get("QUANTKIT_CPU_LIBRARY") or LIBRARY_PATH)


def _declare(lib) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.qk_cpu_abi_version.argtypes = []
    lib.qk_cpu_abi_version.restype = i32
    lib.qk_cpu_features.argtypes = []
    lib.qk_cpu_features.restype = i32
    lib.qk_cpu_gemm_s8s8s32.argtypes = [i32, i64, i64, i64, p, i64, p, i64, p, p, i64, i32]
    lib.qk_cpu_gemm_s8s8s32.restype = i32
    lib.qk_cpu_linear_w8_f32.argtypes = [i32, i64, i64, i64, p, i64, p, i64, p, p, p, i64, i32]
    lib.qk_cpu_linear_w8_f32.restype = i32
    lib.qk_cpu_linear_w8a8_f32.argtypes = [i32, i64, i64, i64, p, i64, p, i64, p, p, p, p, p,
                                           i64, i32]
    lib.qk_cpu_linear_w8a8_f32.restype = i32
    lib.qk_cpu_linear_w8b_f32.argtypes = [i32, i64, i64, i64, p, i64, p, i64, p, i64, p, p, i64,
                                          i32]
    lib.qk_cpu_linear_w8b_f32.restype = i32
    lib.qk_cpu_linear_w8a8b_f32.argtypes = [i32, i64, i64, i64, p, i64, p, i64, p, p, i64, p, p,
                                            i64, i32]
    lib.qk_cpu_linear_w8a8b_f32.restype = i32


def _load():
    global _library, _failure
    with _lock:
        if _library is not None or _failure is not None:
            return
        path = library_path()
        if not path.is_file():
            _failure = f"quantkit's CPU library is not built ({path} does not exist). " + BUILD_HINT
            return
        try:
            lib = ctypes.CDLL(str(path))
            _declare(lib)
        except (OSError, AttributeError) as exc:
            _failure = f"quantkit's CPU library at {path} cannot be loaded ({exc}). " + BUILD_HINT
            return
        version = lib.qk_cpu_abi_version()
        if version != ABI_VERSION:
            _failure = (f"quantkit's CPU library at {path} has ABI version {version}, this "
                        f"quantkit needs {ABI_VERSION}: it is stale. " + BUILD_HINT)
            return
        _library = lib


def unavailable_reason():
    """None when the library is loaded and usable, else a sentence saying why not."""
    _load()
    return _failure


def library():
    """The loaded library; RuntimeError (with build instructions) when it is unusable."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    return _library


def _reset_for_tests() -> None:
    """Forget the loaded library and any failure (tests point QUANTKIT_CPU_LIBRARY elsewhere)."""
    global _library, _failure
    with _lock:
        _library = None
        _failure = None


def features() -> int:
    """The CPU's feature bits as the library detects them (cpuid): FEATURE_* or-ed together."""
    return int(library().qk_cpu_features())


def path_supported(path: str) -> bool:
    """Whether this CPU can run ``path`` ("generic" always; "avx2" needs AVX2 and FMA; "vnni"
    also AVX-512 F/BW/VL and AVX-512 VNNI; "amx" also AMX-TILE and AMX-INT8, granted by the OS)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {sorted(PATHS)}, got {path!r}")
    bits = features()
    if path in ("vnni", "amx"):
        need = FEATURE_AVX2 | FEATURE_AVX512 | FEATURE_AVX512_VNNI
        if path == "amx":
            need |= FEATURE_AMX_INT8
        return bits & need == need
    return path == "generic" or bool(bits & FEATURE_AVX2)


def _rows_view(a: np.ndarray, dtype, name: str) -> np.ndarray:
    """``a`` as 2-D rows with unit element stride (a copy only where the layout needs one)."""
    if a.dtype != dtype:
        raise TypeError(f"{name} must be {np.dtype(dtype).name}, got {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    gapped = a.strides[0] % a.itemsize or a.strides[0] < 0
    overlapping = a.shape[0] > 1 and a.strides[0] < a.shape[1] * a.itemsize
    if (a.shape[1] > 1 and a.strides[1] != a.itemsize) or gapped or overlapping:
        a = np.ascontiguousarray(a)
    return a


def _ld(a: np.ndarray) -> int:
    return max(a.strides[0] // a.itemsize, a.shape[1])


#: What each accelerated path needs beyond AVX2 and FMA, for the error message.
_NEEDS = {"vnni": "AVX-512 BW/VL and VNNI",
          "amx": "AVX-512 BW/VL, VNNI and AMX-INT8 granted by the OS"}


def _check(code: int, path: str) -> None:
    if code == _ERR_UNSUPPORTED:
        need = _NEEDS.get(path, "AVX2 and FMA")
        raise RuntimeError(f"the {path!r} int8 kernels cannot run on this CPU (they need {need})")
    if code == _ERR_MEMORY:
        raise MemoryError("quantkit's CPU library could not allocate its work buffers")
    if code != 0:
        raise ValueError(f"quantkit's CPU library rejected the arguments (error {code})")


def row_sums(b: np.ndarray) -> np.ndarray:
    """``sum_k b[j, k]`` of each row of an int8 (N, K) array, exactly, as C-contiguous int32 (N,):
    what the "vnni" kernels subtract (DESIGN.md section 6), for callers that keep it."""
    b = _rows_view(b, np.int8, "b")
    if b.shape[1] > MAX_SUM_K:
        raise ValueError(f"rows of {b.shape[1]} int8 values can sum beyond int32 (at most "
                         f"{MAX_SUM_K})")
    return np.ascontiguousarray(b.sum(axis=1, dtype=np.int32))


def _sums_pointer(sums, n: int):
    """The address of ``sums`` (int32 (n,), C-contiguous) for the C call; None passes NULL."""
    if sums is None:
        return None
    if (not isinstance(sums, np.ndarray) or sums.dtype != np.int32 or sums.shape != (n,)
            or not sums.flags.c_contiguous):
        raise ValueError(f"b_row_sums must be a C-contiguous int32 array of shape {(n,)} "
                         f"(row_sums(b))")
    return sums.ctypes.data


def gemm_s8s8s32(a: np.ndarray, b: np.ndarray, *, path: str = "avx2", threads: int = 1,
                 out: np.ndarray | None = None, b_row_sums: np.ndarray | None = None) -> np.ndarray:
    """``a @ b.T`` exactly in int32: a (M, K) and b (N, K) int8 with codes in [-127, 127].

    Returns a C-contiguous int32 (M, N) array (``out`` when given). ``b_row_sums``
    (:func:`row_sums` of b, kept by the caller) spares the "vnni" path its pass over b; it must be
    b's: other paths ignore it.
    """
    a = _rows_view(a, np.int8, "a")
    b = _rows_view(b, np.int8, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a is {a.shape} and b is {b.shape}: their second dimensions differ")
    m, n = a.shape[0], b.shape[0]
    if out is None:
        out = np.empty((m, n), np.int32)
    elif out.dtype != np.int32 or out.shape != (m, n) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous int32 array of shape {(m, n)}")
    sums = _sums_pointer(b_row_sums, n)
    code = library().qk_cpu_gemm_s8s8s32(
        PATHS[path], m, n, a.shape[1], a.ctypes.data, _ld(a), b.ctypes.data, _ld(b), sums,
        out.ctypes.data, n, int(threads))
    _check(code, path)
    return out


def _vector(v, n: int, name: str) -> np.ndarray:
    v = np.ascontiguousarray(v, np.float32)
    if v.shape != (n,):
        raise ValueError(f"{name} must have shape {(n,)}, got {v.shape}")
    return v


def _block_scales(scale, n: int, k: int, block_size: int, name: str) -> np.ndarray:
    """``scale`` as a C-contiguous float32 (n, k / block_size) array of per-block scales."""
    if block_size <= 0 or k % block_size:
        raise ValueError(f"block_size must be a positive divisor of K = {k}, got {block_size}")
    scale = np.ascontiguousarray(scale, np.float32)
    if scale.shape != (n, k // block_size):
        raise ValueError(f"{name} must have shape {(n, k // block_size)} (one scale per block of "
                         f"{block_size} weights of each row), got {scale.shape}")
    return scale


def linear_w8a8_f32(a: np.ndarray, b: np.ndarray, s_a: np.ndarray, s_b: np.ndarray, bias=None,
                    *, block_size: int | None = None, path: str = "avx2", threads: int = 1,
                    b_row_sums: np.ndarray | None = None) -> np.ndarray:
    """``float32(a @ b.T) * (s_a[:, None] * s_b[None, :]) + bias`` with the product exact in int32.

    a (M, K) and b (N, K) int8 codes in [-127, 127]; s_a float32 (M,), s_b and bias float32 (N,),
    bias None adds nothing. Each float32 operation is rounded once, in that order. Returns a
    C-contiguous float32 (M, N) array.

    With ``block_size`` B (a divisor of K), ``s_b`` is (N, K / B), one scale per block of B weights
    of a row, and ``y = t * s_a[:, None] + bias`` with ``t = sum_g float32(C_g) * s_b[:, g]``
    accumulated in float32 from 0 in block order, ``C_g`` the exact int32 product over block g.

    ``b_row_sums`` as in :func:`gemm_s8s8s32` (per-row scales only: None with ``block_size``).
    """
    a = _rows_view(a, np.int8, "a")
    b = _rows_view(b, np.int8, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a is {a.shape} and b is {b.shape}: their second dimensions differ")
    m, n = a.shape[0], b.shape[0]
    s_a = _vector(s_a, m, "s_a")
    bias = None if bias is None else _vector(bias, n, "bias")
    out = np.empty((m, n), np.float32)
    bias_ptr = None if bias is None else bias.ctypes.data
    if block_size is None:
        s_b = _vector(s_b, n, "s_b")
        code = library().qk_cpu_linear_w8a8_f32(
            PATHS[path], m, n, a.shape[1], a.ctypes.data, _ld(a), b.ctypes.data, _ld(b),
            _sums_pointer(b_row_sums, n), s_a.ctypes.data, s_b.ctypes.data, bias_ptr,
            out.ctypes.data, n, int(threads))
    else:
        if b_row_sums is not None:
            raise ValueError("b_row_sums applies to per-row scales only (block_size is None)")
        s_b = _block_scales(s_b, n, a.shape[1], int(block_size), "s_b")
        code = library().qk_cpu_linear_w8a8b_f32(
            PATHS[path], m, n, a.shape[1], a.ctypes.data, _ld(a), b.ctypes.data, _ld(b),
            s_a.ctypes.data, s_b.ctypes.data, int(block_size), bias_ptr, out.ctypes.data, n,
            int(threads))
    _check(code, path)
    return out


def linear_w8_f32(x: np.ndarray, w: np.ndarray, scale: np.ndarray, bias=None, *,
                  block_size: int | None = None, path: str = "avx2",
                  threads: int = 1) -> np.ndarray:
    """``float32(x @ float32(w).T) * scale + bias`` with w (N, K) int8, x (M, K) float32.

    ``scale`` and ``bias`` are float32 (N,); bias None adds nothing. Returns a C-contiguous float32
    (M, N) array.

    With ``block_size`` B (a multiple of 8 dividing K), ``scale`` is (N, K / B), one scale per block
    of B weights of a row, and ``y = x @ (float32(w) * scale_per_weight).T + bias``: each weight is
    dequantized (one rounding) before it enters the sum.
    """
    x = _rows_view(x, np.float32, "x")
    w = _rows_view(w, np.int8, "w")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x is {x.shape} and w is {w.shape}: their second dimensions differ")
    m, n = x.shape[0], w.shape[0]
    bias = None if bias is None else _vector(bias, n, "bias")
    out = np.empty((m, n), np.float32)
    bias_ptr = None if bias is None else bias.ctypes.data
    if block_size is None:
        scale = _vector(scale, n, "scale")
        code = library().qk_cpu_linear_w8_f32(
            PATHS[path], m, n, x.shape[1], x.ctypes.data, _ld(x), w.ctypes.data, _ld(w),
            scale.ctypes.data, bias_ptr, out.ctypes.data, n, int(threads))
    else:
        if int(block_size) % 8:
            raise ValueError(f"block_size must be a multiple of 8, got {block_size}")
        scale = _block_scales(scale, n, x.shape[1], int(block_size), "scale")
        code = library().qk_cpu_linear_w8b_f32(
            PATHS[path], m, n, x.shape[1], x.ctypes.data, _ld(x), w.ctypes.data, _ld(w),
            scale.ctypes.data, int(block_size), bias_ptr, out.ctypes.data, n, int(threads))
    _check(code, path)
    return out
