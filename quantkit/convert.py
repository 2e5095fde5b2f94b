"""Quantize a float safetensors checkpoint into a quantkit int8 checkpoint: the engine behind
``quantkit quantize``, callable from Python; it prints nothing.

``SafetensorsSource(path)`` lists the tensors of a ``.safetensors`` file or of a sharded
checkpoint (a folder holding one ``*.index.json``, ``{"weight_map": {tensor: shard file}}``, or
that index file itself) from their headers, and reads one tensor at a time through
``safetensors.safe_open`` (memory-mapped, reopened per tensor so that the pages of tensors already
done do not stay mapped).

``convert_checkpoint(source, out, ...)`` plans the output, then quantizes and writes one tensor at
a time through :class:`quantkit.io.CheckpointWriter` into a temporary file that is renamed over
``out`` only when every tensor is written: peak memory stays near a few times the largest tensor,
whatever the checkpoint's size. Every floating-point tensor with two or more dimensions is
quantized (``channel`` means one alpha per slice along axis 0, the output channels of a Linear or
conv weight) unless its name matches a ``skip`` pattern (shell-style, e.g. ``'*embeddings*'``;
matched against the whole name and the module's name, so ``lm_head`` keeps ``lm_head.weight``);
the rest is copied unchanged. Callbacks report each tensor as it starts and as it is written.

Failures raise :class:`ConvertError` with a one-line message.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


class ConvertError(Exception):
    """A checkpoint that cannot be read or converted, or an output that cannot be written.

    ``usage`` is True where the request itself is wrong (an output that is a folder or would
    overwrite the input) rather than the data or the file system.
    """

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.usage = usage


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
        return self.size * ITEMSIZE.get(self.dtype, 1)


class SafetensorsSource:
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
            raise ConvertError(f"{info.file}: cannot read tensor {info.name!r}: {exc}") from None

    def find(self, name: str) -> TensorInfo:
        for info in self.tensors:
            if info.name == name:
                return info
        names = ", ".join(i.name for i in self.tensors[:5])
        more = f", ... ({len(self.tensors)} in all)" if len(self.tensors) > 5 else ""
        raise ConvertError(f"no tensor {name!r} in {self.path}; it has {names}{more}")

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.tensors)


def _open_checkpoint(path: Path):
    """(files, tensors as safetensors lists them, first metadata, index file or None) for a file,
    a folder or an index."""
    if not path.exists():
        raise ConvertError(f"{path}: no such file or directory")
    if path.is_dir():
        indexes = sorted(path.glob("*.index.json"))
        if len(indexes) > 1:
            raise ConvertError(f"{path}: more than one *.index.json ("
                               f"{', '.join(p.name for p in indexes)}); name the one to use")
        if not indexes:
            singles = sorted(path.glob("*.safetensors"))
            if len(singles) == 1:
                return _open_checkpoint(singles[0])
            raise ConvertError(f"{path}: a folder without a *.index.json; a sharded checkpoint "
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
        if not weight_map:
            raise ValueError("weight_map lists no tensors")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ConvertError(f"{index}: not a sharded-checkpoint index ({{\"weight_map\": ...}}): "
                           f"{exc}") from None
    shards = []
    for shard in weight_map.values():
        if shard not in shards:
            shards.append(shard)
    tensors, metadata = [], {}
    for shard in shards:
        file = index.parent / shard
        if not file.is_file():
            raise ConvertError(f"{index}: shard {shard!r} is missing")
        shard_tensors, shard_meta = _read_header(file)
        metadata = metadata or shard_meta
        listed = {name for name, s in weight_map.items() if s == shard}
        found = {t.name for t in shard_tensors}
        if listed - found:
            raise ConvertError(f"{index}: tensor {sorted(listed - found)[0]!r} is listed in "
                               f"shard {shard!r} but not stored there")
        if found - listed:     # a tensor the index does not list would be dropped silently
            raise ConvertError(f"{index}: shard {shard!r} stores tensor "
                               f"{sorted(found - listed)[0]!r}, which the index does not list "
                               f"there")
        tensors += [t for t in shard_tensors if t.name in listed]
    return [index.parent / s for s in shards], tensors, metadata, index


def _read_header(file: Path):
    """(tensors, metadata) from one safetensors file's header, through safe_open."""
    from safetensors import safe_open

    if file.is_dir():
        raise ConvertError(f"{file}: is a folder")
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = []
            for name in f.keys():
                piece = f.get_slice(name)
                tensors.append(TensorInfo(name, file, piece.get_dtype(), tuple(piece.get_shape())))
    except ConvertError:
        raise
    except OSError as exc:
        raise ConvertError(f"{file}: cannot read: {exc.strerror or exc}") from None
    except Exception as exc:
        raise ConvertError(f"{file}: not a safetensors file ({exc})") from None
    return tensors, metadata


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
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
    """None if the tensor is to be quantized, else why it is kept as it is: its dtype, "N-D"
    (fewer than two dimensions), "empty", or "skip" (its name matches a ``skip`` pattern)."""
    if info.dtype not in FLOAT_DTYPES:
        return info.dtype
    if len(info.shape) < 2:
        return f"{len(info.shape)}-D"
    if info.size == 0:
        return "empty"
    if any(skip_matches(info.name, pattern) for pattern in skip):
        return "skip"
    return None


def skip_matches(name: str, pattern: str) -> bool:
    """A ``skip`` pattern (shell-style) matches a tensor by its whole name or by its module's
    name (the name without its last part): ``lm_head`` matches ``lm_head.weight``, as
    ``quantize_model(skip=...)`` matches the module."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rpartition(".")[0],
                                                                      pattern)


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
    mse = exact_mse(x32, alpha, **kw)
    alpha_max = alpha if method == "max" else calibrate(x32, "max", **kw)
    mse_max = mse if method == "max" else exact_mse(x32, alpha_max, **kw)
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


def exact_mse(x, alpha, *, axis, block_size) -> float:
    """The exact quantize-dequantize MSE over the whole tensor (quantkit.calibration)."""
    from .calibration import quantization_mse

    per = np.asarray(quantization_mse(x, alpha, axis=axis, block_size=block_size).mse, np.float64)
    if block_size is None or per.ndim == 0:
        return float(per.mean())          # per tensor, or channels of equal size
    n = int(np.prod(np.shape(x), dtype=np.int64))
    sizes = np.full(per.size, block_size, np.float64)
    sizes[-1] = n - (per.size - 1) * block_size      # the last block may be short
    return float((per * sizes).sum() / n)


def _check_output(out: Path, source: SafetensorsSource):
    if out.exists() and out.is_dir():
        raise ConvertError(f"{out}: is a folder; give the output file name, e.g. "
                           f"{out / 'model-int8.safetensors'}", usage=True)
    inputs = [*source.files, *([source.index] if source.index else [])]
    for f in inputs:
        if _same_file(out, f) or out.resolve() == f.resolve():
            raise ConvertError(f"refusing to overwrite the input {f}; choose another output path",
                               usage=True)
    if not out.resolve().parent.is_dir():
        raise ConvertError(f"{out}: the folder {out.resolve().parent} does not exist")


def _plan_granularity(granularity: Granularity) -> dict:
    """The checkpoint writer's granularity entry."""
    if granularity.kind == "channel":
        return {"axis": 0}
    if granularity.kind == "block":
        return {"block_size": granularity.block_size}
    return {}


@dataclass(frozen=True)
class TensorDone:
    """One tensor written: ``result`` for a quantized one, else ``reason`` (see quantizable)."""

    info: TensorInfo
    result: TensorResult | None
    reason: str | None
    bytes_after: int


def convert_checkpoint(source: SafetensorsSource, out, *, method="mse",
                       granularity=Granularity("channel"), skip=(), options=None, on_start=None,
                       on_tensor=None) -> dict:
    """Quantize ``source`` into the int8 checkpoint ``out`` and return the totals: tensors,
    quantized, kept, bytes_before, bytes_after, seconds, worst_sqnr_db.

    ``on_start(info)`` (optional) is called before each tensor is read, and ``on_start(None)`` once
    every tensor is written, before the file is renamed into place; ``on_tensor(done)`` after each
    tensor is written, with a :class:`TensorDone`. ``options`` go to ``calibrate`` (e.g.
    ``{"percentile": 99.9}``). Nothing is left at ``out`` on failure or interruption.
    """
    from .io import FORMAT, RESERVED_KEYS, CheckpointWriter

    out = Path(out)
    _check_output(out, source)
    if source.metadata.get("format") == FORMAT:
        raise ConvertError(f"{source.path} is already a quantkit int8 checkpoint; quantize the "
                           "float checkpoint it came from")
    if not source.tensors:
        raise ConvertError(f"{source.path} holds no tensors: nothing to quantize")
    unused = [p for p in skip if not any(skip_matches(i.name, p) for i in source.tensors)]
    if unused:
        raise ConvertError(f"--skip {unused[0]!r} matches no tensor of {source.path} (names look "
                           f"like {source.tensors[0].name!r}; a pattern is shell-style and matches "
                           f"a whole tensor name or its module's name)", usage=True)
    plans, reasons = {}, {}
    for info in source.tensors:
        reason = quantizable(info, skip)
        reasons[info.name] = reason
        if reason is None:
            plans[info.name] = ("int8", info.shape, _plan_granularity(granularity))
        else:
            plans[info.name] = (info.dtype, info.shape)
    metadata = {k: v for k, v in source.metadata.items() if k not in RESERVED_KEYS}
    metadata.update({"quantkit.source": source.path.name, "quantkit.method": method,
                     "quantkit.granularity": str(granularity)})
    try:
        writer = CheckpointWriter(out, plans, metadata=metadata)
    except (ValueError, TypeError) as exc:   # e.g. a tensor NAME_scale beside a quantized NAME
        raise ConvertError(f"cannot write {out}: {exc}") from None
    except OSError as exc:
        raise ConvertError(f"cannot write {out}: {exc.strerror or exc}") from None
    totals = {"tensors": len(source.tensors), "quantized": 0, "kept": 0, "bytes_before": 0,
              "bytes_after": 0, "seconds": 0.0, "worst_sqnr_db": math.inf}
    on_start = on_start or (lambda info: None)
    on_tensor = on_tensor or (lambda done: None)
    start = time.perf_counter()
    try:
        with writer:
            for info in source.tensors:
                on_start(info)
                x = source.read(info)
                reason = reasons[info.name]
                result = None
                if reason is None:
                    try:
                        q, result = quantize_tensor(x, method, granularity, options)
                    except ValueError as exc:
                        raise ConvertError(f"tensor {info.name!r}: {exc}") from None
                    del x
                    writer.write(info.name, q)
                    after = result.bytes_after
                    totals["quantized"] += 1
                    totals["worst_sqnr_db"] = min(totals["worst_sqnr_db"], result.sqnr_db)
                else:
                    writer.write(info.name, x)
                    after = info.nbytes
                    totals["kept"] += 1
                totals["bytes_before"] += info.nbytes
                totals["bytes_after"] += after
                on_tensor(TensorDone(info, result, reason, after))
            on_start(None)
    except OSError as exc:      # a full disk, a vanished folder: the temporary file is gone
        raise ConvertError(f"cannot write {out}: {exc.strerror or exc}") from None
    totals["seconds"] = time.perf_counter() - start
    return totals
