"""quantkit: int8 quantization kernels for NumPy and PyTorch, with MSE-optimal calibration.

The flat public API::

    from quantkit import quantize, dequantize, QTensor          # the int8 core
    from quantkit import calibrate, Observer, quantization_mse  # calibration
    from quantkit import QuantLinear, quantize_model, load_quantized  # PyTorch layers
    from quantkit import save, load                             # int8 checkpoints (safetensors)

Importing compiles nothing, imports neither numba nor torch, and starts no CUDA: the modules behind
the names above load on first use, and numba kernels compile on first call (then come from the cache).
"""

from importlib import import_module

from ._constants import QMAX
from .ops import dequantize, quantize
from .qtensor import QTensor

__version__ = "0.1.0"

# Public name -> the submodule that defines it, imported on first access (PEP 562).
_LAZY = {
    "calibrate": "calibration",
    "Observer": "calibration",
    "quantization_mse": "calibration",
    "QuantLinear": "nn",
    "quantize_model": "nn",
    "load_quantized": "nn",
    "save": "io",
    "load": "io",
}

__all__ = ["QMAX", "QTensor", "dequantize", "quantize", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'quantkit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
