"""The NumPy reference: the executable definition of quantkit's arithmetic.

Every backend (numba on the CPU, CUDA in ``csrc/``) must produce exactly these codes and scales,
compared with ``np.array_equal``. This module is written to be read, not to be fast.

Symmetric int8, narrow range (``QMAX = 127``)::

    scale     = float32(alpha / 127)                      dequantization step
    inv_scale = float32(127 / alpha), 0 where alpha == 0  quantization multiplier
    q         = clamp(rint(x * inv_scale), -127, 127)     int8; rint rounds half to even
    x_hat     = float32(q) * scale

All products and quotients are float32 operations (one rounding each). alpha is float32, finite,
and either 0 or at least ``MIN_POSITIVE_ALPHA`` (about 3.7e-37, where ``127 / alpha`` would overflow
float32); the public API rejects other alphas, so ``inv_scale`` is always finite.

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
