"""Calibration: choose the clipping range alpha that ``quantize`` takes.

``calibrate(x, method="mse", *, axis=None, block_size=None, **options)`` with the methods

* ``"max"``: ``alpha = max |x|`` (nothing is clipped);
* ``"percentile"``: ``alpha`` = the ``percentile``-th percentile of ``|x|`` (option, default 99.99,
  linear interpolation as ``np.percentile``);
* ``"mse"`` (default): the alpha in ``(0, max |x|]`` that minimises the exact quantize-dequantize
  error ``MSE(alpha) = mean((x - dequantize(quantize(x, alpha)))^2)`` of the data itself;
* ``"entropy"``: TensorRT's KL-divergence calibration on a 2048-bin histogram of ``|x|``.

``quantization_mse(x, alpha)`` gives that exact MSE and its split into the clipping part (elements
whose code the clamp at +-127 changed) and the rounding part (all others).

``Observer`` accumulates a bounded, mergeable summary of many batches (a histogram of ``|x|``,
exact to integer counts and moments) and yields alpha with the same methods.

The package: ``_args`` (checked arguments), ``mse`` (the "mse" search of one flat array, one
policy over a kernel set per device), ``entropy``, ``observer``, ``gpu`` (CUDA tensors on their
device). How the "mse" search works, and how close it gets to the brute-force optimum:
docs/CALIBRATION.md.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _arrays
from . import _args, gpu, mse
from ._args import METHODS
from .entropy import entropy_flat
from .gpu import CUDA_SUPPORTED, calibrate_cuda
from .mse import FlatKernels
from .observer import Observer

__all__ = ["CUDA_SUPPORTED", "FlatKernels", "METHODS", "Observer", "QuantizationMSE", "calibrate",
           "calibrate_cuda", "quantization_mse"]


class QuantizationMSE(NamedTuple):
    """The exact int8 quantize-dequantize MSE and its parts: ``mse == clipping + rounding``.

    Floats per tensor; arrays with one entry per channel or block otherwise.
    """

    mse: object
    clipping: object
    rounding: object




def _percentile_rows(rows: np.ndarray, p: float) -> np.ndarray:
    return np.percentile(np.abs(rows), p, axis=1).astype(np.float32)


def _calibrate_rows(rows: np.ndarray, amax: np.ndarray, method: str, opts: dict) -> np.ndarray:
    """One alpha per row of a 2-D C-contiguous array."""
    if method == "max":
        return _args.legal_alpha(amax, amax)
    if method == "percentile":
        return _args.legal_alpha(_percentile_rows(rows, opts["percentile"]), amax)
    if method == "entropy":
        out = np.zeros(rows.shape[0], np.float32)
        for r in range(rows.shape[0]):
            out[r] = entropy_flat(rows[r], amax[r], opts["bins"])
        return _args.legal_alpha(out, amax)
    return _args.legal_alpha(mse.search_rows(rows, amax), amax)


def _calibrate_blocks(flat: np.ndarray, block_size: int, method: str, opts: dict) -> np.ndarray:
    nb = _arrays.n_blocks(flat.size, block_size)
    padded = np.zeros(nb * block_size, np.float32)
    padded[: flat.size] = flat
    amax = np.abs(padded.reshape(nb, block_size)).max(axis=1).astype(np.float32)
    return _args.legal_alpha(_blocks_raw(flat, block_size, method, opts, amax), amax)


def _blocks_raw(flat, block_size, method, opts, amax):
    nb = amax.size
    if method == "max":
        return amax
    if method == "percentile":
        out = np.empty(nb, np.float32)
        full = flat.size // block_size
        if full:
            out[:full] = _percentile_rows(flat[: full * block_size].reshape(full, block_size),
                                          opts["percentile"])
        if full < nb:
            out[full] = np.float32(np.percentile(np.abs(flat[full * block_size:]),
                                                 opts["percentile"]))
        return out
    if method == "entropy":
        out = np.zeros(nb, np.float32)
        for b in range(nb):
            block = flat[b * block_size:(b + 1) * block_size]
            out[b] = entropy_flat(block, amax[b], opts["bins"])
        return out
    return _args.legal_alpha(mse.search_blocks(flat, block_size, amax), amax)


def calibrate(x, method: str = "mse", *, axis=None, block_size=None, **options):
    """The clipping range alpha for ``quantize(x, alpha, axis=axis, block_size=block_size)``.

    Args:
        x: NumPy array or CPU torch tensor, float16/bfloat16/float32/float64 (used as float32),
            finite, not empty. Never modified. CUDA tensors go to :func:`calibrate_cuda`
            (nothing is copied to the host behind the caller's back): "max" at every granularity
            and "mse" per tensor of more than 65536 non-zero values run on the GPU; the rest
            raises NotImplementedError (a RuntimeError), see :func:`calibrate_cuda`.
        method: ``"mse"`` (default; exact-MSE optimal), ``"max"``, ``"percentile"``, ``"entropy"``.
        axis: one alpha per slice along this axis (per channel).
        block_size: one alpha per block of the C-order flattening (power of two in [64, 4096]).
        **options: ``percentile=`` (in (0, 100], default 99.99) for "percentile"; ``bins=`` (>= 128,
            default 2048; at most one bin per two elements of the tensor, row or block) for
            "entropy".

    Returns:
        A Python float per tensor; per channel or per block a float32 array (NumPy, or a torch
        tensor on x's device when x is one). Always ``0 <= alpha <= max |x|`` (over the slice);
        all-zero data gives 0. Scaling x by a power of two scales alpha by the same power exactly.

    Raises:
        ValueError: NaN/Inf in x (how many, and the index of the first), empty x, unknown method,
            percentile outside (0, 100], axis out of range, a bad block_size.
        TypeError: x not an array of floats, an option the method does not take.
        NotImplementedError: (a RuntimeError) a CUDA tensor with a method or granularity the GPU
            path does not compute (see :func:`calibrate_cuda`); or RuntimeError when the CUDA
            library is not built.
    """
    opts = _args.check_method(method, options)
    if _arrays.kind_of(x, "x") == _arrays.TORCH_CUDA:
        return gpu.calibrate_on_gpu(x, method, axis, block_size, opts)
    x32, kind = _args.prepare(x)
    axis, block_size = _args.granularity(x32.shape, axis, block_size)
    if axis is not None:
        rows = _args.rows_of(x32, axis)
        amax = _args.checked_absmax_rows(x32, rows)
        return _arrays.wrap_like(_calibrate_rows(rows, amax, method, opts), kind)
    flat = _args.flat_of(x32)
    if method == "mse" and block_size is None:
        alpha = mse.search_host_flat(flat, x32)
        return float(_args.legal_alpha(alpha, alpha))
    amax = _args.checked_absmax_flat(x32, flat)
    if block_size is not None:
        return _arrays.wrap_like(_calibrate_blocks(flat, block_size, method, opts), kind)
    if method == "max":
        alpha = amax
    elif method == "percentile":
        alpha = np.float32(np.percentile(np.abs(flat), opts["percentile"]))
    else:
        alpha = entropy_flat(flat, amax, opts["bins"])
    return float(_args.legal_alpha(alpha, amax))


# ------------------------------------------------------------------------------ the exact MSE


def quantization_mse(x, alpha, *, axis=None, block_size=None) -> QuantizationMSE:
    """The exact MSE of ``dequantize(quantize(x, alpha))`` against x, split into its parts.

    ``mse = mean((x - x_hat)^2)`` with x_hat computed exactly as :mod:`quantkit.reference` does
    (float32 throughout; squares added in float64). ``clipping`` sums the elements whose code the
    clamp changed (``|rint(x * inv_scale)| > 127``), ``rounding`` all others; both are divided by
    the same element count, so ``mse == clipping + rounding``.

    Per tensor the three fields are Python floats; per channel (``axis``) or block (``block_size``)
    float64 arrays (NumPy, or torch like x) with one entry per slice, each the mean over its slice.
    """
    x32, kind = _args.prepare(x)
    axis, block_size = _args.granularity(x32.shape, axis, block_size)
    k = _args.data_kernels()
    if axis is not None:
        rows = _args.rows_of(x32, axis)
        alpha32 = _arrays.alpha_array(alpha, (rows.shape[0],))
        _args.checked_absmax_rows(x32, rows)
    elif block_size is not None:
        flat = _args.flat_of(x32)
        nb = _arrays.n_blocks(flat.size, block_size)
        alpha32 = _arrays.alpha_array(alpha, (nb,))
        _args.checked_absmax_flat(x32, flat)
        padded = np.zeros(nb * block_size, np.float32)
        padded[: flat.size] = flat
        rows = padded.reshape(nb, block_size)
    else:
        flat = _args.flat_of(x32)
        alpha32 = _arrays.alpha_array(alpha, ())
        _args.checked_absmax_flat(x32, flat)
        total, clipped = k.sse_f64_many(flat, alpha32.reshape(1))
        n = flat.size
        return QuantizationMSE(float(total[0] / n), float(clipped[0] / n),
                               float((total[0] - clipped[0]) / n))
    total = np.empty(rows.shape[0])
    clipped = np.empty(rows.shape[0])
    k.sse_f64_rows(rows, alpha32, total, clipped)
    if block_size is not None:  # the padding zeros add no error; divide by the real block sizes
        sizes = np.full(rows.shape[0], block_size, np.float64)
        sizes[-1] = flat.size - (rows.shape[0] - 1) * block_size
    else:
        sizes = np.float64(max(rows.shape[1], 1))
    parts = (total / sizes, clipped / sizes, (total - clipped) / sizes)
    return QuantizationMSE(*(_arrays.wrap_like(np.ascontiguousarray(p), kind) for p in parts))
