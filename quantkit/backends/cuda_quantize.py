"""The CUDA backend of quantkit.ops: quantize, dequantize and |x|max of CUDA tensors, per tensor,
per channel and per block (the module :func:`quantkit._dispatch.backend` returns for CUDA tensors).

Every function takes CUDA torch tensors, runs on the tensor's device and on torch's current stream
there, and returns CUDA tensors. Multipliers and scales are computed on the host by
:mod:`quantkit.reference` (so every backend uses the same float32 values) and copied to the device;
the kernels only multiply. Quantize and |x|max count non-finite inputs in the same pass and raise
ValueError when there are any. Layouts as described in :mod:`cuda_layout`.
"""

from __future__ import annotations

import torch

from .. import _arrays
from . import cuda_layout, cuda_library


def quantize(x, alpha, *, axis=None, block_size=None, out=None) -> tuple:
    """int8 codes of the CUDA tensor ``x`` (see :func:`quantkit.quantize`), computed on its device.

    Returns ``(codes, scale)``: int8 codes of x's shape and the float32 scales, CUDA tensors on x's
    device (``quantkit.ops.quantize`` wraps them in a QTensor).
    """
    cuda_layout.require_cuda(x, "x")
    axis, block_size, inv, scale = cuda_layout.prepare_quantize(x, alpha, axis, block_size)
    device = x.device
    x32 = cuda_layout.as_float32(x)
    out = cuda_layout.check_out(out, tuple(x32.shape), torch.int8, device)
    lib = cuda_library.library()
    dense, perm = cuda_layout.as_dense(x32, keep_layout=out is None and block_size is None)
    codes = out if out is not None else torch.empty(dense.shape, dtype=torch.int8, device=device)
    n = dense.numel()
    if n > 0:
        inv_d = cuda_layout.device_array(inv, device)
        counter = torch.empty(1, dtype=torch.int64, device=device)
        args = (counter.data_ptr(), cuda_library.device_index(device), cuda_library.stream(device))
        code = _launch((lib.qk_quantize_int8_per_channel_f32, lib.qk_quantize_int8_blockwise_f32,
                        lib.qk_quantize_int8_f32), dense, perm, axis, block_size, codes,
                       inv_d.data_ptr(), args)
        cuda_library.check_finite(code, "quantize", counter, x32)
    data = out if out is not None else codes.permute(cuda_layout.inverse_permutation(perm))
    return data, torch.from_numpy(scale).to(device)


def _launch(entries, dense, perm, axis, block_size, dst, mults, args) -> int:
    """Run the entry point of the granularity, ``entries`` = (per channel, blockwise, per
    tensor), from ``dense`` into ``dst`` with the multipliers at ``mults``; ``args`` are the
    entry point's trailing arguments. Returns its error code."""
    per_channel, blockwise, per_tensor = entries
    src, out, n = dense.data_ptr(), dst.data_ptr(), dense.numel()
    if axis is not None:
        outer, channels, inner = cuda_layout.channel_view(tuple(dense.shape), perm.index(axis))
        return per_channel(src, out, outer, channels, inner, mults, *args)
    if block_size is not None:
        return blockwise(src, out, n, block_size, mults, *args)
    return per_tensor(src, out, n, mults, *args)


def dequantize(data, scale, *, axis=None, block_size=None, out=None):
    """float32 values ``float32(data) * scale`` of int8 codes held on a CUDA device.

    ``scale`` fits the granularity (``axis`` normalized to be >= 0, or ``block_size``), as a
    QTensor's does (``quantkit.ops.dequantize`` passes a QTensor's fields).
    """
    cuda_layout.require_cuda(data, "q.data")
    cuda_layout.require_cuda(scale, "q.scale")
    device = data.device
    if scale.device != device:
        raise ValueError(f"q.scale is on {scale.device}, q.data on {device}")
    out = cuda_layout.check_out(out, tuple(data.shape), torch.float32, device)
    lib = cuda_library.library()
    dense, perm = cuda_layout.as_dense(data, keep_layout=out is None and block_size is None)
    values = out if out is not None else torch.empty(dense.shape, dtype=torch.float32,
                                                     device=device)
    n = dense.numel()
    if n > 0:
        scale = scale.detach().to(torch.float32).contiguous().reshape(-1)
        args = (cuda_library.device_index(device), cuda_library.stream(device))
        code = _launch((lib.qk_dequantize_int8_per_channel_f32,
                        lib.qk_dequantize_int8_blockwise_f32, lib.qk_dequantize_int8_f32), dense,
                       perm, axis, block_size, values, scale.data_ptr(), args)
        cuda_library.check(code, "dequantize")
    return out if out is not None else values.permute(cuda_layout.inverse_permutation(perm))


def absmax(x, *, axis=None, block_size=None):
    """max |x| per tensor (0-d), per channel along ``axis`` or per block, as float32 on x's device.

    The "max" calibration statistic, computed without copying ``x`` to the host. Non-finite
    values raise ValueError (as quantize does). An empty slice has |x|max 0.
    """
    cuda_layout.require_cuda(x, "x")
    cuda_layout.check_float(x)
    axis, block_size, out_shape = _arrays.granularity(tuple(x.shape), axis, block_size)
    device = x.device
    x32 = cuda_layout.as_float32(x)
    lib = cuda_library.library()
    dense, perm = cuda_layout.as_dense(x32, keep_layout=block_size is None)
    result = torch.empty(cuda_layout.numel(out_shape), dtype=torch.float32, device=device)
    counter = torch.empty(1, dtype=torch.int64, device=device)
    args = (result.data_ptr(), counter.data_ptr(), cuda_library.device_index(device),
            cuda_library.stream(device))
    n = dense.numel()
    if axis is not None:
        outer, channels, inner = cuda_layout.channel_view(tuple(dense.shape), perm.index(axis))
        code = lib.qk_absmax_per_channel_f32(dense.data_ptr(), outer, channels, inner, *args)
    elif block_size is not None:
        code = lib.qk_absmax_blockwise_f32(dense.data_ptr(), n, block_size, *args)
    else:
        code = lib.qk_absmax_f32(dense.data_ptr(), n, *args)
    cuda_library.check_finite(code, "absmax", counter, x32)
    return result.reshape(out_shape)
