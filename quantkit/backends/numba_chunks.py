"""The chunked parallel loop of the numba kernels over flat arrays.

A kernel cuts ``n`` values into ``chunk_count(n)`` pieces of ``_constants.CHUNK`` (the last one
shorter), runs ``for c in prange(chunk_count(n))`` and works on ``lo, hi = chunk_bounds(c, n)``;
per-chunk partial results (counts, maxima, sums) go into an array indexed by ``c`` and are
reduced afterwards in chunk order, so results do not depend on the number of threads.

Both helpers are inlined into their callers. numba's on-disk cache of a caller is keyed on the
caller's own source file: after editing this module, clear the ``__pycache__`` of the kernels.
"""

from __future__ import annotations

from numba import njit

from .._constants import CHUNK


@njit(inline="always")
def chunk_count(n, chunk=CHUNK):
    """Number of chunks of ``chunk`` values covering ``n`` values."""
    return (n + chunk - 1) // chunk


@njit(inline="always")
def chunk_bounds(c, n, chunk=CHUNK):
    """``(lo, hi)``: the half-open range of values of chunk ``c``."""
    lo = c * chunk
    return lo, min(lo + chunk, n)
