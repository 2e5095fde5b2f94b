"""What the int8 Linear product tests share: the paths and the skip rule for a path this machine
cannot run."""

from __future__ import annotations

import pytest

from quantkit import matmul
from quantkit.backends import native_cpu

INT8_PATHS = ("amx", "vnni", "avx2", "generic", "int_mm", "float")
FUSED_PATHS = ("amx", "vnni", "avx2", "generic")


def skip_unless_runnable(path: str) -> None:
    """pytest.skip unless this machine can run ``path`` (the reason names what is missing)."""
    if path in FUSED_PATHS:
        reason = native_cpu.unavailable_reason()
        if reason is not None:
            pytest.skip(reason)
        if not native_cpu.path_supported(path):
            need = {"vnni": "AVX-512 BW/VL and VNNI",
                    "amx": "AMX-INT8 (with the tile state granted by the OS)"}.get(path, "AVX2/FMA")
            pytest.skip(f"this CPU ({matmul.cpu_info()['model']}) lacks {need} for {path!r}")
