"""The subcommands quantize, inspect and calibrate of the ``quantkit`` command: they print; the
work is done by :mod:`quantkit.convert`, :mod:`quantkit.calibration` and :mod:`quantkit.io`."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np

from ..calibration._args import METHODS as _CALIBRATION_METHODS
from .. import convert
from ..convert import FLOAT_DTYPES, Granularity, SafetensorsSource, exact_mse, quantizable
from .table import Progress, Table, alpha_range, human_bytes, progress_wanted, shape_text

#: The calibration methods in the order the command lists them: the default ("mse") first.
METHODS = ("mse",) + tuple(m for m in _CALIBRATION_METHODS if m != "mse")
PLOT_HINT = 'pip install "quantkit[plot]"'


class CommandError(Exception):
    """A failure shown as one line ``quantkit: error: MESSAGE``; exit code 1, or 2 for usage."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _usage_error(message: str) -> CommandError:
    return CommandError(message, 2)


def calibration_options(args) -> dict:
    if getattr(args, "percentile", None) is None:
        return {}
    if args.method != "percentile":
        raise _usage_error("--percentile goes with --method percentile")
    p = args.percentile
    if not (math.isfinite(p) and 0 < p <= 100):
        raise _usage_error(f"--percentile must be in (0, 100], got {p}")
    return {"percentile": p}


def run_quantize(source: SafetensorsSource, out: Path, *, method="mse",
                 granularity=Granularity("channel"), skip=(), options=None, stdout=None,
                 progress=False) -> dict:
    """Quantize ``source`` into ``out`` (quantkit.convert.convert_checkpoint), printing a table
    row per tensor and the totals; returns the totals."""
    stdout = stdout or sys.stdout
    name_w = max([len(i.name) for i in source.tensors] + [6])
    shape_w = max([len(shape_text(i.shape)) for i in source.tensors] + [5])
    table = Table(["tensor", "shape", "alpha", "SQNR dB", "MSE/max", "before", "after"],
                  [name_w, shape_w, 17, 7, 7, 10, 10],
                  [False, False, False, True, True, True, True], stdout)
    bar = Progress(source.nbytes, len(source.tensors), progress)
    started = []

    def on_start(info):
        if not started:  # the output file is open: the table begins
            started.append(True)
            table.header()
        bar.show(info.name if info is not None else "writing")

    def on_tensor(done: convert.TensorDone):
        if done.result is not None:
            r = done.result
            cells = [alpha_range(r.alpha), f"{r.sqnr_db:.1f}", f"{r.mse_vs_max:.3f}"]
        else:
            reason = "--skip" if done.reason == "skip" else done.reason
            cells = [f"kept ({reason})", "-", "-"]
        bar.clear()
        info = done.info
        table.emit(table.line([info.name, shape_text(info.shape), *cells,
                               human_bytes(info.nbytes), human_bytes(done.bytes_after)]))
        bar.advance(info.nbytes)

    try:
        totals = convert.convert_checkpoint(source, out, method=method, granularity=granularity,
                                            skip=skip, options=options, on_start=on_start,
                                            on_tensor=on_tensor)
    finally:
        bar.clear()
    table.emit(table.line(["-" * w for w in table.widths]))
    size_in = sum(f.stat().st_size for f in source.files)
    size_out = out.stat().st_size
    ratio = size_in / max(size_out, 1)     # the files' sizes, headers included
    size_text = (f"{ratio:.2f}x smaller than" if ratio >= 1 else f"{1 / ratio:.2f}x larger than")
    worst = (f", worst SQNR {totals['worst_sqnr_db']:.1f} dB" if totals["quantized"] else "")
    table.emit(table.line(["total", "", f"{totals['quantized']} quantized", "", "",
                           human_bytes(totals["bytes_before"]),
                           human_bytes(totals["bytes_after"])]))
    table.emit(f"\nwrote {out} ({human_bytes(size_out)}, {size_text} the input's "
               f"{human_bytes(size_in)}) in "
               f"{totals['seconds']:.1f}s: {totals['quantized']} tensors quantized, "
               f"{totals['kept']} kept as they were{worst}; method {method}, "
               f"granularity {granularity}")
    return totals


def cmd_quantize(args) -> int:
    options = calibration_options(args)
    source = SafetensorsSource(args.input)
    run_quantize(source, Path(args.output), method=args.method, granularity=args.granularity,
                 skip=args.skip, options=options, progress=progress_wanted(args))
    return 0


# ------------------------------------------------------------------------------ inspect


def cmd_inspect(args) -> int:
    from ..io import CheckpointReader

    path = Path(args.file)
    source = SafetensorsSource(path)  # resolves shards, and gives clear errors for bad input
    readers = {}
    for f in source.files:
        try:
            readers[f] = CheckpointReader(f)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    first = readers[source.files[0]]
    int8 = any(r.quantized for r in readers.values())
    names = [(f, n) for f, r in readers.items() for n in r.keys()]
    stored = sum(i.nbytes for i in source.tensors)
    kind = "quantkit int8 checkpoint" if int8 else "float checkpoint"
    shard_note = f", {len(source.files)} shards" if len(source.files) > 1 else ""
    print(f"{path}: {kind}, {len(names)} tensors{shard_note}, {human_bytes(stored)}")
    meta = {k: v for k, v in first.metadata.items() if k != "quantkit.quantized"}
    if meta:
        print("metadata: " + ", ".join(f"{k}={v}" for k, v in sorted(meta.items())))
    name_w = max([len(n) for _, n in names] + [6])
    shape_w = max([len(shape_text(readers[f].entry(n)[1])) for f, n in names] + [5])
    if int8:
        columns = ["tensor", "dtype", "shape", "granularity", "alpha", "clipped", "zeros", "bytes"]
        widths = [name_w, 5, shape_w, 11, 17, 8, 7, 10]
        right = [False, False, False, False, False, True, True, True]
    else:
        columns = ["tensor", "dtype", "shape", "|x|max", "std", "bytes"]
        widths = [name_w, 5, shape_w, 9, 9, 10]
        right = [False, False, False, True, True, True]
    table = Table(columns, widths, right, sys.stdout)
    table.header()
    total_q = 0
    for f, name in names:
        reader = readers[f]
        dtype, shape = reader.entry(name)
        try:
            value = reader.get(name)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if name in reader.quantized:
            total_q += 1
            codes = value.data.numpy().reshape(-1)
            scale = value.scale.numpy()
            from .._constants import QMAX

            clipped = np.count_nonzero(np.abs(codes.astype(np.int16)) == QMAX) / max(codes.size, 1)
            zeros = np.count_nonzero(codes == 0) / max(codes.size, 1)
            cells = ["int8", shape_text(shape), value.granularity + (
                f" {value.block_size}" if value.block_size else ""),
                alpha_range(scale.astype(np.float64) * QMAX), f"{clipped:.3%}", f"{zeros:.1%}",
                human_bytes(value.nbytes)]
        else:
            nbytes = int(np.prod(shape, dtype=np.int64)) * convert.ITEMSIZE.get(dtype, 1)
            if dtype in FLOAT_DTYPES and value.numel():
                x = value.float().numpy().reshape(-1)
                stats = [f"{float(np.abs(x).max()):.4g}", f"{float(x.std()):.4g}"]
            else:
                stats = ["-", "-"]
            if int8:
                cells = [dtype, shape_text(shape), "-", "-", "-", "-", human_bytes(nbytes)]
            else:
                cells = [dtype, shape_text(shape), *stats, human_bytes(nbytes)]
        table.emit(table.line([name, *cells]))
        del value
    if int8:
        print(f"\n{total_q} int8 tensors (alpha = 127 x scale; clipped = codes at +-127), "
              f"{len(names) - total_q} stored as they are")
    return 0


# ------------------------------------------------------------------------------ calibrate


def compare_methods(x, granularity: Granularity, methods=METHODS) -> list[dict]:
    """Each method's alpha, exact MSE, MSE relative to the best, and calibration time."""
    from .. import _arrays
    from ..calibration import calibrate

    x32 = _arrays.float32_numpy(x)
    kw = {"axis": granularity.axis, "block_size": granularity.block_size}
    rows = []
    for method in methods:
        start = time.perf_counter()
        alpha = calibrate(x32, method, **kw)
        seconds = time.perf_counter() - start
        rows.append({"method": method, "alpha": alpha, "mse": exact_mse(x32, alpha, **kw),
                     "seconds": seconds})
    best = min(r["mse"] for r in rows)
    for r in rows:
        r["ratio"] = 1.0 if r["mse"] == best else (r["mse"] / best if best > 0 else math.inf)
    return rows


def cmd_calibrate(args) -> int:
    source = SafetensorsSource(args.file)
    if args.tensor:
        info = source.find(args.tensor)
        if info.dtype not in FLOAT_DTYPES or info.size == 0:
            raise CommandError(f"tensor {info.name!r} is {info.dtype} {shape_text(info.shape)}: "
                               "only non-empty floating-point tensors can be calibrated")
        chosen = [info]
    else:
        chosen = [i for i in source.tensors if quantizable(i) is None]
        if not chosen:
            raise CommandError(f"{source.path}: no floating-point tensor with 2+ dimensions; "
                               "name one with --tensor")
    if args.granularity.kind != "tensor":
        for info in chosen:
            if len(info.shape) < 1 or (args.granularity.kind == "channel" and len(info.shape) < 2):
                raise _usage_error(f"tensor {info.name!r} ({shape_text(info.shape)}) has no "
                                   "channels; use --granularity tensor")
    plot_path = Path(args.plot) if args.plot else None
    if plot_path is not None:
        _require_matplotlib()
        if plot_path.is_dir() or not plot_path.parent.is_dir():   # before the work, not after
            raise _usage_error(f"--plot {plot_path}: " + ("is a folder; give a file name"
                                                          if plot_path.is_dir() else
                                                          f"folder {plot_path.parent} does not "
                                                          f"exist"))
    name_w = max([len(i.name) for i in chosen] + [6])
    table = Table(["tensor", "method", "alpha", "MSE", "vs best", "ms"],
                  [name_w, 10, 17, 10, 8, 8], [False, False, False, True, True, True], sys.stdout)
    print(f"calibration methods, granularity {args.granularity}; MSE is the exact int8 "
          "quantize-dequantize error on the data")
    table.header()
    for info in chosen:
        x = source.read(info)
        try:
            rows = compare_methods(x, args.granularity)
        except ValueError as exc:
            raise CommandError(f"tensor {info.name!r}: {exc}") from None
        for r in rows:
            table.emit(table.line([info.name, r["method"], alpha_range(r["alpha"]),
                                   f"{r['mse']:.4g}", f"{r['ratio']:.3f}x",
                                   f"{r['seconds'] * 1e3:.1f}"]))
        del x
    if plot_path is not None:
        info = chosen[0] if args.tensor else max(chosen, key=lambda i: i.size)
        written = draw_calibration_plot(source.read(info), plot_path, info.name)
        print(f"\nwrote {written} (MSE vs alpha of {info.name!r}, per tensor)")
    return 0


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CommandError(f"--plot needs matplotlib: {PLOT_HINT}") from None
    try:
        from .. import report  # noqa: F401
    except ImportError as exc:
        raise CommandError(f"--plot needs quantkit.report, which failed to import: {exc}") from None


def draw_calibration_plot(x, png: Path, name: str) -> Path:
    """The MSE-vs-alpha picture of ``x`` (quantkit.report), written to ``png``."""
    from .. import _arrays, report

    x32 = _arrays.float32_numpy(x)
    try:
        report.plot_calibration(x32, png, title=f"int8 MSE vs alpha (per tensor): {name}")
    except (OSError, ValueError) as exc:
        raise CommandError(f"{png}: cannot write the plot: {exc}") from None
    return png

