"""What the int8 Linear product tests share: the paths and the skip rule for a path this machine
cannot run."""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
import pytest

from quantkit import matmul
from quantkit.backends import native_cpu

INT8_PATHS = ("amx", "vnni", "avx2", "generic", "int_mm", "float")
FUSED_PATHS = ("amx", "vnni", "avx2", "generic")


def skip_unless_runnable(path: str) -> None:
    """pytest.skip unless this machine can run ``path`` (the reason names what is missing)."""
    if path in FUSED_PATHS:
        reason = native_cpu.unavailable_reason()
        if reason is not None:
            pytest.skip(reason)
        if not native_cpu.path_supported(path):
            need = {"vnni": "AVX-512 BW/VL and VNNI",
                    "amx": "AMX-INT8 (with the tile state granted by the OS)"}.get(path, "AVX2/FMA")
            pytest.skip(f"this CPU ({matmul.cpu_info()['model']}) lacks {need} for {path!r}")


def guarded(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``a`` whose last byte is followed by an inaccessible page: a kernel
    that reads past the end crashes the test instead of passing on whatever lies there."""
    page = mmap.PAGESIZE
    a = np.ascontiguousarray(a)
    total = -(-max(a.nbytes, 1) // page) * page + page
    buf = mmap.mmap(-1, total, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mprotect(ctypes.c_void_p(base + total - page), ctypes.c_size_t(page), 0) != 0:
        pytest.skip(f"mprotect failed (errno {ctypes.get_errno()})")
    out = np.frombuffer(buf, dtype=a.dtype, count=a.size,
                        offset=total - page - a.nbytes).reshape(a.shape)
    out[...] = a
    return out

