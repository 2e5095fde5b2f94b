"""Whole safetensors files of torch tensors: written atomically, read with their metadata.

For small self-describing files (optimizer states, adapters, fine-tune checkpoints); model
checkpoints go through :mod:`quantkit.io`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_tensor_file(tensors: dict, path, metadata: dict) -> None:
    """Write ``tensors`` to a temporary file next to ``path``, then rename it over ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_tensor_file(path) -> tuple[dict, dict]:
    """``(metadata, tensors)`` of a safetensors file; ``ValueError`` when it cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    return metadata, tensors
