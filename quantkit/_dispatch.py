"""The backend of each array kind, and dequantization of int8 codes by kind.

Below both :mod:`quantkit.ops` (which builds QTensors) and :mod:`quantkit.qtensor` (whose
``dequantize`` method needs the kernels), so that neither imports the other's user.
"""

from __future__ import annotations

import numpy as np

from . import _arrays


def backend(kind: str):
    """The module that runs kernels for arrays of ``kind``, imported on first use."""
    if kind == _arrays.TORCH_CUDA:
        from .backends import cuda_quantize

        return cuda_quantize
    from .backends import numba_cpu

    return numba_cpu


def checked_out(out, kind: str, shape: tuple, dtype, name: str = "out"):
    """The caller's output buffer as a NumPy array, after checking it fits."""
    if out is None:
        return None
    if _arrays.kind_of(out) != kind:
        raise TypeError(f"{name} must be the same kind of array as the input ({kind})")
    if kind == _arrays.TORCH_CPU and out.requires_grad:
        raise ValueError(f"{name} must not require grad: it is written in place, outside autograd")
    array = out.numpy() if kind == _arrays.TORCH_CPU else out
    if array.dtype != dtype or tuple(array.shape) != tuple(shape) or not array.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype)} array of shape "
                         f"{tuple(shape)}, got {array.dtype} {tuple(array.shape)}")
    if not array.flags.writeable:
        raise ValueError(f"{name} must be writeable, got a read-only array")
    return array


def dequantize_codes(data, scale, *, axis=None, block_size=None, out=None):
    """``float32(data) * scale`` (broadcast by granularity), the same kind as ``data``: the fields
    of a QTensor (``axis`` normalized), checked here to fit together once more, since the kernels
    read as many scales as the codes' shape asks for.

    out: optional C-contiguous float32 array of data's shape (same kind as data) for the result.
    """
    _arrays.check_codes_and_scale(data, scale, axis, block_size)
    kind = _arrays.kind_of(data)
    if kind == _arrays.TORCH_CUDA:
        return backend(kind).dequantize(data, scale, axis=axis, block_size=block_size, out=out)
    codes = data.detach().numpy() if kind == _arrays.TORCH_CPU else data
    scale = scale.detach().numpy() if kind == _arrays.TORCH_CPU else scale
    out_array = checked_out(out, kind, codes.shape, np.float32)
    if codes.size == 0:
        values = out_array if out_array is not None else np.empty(codes.shape, np.float32)
    else:
        values = backend(kind).dequantize_int8_numba(codes, scale, axis=axis,
                                                     block_size=block_size, out=out_array)
    return out if out is not None else _arrays.wrap_like(values, kind)
