"""The public quantize / dequantize entry points: check arguments, then dispatch by array kind.

NumPy arrays and CPU tensors run on the numba kernels (CPU tensors zero-copy through ``.numpy()``);
CUDA tensors run on the compiled CUDA library. Scales and multipliers come from
:mod:`quantkit.reference`, so every backend uses the very same float32 values.
"""

from __future__ import annotations

import numpy as np

from . import _arrays, reference
from .qtensor import QTensor


def _backend(kind: str):
    """The module that runs kernels for arrays of ``kind``, imported on first use."""
    if kind == _arrays.TORCH_CUDA:
        from .backends import cuda

        return cuda
    from .backends import numba_cpu

    return numba_cpu


def _checked_out(out, kind: str, shape: tuple, dtype, name: str = "out"):
    """The caller's output buffer as a NumPy array, after checking it fits."""
    if out is None:
        return None
    if _arrays.kind_of(out) != kind:
        raise TypeError(f"{name} must be the same kind of array as the input ({kind})")
    array = out.numpy() if kind == _arrays.TORCH_CPU else out
    if array.dtype != dtype or tuple(array.shape) != tuple(shape) or not array.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype)} array of shape "
                         f"{tuple(shape)}, got {array.dtype} {tuple(array.shape)}")
    return array


def quantize(x, alpha, *, axis=None, block_size=None, out=None) -> QTensor:
    """Quantize ``x`` to int8: ``q = clamp(rint(x * float32(127 / alpha)), -127, 127)``.

    Args:
        x: float32 NumPy array or torch tensor, any shape and strides (float16, bfloat16 and float64
            are converted to float32 first). Must be finite: NaN/Inf raise ValueError.
        alpha: clipping range(s), finite and >= 0. A scalar per tensor; with ``axis=k`` one per slice
            along axis k (``x.shape[k]`` entries); with ``block_size=B`` one per block of B
            consecutive elements of the C-order flattening (``ceil(x.size / B)`` entries).
            ``alpha == 0`` gives codes 0 and scale 0.
        axis: channel axis for per-channel quantization.
        block_size: power of two in [64, 4096] for blockwise quantization.
        out: optional C-contiguous int8 array of x's shape (same kind as x) to write the codes to.

    Returns:
        QTensor with int8 ``data`` of x's shape and float32 ``scale = float32(alpha / 127)``.
    """
    kind = _arrays.kind_of(x)
    if kind == _arrays.TORCH_CUDA:
        return _backend(kind).quantize(x, alpha, axis=axis, block_size=block_size, out=out)
    x32 = _arrays.float32_numpy(x)
    axis, block_size, alpha_shape = _arrays.granularity(x32.shape, axis, block_size)
    alpha32 = _arrays.alpha_array(alpha, alpha_shape)
    scale = reference.scale_from_alpha(alpha32)
    out_array = _checked_out(out, kind, x32.shape, np.int8)
    if x32.size == 0:
        codes = out_array if out_array is not None else np.empty(x32.shape, np.int8)
    else:
        inv = reference.inv_scale_from_alpha(alpha32)
        codes, bad = _backend(kind).quantize_int8_numba(x32, inv, axis=axis, block_size=block_size,
                                                        out=out_array)
        if bad:
            raise _arrays.nonfinite_error(x32, bad)
    data = out if out is not None else _arrays.wrap_like(codes, kind)
    return QTensor(data, _arrays.wrap_like(scale, kind), axis=axis, block_size=block_size)


def dequantize(q: QTensor, *, out=None):
    """``float32(q.data) * q.scale`` (broadcast by granularity), the same kind as ``q.data``.

    out: optional C-contiguous float32 array of q's shape (same kind as q.data) for the result.
    """
    if not isinstance(q, QTensor):
        raise TypeError(f"q must be a QTensor, got {type(q).__name__}")
    kind = _arrays.kind_of(q.data)
    if kind == _arrays.TORCH_CUDA:
        return _backend(kind).dequantize(q, out=out)
    codes = q.data.numpy() if kind == _arrays.TORCH_CPU else q.data
    scale = q.scale.numpy() if kind == _arrays.TORCH_CPU else q.scale
    out_array = _checked_out(out, kind, codes.shape, np.float32)
    if codes.size == 0:
        values = out_array if out_array is not None else np.empty(codes.shape, np.float32)
    else:
        values = _backend(kind).dequantize_int8_numba(codes, scale, axis=q.axis,
                                                      block_size=q.block_size, out=out_array)
    return out if out is not None else _arrays.wrap_like(values, kind)
