"""int8 checkpoints: safetensors files holding int8 codes plus float32 scales. Never pickle.

The format (``format_version`` 1) is a plain safetensors file that any safetensors reader opens:

- each quantized tensor ``NAME`` is stored as two tensors: ``NAME`` (int8 codes, the original shape,
  C order) and ``NAME_scale`` (float32 dequantization steps ``alpha / 127``: shape ``()`` per
  tensor, ``(C,)`` per channel along an axis with C slices, ``(n_blocks,)`` per block);
- every other tensor is stored as it is (any safetensors dtype);
- ``__metadata__`` holds ``"format": "quantkit.int8"``, ``"format_version": "1"`` and
  ``"quantkit.quantized"``: a JSON object ``{NAME: {"axis": k} | {"block_size": B} | {}}`` with one
  entry per quantized tensor (``{}`` is per tensor). ``"quantkit.modules"`` (optional, JSON) records
  the quantized layers a model needs to be rebuilt, e.g. ``{"fc": {"type": "QuantLinear",
  "activations": "dynamic"}}``. Other metadata keys are the caller's, strings only.

A :class:`~quantkit.nn.QuantLinear` keeps its int8 weight in the buffer ``weight`` and its scales in
``weight_scale``, so its ``state_dict()`` already is in this layout.

Reading checks everything before returning anything: the header's size, JSON and offsets against the
file's size, each tensor's dtype and byte count, that each quantized tensor is int8 with a float32
``_scale`` of the shape its granularity needs, finite and >= 0. A bad file raises ``ValueError``
naming the tensor; nothing is returned half-loaded.

Writing streams: :class:`CheckpointWriter` takes the names, dtypes and shapes up front (the
safetensors header lists every offset before the data), then one tensor at a time, into a temporary
file in the destination folder that is renamed over ``path`` only once every tensor was written.
Quantized tensors are checked as the readers check them (codes in [-127, 127], scales finite and
>= 0), so no file is written that :func:`load` or ``QuantLinear`` refuses.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import numpy as np

from . import _arrays
from ._constants import QMAX
from ._tensor_files import temporary_file
from .qtensor import QTensor, with_checked_scales

FORMAT = "quantkit.int8"
FORMAT_VERSION = "1"
#: Metadata keys that quantkit writes itself; a caller's metadata may not set them.
RESERVED_KEYS = ("format", "format_version", "quantkit.quantized", "quantkit.modules")
SCALE_SUFFIX = "_scale"

_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
_ALIGN = 8
_MAX_BYTES = 2**63 - 1     # torch's sizes, strides and byte counts are int64


def _torch():
    import torch

    return torch


def _dtype_table():
    """safetensors dtype string <-> torch dtype (the ones this torch has)."""
    torch = _torch()
    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
             "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
             "BOOL": "bool", "U16": "uint16", "U32": "uint32", "U64": "uint64",
             "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
    return {code: getattr(torch, name) for code, name in names.items() if hasattr(torch, name)}


def _dtype_code(dtype) -> str:
    """The safetensors dtype string for a torch dtype, NumPy dtype or safetensors string."""
    table = _dtype_table()
    if isinstance(dtype, str) and dtype in table:
        return dtype
    torch = _torch()
    if not isinstance(dtype, torch.dtype):
        try:
            dtype = getattr(torch, np.dtype(dtype).name)
        except (TypeError, AttributeError):
            raise TypeError(f"unsupported dtype {dtype!r}") from None
    for code, d in table.items():
        if d == dtype:
            return code
    raise TypeError(f"dtype {dtype} cannot be stored in safetensors")


def _itemsize(code: str) -> int:
    return _dtype_table()[code].itemsize


def _tensor_nbytes(name: str, code: str, shape: tuple) -> int:
    """The byte count of a ``code`` tensor of ``shape``, computed with Python ints.

    ValueError naming the tensor when its nonzero dimensions span more than int64 bytes: torch
    computes sizes and strides in int64, so it cannot hold such a tensor (even an empty one).
    """
    itemsize = _itemsize(code)
    if math.prod(d for d in shape if d) * itemsize > _MAX_BYTES:
        raise ValueError(f"tensor {name!r}: shape {tuple(shape)} of {code} is too large (its size "
                         f"in bytes does not fit in int64)")
    return math.prod(shape) * itemsize


def _check_scales(name: str, scale) -> None:
    """ValueError naming the tensor unless every scale is finite and >= 0."""
    try:
        _arrays.check_scale_values(scale)
    except ValueError as exc:
        raise ValueError(f"tensor {name!r}: {exc}") from None


def _check_qtensor_values(name: str, q: QTensor) -> None:
    """What the readers require of a quantized tensor ``name``: codes in [-QMAX, QMAX] (the int8
    kernels and ``QuantLinear`` refuse -128) and scales finite and >= 0 (:class:`CheckpointReader`
    refuses others). ValueError naming the tensor otherwise."""
    _check_scales(name + SCALE_SUFFIX, _as_cpu_tensor(q.scale, name + SCALE_SUFFIX))
    codes = q.data
    if math.prod(codes.shape) and int(codes.min()) < -QMAX:
        raise ValueError(f"tensor {name!r}: int8 codes must lie in [-{QMAX}, {QMAX}]; it holds "
                         f"-128")


def _as_cpu_tensor(value, name: str):
    """An array or tensor as a detached, contiguous CPU torch tensor (copied if need be)."""
    torch = _torch()
    if isinstance(value, np.ndarray):
        if not value.dtype.isnative:   # big-endian data: the same values in native byte order
            value = value.astype(value.dtype.newbyteorder("="))
        # np.ascontiguousarray turns a 0-d array into shape (1,): restore the shape
        return torch.from_numpy(np.ascontiguousarray(value).reshape(value.shape))
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu").contiguous()
    raise TypeError(f"tensor {name!r}: expected a torch tensor, NumPy array or QTensor, got "
                    f"{type(value).__name__}")


def _granularity_entry(q: QTensor) -> dict:
    if q.axis is not None:
        return {"axis": int(q.axis)}
    if q.block_size is not None:
        return {"block_size": int(q.block_size)}
    return {}


def _scale_shape(name: str, shape: tuple, granularity: dict) -> tuple:
    """The shape NAME_scale must have; ValueError naming the tensor for a bad granularity entry."""
    if not isinstance(granularity, dict) or set(granularity) - {"axis", "block_size"} or \
            len(granularity) > 1:
        raise ValueError(f"tensor {name!r}: granularity must be {{}}, {{'axis': k}} or "
                         f"{{'block_size': B}}, got {granularity!r}")
    try:
        if "axis" in granularity:
            axis = _arrays.normalize_axis(granularity["axis"], len(shape))
            return (shape[axis],)
        if "block_size" in granularity:
            block = _arrays.check_block_size(granularity["block_size"])
            return (_arrays.n_blocks(math.prod(shape), block),)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"tensor {name!r}: {exc}") from None
    return ()


def plan_of(value) -> tuple:
    """The :class:`CheckpointWriter` plan entry for a tensor, array or QTensor.

    ``(dtype, shape)`` for a plain tensor; ``("int8", shape, granularity)`` for a QTensor, with
    granularity ``{"axis": k}``, ``{"block_size": B}`` or ``{}``.
    """
    if isinstance(value, QTensor):
        return ("int8", tuple(value.shape), _granularity_entry(value))
    if isinstance(value, np.ndarray):
        return (_dtype_code(value.dtype), tuple(value.shape))
    torch = _torch()
    if isinstance(value, torch.Tensor):
        return (_dtype_code(value.dtype), tuple(value.shape))
    raise TypeError(f"expected a torch tensor, NumPy array or QTensor, got {type(value).__name__}")


class CheckpointWriter:
    """Write a quantkit int8 checkpoint one tensor at a time.

    Usage::

        planned = {"emb": (torch.float32, (1000, 64)), "fc.weight": ("int8", (64, 64), {"axis": 0})}
        with CheckpointWriter("out.safetensors", planned, metadata={"source": "x"}) as w:
            w.write("emb", emb_tensor)
            w.write("fc.weight", qtensor)     # writes fc.weight (codes) and fc.weight_scale

    Args:
        path: destination file. The data goes to a temporary file beside it, renamed over ``path``
            when the ``with`` block ends without error and every planned tensor was written; on an
            error (or :meth:`abort`) the temporary file is removed and ``path`` is left untouched.
        planned: ``{name: (dtype, shape)}`` for plain tensors (dtype a torch or NumPy dtype or a
            safetensors string such as ``"F32"``), ``{name: ("int8", shape, granularity)}`` for
            quantized ones (see :func:`plan_of`). Tensors are laid out in this order.
        metadata: extra ``__metadata__`` entries, str -> str.
        modules: the ``"quantkit.modules"`` entry (a JSON-serializable dict), or None.

    Tensors may be written in any order; each is checked against its plan, and a QTensor's codes
    (in [-127, 127]) and scales (finite, >= 0) as the readers check them.
    """

    def __init__(self, path, planned: Mapping, *, metadata: Mapping | None = None,
                 modules: Mapping | None = None):
        self.path = os.fspath(path)
        self._entries = {}      # stored name -> (dtype code, shape, offset, nbytes)
        self._quantized = {}    # name -> granularity
        self._written = set()
        header = {}
        offset = 0

        def add(name, code, shape):
            nonlocal offset
            if name in self._entries:
                raise ValueError(f"tensor {name!r} is planned twice (a quantized tensor also "
                                 f"stores NAME{SCALE_SUFFIX})")
            nbytes = _tensor_nbytes(name, code, shape)
            self._entries[name] = (code, shape, offset, nbytes)
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset,
                                                                                  offset + nbytes]}
            offset += nbytes

        for name, plan in planned.items():
            if not isinstance(name, str) or not name or name == "__metadata__":
                raise ValueError(f"tensor names must be non-empty strings other than "
                                 f"'__metadata__', got {name!r}")
            if not isinstance(plan, tuple) or len(plan) not in (2, 3):
                raise ValueError(f"tensor {name!r}: plan must be (dtype, shape) or "
                                 f"('int8', shape, granularity), got {plan!r}")
            shape = _shape_tuple(plan[1], name)
            if len(plan) == 3:
                if _dtype_code(plan[0]) != "I8":
                    raise ValueError(f"tensor {name!r}: a quantized tensor is planned as int8, got "
                                     f"{plan[0]!r}")
                granularity = dict(plan[2])
                scale_shape = _scale_shape(name, shape, granularity)
                self._quantized[name] = granularity
                add(name, "I8", shape)
                add(name + SCALE_SUFFIX, "F32", scale_shape)
            else:
                add(name, _dtype_code(plan[0]), shape)

        meta = {}
        for key, value in (metadata or {}).items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"metadata must map str to str, got {key!r}: {value!r}")
            if key in RESERVED_KEYS:
                raise ValueError(f"metadata key {key!r} is reserved for quantkit")
            meta[key] = value
        meta["format"] = FORMAT
        meta["format_version"] = FORMAT_VERSION
        meta["quantkit.quantized"] = json.dumps(self._quantized, sort_keys=True)
        if modules:
            meta["quantkit.modules"] = json.dumps(dict(modules), sort_keys=True)
        header = {"__metadata__": meta, **header}
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % _ALIGN)   # data starts 8-byte aligned, as safetensors pads it
        self._data_start = 8 + len(blob)
        self._total = self._data_start + offset

        directory = os.path.dirname(os.path.abspath(self.path))
        if os.path.isdir(self.path):
            raise IsADirectoryError(f"{self.path} is a folder; give a file name for the "
                                    f"checkpoint")
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"folder {directory} does not exist (for {self.path})")
        fd, self._tmp = temporary_file(directory, ".quantkit-")
        self._file = os.fdopen(fd, "wb")
        try:
            self._file.write(len(blob).to_bytes(8, "little"))
            self._file.write(blob)
            self._file.truncate(self._total)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, value) -> None:
        """Write one planned tensor (a QTensor for a name planned as quantized)."""
        if self._file is None:
            raise ValueError("this CheckpointWriter is closed")
        if name not in self._entries or name.endswith(SCALE_SUFFIX) and \
                name[: -len(SCALE_SUFFIX)] in self._quantized:
            raise KeyError(f"tensor {name!r} was not planned")
        if name in self._written:
            raise ValueError(f"tensor {name!r} was already written")
        if name in self._quantized:
            if not isinstance(value, QTensor):
                raise TypeError(f"tensor {name!r} is planned as quantized: pass a QTensor, got "
                                f"{type(value).__name__}")
            if _granularity_entry(value) != self._quantized[name]:
                raise ValueError(f"tensor {name!r}: planned granularity {self._quantized[name]}, "
                                 f"got {_granularity_entry(value)}")
            _check_qtensor_values(name, value)
            self._write_one(name, value.data)
            self._write_one(name + SCALE_SUFFIX, value.scale)
        else:
            if isinstance(value, QTensor):
                raise TypeError(f"tensor {name!r} is planned as a plain tensor, got a QTensor")
            self._write_one(name, value)
        self._written.add(name)

    def _write_one(self, name, value):
        code, shape, offset, nbytes = self._entries[name]
        tensor = _as_cpu_tensor(value, name)
        got = (_dtype_code(tensor.dtype), tuple(tensor.shape))
        if got != (code, shape):
            raise ValueError(f"tensor {name!r}: planned {code} {shape}, got {got[0]} {got[1]}")
        if nbytes:
            raw = tensor.reshape(-1).view(_torch().uint8).numpy()
            self._file.seek(self._data_start + offset)
            self._file.write(memoryview(raw))

    def close(self) -> None:
        """Finish: check that every planned tensor was written, then rename into place."""
        if self._file is None:
            return
        missing = [n for n in self._entries if n not in self._written and
                   not (n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in self._written
                        and n[: -len(SCALE_SUFFIX)] in self._quantized)]
        if missing:
            self.abort()
            raise ValueError(f"checkpoint not written: {len(missing)} planned tensor(s) missing, "
                             f"the first is {missing[0]!r}")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the temporary file; ``path`` is left as it was."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def _shape_tuple(shape, name) -> tuple:
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise ValueError(f"tensor {name!r}: shape must be a sequence of ints, got {shape!r}") \
            from None
    if any(d < 0 for d in dims) or any(isinstance(d, bool) for d in shape):
        raise ValueError(f"tensor {name!r}: bad shape {shape!r}")
    return dims


def _collect(obj):
    """(tensors, modules) to save from a model, a state_dict or a dict of tensors and QTensors.

    In a plain dict, an int8 tensor ``NAME`` beside a float32 ``NAME_scale`` of shape ``()`` or
    ``(NAME.shape[0],)`` is taken as quantized per tensor or per channel along axis 0 (the layout
    of a QuantLinear state_dict); pass QTensors for other granularities.
    """
    torch = _torch()
    modules = {}
    if isinstance(obj, torch.nn.Module):
        state = obj.state_dict()
        tensors = {}
        for prefix, module in obj.named_modules(remove_duplicate=False):   # at every path
            # A quantized module describes itself (QuantLinear does): checkpoint_entry() gives
            # its "quantkit.modules" entry, qtensor() its weight (``weight`` and ``weight_scale``)
            # as a QTensor of its granularity.
            describe = getattr(module, "checkpoint_entry", None)
            if callable(describe):
                modules[prefix] = describe()
                q = module.qtensor()
                w = (prefix + "." if prefix else "") + "weight"
                tensors[w] = with_checked_scales(state[w], state[w + SCALE_SUFFIX],
                                                 axis=q.axis, block_size=q.block_size)
        for name, value in state.items():
            if name not in tensors and not (name.endswith(SCALE_SUFFIX) and
                                            name[: -len(SCALE_SUFFIX)] in tensors):
                tensors[name] = value
        return tensors, modules
    if not isinstance(obj, Mapping):
        raise TypeError(f"save expects an nn.Module, a state_dict or a dict of tensors/QTensors, "
                        f"got {type(obj).__name__}")
    tensors = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings, got {name!r}")
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in obj:
            base = obj[name[: -len(SCALE_SUFFIX)]]
            if isinstance(base, QTensor):
                raise ValueError(f"tensor {name!r} collides with the scales of QTensor "
                                 f"{name[: -len(SCALE_SUFFIX)]!r}")
            if _is_paired_int8(base, value):
                continue
        if _is_paired_int8(value, obj.get(name + SCALE_SUFFIX)):
            scale = obj[name + SCALE_SUFFIX]
            axis = None if tuple(scale.shape) == () else 0
            value = with_checked_scales(value.detach().cpu(), scale.detach().cpu(), axis=axis)
        tensors[name] = value
    return tensors, modules


def _is_paired_int8(codes, scale) -> bool:
    torch = _torch()
    if not (isinstance(codes, torch.Tensor) and isinstance(scale, torch.Tensor)):
        return False
    if codes.dtype != torch.int8 or scale.dtype != torch.float32:
        return False
    if tuple(scale.shape) == ():
        return True
    return codes.dim() >= 1 and tuple(scale.shape) == (codes.shape[0],)


def save(obj, path, *, metadata: Mapping | None = None) -> None:
    """Save a model, a state_dict or a dict of tensors/QTensors as a quantkit int8 checkpoint.

    An ``nn.Module`` is saved through its ``state_dict()``, with each QuantLinear's weight recorded
    as quantized per output channel and its activation mode in ``"quantkit.modules"``. In a plain
    dict, QTensors are saved as NAME + NAME_scale; an int8 tensor with a float32 ``NAME_scale`` of
    shape ``()`` or ``(shape[0],)`` is taken as quantized per tensor / along axis 0. Nothing of
    the caller's is modified. The file appears only once it is complete (temporary file + rename).

    Every quantized tensor is checked as :func:`load` and ``QuantLinear`` check it (codes in
    [-127, 127], scales finite and >= 0, by :meth:`CheckpointWriter.write`): a bad one raises
    ValueError naming it and no file appears.
    """
    tensors, modules = _collect(obj)
    planned = {}
    for name, value in tensors.items():
        try:
            planned[name] = plan_of(value)
        except TypeError as exc:
            raise TypeError(f"tensor {name!r}: {exc}") from None
    with CheckpointWriter(path, planned, metadata=metadata, modules=modules) as writer:
        for name, value in tensors.items():
            writer.write(name, value)


class Checkpoint(dict):
    """What :func:`load` returns: a dict ``{name: QTensor | torch.Tensor}`` plus the metadata.

    Attributes:
        metadata: the ``__metadata__`` dict (str -> str), quantkit's keys included.
        modules: the parsed ``"quantkit.modules"`` entry ({} when absent).
    """

    def __init__(self, tensors, metadata, modules):
        super().__init__(tensors)
        self.metadata = metadata
        self.modules = modules

    def state_dict(self) -> dict:
        """The flat tensors: each QTensor ``NAME`` as ``NAME`` (int8) and ``NAME_scale``."""
        out = {}
        for name, value in self.items():
            if isinstance(value, QTensor):
                out[name] = value.data
                out[name + SCALE_SUFFIX] = value.scale
            else:
                out[name] = value
        return out


class CheckpointReader:
    """Validated, lazy access to a safetensors file: the header is checked when it is opened.

    ``keys()`` lists the logical tensors (a quantized NAME once, its ``NAME_scale`` folded in);
    ``get(name)`` reads one (a QTensor for a quantized one); ``entry(name)`` gives its stored
    ``(dtype, shape)``; ``quantized`` maps each quantized name to its granularity. A plain
    safetensors file (no quantkit metadata) reads as plain tensors.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ValueError(f"{self.path}: not a safetensors file (truncated: {size} bytes)")
            n = int.from_bytes(f.read(8), "little")
            if n > _MAX_HEADER or n < 2:
                raise ValueError(f"{self.path}: not a safetensors file (header length {n})")
            if 8 + n > size:
                raise ValueError(f"{self.path}: truncated: the header needs {n} bytes, the file "
                                 f"has {size - 8} after the length")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            raise ValueError(f"{self.path}: malformed safetensors header: {exc}") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: malformed safetensors header: not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in meta.items()):
            raise ValueError(f"{self.path}: malformed __metadata__: must map str to str")
        self.metadata = meta
        self._data_start = 8 + n
        data_size = size - self._data_start
        table = _dtype_table()
        self._entries = {}
        spans = []
        for name, info in header.items():
            if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
                raise ValueError(f"tensor {name!r}: malformed header entry {info!r}")
            code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if code not in table:
                raise ValueError(f"tensor {name!r}: unknown dtype {code!r}")
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise ValueError(f"tensor {name!r}: bad shape {shape!r}")
            if not (isinstance(offsets, list) and len(offsets) == 2 and
                    all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
                raise ValueError(f"tensor {name!r}: bad data_offsets {offsets!r}")
            nbytes = math.prod(shape) * table[code].itemsize
            if offsets[1] - offsets[0] != nbytes:
                raise ValueError(f"tensor {name!r}: {code} {tuple(shape)} needs {nbytes} bytes, "
                                 f"the header gives {offsets[1] - offsets[0]}")
            if offsets[1] > data_size:
                raise ValueError(f"tensor {name!r}: truncated file: its data ends at byte "
                                 f"{offsets[1]} of a data section of {data_size} bytes")
            _tensor_nbytes(name, code, shape)     # an empty tensor torch can hold
            self._entries[name] = (code, tuple(shape), offsets[0], nbytes)
            spans.append((offsets[0], offsets[1], name))
        spans.sort()
        end = 0
        for start, stop, name in spans:
            if start != end:
                raise ValueError(f"tensor {name!r}: data_offsets overlap or leave a gap "
                                 f"(starts at {start}, previous data ends at {end})")
            end = stop
        if end != data_size:
            raise ValueError(f"{self.path}: {data_size - end} unexpected byte(s) after the last "
                             f"tensor's data")
        self.quantized = self._parse_quantkit_metadata()
        self._scale_names = {n + SCALE_SUFFIX for n in self.quantized}
        # a plain safetensors file's metadata is its own business: modules only from quantkit's
        quantkit_file = meta.get("format") == FORMAT and "quantkit.modules" in meta
        self.modules = json.loads(meta["quantkit.modules"]) if quantkit_file else {}

    def _parse_quantkit_metadata(self) -> dict:
        meta = self.metadata
        fmt = meta.get("format")
        if fmt is None or fmt != FORMAT:
            if "quantkit.quantized" in meta:
                raise ValueError(f"{self.path}: has quantkit.quantized but format is {fmt!r}, "
                                 f"expected {FORMAT!r}")
            return {}   # a plain safetensors file (e.g. format "pt"): plain tensors only
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{self.path}: unsupported quantkit format_version "
                             f"{meta.get('format_version')!r} (this quantkit reads "
                             f"{FORMAT_VERSION!r})")
        try:
            quantized = json.loads(meta.get("quantkit.quantized", "{}"))
            if "quantkit.modules" in meta and not isinstance(json.loads(meta["quantkit.modules"]),
                                                             dict):
                raise ValueError("quantkit.modules must be a JSON object")
        except (json.JSONDecodeError, ValueError) as exc:
            raise ValueError(f"{self.path}: malformed quantkit metadata: {exc}") from None
        if not isinstance(quantized, dict):
            raise ValueError(f"{self.path}: quantkit.quantized must be a JSON object")
        for name, granularity in quantized.items():
            if name not in self._entries:
                raise ValueError(f"tensor {name!r}: listed as quantized but not in the file")
            code, shape, _, _ = self._entries[name]
            if code != "I8":
                raise ValueError(f"tensor {name!r}: quantized codes must be int8 (I8), got {code}")
            scale_name = name + SCALE_SUFFIX
            if scale_name not in self._entries:
                raise ValueError(f"tensor {name!r}: its scales {scale_name!r} are missing")
            expected = _scale_shape(name, shape, granularity)
            scale_code, scale_shape, _, _ = self._entries[scale_name]
            if scale_code != "F32":
                raise ValueError(f"tensor {scale_name!r}: scales must be float32 (F32), got "
                                 f"{scale_code}")
            if scale_shape != expected:
                raise ValueError(f"tensor {scale_name!r}: shape {scale_shape} does not fit the "
                                 f"granularity {granularity} of {name!r} {shape} (expected "
                                 f"{expected})")
            if scale_name in quantized:
                raise ValueError(f"tensor {scale_name!r} is both a scale and quantized")
        return quantized

    def keys(self) -> list:
        scales = self._scale_names
        return [n for n in self._entries if n not in scales]

    def entry(self, name: str) -> tuple:
        """``(safetensors dtype string, shape)`` of a stored tensor."""
        code, shape, _, _ = self._entries[name]
        return code, shape

    def _read(self, name, f):
        torch = _torch()
        code, shape, offset, nbytes = self._entries[name]
        if nbytes == 0:
            return torch.empty(shape, dtype=_dtype_table()[code])
        f.seek(self._data_start + offset)
        raw = np.fromfile(f, dtype=np.uint8, count=nbytes)
        if raw.size != nbytes:
            raise ValueError(f"tensor {name!r}: truncated file (read {raw.size} of {nbytes} bytes)")
        tensor = torch.from_numpy(raw)
        return tensor.view(_dtype_table()[code]).reshape(shape)

    def get(self, name: str, _file=None):
        """The tensor ``name``: a QTensor (torch data) if it is quantized, else a torch tensor."""
        if name not in self._entries or name in self._scale_names:
            raise KeyError(f"no tensor {name!r} in {self.path}")
        if _file is None:
            with open(self.path, "rb") as f:
                return self.get(name, f)
        value = self._read(name, _file)
        if name not in self.quantized:
            return value
        scale = self._read(name + SCALE_SUFFIX, _file)
        _check_scales(name + SCALE_SUFFIX, scale)
        granularity = self.quantized[name]
        return with_checked_scales(value, scale, axis=granularity.get("axis"),
                                   block_size=granularity.get("block_size"))

    def load(self) -> Checkpoint:
        """Every tensor, read and checked, as a :class:`Checkpoint`."""
        with open(self.path, "rb") as f:
            tensors = {name: self.get(name, f) for name in self.keys()}
        return Checkpoint(tensors, dict(self.metadata), self.modules)


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {dup!r}")
    return dict(pairs)


def load(path) -> Checkpoint:
    """Read a quantkit int8 checkpoint (or a plain safetensors file): ``{name: QTensor | Tensor}``.

    Quantized tensors come back as QTensors with torch int8 ``data`` and float32 ``scale``; the
    rest as torch tensors. The whole file is checked first; a bad file raises ``ValueError``
    naming the tensor. ``load(path).metadata`` is the file's ``__metadata__``;
    ``load(path).state_dict()`` the flat tensors for ``module.load_state_dict``.
    """
    return CheckpointReader(path).load()
