"""quantkit's kernels as torch operators, so ``torch.compile`` can trace code that calls them.

Importing this module registers (once per process)::

    torch.ops.quantkit.quantize_int8(x, alpha, axis=None, block_size=None) -> (codes, scale)
    torch.ops.quantkit.dequantize_int8(codes, scale, axis=None, block_size=None) -> values
    torch.ops.quantkit.absmax(x, axis=None, block_size=None) -> |x|max per tensor/channel/block

CPU tensors run on the numba kernels (through :mod:`quantkit.ops`), CUDA tensors on the compiled
CUDA library (:mod:`quantkit.backends.cuda_quantize`), each exactly the arithmetic of
:mod:`quantkit.reference`. Every op has a fake (meta) implementation giving output shapes, dtypes
and devices, so ``torch.compile`` and ``torch.export`` trace through them without running them.

``alpha`` is a float tensor (0-d per tensor, one entry per channel or per block), on the CPU or on
x's device. Outputs are contiguous tensors on x's device; ``scale`` has alpha's shape. Non-finite
input raises ValueError when the op runs. ``quantkit/__init__.py`` does not import this module
(importing quantkit imports no torch): import ``quantkit._torch_ops`` to register the ops.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _arrays, ops
from .qtensor import QTensor, with_checked_scales

Tensor = torch.Tensor


def _cuda():
    from .backends import cuda_quantize

    return cuda_quantize


def _n_blocks(numel, block_size: int):
    return (numel + block_size - 1) // block_size


# ---------------------------------------------------------------------------------- quantize


@torch.library.custom_op("quantkit::quantize_int8", mutates_args=(), device_types="cpu")
def quantize_int8(x: Tensor, alpha: Tensor, axis: Optional[int] = None,
                  block_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """int8 codes and float32 scales of ``x`` (see :func:`quantkit.quantize`)."""
    q = ops.quantize(x, alpha, axis=axis, block_size=block_size)
    return q.data.contiguous(), q.scale.reshape(alpha.shape).contiguous()


@quantize_int8.register_kernel("cuda")
def _quantize_int8_cuda(x, alpha, axis=None, block_size=None):
    codes, scale = _cuda().quantize(x, alpha, axis=axis, block_size=block_size)
    return codes.contiguous(), scale.reshape(alpha.shape).contiguous()


@quantize_int8.register_fake
def _quantize_int8_fake(x, alpha, axis=None, block_size=None):
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(alpha.shape, dtype=torch.float32, device=x.device)
    return codes, scale


# -------------------------------------------------------------------------------- dequantize


@torch.library.custom_op("quantkit::dequantize_int8", mutates_args=(), device_types="cpu")
def dequantize_int8(codes: Tensor, scale: Tensor, axis: Optional[int] = None,
                    block_size: Optional[int] = None) -> Tensor:
    """float32 ``codes * scale`` (broadcast by granularity; see :func:`quantkit.dequantize`)."""
    values = ops.dequantize(QTensor(codes, scale.to(torch.float32), axis=axis,
                                    block_size=block_size))
    return values.contiguous()


@dequantize_int8.register_kernel("cuda")
def _dequantize_int8_cuda(codes, scale, axis=None, block_size=None):
    scale = scale.to(device=codes.device, dtype=torch.float32)
    # the granularity is checked; the scale values are not (that would sync the device per call)
    q = with_checked_scales(codes, scale, axis=axis, block_size=block_size)
    values = _cuda().dequantize(q.data, q.scale, axis=q.axis, block_size=q.block_size)
    return values.contiguous()


@dequantize_int8.register_fake
def _dequantize_int8_fake(codes, scale, axis=None, block_size=None):
    if codes.dtype != torch.int8:
        raise TypeError(f"codes must be int8, got {codes.dtype}")
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


# ------------------------------------------------------------------------------------ absmax


def _absmax_cpu(x: Tensor, axis, block_size) -> Tensor:
    """max |x| per tensor / channel / block on the CPU, with the CUDA kernel's conventions."""
    a = x.detach().to(torch.float32).abs()
    finite = torch.isfinite(a)
    if not bool(finite.all()):
        from . import _arrays

        raise _arrays.nonfinite_error(x.detach().to(torch.float32).numpy(),
                                      int((~finite).sum()))
    if axis is not None:
        axis = axis % x.dim()
        rows = a.movedim(axis, 0).reshape(x.shape[axis], -1)
        if rows.shape[1] == 0:
            return torch.zeros(x.shape[axis], dtype=torch.float32)
        return rows.amax(dim=1).contiguous()
    if block_size is not None:
        flat = a.reshape(-1)
        n_blocks = _n_blocks(flat.numel(), block_size)
        padded = torch.zeros(n_blocks * block_size, dtype=torch.float32)
        padded[: flat.numel()] = flat
        return padded.reshape(n_blocks, block_size).amax(dim=1)
    if a.numel() == 0:
        return torch.zeros((), dtype=torch.float32)
    return a.amax()


@torch.library.custom_op("quantkit::absmax", mutates_args=(), device_types="cpu")
def absmax(x: Tensor, axis: Optional[int] = None, block_size: Optional[int] = None) -> Tensor:
    """max |x| (float32): 0-d per tensor, one per slice along ``axis``, or one per block."""
    _cuda_free_checks(x, axis, block_size)
    return _absmax_cpu(x, axis, block_size)


def _cuda_free_checks(x, axis, block_size):
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    _arrays.granularity(tuple(x.shape), axis, block_size)


@absmax.register_kernel("cuda")
def _absmax_cuda(x, axis=None, block_size=None):
    return _cuda().absmax(x, axis=axis, block_size=block_size)


@absmax.register_fake
def _absmax_fake(x, axis=None, block_size=None):
    if axis is not None:
        shape = (x.shape[axis],)
    elif block_size is not None:
        shape = (_n_blocks(x.numel(), block_size),)
    else:
        shape = ()
    return torch.empty(shape, dtype=torch.float32, device=x.device)
