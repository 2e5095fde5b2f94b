"""CUDA backend of the 8-bit AdamW step: the C ABI of csrc/optim.cu over torch CUDA tensors.

A leaf: it is handed the loaded library and a stream by its caller (:mod:`quantkit.optim`) and
imports nothing of quantkit. The kernels compute exactly ``numba_optim.adamw8bit_step`` and
``numba_optim.adamw32_step`` (csrc/optim.cu states the arithmetic); the caller has checked the
gradient (finite, at most 2**60 in magnitude) and the shapes.
"""

from __future__ import annotations

import ctypes

import numpy as np

_declared = set()


def declare(lib) -> None:
    """Set the argument and result types of the optimizer entry points of ``lib`` (once)."""
    if id(lib) in _declared:
        return
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.qk_adamw8bit_step_f32.argtypes = [p, p, p, p, p, p, i64, i64, i64, i32, i32, i32, i32,
                                          p, i32, p]
    lib.qk_adamw8bit_step_f32.restype = i32
    lib.qk_adamw32_step_f32.argtypes = [p, p, p, p, i64, p, i32, p]
    lib.qk_adamw32_step_f32.restype = i32
    lib.qk_error_string.argtypes = [i32]
    lib.qk_error_string.restype = ctypes.c_char_p
    _declared.add(id(lib))


def _check(lib, code: int, what: str) -> None:
    if code != 0:
        message = lib.qk_error_string(code)
        raise RuntimeError(f"{what} failed on the GPU: "
                           f"{message.decode() if message else f'error {code}'}")


def _device_index(t) -> int:
    return t.device.index or 0 if t.device.type == "cuda" else 0


def adamw8bit_step(lib, stream, p, g, m_codes, m_absmax, r_codes, r_absmax, block_size: int,
                   m_code: tuple, r_code: tuple, scalars) -> None:
    """In place on contiguous (rows, L) ``p`` (float32) with ``g``; states as the CPU kernel's."""
    values = np.ascontiguousarray(scalars, np.float32)
    rows, length = p.shape
    code = lib.qk_adamw8bit_step_f32(
        p.data_ptr(), g.data_ptr(), m_codes.data_ptr(), m_absmax.data_ptr(), r_codes.data_ptr(),
        r_absmax.data_ptr(), rows, length, block_size, *m_code, *r_code, values.ctypes.data,
        _device_index(p), stream)
    _check(lib, code, "the 8-bit AdamW step")


def adamw32_step(lib, stream, p, g, m, r, scalars) -> None:
    """In place on contiguous float32 ``p``, ``m``, ``r`` (one size) with gradient ``g``."""
    values = np.ascontiguousarray(scalars, np.float32)
    code = lib.qk_adamw32_step_f32(p.data_ptr(), g.data_ptr(), m.data_ptr(), r.data_ptr(),
                                   p.numel(), values.ctypes.data, _device_index(p), stream)
    _check(lib, code, "the float32-state AdamW step")
