"""The NumPy reference: the executable definition of quantkit's arithmetic.

Every backend (numba on the CPU, CUDA in ``csrc/``) must produce exactly these codes and scales,
compared with ``np.array_equal``. This module is written to be read, not to be fast.

Symmetric int8, narrow range (``QMAX = 127``)::

    scale     = float32(alpha / 127)                      dequantization step
    inv_scale = float32(127 / alpha), 0 where alpha == 0  quantization multiplier
    q         = clamp(rint(x * inv_scale), -127, 127)     int8; rint rounds half to even
    x_hat     = float32(q) * scale

All products and quotients are float32 operations (one rounding each). alpha is float32, finite,
either 0 or at least ``MIN_POSITIVE_ALPHA`` (about 3.7e-37, where ``127 / alpha`` would overflow
float32), and at most ``MAX_ALPHA`` (one step below FLT_MAX, where ``127 * scale`` would overflow);
the public API rejects other alphas, so ``inv_scale`` and every ``x_hat`` are finite.

Inputs to the quantize functions must be finite float32; the public API (:mod:`quantkit.ops`) checks
that before any kernel runs. :func:`count_nonfinite` is the reference for the fused check.
"""

from __future__ import annotations

import numpy as np

from ._constants import QMAX

def scale_from_alpha(alpha) -> np.ndarray:
    """``scale = float32(alpha / 127)``, elementwise; ``alpha`` float32, finite, ``>= 0``."""
    alpha = np.asarray(alpha, dtype=np.float32)
    return np.asarray(alpha / np.float32(QMAX), dtype=np.float32)


def inv_scale_from_alpha(alpha) -> np.ndarray:
    """``inv_scale = float32(127 / alpha)``, 0 where ``alpha == 0``."""
    alpha = np.asarray(alpha, dtype=np.float32)
    inv = np.zeros(alpha.shape, dtype=np.float32)
    np.divide(np.float32(QMAX), alpha, out=inv, where=alpha > 0)
    return inv


def count_nonfinite(x: np.ndarray) -> int:
    """Number of NaN or +-Inf elements in ``x``."""
    return int(np.count_nonzero(~np.isfinite(x)))


def _round_and_clamp(y: np.ndarray) -> np.ndarray:
    """``clamp(rint(y), -127, 127)`` as int8 (``np.rint`` rounds half to even)."""
    return np.clip(np.rint(y), -QMAX, QMAX).astype(np.int8)


def _times(x: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """float32 ``x * inv``; overflow to +-Inf (huge x) is harmless: it clamps to +-127."""
    with np.errstate(over="ignore"):
        return x * inv


def _channel_shape(ndim: int, axis: int, channels: int) -> tuple:
    shape = [1] * ndim
    shape[axis] = channels
    return tuple(shape)


def quantize_per_tensor(x: np.ndarray, alpha) -> np.ndarray:
    """Codes ``clamp(rint(x * inv_scale(alpha)), -127, 127)`` with one alpha for the whole tensor."""
    x = np.asarray(x, dtype=np.float32)
    inv = inv_scale_from_alpha(alpha)
    return _round_and_clamp(_times(x, inv))


def dequantize_per_tensor(q: np.ndarray, scale) -> np.ndarray:
    """``float32(q) * scale`` with one scale for the whole tensor."""
    return np.asarray(q).astype(np.float32) * np.float32(scale)


def quantize_per_channel(x: np.ndarray, alpha: np.ndarray, axis: int) -> np.ndarray:
    """Codes with one alpha per slice ``x.take(c, axis)``; ``alpha`` has ``x.shape[axis]`` entries."""
    x = np.asarray(x, dtype=np.float32)
    inv = inv_scale_from_alpha(alpha).reshape(_channel_shape(x.ndim, axis, x.shape[axis]))
    return _round_and_clamp(_times(x, inv))


def dequantize_per_channel(q: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """``float32(q) * scale[c]`` for each slice ``c`` along ``axis``."""
    q = np.asarray(q)
    scale = np.asarray(scale, dtype=np.float32).reshape(_channel_shape(q.ndim, axis, q.shape[axis]))
    return q.astype(np.float32) * scale


def _blocks(flat: np.ndarray, block_size: int) -> np.ndarray:
    """The flattened tensor padded with zeros to whole blocks, as (n_blocks, block_size)."""
    n_blocks = -(-flat.size // block_size)
    padded = np.zeros(n_blocks * block_size, dtype=flat.dtype)
    padded[: flat.size] = flat
    return padded.reshape(n_blocks, block_size)


def quantize_blockwise(x: np.ndarray, alpha: np.ndarray, block_size: int) -> np.ndarray:
    """Codes with one alpha per block of ``block_size`` consecutive elements of ``x`` in C order.

    Block ``b`` holds flat elements ``[b * block_size, (b + 1) * block_size)``; the last may be short.
    """
    x = np.asarray(x, dtype=np.float32)
    inv = inv_scale_from_alpha(alpha)
    codes = _round_and_clamp(_times(_blocks(x.reshape(-1), block_size), inv[:, None]))
    return codes.reshape(-1)[: x.size].reshape(x.shape)


def dequantize_blockwise(q: np.ndarray, scale: np.ndarray, block_size: int) -> np.ndarray:
    """``float32(q) * scale[b]`` for each block ``b`` of the flattened codes."""
    q = np.asarray(q)
    scale = np.asarray(scale, dtype=np.float32)
    values = _blocks(q.reshape(-1), block_size).astype(np.float32) * scale[:, None]
    return values.reshape(-1)[: q.size].reshape(q.shape)


def absmax_per_block(x: np.ndarray, block_size: int) -> np.ndarray:
    """``max |x|`` over each block of the flattened tensor (the "max" alpha per block)."""
    x = np.asarray(x, dtype=np.float32)
    return np.abs(_blocks(x.reshape(-1), block_size)).max(axis=1).astype(np.float32)


# --------------------------------------------------------- the int8 Linear with weight blocks
#
# A weight W (N, K) quantized in blocks of B consecutive values of each row (B divides K, so the
# blocks of the C-order flattening are row blocks): codes (N, K) and scales S (N, K / B), block g
# of row j covering k in [g * B, (g + 1) * B).


def linear_w8a8_blocks(q_x: np.ndarray, s_x: np.ndarray, codes: np.ndarray, scale: np.ndarray,
                       block_size: int, bias=None) -> np.ndarray:
    """W8A8 with block-scaled weights: ``y = t * s_x[:, None] + bias`` where ``t = 0`` and, for each
    block g in order, ``t = t + float32(C_g) * S[:, g]``, ``C_g = q_x[:, g] @ codes[:, g].T`` the
    exact integer product over block g (every float32 operation rounded once)."""
    q_x, codes = np.asarray(q_x), np.asarray(codes)
    scale = np.asarray(scale, dtype=np.float32)
    m, k = q_x.shape
    t = np.zeros((m, codes.shape[0]), np.float32)
    for g in range(k // block_size):
        cols = slice(g * block_size, (g + 1) * block_size)
        exact = q_x[:, cols].astype(np.int64) @ codes[:, cols].astype(np.int64).T
        t = t + exact.astype(np.float32) * scale[None, :, g]
    y = t * np.asarray(s_x, dtype=np.float32)[:, None]
    return y if bias is None else y + np.asarray(bias, dtype=np.float32)


def linear_w8_blocks(x: np.ndarray, codes: np.ndarray, scale: np.ndarray, block_size: int,
                     bias=None) -> np.ndarray:
    """Weight-only with block-scaled weights: ``y = x @ W_hat.T + bias`` with the dequantized weight
    ``W_hat = float32(codes) * S[:, k // B]`` (one rounding per weight). The sum is taken in float64
    and rounded to float32 once: kernels agree with it to float32 summation error, not bit for
    bit (their order is docs/DESIGN.md section 6's)."""
    scale = np.asarray(scale, dtype=np.float32)
    w_hat = np.asarray(codes).astype(np.float32) * np.repeat(scale, block_size, axis=1)
    y = np.asarray(x, dtype=np.float64) @ w_hat.astype(np.float64).T
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)
    return y.astype(np.float32)


# ------------------------------------------------------------------- 8-bit optimizer states
#
# AdamW keeps two moments per parameter: m (signed) and v (non-negative). quantkit stores each
# in 8-bit codes with one float32 absmax per block (docs/DESIGN.md section 7):
#
# * a block never crosses a row (a slice along dim 0): a row of L values is cut into
#   n = max(1, L // block_size) blocks, all of block_size values except the last, which takes the
#   remainder (so it holds block_size .. 2 * block_size - 1 values, or L when L < block_size).
#   Sharding along dim 0 (FSDP2) therefore never splits a block.
# * a code is an index into a small floating-point table ("minifloat"): ``mantissa_bits`` bits of
#   mantissa, the rest exponent, with a linear (subnormal) run from 0; the largest entry is
#   ``table_top``. The first moment uses 128 magnitudes (5 mantissa bits) and a sign (int8
#   codes -127..127, sign kept, so quantization never flips the sign of m and 0 stays exactly 0);
#   the second moment stores r = sqrt(v) with 256 magnitudes (5 mantissa bits; uint8 codes).
# * encoding a block: absmax = max |x| (float32), inv = float32(table_top / absmax) (0 when
#   absmax == 0), y = float32(|x| * inv), code = the nearest table entry to y: ties to the even
#   index in the linear run, to the larger magnitude above it. Decoding: table[code] * unit, with
#   unit = float32(absmax / table_top) computed once per block (table[code] is exact in float32,
#   so a decode is one rounding).
# * the step (adamw8bit_step) folds the per-block factors into the update instead of decoding
#   first: m' = (+-table[c_m]) * f32(beta1 * unit_m) + ..., v' = table[c_r]^2 * f32(f32(unit_r^2)
#   * beta2) + ... (table[c]^2 is exact: at most 12 significant bits).


def _e_min(levels: int, mantissa_bits: int) -> int:
    """Exponent of the smallest normal magnitude: the top binade sits at exponent 0."""
    return 1 - (levels // (1 << mantissa_bits) - 1)


def moment_magnitudes(levels: int, mantissa_bits: int) -> np.ndarray:
    """The ``levels`` magnitudes of a code map, increasing from 0 (float32, exact).

    Index ``k < 2**mantissa_bits`` is the linear run ``k * 2**(e_min - mantissa_bits)``; above it
    index ``k = (e - e_min + 1) * 2**mantissa_bits + f`` is ``2**e * (1 + f / 2**mantissa_bits)``.
    ``e_min`` puts the top binade at exponent 0, so the largest magnitude lies in [1, 2).
    """
    per_binade = 1 << mantissa_bits
    if levels % per_binade:
        raise ValueError("levels must be a multiple of 2**mantissa_bits")
    e_min = _e_min(levels, mantissa_bits)
    k = np.arange(levels, dtype=np.float64)
    linear = k * 2.0 ** (e_min - mantissa_bits)
    e = np.floor(k / per_binade) - 1 + e_min
    f = k - np.floor(k / per_binade) * per_binade
    normal = 2.0 ** e * (1 + f / per_binade)
    return np.where(k < per_binade, linear, normal).astype(np.float32)


def decode_unit(absmax, levels: int, mantissa_bits: int):
    """``float32(absmax / table_top)``: the value of magnitude 1 in a block (the top code decodes
    to ``table_top * unit``, absmax within one rounding); elementwise over an array of absmax."""
    return (np.asarray(absmax, np.float32) / moment_magnitudes(levels, mantissa_bits)[-1]).astype(
        np.float32)


def encode_magnitudes(y: np.ndarray, levels: int, mantissa_bits: int) -> np.ndarray:
    """Index of the magnitude nearest to each ``y >= 0``, as int64.

    In the linear run (``y`` below the smallest normal magnitude ``2**e_min``) the index is
    ``rint(y * 2**(mantissa_bits - e_min))`` (exact product; ties to the even index); above it,
    the nearest magnitude with ties to the larger (the midpoints of neighbouring magnitudes are
    exact in float32, so the comparison is exact). ``y`` above the top magnitude takes the top
    index.
    """
    mags = moment_magnitudes(levels, mantissa_bits)
    e_min = _e_min(levels, mantissa_bits)
    y = np.asarray(y, np.float32)
    mid = ((mags[:-1].astype(np.float64) + mags[1:]) / 2).astype(np.float32)
    nearest = np.searchsorted(mid, y, side="right")
    linear = np.minimum(np.rint(y * 2.0 ** (mantissa_bits - e_min)), levels - 1)
    return np.where(y < 2.0 ** e_min, linear, nearest).astype(np.int64)


def row_blocks(length: int, block_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of the blocks of one row of ``length`` values."""
    n = max(1, length // block_size)
    bounds = [b * block_size for b in range(n)] + [length]
    return list(zip(bounds[:-1], bounds[1:]))


def _encode_block(x: np.ndarray, levels: int, mantissa_bits: int, signed: bool):
    """(codes, absmax) of one block of float32 values."""
    absmax = np.float32(np.max(np.abs(x))) if x.size else np.float32(0)
    top = moment_magnitudes(levels, mantissa_bits)[-1]
    inv = np.float32(top / absmax) if absmax > 0 else np.float32(0)
    y = (np.abs(x) * inv).astype(np.float32)
    k = encode_magnitudes(y, levels, mantissa_bits)
    if signed:
        return np.where(x < 0, -k, k).astype(np.int8), absmax
    return k.astype(np.uint8), absmax


def _decode_block(codes: np.ndarray, absmax, levels: int, mantissa_bits: int, signed: bool):
    """Decode one block of every row: ``codes`` (rows, n), ``absmax`` (rows,)."""
    mags = moment_magnitudes(levels, mantissa_bits)
    k = np.abs(codes.astype(np.int64))
    unit = decode_unit(absmax, levels, mantissa_bits)
    values = (mags[k] * np.reshape(unit, (-1, 1))).astype(np.float32)
    return np.where(codes < 0, -values, values).astype(np.float32) if signed else values


#: The code maps of the two moments: (levels, mantissa_bits). See docs/DESIGN.md section 7.
M_CODE = (128, 5)
R_CODE = (256, 5)


def encode_moments(x2d: np.ndarray, block_size: int, signed: bool, code=None):
    """Codes (shape of ``x2d``) and absmax per block (rows, blocks per row) of a 2-d array."""
    levels, mantissa_bits = code or (M_CODE if signed else R_CODE)
    x2d = np.asarray(x2d, np.float32)
    rows, length = x2d.shape
    blocks = row_blocks(length, block_size)
    codes = np.zeros(x2d.shape, np.int8 if signed else np.uint8)
    absmax = np.zeros((rows, len(blocks)), np.float32)
    for r in range(rows):
        for b, (lo, hi) in enumerate(blocks):
            codes[r, lo:hi], absmax[r, b] = _encode_block(x2d[r, lo:hi], levels, mantissa_bits,
                                                          signed)
    return codes, absmax


def decode_moments(codes: np.ndarray, absmax: np.ndarray, block_size: int, signed: bool,
                   code=None) -> np.ndarray:
    """float32 values of codes made by :func:`encode_moments`."""
    levels, mantissa_bits = code or (M_CODE if signed else R_CODE)
    out = np.zeros(codes.shape, np.float32)
    for b, (lo, hi) in enumerate(row_blocks(codes.shape[1], block_size)):
        out[:, lo:hi] = _decode_block(codes[:, lo:hi], absmax[:, b], levels, mantissa_bits,
                                      signed)
    return out


#: The names of :func:`adamw_scalars`, in the order csrc/optim.cu takes them.
ADAMW_SCALARS = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "decay",
                 "step_size", "bc2_sqrt", "r_eps", "r_step_size")
#: The scalars of the CPU kernels, in their argument order (backends/numba_optim.py).
ADAMW8BIT_KERNEL_SCALARS = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "decay",
                            "r_eps", "r_step_size")
ADAMW32_KERNEL_SCALARS = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "decay",
                          "step_size", "bc2_sqrt")


def adamw_scalars(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                  step: int) -> dict:
    """The float32 constants of AdamW step ``step`` (1-based), computed in float64 once.

    ``decay = 1 - lr * weight_decay``, ``step_size = lr / (1 - beta1**step)``,
    ``bc2_sqrt = sqrt(1 - beta2**step)``; for the 8-bit step, which divides by ``r' + r_eps``
    instead of ``r' / bc2_sqrt + eps``: ``r_eps = eps * bc2_sqrt`` and
    ``r_step_size = step_size * bc2_sqrt`` (the same quotient, one division fewer).
    """
    f = np.float32
    bc2_sqrt = np.sqrt(1.0 - beta2 ** step)
    return {
        "beta1": f(beta1), "one_minus_beta1": f(1.0 - beta1),
        "beta2": f(beta2), "one_minus_beta2": f(1.0 - beta2),
        "eps": f(eps), "decay": f(1.0 - lr * weight_decay),
        "step_size": f(lr / (1.0 - beta1 ** step)),
        "bc2_sqrt": f(bc2_sqrt),
        "r_eps": f(eps * bc2_sqrt),
        "r_step_size": f(lr * bc2_sqrt / (1.0 - beta1 ** step)),
    }


def adamw_update(p, g, m, r, s: dict):
    """One AdamW step on float32 arrays, every operation one float32 rounding, in this order::

        m' = beta1 * m + (1 - beta1) * g
        r' = sqrt(beta2 * r * r + (1 - beta2) * (g * g))        r = sqrt(v)
        p' = p * decay - step_size * (m' / (r' / bc2_sqrt + eps))

    Returns ``(p', m', r')``; the inputs are not modified.
    """
    f32 = np.float32
    p, g, m, r = (np.asarray(a, f32) for a in (p, g, m, r))
    m_new = (s["beta1"] * m).astype(f32) + (s["one_minus_beta1"] * g).astype(f32)
    v_new = (s["beta2"] * (r * r).astype(f32)).astype(f32) + (
        s["one_minus_beta2"] * (g * g).astype(f32)).astype(f32)
    r_new = np.sqrt(v_new.astype(f32)).astype(f32)
    denom = ((r_new / s["bc2_sqrt"]).astype(f32) + s["eps"]).astype(f32)
    p_new = (p * s["decay"]).astype(f32) - (s["step_size"] * (m_new / denom).astype(f32)).astype(f32)
    return p_new.astype(f32), m_new.astype(f32), r_new


def adamw8bit_update(p, g, m_mag, m_factor, r_mag, v_factor, s: dict):
    """The 8-bit step's update on float32 arrays, every operation one float32 rounding::

        m' = m_mag * m_factor + (1 - beta1) * g
        v' = (r_mag * r_mag) * v_factor + (1 - beta2) * (g * g)
        r' = sqrt(v')
        p' = p * decay - (m' * r_step_size) / (r' + r_eps)

    ``m_mag`` is the signed table magnitude of m's code and ``m_factor = f32(beta1 * unit_m)``;
    ``r_mag`` the table magnitude of r's code (``r_mag * r_mag`` is exact) and
    ``v_factor = f32(f32(unit_r * unit_r) * beta2)``; the factors broadcast per element. This is
    :func:`adamw_update` with the decode's unit folded into beta1 and beta2 and the bias
    correction of r folded into r_eps and r_step_size: the same quantities, rounded differently.
    Returns ``(p', m', r')``.
    """
    f32 = np.float32
    p, g, m_mag, m_factor, r_mag, v_factor = (np.asarray(a, f32) for a in (
        p, g, m_mag, m_factor, r_mag, v_factor))
    m_new = (m_mag * m_factor).astype(f32) + (s["one_minus_beta1"] * g).astype(f32)
    v_new = ((r_mag * r_mag).astype(f32) * v_factor).astype(f32) + (
        s["one_minus_beta2"] * (g * g).astype(f32)).astype(f32)
    r_new = np.sqrt(v_new.astype(f32)).astype(f32)
    step = ((m_new * s["r_step_size"]).astype(f32) / (r_new + s["r_eps"]).astype(f32)).astype(f32)
    p_new = (p * s["decay"]).astype(f32) - step
    return p_new.astype(f32), m_new.astype(f32), r_new


def _per_element(per_block: np.ndarray, length: int, block_size: int) -> np.ndarray:
    """(rows, length) array repeating each block's value (rows, blocks per row) over its values."""
    out = np.empty((per_block.shape[0], length), per_block.dtype)
    for b, (lo, hi) in enumerate(row_blocks(length, block_size)):
        out[:, lo:hi] = per_block[:, b:b + 1]
    return out


def adamw8bit_step(p, g, m_codes, m_absmax, r_codes, r_absmax, block_size: int, s: dict,
                   m_code=None, r_code=None):
    """One 8-bit AdamW step on a 2-d parameter (rows, L): table magnitudes of the codes and the
    blocks' factors, :func:`adamw8bit_update`, encode (:func:`encode_moments`).

    The parameter update uses the moments before they are re-encoded. Returns new arrays
    ``(p, m_codes, m_absmax, r_codes, r_absmax)``.
    """
    f32 = np.float32
    m_levels, m_bits = m_code or M_CODE
    r_levels, r_bits = r_code or R_CODE
    m_codes, r_codes = np.asarray(m_codes), np.asarray(r_codes)
    length = m_codes.shape[1]
    m_table = moment_magnitudes(m_levels, m_bits)
    m_mag = m_table[np.abs(m_codes.astype(np.int64))]
    m_mag = np.where(m_codes < 0, -m_mag, m_mag).astype(f32)
    r_mag = moment_magnitudes(r_levels, r_bits)[r_codes.astype(np.int64)]
    m_unit = decode_unit(m_absmax, m_levels, m_bits)
    r_unit = decode_unit(r_absmax, r_levels, r_bits)
    m_factor = (s["beta1"] * m_unit).astype(f32)
    v_factor = ((r_unit * r_unit).astype(f32) * s["beta2"]).astype(f32)
    p_new, m_new, r_new = adamw8bit_update(
        p, g, m_mag, _per_element(m_factor, length, block_size), r_mag,
        _per_element(v_factor, length, block_size), s)
    m_codes, m_absmax = encode_moments(m_new, block_size, True, m_code)
    r_codes, r_absmax = encode_moments(r_new, block_size, False, r_code)
    return p_new, m_codes, m_absmax, r_codes, r_absmax


# ----------------------------------------------------- the exact MSE and its minimum by brute force


def quantization_mse(x: np.ndarray, alpha, counts=None) -> float:
    """The exact mean squared error of ``x`` quantized per tensor with ``alpha``.

    ``x_hat = dequantize_per_tensor(quantize_per_tensor(x, alpha), scale_from_alpha(alpha))`` in
    float32, ``e = float64(x - x_hat)`` (the float32 difference), and::

        mse = sum(counts * e * e) / sum(counts)        in float64

    where value ``x[i]`` occurs ``counts[i]`` times (once each without ``counts``: ``mean(e * e)``).
    The per-tensor ``mse`` of :func:`quantkit.quantization_mse`, up to the order of the additions.
    """
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    alpha = np.float32(alpha)
    x_hat = dequantize_per_tensor(quantize_per_tensor(x, alpha), scale_from_alpha(alpha))
    e = (x - x_hat).astype(np.float64)
    if counts is None:
        return float(np.mean(e * e))
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    return float(np.dot(e * e, counts) / counts.sum())


def brute_force_mse(x: np.ndarray, grid: int = 2000, refinements: int = 2,
                    counts=None) -> tuple[float, float]:
    """``(alpha, mse)``: the lowest :func:`quantization_mse` found by trying a dense grid of alphas.

    With ``A = max|x|`` and ``h = A / grid``, the alphas ``h, 2h, ..., grid * h = A``; then
    ``refinements`` times, 101 evenly spaced alphas on ``[max(b - h, h / 100), min(b + h, A)]``
    around the best alpha ``b`` so far, with ``h /= 50`` after each round. Every alpha is tried as
    float32 (the alpha quantize takes); the first lowest error wins, and a round replaces ``b`` only
    with a strictly lower error. ``x`` (with ``counts`` as in :func:`quantization_mse`) is used as
    float32. All zeros: ``(0.0, 0.0)``.

    The error is piecewise smooth in alpha with many small jumps, so this is an upper bound of the
    true minimum over float32 alphas, not the minimum itself; it never exceeds the error at ``A``
    (an alpha of the grid). It is the oracle the searches of quantkit.calibration are held to.
    """
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    amax = float(np.abs(x).max()) if x.size else 0.0
    if amax == 0:
        return 0.0, 0.0

    def lowest(alphas):
        errors = [quantization_mse(x, np.float32(a), counts) for a in alphas]
        i = int(np.argmin(errors))
        return alphas[i], errors[i]

    step = amax / grid
    best, best_mse = lowest(np.arange(1, grid + 1) * step)
    for _ in range(refinements):
        alpha, mse = lowest(np.linspace(max(best - step, step / 100), min(best + step, amax), 101))
        if mse < best_mse:
            best, best_mse = alpha, mse
        step /= 50
    return float(np.float32(best)), float(best_mse)
