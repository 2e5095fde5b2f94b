"""quantkit.convert: the quantize-a-checkpoint engine, called from Python (it prints nothing)."""

from __future__ import annotations

import json

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


def test_skip_matches_a_module_name_and_an_unmatched_pattern_is_refused(source, tmp_path):
    out = tmp_path / "int8.safetensors"
    done = []
    convert_checkpoint(source, out, skip=["emb"], on_tensor=done.append)   # the module's name
    assert {d.info.name: d.reason for d in done}["emb.weight"] == "skip"
    out.unlink()
    with pytest.raises(ConvertError, match=r"--skip '\*\.emb\.\*' matches no tensor") as exc:
        convert_checkpoint(source, out, skip=["*.emb.*"])
    assert exc.value.usage and not out.exists()


def test_an_index_that_lists_nothing_or_not_all_is_refused(tmp_path):
    g = torch.Generator().manual_seed(0)
    save_file({"a.weight": torch.randn(4, 8, generator=g), "b.weight": torch.randn(4, 8, generator=g)},
              str(tmp_path / "shard-1.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(ConvertError, match="lists no tensors"):
        SafetensorsSource(index)
    index.write_text(json.dumps({"weight_map": {"a.weight": "shard-1.safetensors"}}))
    with pytest.raises(ConvertError, match="stores tensor 'b.weight', which the index does not"):
        SafetensorsSource(index)
