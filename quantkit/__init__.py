"""quantkit: int8 quantization kernels for NumPy and PyTorch, with MSE-optimal calibration.

``from quantkit import quantize, dequantize, QTensor``. Importing compiles nothing and starts no CUDA;
numba kernels compile on first call and are cached on disk.
"""

from ._constants import QMAX
from .ops import dequantize, quantize
from .qtensor import QTensor

__all__ = ["QMAX", "QTensor", "dequantize", "quantize"]
__version__ = "0.1.0"
