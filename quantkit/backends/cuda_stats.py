"""Statistics of calibration data on the GPU: the linear histogram of |x|, and the kernels behind
calibration's per-tensor "mse" search (|x|max with the non-finite count, the log histogram with its
residual sums, the fixed-point error sums at candidate alphas).

GPU versions of the numba_calib kernels of the same names; they sum integers, so they equal the CPU
kernels bit for bit whatever the order of the additions. ``x`` stays on its device; per-bin and
per-candidate sums and scalars come back. The order of x's elements does not matter to any of them,
so a permuted dense tensor is read in place. Non-finite values raise ValueError.
"""

from __future__ import annotations

import numpy as np
import torch

from .._constants import HIST_BINS, MIN_POSITIVE_ALPHA, QMAX
from . import cuda_layout, cuda_library

#: Largest bin count of :func:`abs_histogram` (QK_MAX_HISTOGRAM_BINS in csrc/quantkit.h).
MAX_HISTOGRAM_BINS = 1 << 20
#: Bins of :func:`abs_histogram_log` (QK_LOG_HISTOGRAM_BINS; the numba kernels' HIST_BINS).
LOG_HISTOGRAM_BINS = HIST_BINS
#: Candidates per pass of :func:`sse_fixed_many` (QK_MAX_SSE_CANDIDATES).
MAX_SSE_CANDIDATES = 16


def _checked_dense(x) -> tuple:
    """(x as float32, a contiguous tensor of its elements in some order) of a float CUDA tensor."""
    cuda_layout.require_cuda(x, "x")
    cuda_layout.check_float(x)
    x32 = cuda_layout.as_float32(x)
    return x32, cuda_layout.as_dense(x32, keep_layout=True)[0]


def histogram_inv_width(bins: int, hi) -> np.float32:
    """The bin multiplier ``float32(bins) / float32(hi)`` of the histogram kernel, checked."""
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)):
        raise TypeError(f"bins must be an int, got {type(bins).__name__}")
    if not 1 <= int(bins) <= MAX_HISTOGRAM_BINS:
        raise ValueError(f"bins must be in [1, {MAX_HISTOGRAM_BINS}], got {bins}")
    hi32 = np.float32(hi)
    if not (np.isfinite(hi32) and hi32 > 0):
        raise ValueError(f"hi must be finite and > 0 in float32, got {hi!r}")
    with np.errstate(over="ignore"):
        inv_width = np.float32(int(bins)) / hi32
    if not np.isfinite(inv_width):
        raise ValueError(f"hi={hi!r} is too small for {bins} bins (bins / hi overflows float32)")
    return np.float32(inv_width)


def abs_histogram(x, bins: int, hi):
    """Histogram of ``a = |x|`` over ``bins`` equal bins of ``[0, hi)``, on x's device.

    Bin of ``a``: ``t = float32(a * float32(bins / hi))``, ``floor(t)`` if ``t < bins``, else the
    last bin (``a >= hi`` lands in the last bin). Returns ``(counts, sums, sumsq)`` CUDA tensors of
    ``bins`` entries: int64 counts (exact), float64 sums of ``a`` and of ``a * a`` (added in an
    unspecified order: equal to a float64 reference up to rounding, not bit for bit). Non-finite
    values raise ValueError.
    """
    x32, dense = _checked_dense(x)
    inv_width = histogram_inv_width(bins, hi)
    bins = int(bins)
    device = x.device
    counts = torch.empty(bins, dtype=torch.int64, device=device)
    sums = torch.empty(bins, dtype=torch.float64, device=device)
    sumsq = torch.empty(bins, dtype=torch.float64, device=device)
    counter = torch.empty(1, dtype=torch.int64, device=device)
    code = cuda_library.library().qk_abs_histogram_f32(
        dense.data_ptr(), dense.numel(), bins, float(inv_width), counts.data_ptr(),
        sums.data_ptr(), sumsq.data_ptr(), counter.data_ptr(), cuda_library.device_index(device),
        cuda_library.stream(device))
    cuda_library.check_finite(code, "histogram", counter, x32)
    return counts, sums, sumsq


# ------------------------------------------------------------- the "mse" calibration's kernels


def abs_histogram_log(x):
    """Log histogram of ``|x|`` on x's device: ``(counts, sum_res, sum_res2)``, int64 CUDA tensors.

    Bin ``bits(|x|) >> 16`` (LOG_HISTOGRAM_BINS bins), residual ``r = bits(|x|) & 0xFFFF``; per bin
    the count, the sum of r and the sum of r^2, exactly as ``numba_calib.histogram_log``.
    Non-finite values raise ValueError.
    """
    x32, dense = _checked_dense(x)
    device = x.device
    counts, sum_res, sum_res2 = (torch.empty(LOG_HISTOGRAM_BINS, dtype=torch.int64, device=device)
                                 for _ in range(3))
    counter = torch.empty(1, dtype=torch.int64, device=device)
    code = cuda_library.library().qk_abs_histogram_log_f32(
        dense.data_ptr(), dense.numel(), counts.data_ptr(), sum_res.data_ptr(),
        sum_res2.data_ptr(), counter.data_ptr(), cuda_library.device_index(device),
        cuda_library.stream(device))
    cuda_library.check_finite(code, "log histogram", counter, x32)
    return counts, sum_res, sum_res2


def candidate_scales(alphas) -> tuple:
    """(scale, inv_scale) float32 arrays of candidate alphas, as ``numba_calib.scale_inv``.

    ``scale = float32(a / QMAX)``, ``inv = float32(QMAX / a)``, 0 where a == 0. Each alpha must be 0
    or at least MIN_POSITIVE_ALPHA (so inv is finite), as everywhere in quantkit.
    """
    a = np.asarray(alphas, dtype=np.float32).reshape(-1)
    tiny = (a > 0) & (a < np.float32(MIN_POSITIVE_ALPHA))
    if not (np.isfinite(a).all() and (a >= 0).all()) or tiny.any():
        raise ValueError(f"candidate alphas must be finite and 0 or >= {MIN_POSITIVE_ALPHA}")
    q = np.float32(QMAX)
    scale = (a / q).astype(np.float32)
    inv = np.zeros_like(a)
    np.divide(q, a, out=inv, where=a > 0)
    return scale, inv


def sse_fixed_many(x, alphas, unit_inv: float) -> np.ndarray:
    """Fixed-point error sums of x for each candidate alpha, as ``numba_calib.sse_fixed_many``.

    For each finite element, ``a = |x|``, ``e = a - min(rint(a * inv), QMAX) * scale`` in float32
    and ``int64(float64(e)^2 * unit_inv)`` summed as integers. Returns an int64 NumPy array (one
    entry per alpha; MAX_SSE_CANDIDATES alphas per pass over x). Non-finite values raise ValueError.
    """
    x32, dense = _checked_dense(x)
    unit_inv = float(unit_inv)
    if not (np.isfinite(unit_inv) and unit_inv >= 0):
        raise ValueError(f"unit_inv must be finite and >= 0, got {unit_inv!r}")
    scale, inv = candidate_scales(alphas)
    device = x.device
    lib = cuda_library.library()
    scale_d = cuda_layout.device_array(scale, device)
    inv_d = cuda_layout.device_array(inv, device)
    sums = torch.empty(max(1, scale.size), dtype=torch.int64, device=device)
    counter = torch.empty(1, dtype=torch.int64, device=device)
    for lo in range(0, scale.size, MAX_SSE_CANDIDATES):
        k = min(MAX_SSE_CANDIDATES, scale.size - lo)
        code = lib.qk_sse_fixed_many_f32(dense.data_ptr(), dense.numel(),
                                         scale_d[lo:].data_ptr(), inv_d[lo:].data_ptr(), k,
                                         unit_inv, sums[lo:].data_ptr(), counter.data_ptr(),
                                         cuda_library.device_index(device),
                                         cuda_library.stream(device))
        cuda_library.check_finite(code, "error sums", counter, x32)
    return sums[: scale.size].cpu().numpy()


def absmax_flat(flat) -> tuple:
    """(max |x| over the finite elements as float32, number of non-finite elements) of a CUDA
    tensor in any layout, as ``numba_calib.absmax_flat``; two scalars come back to the host."""
    cuda_layout.require_cuda(flat, "x")
    device = flat.device
    dense, _ = cuda_layout.as_dense(cuda_layout.as_float32(flat), keep_layout=True)
    out = torch.empty(1, dtype=torch.float32, device=device)
    counter = torch.empty(1, dtype=torch.int64, device=device)
    code = cuda_library.library().qk_absmax_f32(
        dense.data_ptr(), dense.numel(), out.data_ptr(), counter.data_ptr(),
        cuda_library.device_index(device), cuda_library.stream(device))
    cuda_library.check(code, "absmax")
    return np.float32(out.item()), cuda_library.read_count(counter)


def histogram_log(flat, tasks, counts, sum_res, sum_res2) -> None:
    """Adds the log histogram of |flat| (a CUDA tensor) into the int64 NumPy arrays, as
    ``numba_calib.histogram_log`` does (``tasks`` is unused). Non-finite values raise ValueError."""
    del tasks
    for host, device_sums in zip((counts, sum_res, sum_res2), abs_histogram_log(flat)):
        host += device_sums.cpu().numpy()
