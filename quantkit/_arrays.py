"""Array kinds and argument checks shared by the public entry points.

quantkit takes NumPy arrays and torch tensors. torch is never imported here: a torch tensor can only
exist if the caller already imported torch, so ``sys.modules`` tells whether to look for one.
Inputs are never modified: conversions make new arrays, and kernels only read them.
"""

from __future__ import annotations

import numbers
import sys

import numpy as np

from ._constants import MAX_ALPHA, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, MIN_POSITIVE_ALPHA

#: Kinds of array a caller can pass: a NumPy array, a CPU torch tensor, a CUDA torch tensor.
NUMPY, TORCH_CPU, TORCH_CUDA = "numpy", "torch", "cuda"

_NUMPY_FLOATS = (np.float16, np.float32, np.float64)


def _torch():
    return sys.modules.get("torch")


def is_torch_tensor(x) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def kind_of(x, name: str = None) -> str:
    """NUMPY, TORCH_CPU or TORCH_CUDA for a supported array; TypeError (naming the argument
    ``name`` when given) otherwise."""
    what = f"{name} must be" if name else "expected"
    if isinstance(x, np.ndarray):
        return NUMPY
    if is_torch_tensor(x):
        if x.device.type == "cpu":
            return TORCH_CPU
        if x.device.type == "cuda":
            return TORCH_CUDA
        raise TypeError(f"{name + ': ' if name else ''}tensors on device {x.device} are not "
                        f"supported; use a CPU or CUDA tensor")
    raise TypeError(f"{what} a NumPy array or a torch tensor, got {type(x).__name__}")


def float32_numpy(x, name: str = "x") -> np.ndarray:
    """x (NumPy array or CPU tensor) as a float32 NumPy array, zero-copy when it already is one.

    float16, bfloat16 and float64 are converted (a new array); any other dtype is a TypeError.
    Finite float64 values beyond float32's range are a ValueError (they would become Inf).
    """
    if isinstance(x, np.ndarray):
        if x.dtype == np.float32:
            return x
        if x.dtype.type in _NUMPY_FLOATS:
            with np.errstate(over="ignore"):
                out = x.astype(np.float32)
            if x.dtype == np.float64:
                _check_float32_range(x, out, name)
            return out
        raise TypeError(f"{name} must be a floating-point array (float16/32/64), got dtype {x.dtype}")
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise TypeError(f"{name} must be a CPU tensor here, got one on {x.device}")
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/"
                            f"float64), got {x.dtype}")
        out = x.detach().to(torch.float32).numpy()
        if x.dtype == torch.float64:
            _check_float32_range(x.detach().numpy(), out, name)
        return out
    raise TypeError(f"{name} must be a NumPy array or a torch tensor, got {type(x).__name__}")


def _check_float32_range(x64: np.ndarray, x32: np.ndarray, name: str) -> None:
    """ValueError if a finite float64 value of x64 became Inf in its float32 conversion x32 (NaN
    and Inf themselves are left to the non-finite check that follows)."""
    over = np.isinf(x32) & np.isfinite(x64)
    if over.any():
        flat = int(np.argmax(over.reshape(-1)))
        index = tuple(int(i) for i in np.unravel_index(flat, x64.shape))
        raise ValueError(f"{name} has {int(over.sum())} finite value(s) beyond float32's range "
                         f"(|x| > {np.finfo(np.float32).max}); the first is "
                         f"{x64.reshape(-1)[flat]!r} at index {index}: quantkit computes in "
                         f"float32")


def wrap_like(a: np.ndarray, kind: str):
    """Return the NumPy result ``a`` as the caller's kind (zero-copy torch tensor for TORCH_CPU)."""
    if kind == TORCH_CPU:
        return _torch().from_numpy(a)
    return a


def normalize_axis(axis, ndim: int, name: str = "axis") -> int:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array with {ndim} dimension(s)")
    return int(axis) % ndim


def check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise TypeError(f"block_size must be an int or None, got {type(block_size).__name__}")
    b = int(block_size)
    if not (MIN_BLOCK_SIZE <= b <= MAX_BLOCK_SIZE and b & (b - 1) == 0):
        raise ValueError(f"block_size must be a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}],"
                         f" got {block_size}")
    return b


def n_blocks(size: int, block_size: int) -> int:
    return -(-size // block_size)


def granularity(shape: tuple, axis, block_size):
    """Checked (axis, block_size) for an array of ``shape``, and the shape alpha must have:
    ``()`` per tensor, ``(shape[axis],)`` per channel, ``(n_blocks,)`` per block."""
    if axis is not None and block_size is not None:
        raise ValueError("pass either axis= (per channel) or block_size= (blockwise), not both")
    if axis is not None:
        axis = normalize_axis(axis, len(shape))
        return axis, None, (shape[axis],)
    if block_size is not None:
        block_size = check_block_size(block_size)
        return None, block_size, (n_blocks(int(np.prod(shape, dtype=np.int64)), block_size),)
    return None, None, ()


def alpha_array(alpha, expected_shape: tuple) -> np.ndarray:
    """alpha as a float32 NumPy array of ``expected_shape``: finite, 0 or in [MIN_POSITIVE_ALPHA,
    MAX_ALPHA] once in float32 (a positive alpha that rounds to 0 is refused too), else ValueError.

    ``expected_shape`` is ``()`` per tensor, ``(channels,)`` per channel, ``(n_blocks,)`` per block.
    """
    if is_torch_tensor(alpha):
        if alpha.is_floating_point() or alpha.dtype in _torch_int_dtypes():
            alpha = alpha.detach().cpu().to(_torch().float64).numpy()
        else:
            raise TypeError(f"alpha must hold real numbers, got a tensor of {alpha.dtype}")
    if isinstance(alpha, (bool, np.bool_)):
        raise TypeError("alpha must be a real number or an array of them, got a bool")
    try:
        a = np.asarray(alpha)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"alpha must be a real number or an array of them: {exc}") from None
    if a.dtype.kind not in "fiu":
        raise TypeError(f"alpha must be a real number or an array of them, got dtype {a.dtype}")
    if a.shape != expected_shape:
        if expected_shape == ():
            raise ValueError(f"alpha must be a scalar for per-tensor quantization, got shape "
                             f"{a.shape} (pass axis= or block_size= for one alpha per slice)")
        raise ValueError(f"alpha must have shape {expected_shape}, got {a.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        a32 = a.astype(np.float32)
    finite = np.isfinite(a32)
    if not finite.all():
        first = int(np.argmin(finite.reshape(-1)))
        raise ValueError(f"alpha must be finite in float32; entry {first} is "
                         f"{a.reshape(-1)[first]!r}")
    if (a32 < 0).any():
        first = int(np.argmax((a32 < 0).reshape(-1)))
        raise ValueError(f"alpha must be >= 0; entry {first} is {a.reshape(-1)[first]!r}")
    tiny = (a > 0) & (a32 < np.float32(MIN_POSITIVE_ALPHA))  # a: before rounding to float32
    if tiny.any():
        first = int(np.argmax(tiny.reshape(-1)))
        raise ValueError(f"alpha must be 0 or at least {MIN_POSITIVE_ALPHA} (127/alpha must fit "
                         f"in float32); entry {first} is {a.reshape(-1)[first]!r}")
    huge = a32 > np.float32(MAX_ALPHA)
    if huge.any():
        first = int(np.argmax(huge.reshape(-1)))
        raise ValueError(f"alpha must be at most {MAX_ALPHA} (127 * float32(alpha / 127) must be "
                         f"finite in float32); entry {first} is {a.reshape(-1)[first]!r}")
    return a32


def _torch_int_dtypes():
    torch = _torch()
    return (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def nonfinite_error(x: np.ndarray, count: int, name: str = "x") -> ValueError:
    """The error for ``count`` NaN/Inf elements in ``x``, naming the first in C order."""
    flat_bad = ~np.isfinite(x).reshape(-1)
    first = int(np.argmax(flat_bad))
    index = tuple(int(i) for i in np.unravel_index(first, x.shape)) if x.ndim else ()
    value = x.reshape(-1)[first]
    return ValueError(f"{name} has {count} non-finite value(s) (NaN or Inf); the first is "
                      f"{value} at index {index}")


def check_codes_and_scale(data, scale, axis, block_size) -> None:
    """The invariants of a QTensor's fields (``axis`` normalized, ``block_size`` checked): int8
    codes, float32 scales of the same kind of array, and a scale shape that fits the codes'
    current shape. Checked by the constructor and again wherever the kernels read the fields,
    since a field may have been replaced, or the codes reshaped in place, since then."""
    kind = kind_of(data)
    if str(data.dtype) not in ("int8", "torch.int8"):
        raise TypeError(f"data must hold int8 codes, got {data.dtype}")
    if kind_of(scale) != kind:
        raise TypeError(f"scale must be the same kind of array as data ({kind}), "
                        f"got {type(scale).__name__}")
    if str(scale.dtype) not in ("float32", "torch.float32"):
        raise TypeError(f"scale must be float32, got {scale.dtype}")
    shape = tuple(data.shape)
    if axis is not None:
        if not 0 <= axis < len(shape):
            raise ValueError(f"axis={axis} is out of range for codes of shape {shape}")
        expected = (shape[axis],)
    elif block_size is not None:
        expected = (n_blocks(int(np.prod(shape, dtype=np.int64)), block_size),)
    else:
        expected = ()
    if tuple(scale.shape) != expected:
        raise ValueError(f"scale must have shape {expected} for codes of shape {shape} at this "
                         f"granularity, got {tuple(scale.shape)}")


def check_scale_values(scale) -> None:
    """Scales must be finite and >= 0 (any kind of array; a CUDA one is reduced on its device)."""
    if is_torch_tensor(scale):
        torch = _torch()
        s = scale.detach()
        bad = ~(torch.isfinite(s) & (s >= 0))
        if not bool(bad.any()):
            return
        first = int(torch.nonzero(bad.reshape(-1))[0, 0])
        value = float(s.reshape(-1)[first])
    else:
        s = np.asarray(scale)
        bad = ~(np.isfinite(s) & (s >= 0))
        if not bad.any():
            return
        first = int(np.argmax(bad.reshape(-1)))
        value = float(s.reshape(-1)[first])
    raise ValueError(f"scale must be finite and >= 0; entry {first} is {value}")
