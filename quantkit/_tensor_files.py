"""Whole safetensors files of torch tensors: written atomically, read with their metadata.

For small self-describing files (optimizer states, adapters, fine-tune checkpoints); model
checkpoints go through :mod:`quantkit.io`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def temporary_file(directory, prefix: str) -> tuple[int, str]:
    """(fd, path) of a new file in ``directory`` to be renamed into place when complete, with
    the permissions a plain ``open`` would give it (mkstemp's 0600 would make the result
    private to its writer)."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    plain_permissions(tmp)
    return fd, tmp


def plain_permissions(path) -> None:
    """Give ``path`` the permissions ``open`` would create it with (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_tensor_file(tensors: dict, path, metadata: dict) -> None:
    """Write ``tensors`` to a temporary file next to ``path``, then rename it over ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    fd, tmp = temporary_file(path.parent, f".{path.name}.")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        plain_permissions(tmp)     # save_file makes the file anew, as its writer's private file
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
