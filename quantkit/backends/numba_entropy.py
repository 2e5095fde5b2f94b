"""numba KL-divergence threshold of a histogram (TensorRT's entropy calibration).

Importing this module compiles nothing; the kernel is cached on disk.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def entropy_threshold(hist):
    """TensorRT's KL-divergence calibration (as in NVIDIA pytorch-quantization) on a histogram of
    |x| with equal bins over [0, amax]; returns the number of bins i to keep (threshold i * width).

    For each i in [128, bins]: the reference P is hist[:i] with the mass of hist[i:] added to bin
    i-1; the candidate Q merges hist[:i] into 128 equal groups (bin j in group floor(128 j / i)) and
    spreads each group's mass evenly over its non-empty bins. KL(P || Q) of the normalised
    distributions (infinite where Q = 0 < P); the largest i among the minima wins. As there, the
    zero bin is given the count of bin 1 first, so the peak of exact zeros does not dominate.
    """
    bins = hist.size
    nq = 128
    h = hist.astype(np.float64)
    if bins > 1:
        h[0] = h[1]
    tail = np.zeros(bins + 1)
    for i in range(bins - 1, -1, -1):
        tail[i] = tail[i + 1] + h[i]
    best_i = bins
    best_kl = np.inf
    group_mass = np.zeros(nq)
    group_nz = np.zeros(nq)
    for i in range(nq, bins + 1):
        group_mass[:] = 0.0
        group_nz[:] = 0.0
        for j in range(i):
            if h[j] != 0:
                g = (j * nq) // i
                group_mass[g] += h[j]
                group_nz[g] += 1.0
        qsum = group_mass.sum()
        psum = tail[0]
        if qsum <= 0 or psum <= 0:
            continue
        kl = 0.0
        for j in range(i):
            pj = h[j] + (tail[i] if j == i - 1 else 0.0)
            if pj <= 0:
                continue
            if h[j] == 0:
                kl = np.inf
                break
            g = (j * nq) // i
            qj = group_mass[g] / group_nz[g] / qsum
            pj /= psum
            kl += pj * np.log(pj / qj)
        if kl <= best_kl:
            best_kl = kl
            best_i = i
    return best_i
