"""quantkit.convert: the quantize-a-checkpoint engine, called from Python (it prints nothing)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from quantkit import QTensor, load
from quantkit.convert import ConvertError, Granularity, SafetensorsSource, convert_checkpoint


@pytest.fixture
def source(tmp_path) -> SafetensorsSource:
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_file({"fc.weight": torch.randn(16, 64, generator=g), "fc.bias": torch.randn(16),
               "emb.weight": torch.randn(10, 8, generator=g)}, str(path))
    return SafetensorsSource(path)


def test_convert_is_silent_and_reports_through_callbacks(source, tmp_path, capsys):
    started, done = [], []
    out = tmp_path / "int8.safetensors"
    totals = convert_checkpoint(source, out, granularity=Granularity("tensor"), skip=["emb.*"],
                                on_start=started.append, on_tensor=done.append)
    assert capsys.readouterr() == ("", "")
    assert started == [*source.tensors, None]
    assert [d.info.name for d in done] == [i.name for i in source.tensors]
    reasons = {d.info.name: d.reason for d in done}
    assert reasons == {"fc.weight": None, "fc.bias": "1-D", "emb.weight": "skip"}
    assert totals["quantized"] == 1 and totals["kept"] == 2
    loaded = load(out)
    assert isinstance(loaded["fc.weight"], QTensor) and loaded["fc.weight"].granularity == "tensor"
    assert torch.equal(loaded["emb.weight"], source.read(source.find("emb.weight")))


def test_convert_errors_are_convert_errors(source, tmp_path):
    with pytest.raises(ConvertError) as info:
        convert_checkpoint(source, source.path)
    assert info.value.usage and "refusing to overwrite" in str(info.value)
    with pytest.raises(ConvertError) as info:
        SafetensorsSource(tmp_path / "missing.safetensors")
    assert not info.value.usage and "no such file" in str(info.value)
