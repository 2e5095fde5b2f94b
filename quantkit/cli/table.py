"""Text output of the ``quantkit`` command: byte sizes, shapes and alpha ranges as text, tables
printed row by row, and a progress bar on a terminal."""

from __future__ import annotations

import os
import sys
import time

import numpy as np


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def shape_text(shape) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def alpha_range(alpha) -> str:
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
            self.stream = discard(self.stream)


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


def discard(stream):
    """A stream to write to instead of ``stream`` once its reader has gone away."""
    try:
        fd = stream.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)      # so that the interpreter's flush at exit does not fail either
        os.close(devnull)
        return stream
    except (OSError, ValueError, AttributeError):
        return open(os.devnull, "w")


def progress_wanted(args) -> bool:
    if getattr(args, "no_progress", False):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
