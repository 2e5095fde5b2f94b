"""quantkit.qtensor.QTensor: the checks of its fields, its properties and dequantize."""

import numpy as np
import pytest
import torch

import quantkit
from quantkit import QTensor


def test_fields_are_checked():
    codes = np.zeros((4, 130), np.int8)
    QTensor(codes, np.array(0.5, np.float32))
    QTensor(codes, np.ones(4, np.float32), axis=0)
    QTensor(codes, np.ones(9, np.float32), block_size=64)
    with pytest.raises(TypeError, match="int8"):
        QTensor(codes.astype(np.int16), np.array(1, np.float32))
    with pytest.raises(TypeError, match="same kind"):
        QTensor(codes, torch.tensor(1.0))
    with pytest.raises(TypeError, match="float32"):
        QTensor(codes, np.array(1.0))
    with pytest.raises(ValueError, match="not both"):
        QTensor(codes, np.ones(4, np.float32), axis=0, block_size=64)
    with pytest.raises(ValueError, match=r"shape \(130,\)"):
        QTensor(codes, np.ones(4, np.float32), axis=-1)
    with pytest.raises(TypeError, match="scale must be a NumPy array or a torch tensor"):
        QTensor(codes, np.float32(0.5))
    with pytest.raises(TypeError, match="data must be a NumPy array or a torch tensor"):
        QTensor([1, 2], np.array(0.5, np.float32))


def test_properties_and_repr():
    q = QTensor(torch.zeros(3, 128, dtype=torch.int8), torch.ones(3), axis=-2)
    assert q.axis == 0 and q.shape == (3, 128) and q.granularity == "channel"
    assert q.nbytes == 3 * 128 + 4 * 3
    assert repr(q) == "QTensor(shape=(3, 128), granularity='channel', axis=0, torch)"
    b = QTensor(np.zeros(100, np.int8), np.ones(2, np.float32), block_size=64)
    assert b.granularity == "block" and "block_size=64" in repr(b) and "numpy" in repr(b)
    assert QTensor(np.zeros(5, np.int8), np.array(2, np.float32)).granularity == "tensor"


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_dequantize_is_codes_times_scale(kind):
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (3, 70)).astype(np.int8)
    channel = rng.random(3).astype(np.float32)
    blocks = rng.random(4).astype(np.float32)
    wrap = torch.from_numpy if kind == "torch" else (lambda a: a)
    cases = [(dict(), np.float32(0.25), codes * np.float32(0.25)),
             (dict(axis=0), channel, codes * channel[:, None]),
             (dict(block_size=64), blocks,
              (codes.reshape(-1) * np.repeat(blocks, 64)[:210]).reshape(3, 70))]
    for kw, scale, want in cases:
        scale = np.asarray(scale, np.float32)
        got = QTensor(wrap(codes), wrap(scale), **kw).dequantize()
        got = got.numpy() if kind == "torch" else got
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want.astype(np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -1.0, -0.5])
def test_scales_must_be_finite_and_not_negative(bad):
    codes = np.arange(-64, 64, dtype=np.int8).reshape(2, 64)
    with pytest.raises(ValueError, match=f"scale must be finite and >= 0; entry 0 is {bad}"):
        QTensor(codes, np.array(bad, np.float32))
    with pytest.raises(ValueError, match=f"entry 1 is {bad}"):
        QTensor(torch.from_numpy(codes), torch.tensor([0.5, bad]), axis=0)
    QTensor(codes, np.array(0.0, np.float32))  # a zero scale (alpha 0) is legal


def test_fields_changed_after_construction_are_refused_not_read_out_of_bounds():
    """The kernels read as many scales as the codes' shape asks for: dequantizing re-checks the
    fields, so a replaced field or codes reshaped in place give an error, never a read past the
    scales (this was a segfault)."""
    q = quantkit.quantize(np.ones((1, 64), np.float32), np.ones(1), axis=0)
    q.data = np.ones((4_000_000, 64), np.int8)
    with pytest.raises(ValueError, match=r"scale must have shape \(4000000,\)"):
        q.dequantize()
    with pytest.raises(ValueError, match="shape"):
        quantkit.dequantize(q)
    t = quantkit.quantize(torch.randn(2, 4096), torch.full((2,), 3.0), axis=0)
    t.data.t_()
    with pytest.raises(ValueError, match=r"scale must have shape \(4096,\)"):
        t.dequantize()
    r = quantkit.quantize(np.ones((3, 5), np.float32), np.ones(3), axis=0)
    r.axis = 1
    with pytest.raises(ValueError, match=r"scale must have shape \(5,\)"):
        r.dequantize()
    r.axis = 7
    with pytest.raises(ValueError, match="axis=7 is out of range"):
        r.dequantize()
    b = quantkit.quantize(np.ones(200, np.float32), np.ones(4), block_size=64)
    b.data = np.ones(300, np.int8)
    with pytest.raises(ValueError, match=r"scale must have shape \(5,\)"):
        b.dequantize()
    b.data = np.ones(200, np.float32)
    with pytest.raises(TypeError, match="int8"):
        b.dequantize()


def test_scales_that_require_grad_and_out_that_requires_grad():
    codes = torch.arange(-64, 64, dtype=torch.int8).reshape(2, 64)
    scale = torch.tensor([0.5, 0.25], requires_grad=True)
    q = QTensor(codes, scale, axis=0)
    assert torch.equal(q.dequantize(), codes.float() * scale.detach()[:, None])
    with pytest.raises(ValueError, match="out must not require grad"):
        quantkit.dequantize(q, out=torch.empty(2, 64, requires_grad=True))
