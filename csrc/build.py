"""Build quantkit's compiled libraries: the one place that knows the flags.

* the CUDA library (csrc/*.cu) with nvcc;
* the CPU library (csrc/cpu/*.c: the int8 Linear kernels) with the C compiler (``cc``, ``gcc``
  or ``$CC``), with OpenMP; its AVX2 code is selected at run time, so one build runs on any
  x86-64 CPU (``python3 csrc/build.py --cpu``).

Used by ``setup.py`` (ahead of time, at install), by ``.ci/run`` (``--strict``, warnings as errors
including register spills) and by ``tools/gpu_check.sh``. Standard library only.

    python3 csrc/build.py [--out PATH] [--strict] [--arch 90 ...]

Targets: SASS for sm_75 (T4), sm_80 (A100) and sm_90 (H100/H200), plus PTX for the newest of them
so newer GPUs JIT-compile it. Architectures the installed nvcc no longer lists are left out, with
a note.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CSRC = Path(__file__).resolve().parent
SOURCES = ("quantize.cu", "stats.cu", "optim.cu")
LIBRARY_NAME = "_libquantkit_cuda.so"
DEFAULT_OUT = CSRC.parent / "quantkit" / LIBRARY_NAME
EMULATION_NAME = "_libquantkit_emulated.so"
ARCHS = ("75", "80", "90")
CPU_SOURCES = ("cpu/linear_int8.c",)
CPU_LIBRARY_NAME = "_libquantkit_cpu.so"
CPU_DEFAULT_OUT = CSRC.parent / "quantkit" / CPU_LIBRARY_NAME


def find_cc() -> str | None:
    """The C compiler: $CC, else cc or gcc from PATH, else None."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"]) or os.environ["CC"]
    return shutil.which("cc") or shutil.which("gcc")


def cpu_command(cc: str, out: Path) -> list:
    """The C compiler command that builds the CPU library at ``out``.

    No fast-math and no contraction (-ffp-contract=off): every float operation of the weight-only
    kernel is the one csrc/cpu/linear_int8.c writes, on every path.
    """
    return [cc, "-O2", "-std=c11", "-fPIC", "-shared", "-fopenmp", "-fvisibility=hidden",
            "-ffp-contract=off", "-fno-fast-math", "-Wall", "-Wextra", "-Werror",
            *(str(CSRC / s) for s in CPU_SOURCES), "-o", str(out), "-lm"]


def build_cpu(out=CPU_DEFAULT_OUT, *, cc=None, quiet=False, strict=False) -> Path:
    """Compile csrc/cpu/ into ``out``; raises RuntimeError (with the compiler's output) on failure.

    A toolchain that cannot build the AMX kernels (an assembler older than they are) gets the
    library without them, with a note, unless ``strict`` (CI: every kernel must compile).

    Written to a temporary name and renamed, so a process that has the old library loaded keeps
    a valid file.
    """
    cc = cc or find_cc()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    cmd = cpu_command(cc, tmp)
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 and not strict:   # a toolchain without AMX: the rest of the library
        retry = subprocess.run(cmd[:1] + ["-DQK_NO_AMX"] + cmd[1:], capture_output=True,
                               text=True)
        if retry.returncode == 0:
            print("quantkit: the CPU library's AMX kernels did not compile here; built without "
                  "them:\n" + result.stdout + result.stderr)
            result = retry
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError("building quantkit's CPU library failed:\n  " + " ".join(cmd) + "\n"
                           + result.stdout + result.stderr)
    os.replace(tmp, out)
    if not quiet:
        print(f"quantkit: built {out} with {cc} in {time.perf_counter() - start:.1f} s")
    return out


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME/bin, else from PATH, else None."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _run(args) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def supported_archs(nvcc: str) -> set:
    """The sm_XX numbers this nvcc can generate code for (``nvcc --list-gpu-code``)."""
    try:
        listed = _run([nvcc, "--list-gpu-code"]).split()
    except (subprocess.CalledProcessError, OSError):
        return set(ARCHS)  # old nvcc without the option: assume the classic targets
    return {item[3:] for item in listed if item.startswith("sm_")}


def gencode_flags(nvcc: str, archs=ARCHS) -> tuple:
    """(-gencode flags, the archs used): SASS for each supported arch, PTX for the newest."""
    available = supported_archs(nvcc)
    chosen = [a for a in archs if a in available]
    for missing in sorted(set(archs) - set(chosen)):
        print(f"quantkit: this nvcc cannot target sm_{missing}; building without it")
    if not chosen:
        raise RuntimeError(f"nvcc supports none of the target architectures {archs}")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in chosen[:-1]]
    newest = chosen[-1]
    flags.append(f"-gencode=arch=compute_{newest},code=[sm_{newest},compute_{newest}]")
    return flags, chosen


def warning_flags(nvcc: str, strict: bool, werror: bool = True) -> list:
    """Warnings as errors: nvcc's own, the host compiler's and, with ``strict``, ptxas spills.

    ``werror=False`` keeps the warnings visible but not fatal (for an unfamiliar toolchain whose
    own headers warn).
    """
    if not werror:
        return ["-Xcompiler=-Wall,-Wextra"]
    flags = ["-Xcompiler=-Wall,-Wextra,-Werror"]
    try:
        help_text = _run([nvcc, "--help"])
    except (subprocess.CalledProcessError, OSError):
        help_text = ""
    if "all-warnings" in help_text:
        flags += ["--Werror", "all-warnings"]
    if strict:
        flags += ["-Xptxas=-warn-spills,-warn-lmem-usage,-Werror"]
    return flags


def command(nvcc: str, out: Path, *, strict: bool = False, archs=ARCHS, werror=True) -> list:
    """The full nvcc command line that builds the shared library at ``out``."""
    gencode, _ = gencode_flags(nvcc, archs)
    # No --use_fast_math, and -fmad=false so no product is ever contracted into an FMA (the kernels
    # use __fmul_rn anyway; this keeps any future plain `*` exact too).
    return [nvcc, "-O3", "-std=c++17", "-shared", "-fmad=false",
            "-Xcompiler=-fPIC,-fvisibility=hidden",
            "-cudart=static", *warning_flags(nvcc, strict, werror), *gencode, "-I", str(CSRC),
            *(str(CSRC / s) for s in SOURCES), "-o", str(out)]


def build(out=DEFAULT_OUT, *, strict: bool = False, archs=ARCHS, nvcc=None, quiet=False,
          werror=True) -> Path:
    """Compile csrc/ into ``out``; raises RuntimeError (with nvcc's output) when it fails."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (put it on PATH or set CUDA_HOME)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(nvcc, out, strict=strict, archs=archs, werror=werror)
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError("building quantkit's CUDA library failed:\n  " + " ".join(cmd) + "\n"
                           + result.stdout + result.stderr)
    if not quiet:
        print(f"quantkit: built {out} with {nvcc} in {time.perf_counter() - start:.1f} s")
    return out


# ------------------------------------------------------------------- host emulation (no GPU)

_LAUNCH = re.compile(r"(\b[A-Za-z_]\w*(?:<[^<>;]*>)?)<<<([^>]*)>>>\(([^;]*)\);")
_SHARED = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\[\];")


def emulation_source(text: str) -> str:
    """A .cu file as C++ for host_emulation.h: launches become qk_emu::launch, shared memory a
    pointer into the emulated block's buffer."""
    def launch(m):
        return f"qk_emu::launch({m.group(2)}, [&] {{ {m.group(1)}({m.group(3)}); }});"

    def shared(m):
        return f"{m.group(1)} *{m.group(2)} = qk_emu::shared_memory<{m.group(1)}>();"

    return _SHARED.sub(shared, _LAUNCH.sub(launch, text))


def build_emulation(out, *, cxx: str = "g++", quiet=False) -> Path:
    """Compile csrc/*.cu for the CPU against host_emulation.h (same C ABI, host pointers)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for stub in ("cuda_runtime.h", "cuda_runtime_api.h"):
            (tmp / stub).write_text('#pragma once\n#include "host_emulation.h"\n')
        sources = []
        for name in SOURCES:
            target = tmp / (Path(name).stem + ".cpp")
            target.write_text(emulation_source((CSRC / name).read_text()))
            sources.append(str(target))
        cmd = [cxx, "-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-ffp-contract=off",
               "-fno-fast-math", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
               "-I", str(tmp), "-I", str(CSRC), *sources, "-o", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError("building the host emulation failed:\n  " + " ".join(cmd) + "\n"
                           + result.stdout + result.stderr)
    if not quiet:
        print(f"quantkit: built the host emulation {out}")
    return out


def _exit_status(build_fn, out) -> int:
    """0 when ``build_fn(out)`` builds, else 1 with its error on stderr."""
    try:
        build_fn(out)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="path of the shared library")
    parser.add_argument("--strict", action="store_true",
                        help="also treat ptxas warnings (register spills, local memory) as errors; "
                             "with --cpu, no fallback build without the AMX kernels")
    parser.add_argument("--no-werror", action="store_true",
                        help="warnings are not errors (diagnosing an unfamiliar toolchain)")
    parser.add_argument("--arch", action="append", help="sm number(s) to target, e.g. 90")
    parser.add_argument("--print-command", action="store_true", help="print the nvcc command")
    parser.add_argument("--emulate", action="store_true",
                        help="build the CPU emulation of the kernels (g++, no GPU) instead")
    parser.add_argument("--cpu", action="store_true",
                        help="build the CPU library (csrc/cpu/, C compiler) instead")
    args = parser.parse_args(argv)
    if args.cpu:
        return _exit_status(lambda out: build_cpu(out, strict=args.strict),
                            CPU_DEFAULT_OUT if args.out == str(DEFAULT_OUT) else args.out)
    if args.emulate:
        return _exit_status(build_emulation, CSRC.parent / "build" / EMULATION_NAME
                            if args.out == str(DEFAULT_OUT) else args.out)
    archs = tuple(args.arch) if args.arch else ARCHS
    nvcc = find_nvcc()
    if nvcc is None:
        print("quantkit: nvcc not found; nothing built", file=sys.stderr)
        return 2
    if args.print_command:
        print(" ".join(command(nvcc, Path(args.out), strict=args.strict, archs=archs,
                               werror=not args.no_werror)))
    return _exit_status(lambda out: build(out, strict=args.strict, archs=archs, nvcc=nvcc,
                                          werror=not args.no_werror), args.out)


if __name__ == "__main__":
    sys.exit(main())
