"""csrc/build.py's CPU library build: a toolchain that cannot assemble the AMX kernels still gets
the rest of the library (without AMX), unless the build is strict (CI)."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _build_module():
    spec = importlib.util.spec_from_file_location("quantkit_csrc_build_cpu",
                                                  ROOT / "csrc" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compiler_without_amx(folder: Path, cc: str) -> str:
    """A compiler that fails like an assembler without AMX unless the AMX kernels are left out."""
    script = folder / "cc-without-amx"
    script.write_text('#!/bin/sh\ncase " $* " in *" -DQK_NO_AMX "*) exec ' + cc + ' "$@";; esac\n'
                      'echo "Error: no such instruction: tileloadd" >&2\nexit 1\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_cpu_library_builds_without_amx_where_the_toolchain_lacks_it(tmp_path, capsys):
    build = _build_module()
    cc = build.find_cc()
    if cc is None or os.name != "posix":
        pytest.skip("no C compiler (or not a POSIX shell) here")
    fake = _compiler_without_amx(tmp_path, cc)
    out = build.build_cpu(tmp_path / "lib.so", cc=fake, quiet=True)
    assert "AMX kernels did not compile here" in capsys.readouterr().out
    lib = ctypes.CDLL(str(out))
    lib.qk_cpu_features.restype = ctypes.c_int
    assert lib.qk_cpu_features() & 8 == 0            # no AMX reported: the path is refused
    with pytest.raises(RuntimeError, match="no such instruction: tileloadd"):
        build.build_cpu(tmp_path / "strict.so", cc=fake, quiet=True, strict=True)
    assert not (tmp_path / "strict.so").exists()
