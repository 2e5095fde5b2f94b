"""numba kernels of the 8-bit AdamW step (the arithmetic of :mod:`quantkit.reference`).

One pass per parameter: each work item owns whole blocks of one row (a row is a slice along
dim 0; see ``reference.row_blocks``), decodes their moment codes, updates the parameter and the
moments in float32 registers and small per-item buffers, and re-encodes the moments. No float32
copy of a moment as large as the parameter exists at any time.

Encoding is the nearest-magnitude rule of ``reference.encode_magnitudes`` computed from the bits of
the float32 value: in the normal range adding half a unit of the kept mantissa to the bit pattern
and shifting rounds to nearest with ties up (a carry moves into the exponent, which is the next
table entry); below the smallest normal the run is linear and an exact scaled floor decides.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

#: Gradients are accepted up to this magnitude: beyond it ``g * g`` could overflow float32.
GRAD_LIMIT = np.float32(2.0 ** 60)

_ITEMS = 64  # blocks per parallel work item


@njit(parallel=True, cache=True)
def count_bad_gradients(g):
    """Number of elements that are NaN, +-Inf or larger in magnitude than GRAD_LIMIT."""
    n = g.size
    chunk = 1 << 16
    n_chunks = (n + chunk - 1) // chunk
    bad = np.zeros(n_chunks, np.int64)
    for c in prange(n_chunks):
        lo = c * chunk
        hi = min(lo + chunk, n)
        gs = g[lo:hi]
        count = 0
        for i in range(hi - lo):
            count += not (abs(gs[i]) <= GRAD_LIMIT)
        bad[c] = count
    return bad.sum()


@njit(inline="always")
def _magnitude_index(y, ybits, per_binade, mantissa_bits, e_min, smallest_normal, linear_mult,
                     top_index):
    """Nearest magnitude index of y >= 0 (its float32 bit pattern is ybits), ties up.

    Both rules are computed and one is selected (no branch, so the loop vectorises).
    """
    t = y * linear_mult  # exact: a power of two
    k_linear = np.int32(t)
    k_linear += np.int32(t - np.float32(k_linear) >= np.float32(0.5))
    shift = 23 - mantissa_bits
    k_normal = ((ybits + np.int32(1 << (shift - 1))) >> shift) - np.int32(
        (127 + e_min) << mantissa_bits) + np.int32(per_binade)
    k = k_linear if y < smallest_normal else k_normal
    return min(k, np.int32(top_index))


@njit(parallel=True, cache=True)
def adamw8bit_step(p, g, m_codes, m_absmax, r_codes, r_absmax, block_size,
                   m_table, m_mbits, r_table, r_mbits,
                   beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bc2_sqrt):
    """In-place 8-bit AdamW on 2-d float32 ``p`` (rows, L) with gradient ``g`` of the same shape.

    ``m_codes`` int8 and ``r_codes`` uint8 have p's shape; ``m_absmax``/``r_absmax`` are float32
    (rows, blocks per row). ``*_table`` are the decoding tables (``reference.moment_table``),
    ``*_mbits`` their mantissa bits.
    """
    rows, length = p.shape
    per_row = max(1, length // block_size)
    n_blocks = rows * per_row
    n_items = (n_blocks + _ITEMS - 1) // _ITEMS
    m_levels = m_table.size
    r_levels = r_table.size
    m_top_index = m_levels - 1
    # m's table indexed by code + (levels - 1): -table[k] for negative codes
    m_signed = np.empty(2 * m_levels - 1, np.float32)
    for k in range(m_levels):
        m_signed[m_top_index + k] = m_table[k]
        m_signed[m_top_index - k] = -m_table[k]
    m_per = np.int64(1) << m_mbits
    r_per = np.int64(1) << r_mbits
    m_emin = 1 - (m_levels // m_per - 1)
    r_emin = 1 - (r_levels // r_per - 1)
    # the smallest normal magnitude 2**e_min and the top magnitude, in table_top units
    m_lin = np.float32(2.0 ** m_emin)
    r_lin = np.float32(2.0 ** r_emin)
    m_mult = np.float32(2.0 ** (m_mbits - m_emin))
    r_mult = np.float32(2.0 ** (r_mbits - r_emin))
    m_top = np.float32(1.0 + (m_per - 1) / m_per)
    r_top = np.float32(1.0 + (r_per - 1) / r_per)
    for item in prange(n_items):
        buf_m = np.empty(2 * block_size, np.float32)
        buf_r = np.empty(2 * block_size, np.float32)
        bits_m = buf_m.view(np.int32)
        bits_r = buf_r.view(np.int32)
        for blk in range(item * _ITEMS, min((item + 1) * _ITEMS, n_blocks)):
            row = blk // per_row
            b = blk - row * per_row
            lo = b * block_size
            hi = length if b == per_row - 1 else lo + block_size
            n = hi - lo
            ps = p[row, lo:hi]
            gs = g[row, lo:hi]
            mc = m_codes[row, lo:hi]
            rc = r_codes[row, lo:hi]
            m_scale = m_absmax[row, b]
            r_scale = r_absmax[row, b]
            m_max = np.float32(0)
            r_max = np.float32(0)
            for i in range(n):
                m = m_signed[np.int32(mc[i]) + m_top_index] * m_scale
                r = r_table[np.int32(rc[i])] * r_scale
                gi = gs[i]
                m = beta1 * m + one_minus_beta1 * gi
                v = beta2 * (r * r) + one_minus_beta2 * (gi * gi)
                r = np.sqrt(v)
                denom = r / bc2_sqrt + eps
                ps[i] = ps[i] * decay - step_size * (m / denom)
                buf_m[i] = m
                buf_r[i] = r
                m_max = max(m_max, abs(m))
                r_max = max(r_max, r)
            m_inv = m_top / m_max if m_max > 0 else np.float32(0)
            r_inv = r_top / r_max if r_max > 0 else np.float32(0)
            m_absmax[row, b] = m_max
            r_absmax[row, b] = r_max
            for i in range(n):
                buf_m[i] = buf_m[i] * m_inv
                buf_r[i] = buf_r[i] * r_inv
            for i in range(n):
                y = buf_m[i]
                k = _magnitude_index(abs(y), bits_m[i] & 0x7FFFFFFF, m_per, m_mbits, m_emin,
                                     m_lin, m_mult, m_levels - 1)
                mc[i] = np.int8(-k if y < 0 else k)
                rc[i] = np.uint8(_magnitude_index(buf_r[i], bits_r[i], r_per, r_mbits, r_emin,
                                                  r_lin, r_mult, r_levels - 1))
    return 0


@njit(parallel=True, cache=True)
def adamw32_step(p, g, m, r, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay,
                 step_size, bc2_sqrt):
    """In-place AdamW with float32 moments (m and r = sqrt(v)), flat arrays of one size."""
    n = p.size
    chunk = 1 << 14
    for c in prange((n + chunk - 1) // chunk):
        lo = c * chunk
        hi = min(lo + chunk, n)
        ps = p[lo:hi]
        gs = g[lo:hi]
        ms = m[lo:hi]
        rs = r[lo:hi]
        for i in range(hi - lo):
            gi = gs[i]
            mi = beta1 * ms[i] + one_minus_beta1 * gi
            ri = rs[i]
            ri = np.sqrt(beta2 * (ri * ri) + one_minus_beta2 * (gi * gi))
            ps[i] = ps[i] * decay - step_size * (mi / (ri / bc2_sqrt + eps))
            ms[i] = mi
            rs[i] = ri
    return 0


@njit(cache=True)
def magnitude_indices(y, levels, mantissa_bits):
    """``reference.encode_magnitudes`` through the kernels' bit rule (for tests), y float32 >= 0."""
    per = np.int64(1) << mantissa_bits
    e_min = 1 - (levels // per - 1)
    smallest_normal = np.float32(2.0 ** e_min)
    mult = np.float32(2.0 ** (mantissa_bits - e_min))
    bits = y.view(np.int32)
    out = np.empty(y.size, np.int64)
    for i in range(y.size):
        out[i] = _magnitude_index(y[i], bits[i], per, mantissa_bits, e_min, smallest_normal, mult,
                                  levels - 1)
    return out
