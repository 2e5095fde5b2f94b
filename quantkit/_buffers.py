"""Reuse of large output buffers.

A freshly allocated large array costs a page fault and the OS zeroing every page on first write:
about 3 ms per 64 MiB on the machines in docs/PERF-NOTES.md, a third of a whole quantize pass. Like
the caching allocators of CUDA frameworks (or tcmalloc/jemalloc on the CPU), quantkit keeps the
memory of large outputs that the caller has dropped and hands it out again for the next output of
the same size, so a loop that quantizes same-shaped tensors (activations batch after batch, the
layers of a model) touches warm pages.

* Only outputs of at least ``MIN_BYTES`` go through the cache; smaller ones are plain ``np.empty``.
* A block returns to the cache when the last array (or torch tensor, via ``torch.from_numpy``) using
  it is garbage collected; nothing is ever shared while in use.
* The cache holds at most ``QUANTKIT_BUFFER_CACHE_MB`` MiB (environment variable, default 512;
  0 disables it), evicting the oldest blocks first. :func:`clear` empties it.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict

import numpy as np

MIN_BYTES = 1 << 20
#: Blocks start at a multiple of this many bytes (a cache line; malloc's large blocks start 16
#: bytes past a page, where float32 matrix products run measurably slower).
ALIGNMENT = 64


def _aligned_block(nbytes: int) -> np.ndarray:
    """``nbytes`` uninitialised bytes starting at a multiple of ALIGNMENT (a view of a slightly
    larger allocation, which it keeps alive)."""
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes]


def _limit_from_env() -> int:
    value = os.environ.get("QUANTKIT_BUFFER_CACHE_MB", "512")
    try:
        mib = int(value)
    except ValueError:
        raise ValueError(f"QUANTKIT_BUFFER_CACHE_MB must be a whole number of MiB, got {value!r}")
    return max(mib, 0) << 20


class _Cache:
    """Free blocks (1-D uint8 arrays) by size, oldest first, at most ``limit`` bytes in all."""

    def __init__(self, limit: int):
        self.limit = limit
        self._free = OrderedDict()  # id(block) -> block, in the order they were returned
        self._held = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            for key, block in self._free.items():
                if block.nbytes == nbytes:
                    del self._free[key]
                    self._held -= nbytes
                    return block
        return _aligned_block(nbytes)

    def give(self, block: np.ndarray) -> None:
        if block.nbytes > self.limit:
            return
        with self._lock:
            while self._held + block.nbytes > self.limit:
                _, oldest = self._free.popitem(last=False)
                self._held -= oldest.nbytes
            self._free[id(block)] = block
            self._held += block.nbytes

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._held = 0

    @property
    def held_bytes(self) -> int:
        return self._held


_CACHE = _Cache(_limit_from_env())


class _Lease:
    """Owns one cached block while an array uses it (it is the array's ``base``)."""

    __slots__ = ("_block", "__array_interface__")

    def __init__(self, block: np.ndarray, shape: tuple, dtype: np.dtype):
        self._block = block
        self.__array_interface__ = {"version": 3, "shape": shape, "typestr": dtype.str,
                                    "data": (block.ctypes.data, False)}

    def __del__(self):
        cache = _CACHE  # None while the interpreter shuts down
        if cache is not None:
            cache.give(self._block)


def empty(shape: tuple, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array, from the cache when it is large (see module doc)."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES or _CACHE.limit == 0:
        return np.empty(shape, dtype)
    return np.asarray(_Lease(_CACHE.take(nbytes), shape, dtype))


def clear() -> None:
    """Drop every cached block (their memory goes back to the OS)."""
    _CACHE.clear()
