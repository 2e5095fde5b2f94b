"""The CUDA wrappers' argument checks and layouts: pure functions of shapes, dtypes, strides and
host values (they run the same checks as :mod:`quantkit.ops` and are tested on the CPU), and the
tensors handed to the kernels.

Layouts: as in the numba backend, an input that is a permutation of a dense tensor (a transpose, a
``W.t()`` view) is processed in place and the result keeps its layout (:func:`as_dense`); any other
strides are copied to C order first; blockwise always works on the C-order flattening.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import _arrays, reference

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------- argument checking


def require_cuda(t, name: str) -> None:
    """TypeError unless ``t`` is a torch tensor on a CUDA device."""
    if not _arrays.is_torch_tensor(t) or t.device.type != "cuda":
        raise TypeError(f"{name} must be a CUDA torch tensor, got "
                        + (f"a tensor on {t.device}" if _arrays.is_torch_tensor(t)
                           else type(t).__name__))


def check_float(x, name: str = "x") -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/"
                        f"float64), got {x.dtype}")


def check_out(out, shape: tuple, dtype, device, name: str = "out"):
    """The caller's output tensor, after checking it is a contiguous CUDA tensor that fits."""
    if out is None:
        return None
    require_cuda(out, name)
    if out.device != device:
        raise ValueError(f"{name} is on {out.device}, the input on {device}")
    if out.dtype != dtype or tuple(out.shape) != tuple(shape) or not out.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)}, got "
                         f"{out.dtype} {tuple(out.shape)}" + ("" if out.is_contiguous()
                                                              else " (not contiguous)"))
    return out


def prepare_quantize(x, alpha, axis=None, block_size=None):
    """Checks for ``cuda_quantize.quantize``: returns (axis, block_size, inv_scale, scale), the
    multipliers as float32 NumPy.

    ``x`` only needs ``shape`` and ``dtype`` here (any device); alpha may live anywhere.
    """
    check_float(x)
    axis, block_size, alpha_shape = _arrays.granularity(tuple(x.shape), axis, block_size)
    alpha32 = _arrays.alpha_array(alpha, alpha_shape)
    return (axis, block_size, reference.inv_scale_from_alpha(alpha32),
            reference.scale_from_alpha(alpha32))


# ------------------------------------------------------------------------------- layouts


def numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def channel_view(shape: tuple, axis: int) -> tuple:
    """(outer, channels, inner) sizes of ``shape`` around ``axis``."""
    return numel(shape[:axis]), int(shape[axis]), numel(shape[axis + 1:])


def dense_permutation(t):
    """Axes order ``perm`` with ``t.permute(perm)`` contiguous, or None when there is none."""
    if t.is_contiguous():
        return tuple(range(t.dim()))
    strides, shape = t.stride(), t.shape
    perm = tuple(sorted(range(t.dim()), key=lambda k: (-strides[k], -shape[k])))
    return perm if t.permute(perm).is_contiguous() else None


def inverse_permutation(perm) -> tuple:
    return tuple(int(i) for i in np.argsort(perm))


def as_dense(t, *, keep_layout: bool):
    """(a contiguous tensor holding t's elements, perm) with
    ``t == dense.permute(inverse_permutation(perm))``.

    Without ``keep_layout`` (a caller's ``out``, blockwise) the identity order is used.
    """
    identity = tuple(range(t.dim()))
    perm = dense_permutation(t) if keep_layout else None
    if perm is None:
        return t.contiguous(), identity
    return t.permute(perm), perm


def as_float32(x):
    """``x`` detached, as float32 (the kernels' input type)."""
    x = x.detach()
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def device_array(a: np.ndarray, device):
    """A float32 host array as a 1-D device tensor (at least one element)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(-1)).to(device)
