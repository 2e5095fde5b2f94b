"""QTensor: int8 codes plus their float32 scales and granularity."""

from __future__ import annotations

import numpy as np

from . import _arrays
from ._dispatch import dequantize_codes


class QTensor:
    """An int8-quantized tensor: ``x_hat = float32(data) * scale`` (broadcast by granularity).

    Attributes:
        data: int8 codes, a NumPy array or a torch tensor of the original shape.
        scale: float32 dequantization step(s), the same kind as ``data``: a scalar (0-d) per tensor,
            one per slice along ``axis`` per channel, one per block per block.
        axis: the channel axis (normalized to be >= 0) or None.
        block_size: the block length over the C-order flattening, or None.

    The constructor checks that these fit together and that the scales are finite and >= 0, so a
    QTensor rebuilt from a file is consistent; dequantizing checks the fields again (a field may
    have been replaced, or the codes reshaped in place, since).
    """

    __slots__ = ("data", "scale", "axis", "block_size")

    def __init__(self, data, scale, *, axis=None, block_size=None):
        axis, block_size = _checked_granularity(data, scale, axis, block_size)
        _arrays.check_scale_values(scale)
        self.data = data
        self.scale = scale
        self.axis = axis
        self.block_size = block_size

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def granularity(self) -> str:
        """"tensor", "channel" or "block"."""
        if self.axis is not None:
            return "channel"
        return "tensor" if self.block_size is None else "block"

    @property
    def nbytes(self) -> int:
        """Bytes of codes plus scales."""
        count = int(np.prod(self.data.shape, dtype=np.int64))
        return count + 4 * max(1, int(np.prod(self.scale.shape, dtype=np.int64)))

    def dequantize(self):
        """The float32 approximation ``float32(data) * scale``, the same kind as ``data``."""
        return dequantize_codes(self.data, self.scale, axis=self.axis, block_size=self.block_size)

    def __repr__(self) -> str:
        detail = {"channel": f", axis={self.axis}", "block": f", block_size={self.block_size}",
                  "tensor": ""}[self.granularity]
        kind = "torch" if _arrays.is_torch_tensor(self.data) else "numpy"
        return f"QTensor(shape={self.shape}, granularity={self.granularity!r}{detail}, {kind})"


def _checked_granularity(data, scale, axis, block_size):
    """(axis normalized, block_size checked) after checking the fields fit together."""
    for name, value, hint in (("data", data, ""),
                              ("scale", scale, " (a 0-d float32 array for one scale)")):
        try:
            _arrays.kind_of(value)
        except TypeError:
            raise TypeError(f"{name} must be a NumPy array or a torch tensor{hint}, got "
                            f"{type(value).__name__}") from None
    if axis is not None and block_size is not None:
        raise ValueError("a QTensor has either an axis or a block_size, not both")
    if axis is not None:
        axis = _arrays.normalize_axis(axis, len(tuple(data.shape)))
    elif block_size is not None:
        block_size = _arrays.check_block_size(block_size)
    _arrays.check_codes_and_scale(data, scale, axis, block_size)
    return axis, block_size


def with_checked_scales(data, scale, *, axis=None, block_size=None) -> QTensor:
    """A QTensor whose scale values the caller has checked: quantkit's kernels made them from
    checked alphas (float32(alpha / 127) of finite alphas >= 0), or the checkpoint writer and
    reader check them naming the tensor. The fields are checked to fit together as by the
    constructor; the values are not checked twice (no pass over the scales and, on CUDA, no
    device sync per call)."""
    q = QTensor.__new__(QTensor)
    q.axis, q.block_size = _checked_granularity(data, scale, axis, block_size)
    q.data = data
    q.scale = scale
    return q
