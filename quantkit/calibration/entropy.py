"""TensorRT's KL-divergence threshold ("entropy") of one flat host array."""

from __future__ import annotations

import numpy as np

from . import _args


def entropy_flat(flat: np.ndarray, amax: np.float32, bins: int) -> np.float32:
    """TensorRT's KL threshold of one flat array, on at most one bin per two elements."""
    if amax == 0:
        return np.float32(0)
    bins = entropy_bins_for(flat.size, bins)
    k = _args.data_kernels()
    hist = k.histogram_linear(flat, amax, bins)
    i = k.entropy_threshold(hist)
    return np.float32(min(np.float64(amax) * i / bins, np.float64(amax)))


def entropy_bins_for(n: int, bins: int) -> int:
    """Rows and blocks have few elements: at most one bin per 2 elements, at least 128."""
    return max(128, min(bins, n // 2))

