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


@njit(inline="always")
def _code_constants(levels, mantissa_bits):
    """(per_binade, e_min, normal_offset, linear_step, top) of a code map (reference.moment_table).

    A magnitude index ``k >= per_binade`` has the float32 bits
    ``((k - per_binade) << (23 - mantissa_bits)) + normal_offset``; below it the magnitude is
    ``k * linear_step``; ``top`` is the largest magnitude.
    """
    per = np.int32(1) << mantissa_bits
    e_min = 1 - (levels // per - 1)
    normal_offset = np.int32((127 + e_min) << 23)
    linear_step = np.float32(2.0 ** (e_min - mantissa_bits))
    if levels >= 2 * per:     # the top index is the last of the binade at exponent 0
        top = np.float32(1.0 + (per - 1) / per)
    else:                     # a linear run only
        top = np.float32(levels - 1) * linear_step
    return per, e_min, normal_offset, linear_step, top


@njit(parallel=True, cache=True)
def adamw8bit_step(p, g, m_codes, m_absmax, r_codes, r_absmax, block_size,
                   m_levels, m_mbits, r_levels, r_mbits,
                   beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bc2_sqrt):
    """In-place 8-bit AdamW on 2-d float32 ``p`` (rows, L) with gradient ``g`` of the same shape.

    ``m_codes`` int8 and ``r_codes`` uint8 have p's shape; ``m_absmax``/``r_absmax`` are float32
    (rows, blocks per row); ``*_levels``/``*_mbits`` name the code maps (``reference.M_CODE``,
    ``reference.R_CODE``).

    A code decodes to ``float32(magnitude / top) * absmax`` (negated for negative m codes), the
    magnitude built from its index (see ``_code_constants``) rather than looked up: the quotient
    equals ``reference.moment_table`` entry for entry (``decoded_table`` is tested against it on
    every entry), and without table gathers and with the block maxima taken as integer maxima
    of the float bits (exact: the values are finite and the sign is cleared) every loop over a
    block vectorises. Five loops per block, each over at most ``2 * block_size`` values in L1:
    build the magnitude bits; update p and the moments; the two maxima; scale; encode.
    """
    rows, length = p.shape
    per_row = max(1, length // block_size)
    n_blocks = rows * per_row
    n_items = (n_blocks + _ITEMS - 1) // _ITEMS
    m_per, m_emin, m_offset, m_step, m_top = _code_constants(m_levels, m_mbits)
    r_per, r_emin, r_offset, r_step, r_top = _code_constants(r_levels, r_mbits)
    m_shift = 23 - m_mbits
    r_shift = 23 - r_mbits
    m_lin = np.float32(2.0 ** m_emin)      # the smallest normal magnitude
    r_lin = np.float32(2.0 ** r_emin)
    m_mult = np.float32(2.0 ** (m_mbits - m_emin))
    r_mult = np.float32(2.0 ** (r_mbits - r_emin))
    for item in prange(n_items):
        dec_m = np.empty(2 * block_size, np.float32)
        dec_r = np.empty(2 * block_size, np.float32)
        dec_m_bits = dec_m.view(np.int32)
        dec_r_bits = dec_r.view(np.int32)
        buf_m = np.empty(2 * block_size, np.float32)
        buf_r = np.empty(2 * block_size, np.float32)
        bits_m = buf_m.view(np.int32)
        bits_r = buf_r.view(np.int32)
        scratch = np.empty(2, np.int32)
        scratch_f = scratch.view(np.float32)
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
            for i in range(n):
                dec_m_bits[i] = ((abs(np.int32(mc[i])) - m_per) << m_shift) + m_offset
                dec_r_bits[i] = ((np.int32(rc[i]) - r_per) << r_shift) + r_offset
            for i in range(n):
                c = np.int32(mc[i])
                k = abs(c)
                mag = np.float32(k) * m_step if k < m_per else dec_m[i]
                t = mag / m_top
                m = (t if c >= 0 else -t) * m_scale
                k = np.int32(rc[i])
                mag = np.float32(k) * r_step if k < r_per else dec_r[i]
                r = (mag / r_top) * r_scale
                gi = gs[i]
                m = beta1 * m + one_minus_beta1 * gi
                v = beta2 * (r * r) + one_minus_beta2 * (gi * gi)
                r = np.sqrt(v)
                denom = r / bc2_sqrt + eps
                ps[i] = ps[i] * decay - step_size * (m / denom)
                buf_m[i] = m
                buf_r[i] = r
            m_top_bits = np.int32(0)
            r_top_bits = np.int32(0)
            for i in range(n):
                m_top_bits = max(m_top_bits, bits_m[i] & np.int32(0x7FFFFFFF))
                r_top_bits = max(r_top_bits, bits_r[i])
            scratch[0] = m_top_bits
            scratch[1] = r_top_bits
            m_max = scratch_f[0]
            r_max = scratch_f[1]
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


@njit(cache=True)
def decoded_table(levels, mantissa_bits):
    """The kernel's decoding of every magnitude index, ``float32(magnitude / top)`` (for tests:
    it must equal ``reference.moment_table``)."""
    per, e_min, offset, step, top = _code_constants(levels, mantissa_bits)
    bits = np.empty(levels, np.int32)
    out = bits.view(np.float32)
    for k in range(levels):
        bits[k] = ((np.int32(k) - per) << (23 - mantissa_bits)) + offset
    for k in range(levels):
        mag = np.float32(k) * step if k < per else out[k]
        out[k] = mag / top
    return out.copy()
