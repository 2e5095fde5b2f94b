"""numba kernels for the CPU: quantize and dequantize, per tensor, per channel and blockwise.

Each kernel computes exactly the arithmetic of :mod:`quantkit.reference` (it receives the float32
``inv_scale`` / ``scale`` computed there, so no division happens in a kernel) and the quantize kernels
count non-finite inputs in the same pass. The kernels are compiled on first call and cached on disk
(``cache=True``); importing this module compiles nothing.

Habits that keep the loops at memory bandwidth (see docs/PERF-NOTES.md):

* ``prange`` over chunks, and inside a chunk a loop over a slice view from 0, so LLVM emits plain
  vector loads instead of gathers;
* no ``fastmath`` (it would let LLVM assume there is no NaN/Inf and drop the non-finite count);
* the non-finite test is ``(v - v) != 0``: 0 for every finite ``v``, NaN (hence true) for NaN and Inf.

All wrappers take arrays in any memory layout. Where ``x`` is a permutation of a C-contiguous array
(a transpose, a ``W.t()`` view) the kernels run on the memory in place and the codes keep ``x``'s
layout; otherwise ``x`` is copied to C order first. Blockwise quantization is defined over the
C-order flattening, so it always works on a C-contiguous copy.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import _buffers
from .._constants import CHUNK, QMAX
from .numba_chunks import chunk_bounds, chunk_count

_LOW = np.float32(-QMAX)
_HIGH = np.float32(QMAX)


# --------------------------------------------------------------------------------------- kernels


@njit(parallel=True, cache=True)
def _quantize_flat(x, inv, out):
    """out[i] = clamp(rint(x[i] * inv)); returns the number of non-finite x[i]."""
    n = x.size
    n_chunks = chunk_count(n)
    bad = np.zeros(n_chunks, np.int64)
    for c in prange(n_chunks):
        lo, hi = chunk_bounds(c, n)
        xs = x[lo:hi]
        qs = out[lo:hi]
        count = 0
        for i in range(hi - lo):
            v = xs[i]
            count += (v - v) != 0
            r = np.rint(v * inv)
            qs[i] = np.int8(min(max(r, _LOW), _HIGH))
        bad[c] = count
    return bad.sum()


@njit(parallel=True, cache=True)
def _dequantize_flat(q, scale, out):
    """out[i] = float32(q[i]) * scale."""
    n = q.size
    n_chunks = chunk_count(n)
    for c in prange(n_chunks):
        lo, hi = chunk_bounds(c, n)
        qs = q[lo:hi]
        xs = out[lo:hi]
        for i in range(hi - lo):
            xs[i] = np.float32(qs[i]) * scale


@njit(parallel=True, cache=True)
def _quantize_rows(x, inv, out):
    """x, out: (rows, length); row r uses inv[r % inv.size]. Returns the non-finite count."""
    rows, length = x.shape
    channels = inv.size
    bad = np.zeros(rows, np.int64)
    for r in prange(rows):
        xs = x[r]
        qs = out[r]
        m = inv[r % channels]
        count = 0
        for i in range(length):
            v = xs[i]
            count += (v - v) != 0
            y = np.rint(v * m)
            qs[i] = np.int8(min(max(y, _LOW), _HIGH))
        bad[r] = count
    return bad.sum()


@njit(parallel=True, cache=True)
def _dequantize_rows(q, scale, out):
    """q, out: (rows, length); row r uses scale[r % scale.size]."""
    rows, length = q.shape
    channels = scale.size
    for r in prange(rows):
        qs = q[r]
        xs = out[r]
        s = scale[r % channels]
        for i in range(length):
            xs[i] = np.float32(qs[i]) * s


@njit(parallel=True, cache=True)
def _quantize_columns(x, inv, out):
    """x, out: (rows, length); column j uses inv[j]. Returns the non-finite count."""
    rows, length = x.shape
    bad = np.zeros(rows, np.int64)
    for r in prange(rows):
        xs = x[r]
        qs = out[r]
        count = 0
        for j in range(length):
            v = xs[j]
            count += (v - v) != 0
            y = np.rint(v * inv[j])
            qs[j] = np.int8(min(max(y, _LOW), _HIGH))
        bad[r] = count
    return bad.sum()


@njit(parallel=True, cache=True)
def _dequantize_columns(q, scale, out):
    """q, out: (rows, length); column j uses scale[j]."""
    rows, length = q.shape
    for r in prange(rows):
        qs = q[r]
        xs = out[r]
        for j in range(length):
            xs[j] = np.float32(qs[j]) * scale[j]


@njit(parallel=True, cache=True)
def _quantize_blocks(x, inv, block_size, out):
    """Flat x; block b = x[b*block_size : (b+1)*block_size] uses inv[b]. Returns non-finite count."""
    n = x.size
    n_blocks = inv.size
    per_task = max(1, CHUNK // block_size)
    n_tasks = (n_blocks + per_task - 1) // per_task
    bad = np.zeros(n_tasks, np.int64)
    for t in prange(n_tasks):
        count = 0
        for b in range(t * per_task, min((t + 1) * per_task, n_blocks)):
            lo = b * block_size
            hi = min(lo + block_size, n)
            xs = x[lo:hi]
            qs = out[lo:hi]
            m = inv[b]
            for i in range(hi - lo):
                v = xs[i]
                count += (v - v) != 0
                y = np.rint(v * m)
                qs[i] = np.int8(min(max(y, _LOW), _HIGH))
        bad[t] = count
    return bad.sum()


@njit(parallel=True, cache=True)
def _dequantize_blocks(q, scale, block_size, out):
    """Flat q; block b uses scale[b]."""
    n = q.size
    n_blocks = scale.size
    per_task = max(1, CHUNK // block_size)
    n_tasks = (n_blocks + per_task - 1) // per_task
    for t in prange(n_tasks):
        for b in range(t * per_task, min((t + 1) * per_task, n_blocks)):
            lo = b * block_size
            hi = min(lo + block_size, n)
            qs = q[lo:hi]
            xs = out[lo:hi]
            s = scale[b]
            for i in range(hi - lo):
                xs[i] = np.float32(qs[i]) * s


# ------------------------------------------------------------------------------------ layouts


def _dense_permutation(a: np.ndarray):
    """Axes order ``perm`` such that ``a.transpose(perm)`` is C-contiguous, or None if none exists."""
    if a.flags.c_contiguous:
        return tuple(range(a.ndim))
    if any(s < 0 for s in a.strides):
        return None
    perm = tuple(sorted(range(a.ndim), key=lambda k: (-a.strides[k], -a.shape[k])))
    return perm if a.transpose(perm).flags.c_contiguous else None


def _dense_view(x: np.ndarray, out=None):
    """(C-contiguous array holding x's elements, perm) with ``x == dense.transpose(inverse(perm))``.

    With a caller's ``out`` (C-contiguous, x's shape) the identity order is used.
    """
    perm = _dense_permutation(x) if out is None else None
    if perm is None:
        return np.ascontiguousarray(x), tuple(range(x.ndim))
    return x.transpose(perm), perm


def _undo(a: np.ndarray, perm) -> np.ndarray:
    return a.transpose(np.argsort(perm))


def _output_like(dense: np.ndarray, dtype, out):
    """A new C-contiguous array of dense's shape (large ones reuse cached memory, see
    quantkit._buffers), or the caller's ``out`` (already validated)."""
    if out is None:
        return _buffers.empty(dense.shape, dtype)
    return out


def _channel_rows(shape, axis):
    """(outer, channels, inner) sizes of ``shape`` around ``axis``."""
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
    return outer, shape[axis], inner


# Rows shorter than this go through the column kernel (one multiplier vector per row).
_MIN_ROW = 256


# ------------------------------------------------------------------------------------ wrappers
# Each quantize wrapper returns (codes, non_finite_count); codes keep x's shape. ``out``, when given,
# is a C-contiguous array of x's shape and the right dtype (checked by the caller).


def quantize_per_tensor_numba(x: np.ndarray, inv_scale: np.float32, out=None):
    """Codes for one multiplier ``inv_scale`` over the whole tensor."""
    dense, perm = _dense_view(x, out)
    codes = _output_like(dense, np.int8, out)
    bad = _quantize_flat(dense.reshape(-1), np.float32(inv_scale), codes.reshape(-1))
    return _undo(codes, perm), int(bad)


def dequantize_per_tensor_numba(q: np.ndarray, scale: np.float32, out=None):
    dense, perm = _dense_view(q, out)
    values = _output_like(dense, np.float32, out)
    _dequantize_flat(dense.reshape(-1), np.float32(scale), values.reshape(-1))
    return _undo(values, perm)


def _run_per_channel(rows_kernel, columns_kernel, a, vector, axis, out_dtype, out):
    dense, perm = _dense_view(a, out)
    axis = perm.index(axis)
    result = _output_like(dense, out_dtype, out)
    outer, channels, inner = _channel_rows(dense.shape, axis)
    if inner >= _MIN_ROW or outer * channels * inner == 0:
        ret = rows_kernel(dense.reshape(outer * channels, inner), vector,
                          result.reshape(outer * channels, inner))
    else:
        expanded = np.repeat(vector, inner) if inner > 1 else vector
        ret = columns_kernel(dense.reshape(outer, channels * inner), expanded,
                             result.reshape(outer, channels * inner))
    return _undo(result, perm), ret


def quantize_per_channel_numba(x: np.ndarray, inv_scale: np.ndarray, axis: int, out=None):
    """Codes with multiplier ``inv_scale[c]`` for slice ``c`` along ``axis``."""
    codes, bad = _run_per_channel(_quantize_rows, _quantize_columns, x, inv_scale, axis,
                                  np.int8, out)
    return codes, int(bad)


def dequantize_per_channel_numba(q: np.ndarray, scale: np.ndarray, axis: int, out=None):
    values, _ = _run_per_channel(_dequantize_rows, _dequantize_columns, q, scale, axis,
                                 np.float32, out)
    return values


def quantize_blockwise_numba(x: np.ndarray, inv_scale: np.ndarray, block_size: int, out=None):
    """Codes with multiplier ``inv_scale[b]`` for each block of the C-order flattening."""
    dense = np.ascontiguousarray(x).reshape(x.shape)  # ascontiguousarray makes 0-d arrays 1-d
    codes = _output_like(dense, np.int8, out)
    bad = _quantize_blocks(dense.reshape(-1), inv_scale, block_size, codes.reshape(-1))
    return codes, int(bad)


def dequantize_blockwise_numba(q: np.ndarray, scale: np.ndarray, block_size: int, out=None):
    dense = np.ascontiguousarray(q).reshape(q.shape)  # ascontiguousarray makes 0-d arrays 1-d
    values = _output_like(dense, np.float32, out)
    _dequantize_blocks(dense.reshape(-1), scale, block_size, values.reshape(-1))
    return values


def quantize_int8_numba(x: np.ndarray, inv_scale, *, axis=None, block_size=None, out=None):
    """Dispatch by granularity; returns (codes, non_finite_count)."""
    if axis is not None:
        return quantize_per_channel_numba(x, inv_scale, axis, out)
    if block_size is not None:
        return quantize_blockwise_numba(x, inv_scale, block_size, out)
    return quantize_per_tensor_numba(x, inv_scale, out)


def dequantize_int8_numba(q: np.ndarray, scale, *, axis=None, block_size=None, out=None):
    """Dispatch by granularity; returns float32 values of q's shape."""
    if axis is not None:
        return dequantize_per_channel_numba(q, scale, axis, out)
    if block_size is not None:
        return dequantize_blockwise_numba(q, scale, block_size, out)
    return dequantize_per_tensor_numba(q, scale, out)
