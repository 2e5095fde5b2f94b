"""The calibration report: MSE against alpha for one tensor, split into clipping and rounding error,
with the alpha of each calibration method marked.

``calibration_report(x)`` returns the numbers (for a text table: ``format_report``);
``plot_calibration(x, path)`` also draws them into a PNG. Drawing needs matplotlib, the optional
extra ``quantkit[plot]``; it is imported only there, without pyplot or any global backend change.
Every MSE here is exact (:func:`quantkit.quantization_mse` arithmetic) on the whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .calibration import METHODS, calibrate, quantization_mse
from .calibration._args import prepare as _prepare

_COLORS = {"max": "#d62728", "percentile": "#9467bd", "entropy": "#ff7f0e", "mse": "#2ca02c"}


@dataclass
class MethodResult:
    """One method's alpha, its exact MSE (with parts) and that MSE over the best one found."""

    alpha: float
    mse: float
    clipping: float
    rounding: float
    ratio: float


@dataclass
class CalibrationReport:
    """The exact MSE curve of one tensor and each method's point on it.

    ``alphas`` is a geometric grid from a quarter of the smallest method alpha (at least
    1e-4 * max |x|) up to max |x|, plus every method's alpha; ``mse == clipping + rounding``.
    """

    n: int
    shape: tuple
    amax: float
    alphas: np.ndarray
    mse: np.ndarray
    clipping: np.ndarray
    rounding: np.ndarray
    methods: dict = field(default_factory=dict)

    def best_method(self) -> str:
        return min(self.methods, key=lambda m: (self.methods[m].mse, m))


def _check_methods(methods) -> tuple:
    if isinstance(methods, str):
        methods = (methods,)
    methods = tuple(methods)
    if not methods:
        raise ValueError("methods must name at least one method")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods: {m!r} is unknown; choose from {METHODS}")
    return methods


def calibration_report(x, *, methods=METHODS, points: int = 200, percentile: float = 99.99
                       ) -> CalibrationReport:
    """The numbers of the calibration report for one tensor (per-tensor calibration).

    Args:
        x: NumPy array or CPU tensor of floats, finite, not empty (never modified).
        methods: the calibration methods to mark (any of "max", "percentile", "entropy", "mse").
        points: number of grid alphas for the curve (>= 2); cost is ``points`` exact passes.
        percentile: the option of the "percentile" method.

    Returns:
        CalibrationReport: the exact MSE, clipping and rounding parts over the grid, and for each
        method its alpha, exact MSE and that MSE divided by the lowest MSE among the methods.
    """
    methods = _check_methods(methods)
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an int >= 2, got {points!r}")
    x32, _ = _prepare(x)
    chosen = {}
    for m in methods:
        opts = {"percentile": percentile} if m == "percentile" else {}
        chosen[m] = calibrate(x32, m, **opts)
    amax = calibrate(x32, "max")
    results = {}
    for m, a in chosen.items():
        r = quantization_mse(x32, a)
        results[m] = MethodResult(a, r.mse, r.clipping, r.rounding, 0.0)
    best = min(r.mse for r in results.values())
    for r in results.values():
        r.ratio = r.mse / best if best > 0 else (1.0 if r.mse == 0 else float("inf"))
    if amax > 0:
        positive = [a for a in chosen.values() if a > 0]
        low = max(amax * 1e-4, min([amax] + positive) / 4)
        grid = np.geomspace(low, amax, points)
        grid = np.unique(np.concatenate([grid, positive]).astype(np.float32))
    else:
        grid = np.zeros(1, np.float32)
    from .backends import numba_calib

    flat = np.ascontiguousarray(x32).reshape(-1)
    total, clipped = numba_calib.sse_f64_many(flat, grid)
    n = flat.size
    return CalibrationReport(n=n, shape=tuple(x32.shape), amax=float(amax),
                             alphas=grid.astype(np.float64), mse=total / n, clipping=clipped / n,
                             rounding=(total - clipped) / n, methods=results)


def format_report(report: CalibrationReport) -> str:
    """A plain-text table of the report: one line per method."""
    lines = [f"tensor {report.shape} ({report.n} values), max |x| = {report.amax:.6g}",
             f"{'method':<11} {'alpha':>12} {'MSE':>12} {'clipping':>12} {'rounding':>12} "
             f"{'x best':>8}"]
    for m, r in report.methods.items():
        lines.append(f"{m:<11} {r.alpha:>12.6g} {r.mse:>12.4e} {r.clipping:>12.4e} "
                     f"{r.rounding:>12.4e} {r.ratio:>8.4f}")
    return "\n".join(lines)


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plot_calibration needs matplotlib, the optional extra: "
                          "pip install 'quantkit[plot]' (or pip install matplotlib)") from exc
    return Figure, FigureCanvasAgg


def plot_calibration(x, path, *, methods=METHODS, points: int = 200, percentile: float = 99.99,
                     title: str | None = None) -> CalibrationReport:
    """Draw the calibration report of one tensor to a PNG at ``path`` and return its numbers.

    The picture: exact MSE against alpha (log-log), its clipping and rounding parts, and a
    vertical line at each method's alpha, labelled with the alpha and its MSE relative to the best
    method. See :func:`calibration_report` for the arguments. Needs matplotlib (``quantkit[plot]``).
    """
    Figure, FigureCanvasAgg = _matplotlib()
    report = calibration_report(x, methods=methods, points=points, percentile=percentile)
    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    a = report.alphas
    floor = np.nextafter(0, 1)
    ax.plot(a, np.maximum(report.mse, floor), color="black", lw=2, label="MSE (total)")
    ax.plot(a, np.maximum(report.clipping, floor), color="#1f77b4", lw=1.2, ls="--",
            label="clipping error")
    ax.plot(a, np.maximum(report.rounding, floor), color="#8c564b", lw=1.2, ls=":",
            label="rounding error")
    for m, r in report.methods.items():
        ax.axvline(max(r.alpha, a[0]), color=_COLORS.get(m, "gray"), lw=1.5, alpha=0.85,
                   label=f"{m}: alpha={r.alpha:.4g}, MSE x{r.ratio:.4f}")
    if report.amax > 0 and a.size > 1:
        ax.set_xscale("log")
    positive = report.mse[report.mse > 0]
    if positive.size:
        ax.set_yscale("log")
        ax.set_ylim(positive.min() / 10, positive.max() * 2)
    ax.set_xlabel("alpha (clipping range)")
    ax.set_ylabel("mean squared error")
    ax.set_title(title or f"int8 calibration: {report.n} values, shape {report.shape}, "
                          f"max |x| = {report.amax:.4g}", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return report


__all__ = ["CalibrationReport", "MethodResult", "calibration_report", "format_report",
           "plot_calibration"]
