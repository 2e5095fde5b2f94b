"""quantkit._tensor_files: whole safetensors files written atomically, read with metadata."""

import os
import stat

import torch

from quantkit._tensor_files import read_tensor_file, write_tensor_file


def test_written_files_have_the_permissions_of_a_plain_open(tmp_path):
    """Not mkstemp's 0600: an adapter or optimizer state is readable as any other output."""
    path = tmp_path / "state.safetensors"
    write_tensor_file({"a": torch.ones(3)}, path, {"k": "v"})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    meta, tensors = read_tensor_file(path)
    assert meta["k"] == "v" and torch.equal(tensors["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]
