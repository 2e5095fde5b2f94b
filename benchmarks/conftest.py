"""Shared machinery for the benchmark suite.

``pytest benchmarks/`` measures at full size (median of repeats after warm-up) and writes
``benchmarks/results/<cpu class>/<name>.json`` plus ``summary.md`` in the same folder, where the
CPU class (``avx512_vnni_amx``, ``avx512_vnni``, ``avx512``, ``avx2`` or ``generic``,
:func:`cpu_class`) keeps each kind of machine's figures apart: a run on one never overwrites another's.
``pytest benchmarks/ --quick`` runs the same code at small sizes with one repeat (CI uses it so the
benchmarks cannot rot) and writes to a temporary folder instead, leaving the committed results alone.
``--gpu`` adds the CUDA benchmarks and fails if no CUDA device is present.

Every benchmark measures quantkit and its baselines side by side in one run and records ratios.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

import pytest

RESULTS_ROOT = Path(__file__).parent / "results"


class Bench:
    """Sizes, timing and result recording for one benchmark session."""

    def __init__(self, quick: bool, out_dir: Path):
        self.quick = quick
        self.out_dir = out_dir
        self.repeats = 1 if quick else 7

    def size(self, full, quick):
        """The problem size for this mode."""
        return quick if self.quick else full

    def time(self, fn, *, repeats=None, warmup=1, sync=None) -> float:
        """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls.

        ``sync`` (e.g. torch.cuda.synchronize) is called before each clock read.
        """
        return self.time_many({"fn": fn}, repeats=repeats, warmup=warmup, sync=sync)["fn"]

    def time_many(self, fns: dict, *, repeats=None, warmup=1, sync=None) -> dict:
        """Median wall time in seconds of each ``fns[name]()``, the calls interleaved round-robin.

        Interleaving spreads the machine's noise (other processes, CPU frequency) evenly over
        the functions being compared, so their ratios hold better than with one loop each.
        """
        repeats = repeats or self.repeats
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                if sync:
                    sync()
                start = time.perf_counter()
                fn()
                if sync:
                    sync()
                times[name].append(time.perf_counter() - start)
        return {name: statistics.median(t) for name, t in times.items()}

    def record(self, name: str, result: dict, markdown: str) -> None:
        """Write ``<name>.json`` (raw figures) and ``<name>.md`` (the summary's section)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        payload = {"name": name, "quick": self.quick, "machine": machine(), "result": result}
        (self.out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, default=float))
        (self.out_dir / f"{name}.md").write_text(markdown.rstrip() + "\n")

    @staticmethod
    def table(header: list, rows: list) -> str:
        """A GitHub Markdown table (see :func:`markdown_table`)."""
        return markdown_table(header, rows)


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": _cpu_model(),
            "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        from quantkit import matmul

        chosen = matmul.describe()
        info["cpu_features"] = {k: chosen[k] for k in ("avx2", "fma", "avx512", "avx512_vnni",
                                                              "amx_int8")}
        info["int8_linear_paths"] = {k: chosen[k] for k in ("w8a8", "weight_only_batch1",
                                                            "weight_only_batch256", "forced")}
    except ImportError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def cpu_class() -> str:
    """The results folder of this machine: its widest int8-relevant SIMD feature set."""
    f = machine().get("cpu_features", {})
    if f.get("avx512_vnni"):
        return "avx512_vnni_amx" if f.get("amx_int8") else "avx512_vnni"
    if f.get("avx512"):
        return "avx512"
    return "avx2" if f.get("avx2") and f.get("fma") else "generic"



def cpu_line() -> str:
    """One line naming the CPU and its SIMD features, for the head of every result section."""
    m = machine()
    f = m.get("cpu_features", {})
    flags = ", ".join(name for name in ("avx2", "fma", "avx512", "avx512_vnni", "amx_int8")
                      if f.get(name))
    missing = ", ".join(name for name in ("avx512", "avx512_vnni") if not f.get(name))
    return (f"CPU: {m['processor']}, {m['cpus']} CPUs; features: {flags or 'none detected'}"
            + (f" (no {missing})" if missing else "") + f"; torch {m.get('torch', '-')}.")


def _cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown_table(header: list, rows: list) -> str:
    """A GitHub Markdown table; floats are shown with 4 significant digits."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


RESULTS = RESULTS_ROOT / cpu_class()


@pytest.fixture(scope="session")
def bench(request, tmp_path_factory):
    quick = request.config.getoption("--quick")
    out_dir = tmp_path_factory.mktemp("bench-results") if quick else RESULTS
    request.config.stash[_OUT_DIR] = out_dir
    return Bench(quick, out_dir)


_OUT_DIR = pytest.StashKey[Path]()


def _plots():
    """benchmarks/plots.py, loaded by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("quantkit_bench_plots",
                                                  Path(__file__).with_name("plots.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_sessionfinish(session, exitstatus):
    """Draw the PNG plots (when matplotlib is installed) and, in full mode, gather every
    ``<name>.md`` of the results into ``summary.md``."""
    out_dir = session.config.stash.get(_OUT_DIR, None)
    if out_dir is not None and out_dir.exists():
        for line in _plots().draw_all(out_dir):
            print(f"\nbenchmarks: {line}")
    if session.config.getoption("--quick") or not RESULTS.exists():
        return
    sections = sorted(p for p in RESULTS.glob("*.md") if p.name != "summary.md")
    if not sections:
        return
    m = machine()
    head = ["# quantkit benchmark summary", "",
            "Gathered from full-mode runs of `pytest benchmarks/` (each section from the last "
            f"run of its benchmark) on {m['processor']}, {m['cpus']} CPUs, "
            f"{m['platform']}, torch {m.get('torch', '-')}" + (f", GPU {m['gpu']}" if 'gpu' in m else "")
            + ". Medians of repeats after warm-up; ratios are within one run.", "", cpu_line(),
            "Each section says the CPU it was measured on; a section from another machine "
            "keeps its own line.", ""]
    body = [p.read_text() for p in sections]
    pictures = [f"`{p.name}`" for p in sorted(RESULTS.glob("*.png"))]
    if pictures:   # PNGs are drawn by every run and not committed (see .gitignore)
        body += ["## Plots", "", "Drawn beside this file by the run (with matplotlib): "
                 + ", ".join(pictures) + ".", ""]
    (RESULTS / "summary.md").write_text("\n".join(head) + "\n" + "\n".join(body))
