"""The loaded CUDA library under its former module name, for :mod:`quantkit.optim.adamw8bit`
(``cuda.library()``) until that module imports :mod:`cuda_library` itself. The CUDA backend is
cuda_library (loader, launch checks), cuda_layout, cuda_quantize, cuda_stats and cuda_optim."""

from .cuda_library import library  # noqa: F401
