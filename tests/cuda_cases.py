"""Shared helpers of the CUDA backend tests (test_cuda_*.py): the header's defines, data with
ties and extremes, layouts on the device, exact comparison, calibration data."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import quantkit
from quantkit import _arrays
from quantkit.backends import cuda_library, cuda_optim, cuda_quantize

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "csrc" / "quantkit.h"


def _header_defines() -> dict:
    text = HEADER.read_text()
    return {m.group(1): m.group(2).strip() for m in
            re.finditer(r"^#define\s+(QK_\w+)\s+(.+?)\s*$", text, re.MULTILINE)}


def _header_functions() -> dict:
    """name -> number of parameters, for every QK_API function in the header."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.DOTALL)
    found = {}
    for m in re.finditer(r"QK_API\s+[\w\s\*]+?\b(qk_\w+)\s*\(([^)]*)\)\s*;", text):
        params = m.group(2).strip()
        found[m.group(1)] = 0 if params in ("", "void") else params.count(",") + 1
    return found


def _int(expr: str) -> int:
    assert re.fullmatch(r"[\d\s()<]+", expr), expr  # integers and shifts only
    return int(eval(expr))  # noqa: S307 - checked above


gpu = pytest.mark.gpu
DEVICE = "cuda"


def _cpu(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def _same(got, expected, what="codes"):
    got = _cpu(got) if isinstance(got, torch.Tensor) else np.asarray(got)
    expected = np.asarray(expected)
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    bad = np.count_nonzero(~((got == expected) | (np.isnan(got) & np.isnan(expected)))
                           if got.dtype.kind == "f" else got != expected)
    assert bad == 0, f"{what}: {bad} of {got.size} elements differ"


def _layout(x: np.ndarray, how: str):
    """x on the GPU as a tensor with the given memory layout (same values)."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    if how == "plain":
        return t.to(DEVICE)
    if how == "transpose" and x.ndim >= 2:
        return t.transpose(0, -1).contiguous().to(DEVICE).transpose(0, -1)
    if how == "sliced":
        wide = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=torch.float32, device=DEVICE)
        wide[..., ::2] = t.to(DEVICE)
        return wide[..., ::2]
    if how == "offset":  # storage offset of one element: not 16-byte aligned, the scalar path
        base = torch.zeros(x.size + 1, dtype=torch.float32, device=DEVICE)
        base[1:] = t.reshape(-1).to(DEVICE)
        return base[1:].reshape(x.shape)
    return t.to(DEVICE)


LAYOUTS = ["plain", "transpose", "sliced", "offset"]


def _random(n, seed=0, alpha=3.0):
    """Normal data with exact ties, +-alpha and zeros mixed in."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    scale = np.float32(alpha) / np.float32(127)
    pick = rng.random(n)
    x = np.where(pick < 0.1, (rng.integers(-130, 130, n) + np.float32(0.5)) * scale, x)
    x = np.where(pick > 0.95, np.float32(alpha) * rng.choice([-1, 1, 0], n), x)
    return x.astype(np.float32)


SIZES = [1, 31, 2**20 + 7]


def _check_dequantize_offset(q, expected):
    """Dequantize the same codes from a view one byte into its storage (the element-wise path)."""
    base = torch.empty(q.data.numel() + 1, dtype=torch.int8, device=q.data.device)
    base[1:] = q.data.reshape(-1)
    shifted = quantkit.QTensor(base[1:].reshape(q.data.shape), q.scale, axis=q.axis,
                               block_size=q.block_size)
    _same(_dequantize(shifted), expected, "values from unaligned codes")


def _histogram_reference(x: np.ndarray, bins: int, hi: float):
    a = np.abs(x.astype(np.float32))
    inv_width = np.float32(bins) / np.float32(hi)
    t = a * inv_width  # float32 product, as the kernel
    b = np.where(t < np.float32(bins), np.floor(t), bins - 1).astype(np.int64)
    counts = np.bincount(b, minlength=bins)
    a64 = a.astype(np.float64)
    return counts, np.bincount(b, a64, bins), np.bincount(b, a64 * a64, bins)


def _calibration_data(kind: str, n: int = 70_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "student_t2":  # heavy tails
        return rng.standard_t(2, n).astype(np.float32)
    if kind == "outliers":
        x = rng.standard_normal(n).astype(np.float32)
        x[rng.random(n) < 1e-3] *= np.float32(60)
        return x
    if kind == "bfloat16":  # at most 7 mantissa bits: the exact search on the histogram's bins
        x = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
        return x.bfloat16().float().numpy()
    if kind == "scaled_integers":  # few distinct values, one per bin: the exhaustive search
        return (rng.integers(-100, 101, n) * np.float32(1.37)).astype(np.float32)
    if kind == "zeros_and_subnormals":  # bin 0 holds zeros and subnormals: zeros counted on device
        x = rng.standard_normal(n + 20_000).astype(np.float32)
        x[:15_000] = 0.0
        x[15_000:15_100] = np.float32(1e-41)
        x[15_100:15_200] = np.float32(-0.0)
        return x
    raise AssertionError(kind)


MSE_CASES = ["normal", "student_t2", "outliers", "bfloat16", "scaled_integers",
             "zeros_and_subnormals"]


UNSUPPORTED = [
    (dict(method="mse", axis=0), 'method="mse" per channel'),
    (dict(method="mse", block_size=64), 'method="mse" per block'),
    (dict(method="percentile"), 'method="percentile" per tensor'),
    (dict(method="percentile", axis=1, percentile=99.0), 'method="percentile" per channel'),
    (dict(method="entropy"), 'method="entropy" per tensor'),
    (dict(method="entropy", block_size=128), 'method="entropy" per block'),
]


def _quantize(x, alpha, **kwargs):
    """The CUDA backend's (codes, scale) as a QTensor, as quantkit.quantize returns them."""
    data, scale = cuda_quantize.quantize(x, alpha, **kwargs)
    axis, block_size, _ = _arrays.granularity(tuple(x.shape), kwargs.get("axis"),
                                              kwargs.get("block_size"))
    return quantkit.QTensor(data, scale, axis=axis, block_size=block_size)


def _dequantize(q, out=None):
    """The CUDA backend's dequantize of a QTensor's fields."""
    return cuda_quantize.dequantize(q.data, q.scale, axis=q.axis, block_size=q.block_size, out=out)


def emulated_library(folder: Path):
    """csrc/*.cu built against csrc/host_emulation.h into ``folder`` (g++, no GPU), loaded with
    every entry point declared; pytest.skip without g++."""
    import ctypes
    import importlib.util
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("quantkit_csrc_build", root / "csrc" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    lib = ctypes.CDLL(str(build.build_emulation(folder / "emulated.so", quiet=True)))
    cuda_library.declare(lib)
    cuda_optim.declare(lib)
    return lib
