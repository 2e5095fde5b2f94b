"""What every calibration path checks first: the method and its options, the data (float32 on the
host, not empty), its granularity, its layout (rows or one flat array), max |x| with the NaN/Inf
check, and the rule that makes an alpha legal for ``quantize``."""

from __future__ import annotations

import numbers

import numpy as np

from .. import _arrays
from .._constants import MAX_ALPHA, MIN_POSITIVE_ALPHA

METHODS = ("max", "percentile", "mse", "entropy")
_OPTIONS = {"max": (), "percentile": ("percentile",), "mse": (), "entropy": ("bins",)}
_DEFAULT_PERCENTILE = 99.99
_ENTROPY_BINS = 2048

#: MIN_POSITIVE_ALPHA and MAX_ALPHA as float32, the type every alpha is compared in.
MIN_ALPHA = np.float32(MIN_POSITIVE_ALPHA)
MAX_ALPHA32 = np.float32(MAX_ALPHA)


def legal_alpha(alpha, amax):
    """alpha made legal for ``quantize``: a positive alpha below MIN_POSITIVE_ALPHA (127 / alpha
    would overflow float32) becomes MIN_POSITIVE_ALPHA where max |x| allows, else 0 (all |x| are
    below 4e-37 there: their error at alpha 0 is at most 1.4e-73); one above MAX_ALPHA (max |x| =
    FLT_MAX) becomes MAX_ALPHA, clipping those values by one float32 step."""
    a = np.minimum(np.asarray(alpha, np.float32), MAX_ALPHA32)
    tiny = (a > 0) & (a < MIN_ALPHA)
    if not tiny.any():
        return a
    fix = np.where(np.asarray(amax, np.float32) >= MIN_ALPHA, MIN_ALPHA, np.float32(0))
    return np.where(tiny, fix, a).astype(np.float32)


def data_kernels():
    """The numba kernels, for the passes over data on the host."""
    from ..backends import numba_calib

    return numba_calib


def host_kernels():
    """The numba functions that work on summaries (histograms, moments, candidate lists) on the
    host, whichever device holds the data."""
    from ..backends import numba_calib

    return numba_calib


def tasks() -> int:
    """numba's thread count, for the kernels that split their work into that many tasks."""
    import numba

    return numba.get_num_threads()


def check_method(method, options) -> dict:
    """The options of ``method`` with their defaults, checked; TypeError / ValueError otherwise."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, one of {METHODS}, got {type(method).__name__}")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; choose one of {METHODS}")
    allowed = _OPTIONS[method]
    for key in options:
        if key not in allowed:
            raise TypeError(f"option {key!r} does not apply to method={method!r}"
                            + (f" (it takes {', '.join(allowed)})" if allowed else ""))
    out = dict(options)
    if method == "percentile":
        p = out.get("percentile", _DEFAULT_PERCENTILE)
        if isinstance(p, bool) or not isinstance(p, numbers.Real):
            raise TypeError(f"percentile must be a number in (0, 100], got {type(p).__name__}")
        if not 0 < float(p) <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {p}")
        out["percentile"] = float(p)
    if method == "entropy":
        b = out.get("bins", _ENTROPY_BINS)
        if isinstance(b, bool) or not isinstance(b, numbers.Integral):
            raise TypeError(f"bins must be an int >= 128, got {type(b).__name__}")
        if b < 128:
            raise ValueError(f"bins must be >= 128 (127 int8 levels), got {b}")
        out["bins"] = int(b)
    return out


def reject_cuda(kind: str, what: str) -> None:
    """RuntimeError for a CUDA tensor where only host data is taken."""
    if kind == _arrays.TORCH_CUDA:
        raise RuntimeError(f"{what} of CUDA tensors is not implemented; the data stays on the GPU. "
                           "Pass x.cpu() explicitly to calibrate on the CPU.")


def prepare(x, name="x"):
    """(float32 NumPy array, kind): checks the kind, the dtype and that x is not empty."""
    kind = _arrays.kind_of(x, "x")
    reject_cuda(kind, "calibration")
    x32 = _arrays.float32_numpy(x, name)
    if x32.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x32.shape)}); nothing to calibrate")
    return x32, kind


def granularity(shape, axis, block_size):
    """Checked (axis, block_size) for an array of ``shape`` (at most one of them not None)."""
    return _arrays.granularity(tuple(shape), axis, block_size)[:2]


def rows_of(x32: np.ndarray, axis: int) -> np.ndarray:
    """(channels, rest) C-contiguous view or copy: row c holds the slice x.take(c, axis)."""
    moved = np.moveaxis(x32, axis, 0)
    return np.ascontiguousarray(moved).reshape(x32.shape[axis], -1)


def flat_of(x32: np.ndarray) -> np.ndarray:
    """The elements of x32 as one C-contiguous 1-D array (a view where x32 is contiguous)."""
    return np.ascontiguousarray(x32).reshape(-1)


def checked_absmax_flat(x32: np.ndarray, flat: np.ndarray, name="x"):
    """max |x| of the flat data; ValueError naming count and first index for NaN/Inf."""
    amax, bad = data_kernels().absmax_flat(flat)
    if bad:
        raise _arrays.nonfinite_error(x32, int(bad), name)
    return np.float32(amax)


def checked_absmax_rows(x32: np.ndarray, rows: np.ndarray, name="x") -> np.ndarray:
    """max |x| of each row; ValueError naming count and first index (in x32) for NaN/Inf."""
    amax = np.empty(rows.shape[0], np.float32)
    bad = data_kernels().absmax_rows(rows, amax) if rows.shape[1] else 0
    if rows.shape[1] == 0:
        amax[:] = 0
    if bad:
        raise _arrays.nonfinite_error(x32, int(bad), name)
    return amax
