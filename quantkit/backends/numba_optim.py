"""numba kernels of the 8-bit AdamW step (the arithmetic of :mod:`quantkit.reference`).

One pass per parameter: each work item owns whole blocks of one row (a row is a slice along
dim 0; see ``reference.row_blocks``), decodes their moment codes, updates the parameter and the
moments in float32 registers and small per-item buffers, and re-encodes the moments. No float32
copy of a moment as large as the parameter exists at any time.

Encoding is the nearest-magnitude rule of ``reference.encode_magnitudes`` computed from the bits of
the float32 value: in the normal range adding half a unit of the kept mantissa to the bit pattern
and shifting rounds to nearest with ties up (a carry moves into the exponent, which is the next
table entry); below the smallest normal the run is linear and an exact scaled value is rounded
to the nearest integer, ties to even (one vector rounding).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from .. import reference
from .._constants import CHUNK
from .numba_chunks import chunk_bounds, chunk_count

#: Gradients are accepted up to this magnitude: beyond it ``g * g`` could overflow float32.
GRAD_LIMIT = np.float32(2.0 ** 60)

_ITEMS = 64  # blocks per parallel work item
_FLOAT_STATE_CHUNK = 1 << 14  # values per work item of the float32-state step


@njit(inline="always")
def _bad_in_chunk(g, c):
    lo, hi = chunk_bounds(c, g.size)
    gs = g[lo:hi]
    count = 0
    for i in range(hi - lo):
        count += not (abs(gs[i]) <= GRAD_LIMIT)
    return count


@njit(parallel=True, cache=True)
def _count_bad_parallel(g):
    n_chunks = chunk_count(g.size)
    bad = np.zeros(n_chunks, np.int64)
    for c in prange(n_chunks):
        bad[c] = _bad_in_chunk(g, c)
    return bad.sum()


@njit(cache=True)
def _count_bad_serial(g):
    bad = 0
    for c in range(chunk_count(g.size)):
        bad += _bad_in_chunk(g, c)
    return bad


def count_bad_gradients(g) -> int:
    """Number of elements of the flat float32 ``g`` that are NaN, +-Inf or larger in magnitude
    than GRAD_LIMIT (one chunk: no parallel region, whose start costs more than the work)."""
    if g.size <= CHUNK:
        return _count_bad_serial(g)
    return _count_bad_parallel(g)


@intrinsic
def _bits_of(typingctx, x):
    """The int32 bit pattern of a float32 value (a register move, no conversion)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.int32))

    return types.int32(types.float32), codegen


@intrinsic
def _float_of(typingctx, bits):
    """The float32 value of a bit pattern: the low 32 bits of an integer."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = args[0]
        if bits.bitwidth > 32:
            low = builder.trunc(low, context.get_value_type(types.int32))
        return builder.bitcast(low, context.get_value_type(types.float32))

    return types.float32(bits), codegen


@njit(inline="always")
def _magnitude_index(y, ybits, code):
    """Nearest magnitude index of y >= 0 (its float32 bit pattern is ybits) in the map ``code``
    (:func:`code_map`): ties to even in the linear run, up above it.

    Both rules are computed and one is selected (no branch, so the loop vectorises); every
    integer step is truncated to int32 (numba widens int32 arithmetic to int64, which would
    halve the vector width).
    """
    shift, half_unit, normal_base = code[1], code[5], code[6]
    smallest_normal, linear_mult, top_index = code[7], code[8], code[9]
    k_linear = np.int32(np.rint(y * linear_mult))  # the product is exact: a power of two
    k_normal = np.int32(np.int32(np.int32(ybits + half_unit) >> shift) - normal_base)
    k = k_linear if y < smallest_normal else k_normal
    return min(k, top_index)


@njit(inline="always")
def _magnitude(k, code):
    """Magnitude of index k in the map ``code``: float32 bits ``((k - per_binade) << shift) +
    normal_offset`` above the linear run, ``k * linear_step`` (exact) in it."""
    per_binade, shift, normal_offset, linear_step = code[0], code[1], code[2], code[3]
    normal = _float_of(np.int32(np.int32(np.int32(k - per_binade) << shift) + normal_offset))
    return np.float32(k) * linear_step if k < per_binade else normal


def code_map(levels: int, mantissa_bits: int) -> tuple:
    """The int32/float32 constants of a code map (reference.moment_magnitudes): ``(per_binade,
    shift, normal_offset, linear_step, top, half_unit, normal_base, smallest_normal,
    linear_mult, top_index)``.

    A magnitude index ``k >= per_binade`` has the float32 bits
    ``((k - per_binade) << shift) + normal_offset``; below it the magnitude is
    ``k * linear_step``; ``top`` is the largest magnitude. Encoding adds ``half_unit`` (half a
    kept-mantissa unit) to the bits, shifts, subtracts ``normal_base``, and multiplies by
    ``linear_mult`` below ``smallest_normal``.
    """
    per = 1 << mantissa_bits
    e_min = 1 - (levels // per - 1)
    shift = 23 - mantissa_bits
    linear_step = 2.0 ** (e_min - mantissa_bits)
    if levels >= 2 * per:     # the top index is the last of the binade at exponent 0
        top = 1.0 + (per - 1) / per
    else:                     # a linear run only
        top = (levels - 1) * linear_step
    i32, f32 = np.int32, np.float32
    return (i32(per), i32(shift), i32((127 + e_min) << 23), f32(linear_step), f32(top),
            i32(1 << (shift - 1)), i32(((127 + e_min) << mantissa_bits) - per),
            f32(2.0 ** e_min), f32(2.0 ** (mantissa_bits - e_min)), i32(levels - 1))


#: The code maps of the step. The kernel reads them inside its parallel loop, where numba
#: compiles them as constants: a shift by a constant stays a 32-bit vector shift, a shift by a
#: run-time amount is widened to 64 bits (a third slower step). numba's disk cache is keyed on
#: this file only: after changing reference.M_CODE or R_CODE, clear this module's __pycache__.
M_MAP = code_map(*reference.M_CODE)
R_MAP = code_map(*reference.R_CODE)


@njit(parallel=True, cache=True)
def adamw8bit_step(p, g, m_codes, m_absmax, r_codes, r_absmax, block_size,
                   beta1, one_minus_beta1, beta2, one_minus_beta2, decay, r_eps, r_step_size):
    """In-place 8-bit AdamW (``reference.adamw8bit_step``) on 2-d float32 ``p`` (rows, L) with
    gradient ``g`` of the same shape.

    ``m_codes`` int8 and ``r_codes`` uint8 have p's shape; all four are C-contiguous;
    ``m_absmax``/``r_absmax`` are float32 (rows, blocks per row); the code maps are
    ``reference.M_CODE`` and ``reference.R_CODE`` (``M_MAP``, ``R_MAP``).

    Per element ``reference.adamw8bit_update``: the code's magnitude, built from its index's
    float32 bits (``_magnitude``, no table lookup), times the block's factor
    ``f32(beta1 * absmax / top)`` for m; the squared magnitude times ``f32(f32(unit^2) * beta2)``
    for v. Two loops per block, each over at most ``2 * block_size`` values, both vectorised
    (no gathers; the block maxima are integer maxima of the sign-cleared float bits, exact for
    finite values): update p and the moments + maxima, keeping the new moments in an L1 buffer;
    then scale by ``top / absmax`` and encode.
    """
    rows, length = p.shape
    per_row = max(1, length // block_size)
    n_blocks = rows * per_row
    n_items = (n_blocks + _ITEMS - 1) // _ITEMS
    sign_clear = np.int32(0x7FFFFFFF)
    # one-dimensional contiguous slices: the loops then know their unit stride (a 2-d row slice
    # costs a third more per block)
    p_flat = p.reshape(-1)
    g_flat = g.reshape(-1)
    m_flat = m_codes.reshape(-1)
    r_flat = r_codes.reshape(-1)
    for item in prange(n_items):
        buf_m = np.empty(2 * block_size, np.float32)
        buf_r = np.empty(2 * block_size, np.float32)
        for blk in range(item * _ITEMS, min((item + 1) * _ITEMS, n_blocks)):
            row = blk // per_row
            b = blk - row * per_row
            lo = b * block_size
            hi = length if b == per_row - 1 else lo + block_size
            n = hi - lo
            start = row * length + lo
            ps = p_flat[start:start + n]
            gs = g_flat[start:start + n]
            mc = m_flat[start:start + n]
            rc = r_flat[start:start + n]
            m_top = M_MAP[4]
            r_top = R_MAP[4]
            m_factor = beta1 * (m_absmax[row, b] / m_top)
            r_unit = r_absmax[row, b] / r_top
            v_factor = (r_unit * r_unit) * beta2
            m_top_bits = np.int32(0)
            r_top_bits = np.int32(0)
            for i in range(n):
                c = np.int32(mc[i])
                mag = _magnitude(abs(c), M_MAP)
                r_mag = _magnitude(np.int32(rc[i]), R_MAP)
                gi = gs[i]
                m = (mag if c >= 0 else -mag) * m_factor + one_minus_beta1 * gi
                r = np.sqrt((r_mag * r_mag) * v_factor + one_minus_beta2 * (gi * gi))
                ps[i] = ps[i] * decay - (m * r_step_size) / (r + r_eps)
                buf_m[i] = m
                buf_r[i] = r
                m_top_bits = max(m_top_bits, np.int32(_bits_of(m) & sign_clear))
                r_top_bits = max(r_top_bits, _bits_of(r))
            m_max = _float_of(m_top_bits)
            r_max = _float_of(r_top_bits)
            m_inv = m_top / m_max if m_max > 0 else np.float32(0)
            r_inv = r_top / r_max if r_max > 0 else np.float32(0)
            m_absmax[row, b] = m_max
            r_absmax[row, b] = r_max
            for i in range(n):
                y = buf_m[i] * m_inv
                y_bits = np.int32(_bits_of(y) & sign_clear)
                k = _magnitude_index(_float_of(y_bits), y_bits, M_MAP)
                mc[i] = np.int8(-k if y < 0 else k)
                y = buf_r[i] * r_inv
                rc[i] = np.uint8(_magnitude_index(y, _bits_of(y), R_MAP))
    return 0


@njit(parallel=True, cache=True)
def adamw32_step(p, g, m, r, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay,
                 step_size, bc2_sqrt):
    """In-place AdamW with float32 moments (m and r = sqrt(v)), flat arrays of one size."""
    n = p.size
    for c in prange(chunk_count(n, _FLOAT_STATE_CHUNK)):
        lo, hi = chunk_bounds(c, n, _FLOAT_STATE_CHUNK)
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
def magnitude_indices(y, code):
    """``reference.encode_magnitudes`` through the kernel's bit rule for the map ``code``
    (:func:`code_map`; for tests), y float32 >= 0."""
    out = np.empty(y.size, np.int64)
    for i in range(y.size):
        out[i] = _magnitude_index(y[i], _bits_of(y[i]), code)
    return out


@njit(cache=True)
def decoded_magnitudes(code):
    """The kernel's magnitude of every index of the map ``code`` (:func:`code_map`; for tests:
    it must equal ``reference.moment_magnitudes``)."""
    out = np.empty(code[9] + 1, np.float32)
    for k in range(code[9] + 1):
        out[k] = _magnitude(np.int32(k), code)
    return out
