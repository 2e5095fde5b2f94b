"""The public quantize / dequantize entry points: check arguments, then dispatch by array kind.

NumPy arrays and CPU tensors run on the numba kernels (CPU tensors zero-copy through ``.numpy()``);
CUDA tensors run on the compiled CUDA library. Scales and multipliers come from
:mod:`quantkit.reference`, so every backend uses the very same float32 values.
"""

from __future__ import annotations

import numpy as np

from . import _arrays, reference
from ._dispatch import backend as _backend, checked_out as _checked_out, dequantize_codes
from .qtensor import QTensor, with_checked_scales


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
    kind = _arrays.kind_of(x, "x")
    if kind == _arrays.TORCH_CUDA:
        data, scale = _backend(kind).quantize(x, alpha, axis=axis, block_size=block_size, out=out)
        axis, block_size, _ = _arrays.granularity(tuple(x.shape), axis, block_size)
        return with_checked_scales(data, scale, axis=axis, block_size=block_size)
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
    return with_checked_scales(data, _arrays.wrap_like(scale, kind), axis=axis, block_size=block_size)


def dequantize(q: QTensor, *, out=None):
    """``float32(q.data) * q.scale`` (broadcast by granularity), the same kind as ``q.data``.

    out: optional C-contiguous float32 array of q's shape (same kind as q.data) for the result.
    """
    if not isinstance(q, QTensor):
        raise TypeError(f"q must be a QTensor, got {type(q).__name__}")
    return dequantize_codes(q.data, q.scale, axis=q.axis, block_size=q.block_size, out=out)
