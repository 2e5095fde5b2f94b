"""Importing quantkit compiles nothing: numba, torch and CUDA stay unloaded until first use."""

import subprocess
import sys


def test_import_loads_neither_numba_nor_torch():
    code = ("import sys, quantkit; "
            "print(sorted(m for m in ('numba', 'torch', 'quantkit.backends.numba_cpu') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_names_resolve():
    import quantkit

    for name in ("quantize", "dequantize", "QTensor", "QMAX"):
        assert getattr(quantkit, name) is not None
    assert set(quantkit.__all__) <= set(dir(quantkit))
