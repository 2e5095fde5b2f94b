"""Calibration of CUDA tensors on their device: "max" at every granularity, and "mse" per tensor
through :func:`quantkit.calibration.mse.search_flat` over :func:`cuda_kernels` (the CUDA
implementation of :class:`~quantkit.calibration.mse.FlatKernels`). ``x`` is never copied to the
host; small per-bin and per-candidate sums and the result come back."""

from __future__ import annotations

import numpy as np

from . import _args, mse
from ._args import MIN_ALPHA

#: What :func:`calibrate_cuda` computes on the device; everything else raises NotImplementedError.
CUDA_SUPPORTED = ('method="max" per tensor, per channel and per block; method="mse" per tensor '
                  f"when x has more than {mse.SMALL} non-zero values")


def _not_on_gpu(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"calibrate on a CUDA tensor: {what} is not implemented on the GPU, and the data is not "
        f"copied to the host behind the caller's back. On the GPU: {CUDA_SUPPORTED}. Pass x.cpu() "
        "explicitly to calibrate on the CPU.")


def calibrate_cuda(x, method: str = "mse", *, axis=None, block_size=None, **options):
    """:func:`quantkit.calibrate` of a CUDA tensor, computed on its device (``x`` is never copied
    to the host; small per-bin and per-candidate sums and the result come back).

    "max" comes from ``backends.cuda_quantize.absmax`` (a Python float per tensor; a float32 CUDA
    tensor per channel or block). "mse" per tensor runs the search of
    :func:`quantkit.calibration.mse.search_flat` with the CUDA kernels (|x|max, the log histogram,
    the exact error sums), so alpha equals the CPU's on the same data below 2^23 values (from there
    the CPU samples its bulk; the GPU's full histogram costs little); only per-bin sums, the
    candidates' error sums and scalars come back to the host. Where the search needs the data itself on the host (a tensor with at
    most 65536 non-zero values; a few non-empty bins whose distinct values the histogram cannot
    tell) and for every other method or granularity: NotImplementedError (a RuntimeError) saying
    what does run on the GPU.
    """
    from ..backends import cuda_layout

    cuda_layout.require_cuda(x, "x")
    return calibrate_on_gpu(x, method, axis, block_size, _args.check_method(method, options))


def calibrate_on_gpu(x, method: str, axis, block_size, opts: dict):
    """:func:`calibrate_cuda` with ``opts`` already checked."""
    from ..backends import cuda_layout, cuda_library, cuda_quantize

    cuda_layout.check_float(x)
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}); nothing to calibrate")
    axis, block_size = _args.granularity(tuple(x.shape), axis, block_size)
    if method == "max":
        amax = cuda_quantize.absmax(x, axis=axis, block_size=block_size)
        legal = amax.masked_fill(amax < float(MIN_ALPHA), 0.0).clamp_(max=float(_args.MAX_ALPHA32))
        return float(legal.item()) if axis is None and block_size is None else legal
    if method == "mse" and axis is None and block_size is None:
        # the order of the elements does not matter to the search
        dense, _ = cuda_layout.as_dense(cuda_layout.as_float32(x), keep_layout=True)
        alpha = mse.search_flat(cuda_kernels(), dense, int(dense.numel()),
                                lambda bad: cuda_library.nonfinite_error(x, bad))
        return float(_args.legal_alpha(alpha, alpha))
    where = ("per channel" if axis is not None else "per block" if block_size is not None
             else "per tensor")
    raise _not_on_gpu(f'method="{method}" {where}')


# -------------------------------------------------------------------------- the CUDA kernel set


def cuda_kernels() -> mse.FlatKernels:
    """The kernel set of CUDA tensors: the passes over the data run on the device; the exact
    search of the data itself is not there (NotImplementedError), nor the sampled path."""
    from ..backends import cuda_stats

    return mse.FlatKernels(cuda_stats.absmax_flat, _scan, cuda_stats.sse_fixed_many, _search_exact,
                           _search_discrete)


def _scan(dense) -> mse.FlatScan:
    """|x|max, then (for finite data with amax >= MIN_POSITIVE_ALPHA) the log histogram with its
    residual sums, and the zeros: bin 0's count where it holds exact zeros only, else counted on
    the device (bin 0 also holds the subnormals below 2^-133)."""
    from ..backends import cuda_stats

    amax, bad = cuda_stats.absmax_flat(dense)
    amax = np.float32(amax)
    if bad or amax < MIN_ALPHA:
        return mse.FlatScan(amax, int(bad), 0, 0, None)
    h = _args.host_kernels()
    counts, sum_res, sum_res2 = (np.zeros(h.HIST_BINS, np.int64) for _ in range(3))
    cuda_stats.histogram_log(dense, 1, counts, sum_res, sum_res2)
    low_bits = int(sum_res.sum() != 0)  # the OR of the 16 low mantissa bits is 0 iff their sum is
    if sum_res[0] == 0:
        zeros = int(counts[0])
    else:
        zeros = int(dense.numel()) - _count_nonzero_on_device(dense)
    return mse.FlatScan(amax, 0, zeros, low_bits, counts, sum_res, sum_res2)


def _search_exact(dense, amax, what):
    raise _not_on_gpu(f'method="mse" on {what} (the exact search runs on the data on the host)')


def _search_discrete(dense, amax, scan: mse.FlatScan):
    h = _args.host_kernels()
    pairs = _distinct_from_bins(scan.counts, scan.sum_res, scan.sum_res2, scan.zeros, h)
    if pairs is None:
        raise _not_on_gpu('method="mse" on a tensor whose |x| fall in at most '
                          f"{h.LATTICE_MAX_DISTINCT + 1} log-histogram bins, some holding "
                          "several values (counting the distinct values needs the data on "
                          "the host)")
    if not pairs:
        return None
    return h.search_mse_values(pairs[0], pairs[1], amax)


def _count_nonzero_on_device(t) -> int:
    import torch

    return int(torch.count_nonzero(t).item())  # a reduction on t's device; one scalar comes back


def _distinct_from_bins(counts, sum_res, sum_res2, zeros, k):
    """The distinct non-zero |x| with their counts, from the log histogram, for the exhaustive
    search (search_mse_discrete's input; the order of the pairs does not change its result).

    A bin whose residuals have zero variance (count * sum r^2 == (sum r)^2) holds one value; a bin
    that does not holds at least two. Returns (values, counts) when every non-empty bin holds one
    value; ``()`` when there are certainly more than LATTICE_MAX_DISTINCT distinct values (the CPU
    search would go on to the histogram search too); None when the histogram cannot tell.
    """
    values, weights = [], []
    at_least = 0
    for j in np.flatnonzero(counts):
        c = int(counts[j]) - (zeros if j == 0 else 0)
        if c == 0:
            continue
        s, q = int(sum_res[j]), int(sum_res2[j])  # Python ints: s * s may pass 2^63
        if c * q == s * s:
            values.append((int(j) << k.HIST_SHIFT) | (s // c))
            weights.append(c)
            at_least += 1
        else:
            at_least += 2
    if at_least > k.LATTICE_MAX_DISTINCT:
        return ()
    if at_least > len(values):
        return None
    return np.array(values, np.int32).view(np.float32), np.array(weights, np.int64)
