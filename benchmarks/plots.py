"""PNG plots of the benchmark results, drawn at the end of ``pytest benchmarks/`` (see conftest.py).

* ``throughput.png``: GB/s of every op in ``quantize_throughput.json`` as bars, with the copy
  bandwidth measured in the same run drawn as a line.
* ``calibration_curve.png``: the exact MSE-vs-alpha curve (clipping and rounding parts, each
  method's alpha marked) of a heavy-tailed sample, drawn by :mod:`quantkit.report`.

Needs matplotlib (``pip install "quantkit[plot]"``); without it nothing is drawn and a note says
so.
Can also be run by hand: ``python benchmarks/plots.py [RESULTS_DIR]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def draw_all(out_dir: Path) -> list[str]:
    """Draw every plot whose inputs are present in ``out_dir``; one message per plot."""
    out_dir = Path(out_dir)
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        return ['matplotlib is not installed: no PNG plots (pip install "quantkit[plot]")']
    messages = []
    source = out_dir / "quantize_throughput.json"
    if source.exists():
        messages.append(f"wrote {throughput_plot(source, out_dir / 'throughput.png')}")
    messages.append(calibration_plot(out_dir / "calibration_curve.png"))
    return messages


def throughput_plot(source: Path, png: Path) -> Path:
    """Bars of GB/s per op from bench_quantize's JSON, with the copy bandwidth as a line."""
    import matplotlib.pyplot as plt

    payload = json.loads(Path(source).read_text())
    result = payload["result"]
    rows = result["rows"]
    names = list(rows)
    gbs = [rows[k]["gb_per_s"] for k in names]
    colors = ["#999999" if k.startswith("copy") else
              "#1f77b4" if "quantkit" in k else "#d62728" for k in names]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.6))
    y = np.arange(len(names))[::-1]
    ax.barh(y, gbs, color=colors)
    for yi, value, k in zip(y, gbs, names):
        label = f"{value:.1f}"
        speedup = rows[k].get("speedup_vs_torch")
        if speedup:
            label += f"  ({speedup:.1f}x torch)"
        ax.text(value, yi, " " + label, va="center", fontsize=8)
    ax.axvline(result["copy_gb_per_s"], color="#444444", linestyle="--", linewidth=1)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("GB/s (5 bytes/element for quantize and dequantize, 8 for a copy)")
    elements = result["elements"]
    mode = " (quick mode)" if payload.get("quick") else ""
    ax.set_title(f"int8 throughput, {elements / 2**20:.0f}M float32 elements{mode}\n"
                 f"blue: quantkit, red: baselines, dashed: 2-thread copy "
                 f"{result['copy_gb_per_s']:.1f} GB/s", fontsize=9)
    ax.set_xlim(0, max(gbs) * 1.35)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)


def calibration_sample(n: int = 1 << 18) -> np.ndarray:
    """Student-t(3) data, the heavy-tailed case where clipping at |x|max costs ~10x the optimum."""
    return np.random.default_rng(3).standard_t(3, n).astype(np.float32)


def calibration_plot(png: Path) -> str:
    """The MSE-vs-alpha picture of :func:`calibration_sample` through quantkit.report."""
    try:
        from quantkit import report
    except ImportError as exc:
        return f"no calibration curve: quantkit.report is not available ({exc})"
    result = report.plot_calibration(calibration_sample(), png,
                                     title="int8 MSE vs alpha, Student-t(3), 256K elements")
    best = result.best_method()
    return f"wrote {png} (best method on this sample: {best})"


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results"
    for line in draw_all(folder):
        print(line)
