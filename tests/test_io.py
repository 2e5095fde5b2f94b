"""int8 checkpoints: round trips, the streaming writer, and every kind of bad file refused."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import quantkit
from quantkit import io, reference
from quantkit.qtensor import QTensor


def _qtensor(shape, *, axis=None, block_size=None, seed=0):
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))
    if axis is not None:
        alpha = np.abs(np.moveaxis(x.numpy(), axis, 0).reshape(shape[axis], -1)).max(1)
    elif block_size is not None:
        alpha = reference.absmax_per_block(x.numpy(), block_size)
    else:
        alpha = float(np.abs(x.numpy()).max())
    return quantkit.quantize(x, alpha, axis=axis, block_size=block_size)


def _same(a, b):
    if isinstance(a, QTensor):
        assert isinstance(b, QTensor)
        assert (a.axis, a.block_size) == (b.axis, b.block_size)
        return torch.equal(torch.as_tensor(a.data), b.data) and \
            torch.equal(torch.as_tensor(a.scale), b.scale)
    return a.dtype == b.dtype and torch.equal(a, b)


@pytest.fixture
def mixed():
    return {
        "per_tensor": _qtensor((5, 7)),
        "per_channel": _qtensor((6, 4, 3), axis=1, seed=1),
        "per_block": _qtensor((3, 100), block_size=64, seed=2),
        "f32": torch.randn(4, 5),
        "f16": torch.randn(3).half(),
        "bf16": torch.randn(2, 2).bfloat16(),
        "i64": torch.arange(6).reshape(2, 3),
        "flags": torch.tensor([True, False]),
        "u8": torch.arange(5, dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "plain_int8": torch.tensor([1, -2, 3], dtype=torch.int8),   # no _scale: stays plain
    }


def test_round_trip_everything(tmp_path, mixed):
    path = tmp_path / "m.safetensors"
    before = {k: (QTensor(v.data.clone(), v.scale.clone(), axis=v.axis, block_size=v.block_size)
                  if isinstance(v, QTensor) else v.clone()) for k, v in mixed.items()}
    quantkit.save(mixed, path, metadata={"note": "hello"})
    for k in mixed:                                              # the caller's data is untouched
        assert _same(before[k], mixed[k])
    loaded = quantkit.load(path)
    assert set(loaded) == set(mixed)
    for k in mixed:
        assert _same(mixed[k], loaded[k]), k
    assert loaded.metadata["note"] == "hello"
    assert loaded.metadata["format"] == "quantkit.int8"
    assert loaded.metadata["format_version"] == "1"
    assert json.loads(loaded.metadata["quantkit.quantized"]) == {
        "per_tensor": {}, "per_channel": {"axis": 1}, "per_block": {"block_size": 64}}
    flat = loaded.state_dict()
    assert torch.equal(flat["per_channel_scale"], mixed["per_channel"].scale)
    assert not any(p.name.startswith(".quantkit-") for p in tmp_path.iterdir())


def test_file_is_plain_safetensors(tmp_path, mixed):
    path = tmp_path / "m.safetensors"
    quantkit.save(mixed, path)
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(mixed) | {"per_tensor_scale", "per_channel_scale",
                                              "per_block_scale"}
        assert f.get_tensor("per_channel").dtype == torch.int8
        assert torch.equal(f.get_tensor("per_block_scale"), mixed["per_block"].scale)
        assert torch.equal(f.get_tensor("bf16"), mixed["bf16"])
    raw = path.read_bytes()
    assert (8 + int.from_bytes(raw[:8], "little")) % 8 == 0      # data section 8-byte aligned


def test_reads_files_written_by_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(3, dtype=torch.int32)}
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    loaded = quantkit.load(tmp_path / "plain.safetensors")
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    q = _qtensor((4, 8), axis=0)
    save_file({"w": q.data, "w_scale": q.scale}, str(tmp_path / "q.safetensors"),
              metadata={"format": "quantkit.int8", "format_version": "1",
                        "quantkit.quantized": json.dumps({"w": {"axis": 0}})})
    assert _same(q, quantkit.load(tmp_path / "q.safetensors")["w"])


def test_numpy_values_and_numpy_qtensors(tmp_path):
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    q = quantkit.quantize(x, np.abs(x).max(1), axis=0)               # NumPy codes and scales
    quantkit.save({"w": q, "n": np.arange(4, dtype=np.int16)}, tmp_path / "n.safetensors")
    loaded = quantkit.load(tmp_path / "n.safetensors")
    assert np.array_equal(loaded["w"].data.numpy(), q.data)
    assert np.array_equal(loaded["w"].scale.numpy(), q.scale)
    assert loaded["n"].dtype == torch.int16


def test_state_dict_pairs_are_recognized(tmp_path):
    q = _qtensor((4, 8), axis=0)
    state = {"fc.weight": q.data, "fc.weight_scale": q.scale, "fc.bias": torch.zeros(4)}
    quantkit.save(state, tmp_path / "s.safetensors")
    loaded = quantkit.load(tmp_path / "s.safetensors")
    assert isinstance(loaded["fc.weight"], QTensor) and loaded["fc.weight"].axis == 0
    assert set(loaded.state_dict()) == set(state)


def test_no_pickle(tmp_path, mixed, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle must not be used")

    for name in ("dump", "dumps", "load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "save", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    quantkit.save(mixed, tmp_path / "m.safetensors")
    quantkit.load(tmp_path / "m.safetensors")


# --------------------------------------------------------------------------------- streaming writer

def test_writer_streams_in_any_order(tmp_path):
    q = _qtensor((8, 16), axis=0)
    emb = torch.randn(10, 4)
    planned = {"emb": io.plan_of(emb), "fc.weight": io.plan_of(q)}
    assert planned["fc.weight"] == ("int8", (8, 16), {"axis": 0})
    path = tmp_path / "s.safetensors"
    with io.CheckpointWriter(path, planned, metadata={"source": "test"}) as w:
        w.write("fc.weight", q)
        assert not path.exists()                     # nothing at the destination until the end
        w.write("emb", emb)
    loaded = quantkit.load(path)
    assert _same(q, loaded["fc.weight"]) and torch.equal(loaded["emb"], emb)
    assert loaded.metadata["source"] == "test"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask       # an ordinary file, not mkstemp's


@pytest.mark.parametrize("case", ["missing", "exception", "bad_shape", "bad_dtype", "unplanned",
                                  "twice", "qtensor_for_plain", "plain_for_qtensor",
                                  "granularity"])
def test_writer_failure_leaves_no_file(tmp_path, case):
    q = _qtensor((4, 4), axis=0)
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"previous content")
    planned = {"a": (torch.float32, (2, 3)), "q": ("int8", (4, 4), {"axis": 0})}
    a = torch.zeros(2, 3)
    expected = {"missing": ValueError, "exception": RuntimeError, "bad_shape": ValueError,
                "bad_dtype": ValueError, "unplanned": KeyError, "twice": ValueError,
                "qtensor_for_plain": TypeError, "plain_for_qtensor": TypeError,
                "granularity": ValueError}[case]
    with pytest.raises(expected):
        with io.CheckpointWriter(path, planned) as w:
            if case == "missing":
                w.write("a", a)
            elif case == "exception":
                w.write("a", a)
                raise RuntimeError("interrupted")
            elif case == "bad_shape":
                w.write("a", torch.zeros(3, 2))
            elif case == "bad_dtype":
                w.write("a", torch.zeros(2, 3, dtype=torch.float64))
            elif case == "unplanned":
                w.write("q_scale", q.scale)
            elif case == "twice":
                w.write("a", a)
                w.write("a", a)
            elif case == "qtensor_for_plain":
                w.write("a", q)
            elif case == "plain_for_qtensor":
                w.write("q", q.data)
            elif case == "granularity":
                w.write("q", QTensor(q.data, torch.tensor(1.0)))
    assert path.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_writer_bad_plans(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="reserved"):
        io.CheckpointWriter(path, {}, metadata={"format": "other"})
    with pytest.raises(TypeError, match="str to str"):
        io.CheckpointWriter(path, {}, metadata={"k": 1})
    with pytest.raises(ValueError, match="planned twice"):
        io.CheckpointWriter(path, {"w": ("int8", (2, 2), {}), "w_scale": ("F32", ())})
    with pytest.raises(ValueError, match="'w'"):
        io.CheckpointWriter(path, {"w": ("int8", (2, 2), {"axis": 2})})
    with pytest.raises(ValueError, match="'w'"):
        io.CheckpointWriter(path, {"w": ("F32", (2, 2), {"axis": 0})})
    with pytest.raises(ValueError, match="'w'"):
        io.CheckpointWriter(path, {"w": ("int8", (2, -1))})
    with pytest.raises(TypeError):
        io.CheckpointWriter(path, {"w": ("complex", (2,))})
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_scale_collision(tmp_path):
    with pytest.raises(ValueError, match="w_scale"):
        quantkit.save({"w": _qtensor((2, 2)), "w_scale": torch.zeros(())}, tmp_path / "c")
    with pytest.raises(TypeError):
        quantkit.save([1, 2], tmp_path / "c")
    with pytest.raises(TypeError, match="'x'"):
        quantkit.save({"x": [1.0]}, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------- bad files

def _raw_file(path, header, data: bytes, *, length=None):
    blob = json.dumps(header).encode()
    path.write_bytes((len(blob) if length is None else length).to_bytes(8, "little") + blob + data)
    return path


def _quantkit_file(path, tensors, quantized, **meta):
    metadata = {"format": "quantkit.int8", "format_version": "1",
                "quantkit.quantized": json.dumps(quantized), **meta}
    save_file(tensors, str(path), metadata=metadata)
    return path


def _good(tmp_path):
    path = tmp_path / "good.safetensors"
    quantkit.save({"w": _qtensor((4, 8), axis=0), "b": torch.randn(4)}, path)
    return path


@pytest.mark.parametrize("keep", [0, 5, 12, -1, -17])
def test_truncated_file(tmp_path, keep):
    good = _good(tmp_path).read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good[:keep] if keep >= 0 else good[:len(good) + keep])
    with pytest.raises(ValueError, match="truncated|not a safetensors"):
        quantkit.load(bad)


def test_truncation_names_the_tensor(tmp_path):
    good = _good(tmp_path).read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good[:-3])
    with pytest.raises(ValueError, match=r"tensor '.*'.*truncated"):
        quantkit.load(bad)


def test_trailing_bytes(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_good(tmp_path).read_bytes() + b"xx")
    with pytest.raises(ValueError, match="unexpected byte"):
        quantkit.load(bad)


@pytest.mark.parametrize("header, data, match", [
    ("not json", b"", "malformed"),
    ([1, 2], b"", "malformed"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"k": 1}},
     b"\0" * 8, "__metadata__"),
    ({"a": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "'a'.*dtype"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "'a'.*shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "'a'.*needs 8"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 0]}}, b"\0" * 8, "'a'.*offsets"),
    ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "'a'.*malformed"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "'a'.*gap"),
])
def test_malformed_header(tmp_path, header, data, match):
    path = tmp_path / "bad.safetensors"
    if isinstance(header, str):
        blob = header.encode()
        path.write_bytes(len(blob).to_bytes(8, "little") + blob)
    else:
        _raw_file(path, header, data)
    with pytest.raises(ValueError, match=match):
        quantkit.load(path)


def test_duplicate_keys_and_huge_header(tmp_path):
    path = tmp_path / "dup.safetensors"
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    blob = ('{"a": %s, "a": %s}' % (entry, entry)).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + b"\0" * 4)
    with pytest.raises(ValueError, match="duplicate"):
        quantkit.load(path)
    _raw_file(path, {}, b"", length=2**40)
    with pytest.raises(ValueError, match="header length"):
        quantkit.load(path)


_Q = _qtensor((4, 8), axis=0)
_W, _S = _Q.data, _Q.scale


@pytest.mark.parametrize("tensors, quantized, meta, match", [
    ({"w": _W}, {"w": {"axis": 0}}, {}, "'w'.*w_scale.*missing"),
    ({"w": _W, "w_scale": _S[:3].clone()}, {"w": {"axis": 0}}, {}, "'w_scale'.*shape"),
    ({"w": _W, "w_scale": _S}, {"w": {}}, {}, "'w_scale'.*shape"),
    ({"w": _W, "w_scale": torch.ones(2)}, {"w": {"block_size": 64}}, {}, "'w_scale'.*shape"),
    ({"w": _W.float(), "w_scale": _S}, {"w": {"axis": 0}}, {}, "'w'.*int8"),
    ({"w": _W, "w_scale": _S.double()}, {"w": {"axis": 0}}, {}, "'w_scale'.*float32"),
    ({"w": _W, "w_scale": _S}, {"w": {"axis": 2}}, {}, "'w'.*axis"),
    ({"w": _W, "w_scale": _S}, {"w": {"block_size": 48}}, {}, "'w'.*block_size"),
    ({"w": _W, "w_scale": _S}, {"w": {"axis": 0, "block_size": 64}}, {}, "'w'"),
    ({"w": _W, "w_scale": _S}, {"v": {}}, {}, "'v'.*not in the file"),
    ({"w": _W, "w_scale": -_S}, {"w": {"axis": 0}}, {}, "'w_scale'.*>= 0"),
    ({"w": _W, "w_scale": _S * np.nan}, {"w": {"axis": 0}}, {}, "'w_scale'.*finite"),
    ({"w": _W, "w_scale": _S}, {"w": {"axis": 0}}, {"format_version": "2"}, "format_version"),
    ({"w": _W, "w_scale": _S}, {"w": {"axis": 0}}, {"format": "other"}, "format"),
])
def test_semantic_errors_name_the_tensor(tmp_path, tensors, quantized, meta, match):
    path = _quantkit_file(tmp_path / "x.safetensors", tensors, quantized, **meta)
    with pytest.raises(ValueError, match=match):
        quantkit.load(path)


def test_malformed_quantkit_metadata(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"w": _W}, str(p), metadata={"format": "quantkit.int8", "format_version": "1",
                                            "quantkit.quantized": "{not json"})
    with pytest.raises(ValueError, match="malformed quantkit metadata"):
        quantkit.load(p)


def test_reader_is_lazy_and_validated(tmp_path):
    path = _good(tmp_path)
    reader = io.CheckpointReader(path)
    assert set(reader.keys()) == {"w", "b"}
    assert reader.quantized == {"w": {"axis": 0}}
    assert reader.entry("w_scale") == ("F32", (4,))
    assert isinstance(reader.get("w"), QTensor)
    with pytest.raises(KeyError):
        reader.get("w_scale")
    with pytest.raises(KeyError):
        reader.get("nope")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        quantkit.load(tmp_path / "nope.safetensors")
    assert not os.path.exists(tmp_path / "nope.safetensors")


def test_numpy_qtensors_round_trip_including_per_tensor_scalar_scale(tmp_path):
    from quantkit import quantize

    x = np.random.default_rng(5).standard_normal((8, 64)).astype(np.float32)
    entries = {"t": quantize(x, 2.0), "c": quantize(x, np.abs(x).max(axis=1), axis=0),
               "b": quantize(x, np.full(8, 2.0, np.float32), block_size=64)}
    path = tmp_path / "np.safetensors"
    quantkit.save(entries, path)
    loaded = quantkit.load(path)
    for name, q in entries.items():
        back = loaded[name]
        assert np.array_equal(back.data.numpy(), q.data)
        assert np.array_equal(back.scale.numpy(), q.scale)
        assert (back.axis, back.block_size) == (q.axis, q.block_size)


# ------------------------------------------------------------- the writer refuses what load refuses


def _scale_replaced(data, scale, **granularity):
    """A QTensor whose scale field was replaced after construction: the constructor refuses
    such scales, and the writer must refuse them as well."""
    zeros = torch.zeros_like(scale) if isinstance(scale, torch.Tensor) else np.zeros_like(scale)
    q = QTensor(data, zeros, **granularity)
    q.scale = scale
    return q


@pytest.mark.parametrize("entry, match", [
    ({"w": _scale_replaced(np.ones(3, np.int8), np.array(-1.0, np.float32))}, "'w_scale'.*>= 0"),
    ({"w": _scale_replaced(np.ones(3, np.int8), np.array(np.nan, np.float32))},
     "'w_scale'.*finite"),
    ({"w": _scale_replaced(torch.ones(2, 3, dtype=torch.int8), torch.tensor([1.0, np.inf]),
                           axis=0)},
     "'w_scale'.*entry 1 is inf"),
    ({"w": torch.ones(3, dtype=torch.int8), "w_scale": torch.tensor(-2.0)}, "'w_scale'.*>= 0"),
    ({"w": QTensor(np.array([1, -128], np.int8), np.array(1.0, np.float32))}, "'w'.*-128"),
    ({"w": QTensor(torch.tensor([[-128, 3]], dtype=torch.int8), torch.ones(1), axis=0)},
     "'w'.*-128"),
])
def test_save_refuses_what_load_refuses(tmp_path, entry, match):
    with pytest.raises(ValueError, match=match):
        quantkit.save({"b": torch.ones(2), **entry}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_bad_quantized_values_and_leaves_no_file(tmp_path):
    path = tmp_path / "x.safetensors"
    bad = QTensor(np.array([1, -128], np.int8), np.array(1.0, np.float32))
    with pytest.raises(ValueError, match="'w'.*-128"):
        with io.CheckpointWriter(path, {"w": ("int8", (2,), {})}) as writer:
            writer.write("w", bad)
    nan = _scale_replaced(np.ones(2, np.int8), np.array(np.nan, np.float32))
    with pytest.raises(ValueError, match="'w_scale'.*finite"):
        with io.CheckpointWriter(path, {"w": ("int8", (2,), {})}) as writer:
            writer.write("w", nan)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape, match", [
    ([2**32, 2**32], "'a'.*needs 73786976294838206464 bytes"),
    ([2**63], "'a'.*needs 36893488147419103232 bytes"),
    ([0, 2**62, 2**62], "'a'.*too large"),
    ([2**64, 0], "'a'.*too large"),
])
def test_header_sizes_beyond_int64_are_refused(tmp_path, shape, match):
    """Byte counts are Python ints: no int64 wrap-around lets a shape pass with offsets [0, 0]."""
    path = _raw_file(tmp_path / "ovf.safetensors",
                     {"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}, b"")
    with pytest.raises(ValueError, match=match):
        quantkit.load(path)


def test_writer_refuses_a_plan_beyond_int64(tmp_path):
    with pytest.raises(ValueError, match="'w'.*too large"):
        io.CheckpointWriter(tmp_path / "x", {"w": ("F32", (0, 2**62, 2**62))})
    with pytest.raises(ValueError, match="'q'.*too large"):
        io.CheckpointWriter(tmp_path / "x", {"q": ("int8", (2**40, 2**40), {"axis": 0})})
    assert list(tmp_path.iterdir()) == []


def test_big_endian_arrays_are_saved_with_their_values(tmp_path):
    x = np.arange(6, dtype=">f4").reshape(2, 3)
    path = tmp_path / "be.safetensors"
    quantkit.save({"w": x, "c": np.array([1, -2], dtype=">i8")}, path)
    state = quantkit.load(path).state_dict()
    np.testing.assert_array_equal(state["w"].numpy(), x.astype("<f4"))
    np.testing.assert_array_equal(state["c"].numpy(), [1, -2])


def test_plain_safetensors_metadata_is_not_read_as_quantkit_modules(tmp_path):
    """A file that is not a quantkit checkpoint keeps its own metadata: a "quantkit.modules" key
    there is not parsed (it need not be JSON)."""
    path = tmp_path / "plain.safetensors"
    save_file({"a": torch.ones(2)}, str(path), metadata={"format": "pt",
                                                         "quantkit.modules": "not json"})
    checkpoint = quantkit.load(path)
    assert checkpoint.modules == {} and list(checkpoint.state_dict()) == ["a"]


def test_save_to_a_folder_or_into_a_missing_folder_names_the_path(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder; give a file name"):
        quantkit.save({"a": torch.ones(2)}, tmp_path)
    with pytest.raises(FileNotFoundError, match="folder .*nodir does not exist"):
        quantkit.save({"a": torch.ones(2)}, tmp_path / "nodir" / "x.safetensors")
    assert list(tmp_path.iterdir()) == []
