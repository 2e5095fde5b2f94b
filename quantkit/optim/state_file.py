"""An optimizer's ``state_dict()`` as one safetensors file (no pickle).

Tensors are stored as ``state.<param id>.<key>``; the parameter groups (numbers, tuples, the
parameter ids) go into the ``quantkit.optimizer`` metadata entry as JSON. The file is written to a
temporary name in the destination folder and renamed when complete, so an interrupted save never
leaves a partial file under the final name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .._tensor_files import read_tensor_file, write_tensor_file

_FORMAT = "quantkit.optimizer"
_VERSION = "1"


def save_optimizer_state(optimizer: torch.optim.Optimizer, path) -> None:
    """Write ``optimizer.state_dict()`` to ``path`` (safetensors)."""
    state_dict = optimizer.state_dict()
    tensors = {}
    for pid, state in state_dict["state"].items():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state entry {key!r} of parameter {pid} is "
                                f"{type(value).__name__}; only tensors can be saved")
            tensors[f"state.{pid}.{key}"] = value.detach().contiguous().clone()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in state_dict["param_groups"]]
    metadata = {"format": _FORMAT, "format_version": _VERSION,
                _FORMAT: json.dumps({"param_groups": groups,
                                     "tuples": sorted({k for g in state_dict["param_groups"]
                                                       for k, v in g.items()
                                                       if isinstance(v, tuple)})})}
    write_tensor_file(tensors, path, metadata)


def load_optimizer_state(optimizer: torch.optim.Optimizer, path) -> None:
    """Load a file written by :func:`save_optimizer_state` into ``optimizer``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no optimizer state file at {path}")
    metadata, tensors = read_tensor_file(path)
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a quantkit optimizer state file")
    if metadata.get("format_version") != _VERSION:
        raise ValueError(f"{path} has format_version {metadata.get('format_version')!r}, "
                         f"expected {_VERSION!r}")
    info = json.loads(metadata[_FORMAT])
    groups = info["param_groups"]
    for g in groups:
        for key in info["tuples"]:
            if key in g and isinstance(g[key], list):
                g[key] = tuple(g[key])
    state = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
