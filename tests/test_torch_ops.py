"""torch.ops.quantkit.*: opcheck on the CPU implementations, results equal to the reference, and
torch.compile tracing through them (fake implementations)."""

import numpy as np
import pytest
import torch
from torch.library import opcheck

from quantkit import _arrays, reference

import quantkit._torch_ops  # noqa: F401,E402 - registers torch.ops.quantkit

OPS = torch.ops.quantkit


def _x(shape=(6, 300), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2


def _cases():
    x = _x()
    yield "tensor", x, x.abs().amax(), {}
    yield "channel0", x, x.abs().amax(dim=1), {"axis": 0}
    yield "channel-1", x, x.abs().amax(dim=0), {"axis": -1}
    n_blocks = _arrays.n_blocks(x.numel(), 64)
    yield "block", x, torch.rand(n_blocks, generator=torch.Generator().manual_seed(1)) + 0.5, \
        {"block_size": 64}
    x3 = _x((3, 4, 70), seed=2)
    yield "3d-channel1", x3, x3.abs().amax(dim=(0, 2)), {"axis": 1}
    yield "transposed", x.t(), x.abs().amax(dim=1), {"axis": 1}


CASES = list(_cases())
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("name,x,alpha,kw", CASES, ids=IDS)
def test_opcheck_quantize_and_dequantize(name, x, alpha, kw):
    opcheck(OPS.quantize_int8.default, (x, alpha), kw)
    codes, scale = OPS.quantize_int8(x, alpha, **kw)
    opcheck(OPS.dequantize_int8.default, (codes, scale), kw)


@pytest.mark.parametrize("kw", [{}, {"axis": 0}, {"axis": 1}, {"block_size": 64}], ids=str)
def test_opcheck_absmax(kw):
    opcheck(OPS.absmax.default, (_x(),), kw)


@pytest.mark.parametrize("name,x,alpha,kw", CASES, ids=IDS)
def test_ops_match_the_reference(name, x, alpha, kw):
    xn, an = x.numpy(), alpha.numpy()
    codes, scale = OPS.quantize_int8(x, alpha, **kw)
    values = OPS.dequantize_int8(codes, scale, **kw)
    assert codes.dtype == torch.int8 and codes.is_contiguous() and scale.shape == alpha.shape
    if "axis" in kw:
        axis = kw["axis"] % x.dim()
        expected = reference.quantize_per_channel(xn, an, axis)
        expected_values = reference.dequantize_per_channel(expected, scale.numpy(), axis)
        absmax = np.abs(xn).max(axis=tuple(k for k in range(x.dim()) if k != axis))
    elif "block_size" in kw:
        b = kw["block_size"]
        expected = reference.quantize_blockwise(xn, an, b)
        expected_values = reference.dequantize_blockwise(expected, scale.numpy(), b)
        absmax = reference.absmax_per_block(xn, b)
    else:
        expected = reference.quantize_per_tensor(xn, an)
        expected_values = reference.dequantize_per_tensor(expected, scale.numpy())
        absmax = np.abs(xn).max()
    assert np.array_equal(codes.numpy(), expected)
    assert np.array_equal(scale.numpy(), reference.scale_from_alpha(an))
    assert np.array_equal(values.numpy(), expected_values)
    assert np.array_equal(OPS.absmax(x, **kw).numpy(), np.asarray(absmax, np.float32))


def test_ops_raise_the_public_errors():
    x = _x()
    x[2, 7] = float("nan")
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\).*index \(2, 7\)"):
        OPS.quantize_int8(x, torch.tensor(3.0))
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\).*index \(2, 7\)"):
        OPS.absmax(x)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        OPS.quantize_int8(_x(), torch.tensor(-1.0))
    with pytest.raises(ValueError, match="power of two"):
        OPS.absmax(_x(), block_size=100)


def test_absmax_of_empty_slices_is_zero():
    assert float(OPS.absmax(torch.zeros(0))) == 0.0
    assert OPS.absmax(torch.zeros(3, 0), axis=0).tolist() == [0.0, 0.0, 0.0]


def _roundtrip(x, alpha):
    codes, scale = torch.ops.quantkit.quantize_int8(x, alpha, 0)
    return torch.ops.quantkit.dequantize_int8(codes, scale, 0) * 0.5 + 1.0


def test_torch_compile_traces_the_ops():
    compiled = torch.compile(_roundtrip, fullgraph=True)
    for shape in ((64, 256), (32, 512)):
        x = _x(shape)
        alpha = x.abs().amax(dim=1)
        assert torch.equal(compiled(x, alpha), _roundtrip(x, alpha))


def test_torch_compile_with_dynamic_shapes():
    def per_block(x):
        a = torch.ops.quantkit.absmax(x, block_size=64)
        codes, scale = torch.ops.quantkit.quantize_int8(x, a, block_size=64)
        return codes, scale

    compiled = torch.compile(per_block, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (1000, 4097):
        x = _x((n,), seed=n)
        got, expected = compiled(x), per_block(x)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
