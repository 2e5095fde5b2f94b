"""quantkit.matmul and backends/native_cpu with block-scaled weights (one scale per block of B
consecutive weights of a row, scales (N, K / B)).

W8A8: every path equals :func:`quantkit.reference.linear_w8a8_blocks` bit for bit (exact int32 per
block, then the float32 block sum and rescale). Weight-only: quantkit's fused kernels give
identical bits on every path and agree with the float64 reference to float32 summation error, as
does the dense path. A path this CPU cannot run is skipped, saying why.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantkit import matmul, reference
from quantkit.backends import native_cpu

from matmul_cases import INT8_PATHS, guarded, skip_unless_runnable

# (M, K, N, B): one block per row, many blocks, the largest block, N past the kernels' tiles.
SHAPES = [(1, 64, 3, 64), (2, 128, 5, 64), (7, 576, 17, 64), (40, 1024, 33, 128),
          (5, 4096, 8, 4096), (33, 256, 70, 256), (70, 1152, 65, 64)]


def _problem(rng, m, k, n, b, extremes=False):
    if extremes:
        q_x = rng.choice(np.array([-127, 127, 0], np.int8), size=(m, k))
        codes = rng.choice(np.array([-127, 127, 0], np.int8), size=(n, k))
    else:
        q_x = rng.integers(-127, 128, size=(m, k), dtype=np.int8)
        codes = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
    scale = (rng.random((n, k // b)) * 1e-2).astype(np.float32)
    scale[0, 0] = 0.0                              # an all-zero block
    s_x = (rng.random(m) * 1e-2).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    return q_x, codes, scale, s_x, bias


@pytest.mark.parametrize("path", INT8_PATHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_w8a8_blocks_every_path_is_the_reference(monkeypatch, path, shape):
    skip_unless_runnable(path)
    monkeypatch.setenv(matmul.ENV, path)
    m, k, n, b = shape
    rng = np.random.default_rng(k + n)
    for extremes in (False, True):
        q_x, codes, scale, s_x, bias = _problem(rng, m, k, n, b, extremes)
        for with_bias in (True, False):
            want = reference.linear_w8a8_blocks(q_x, s_x, codes, scale, b,
                                                bias if with_bias else None)
            y = matmul.w8a8_linear(torch.from_numpy(q_x), torch.from_numpy(s_x),
                                   torch.from_numpy(codes), torch.from_numpy(scale),
                                   torch.from_numpy(bias) if with_bias else None, block_size=b)
            assert y.dtype == torch.float32 and y.shape == (m, n)
            assert np.array_equal(y.numpy(), want), (extremes, with_bias)


# Shapes at the packed kernels' edges: rows around the VNNI kernel's tiles of six and the AMX
# kernel's tiles of 16 (pairs of them), weight rows around their work items of 32 (vectors or
# tiles of 16), blocks of 4 to 192 (AMX: multiples of 64; others take its VNNI fallback), one
# block of 3 (the per-block kernel), several AMX passes.
PACKED_EDGES = [(15, 128, 16, 64), (16, 64, 17, 64), (17, 192, 31, 64), (33, 256, 32, 128),
                (47, 384, 33, 192), (1, 128, 5, 64), (64, 96, 40, 32), (300, 4096, 20, 64),
                (5, 12, 3, 4), (7, 24, 9, 8), (13, 36, 48, 12), (6, 9, 7, 3), (2, 4096, 64, 4096)]


@pytest.mark.parametrize("path", ("vnni", "amx"))
@pytest.mark.parametrize("m, k, n, b", PACKED_EDGES)
def test_w8a8_blocks_packed_kernels_at_their_edges(path, m, k, n, b):
    """The kernels that pack the weight (VNNI: sixteen weight rows' four codes per vector; AMX:
    each block's product tiles added into float32 sums before the next block) give the
    reference's bits at their edges, from row-strided codes, with scales of both signs, exact
    zeros and NaN scales and biases (NaN where the generic path gives NaN)."""
    skip_unless_runnable(path)
    rng = np.random.default_rng(m * k + n + b)
    q_x, codes, scale, s_x, bias = _problem(rng, m, k + 16, n, b)
    q_x, codes = q_x[:, 16:], codes[:, 8:8 + k]
    scale = scale[:, :k // b] * rng.choice(np.array([-1, 1], np.float32), size=(n, k // b))
    s_x = s_x * rng.choice(np.array([-1, 0, 1], np.float32), size=m)
    s_x[0] = np.array([0x7FC01234], np.uint32).view(np.float32)[0]
    scale[min(1, n - 1), 0] = np.array([0xFFC54321], np.uint32).view(np.float32)[0]
    scale[min(1, n - 1), -1] = np.array([0x7FC06789], np.uint32).view(np.float32)[0]  # NaN + NaN
    bias[n // 2] = np.array([0x7FC0BEEF], np.uint32).view(np.float32)[0]
    for b_ in (bias, None):
        want = native_cpu.linear_w8a8_f32(q_x, codes, s_x, scale, b_, block_size=b,
                                          path="generic")
        ref = reference.linear_w8a8_blocks(q_x, s_x, codes, scale, b, b_)
        assert np.array_equal(np.isnan(want), np.isnan(ref))
        assert np.array_equal(want[~np.isnan(want)], ref[~np.isnan(ref)])
        for threads in (1, 2):
            got = native_cpu.linear_w8a8_f32(q_x, codes, s_x, scale, b_, block_size=b,
                                             path=path, threads=threads)
            nan = np.isnan(want)     # a NaN matches any NaN: the payload where two NaNs meet
            assert np.array_equal(np.isnan(got), nan), threads     # is the compiler's choice
            assert np.array_equal(got[~nan].view(np.int32), want[~nan].view(np.int32)), threads


@pytest.mark.parametrize("path", ("vnni", "amx"))
@pytest.mark.parametrize("m, k, n, b", [(7, 256, 20, 64), (17, 128, 33, 64), (33, 64, 16, 64),
                                        (3, 70000, 5, 70000)])
def test_w8a8_blocks_packed_kernels_read_nothing_past_their_inputs(path, m, k, n, b):
    """Codes, scales and weights each end at an inaccessible page (a read past them crashes);
    extreme codes over a block of 70000 make sum (a + 128) b pass 2^31 on the VNNI kernel (a
    saturating product would differ) while every true sum fits int32."""
    skip_unless_runnable(path)
    rng = np.random.default_rng(m + k + n)
    q_x, codes, scale, s_x, bias = _problem(rng, m, k, n, b, extremes=True)
    q_x[0], codes[0] = 127, -127                  # the largest sums of a row and a column
    q_x[1] = 127
    codes[1] = 127
    want = reference.linear_w8a8_blocks(q_x, s_x, codes, scale, b, bias)
    got = native_cpu.linear_w8a8_f32(guarded(q_x), guarded(codes), guarded(s_x),
                                     guarded(scale), guarded(bias), block_size=b, path=path,
                                     threads=2)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("amx, rows, block, candidates", [
    (True, 16, 64, ("vnni", "amx")), (True, 15, 64, ("vnni",)), (True, 100, 32, ("vnni",)),
    (True, 100, 128, ("vnni", "amx")), (False, 100, 64, ("vnni",))])
def test_w8a8_blocks_time_the_amx_kernel_where_it_applies(monkeypatch, amx, rows, block,
                                                          candidates):
    info = dict(model="test CPU", avx2=True, fma=True, avx512=True, avx512_vnni=True,
                amx_int8=amx, native=None)
    monkeypatch.setattr(matmul, "cpu_info", lambda: info)
    monkeypatch.delenv(matmul.ENV, raising=False)
    assert matmul._int8_blocks_candidates_cpu(rows, block) == candidates
    monkeypatch.setenv(matmul.ENV, "vnni")
    assert matmul._int8_blocks_candidates_cpu(rows, block) == ("vnni",)


def test_w8a8_blocks_per_block_sums_are_not_one_product():
    """The block sum differs from per-row scaling when scales differ between blocks: the
    reference really applies S[:, g] to block g (a wrong block order would fail here)."""
    q_x = np.ones((1, 128), np.int8)
    codes = np.ones((1, 128), np.int8)
    scale = np.array([[1.0, 0.0]], np.float32)
    s_x = np.ones(1, np.float32)
    assert reference.linear_w8a8_blocks(q_x, s_x, codes, scale, 64)[0, 0] == 64.0
    y = matmul.w8a8_linear(torch.from_numpy(q_x), torch.from_numpy(s_x), torch.from_numpy(codes),
                           torch.from_numpy(scale), None, block_size=64)
    assert y.item() == 64.0


def _weight_only_tolerance(x, codes, scale, b):
    w_hat = codes.astype(np.float32) * np.repeat(scale, b, axis=1)
    return 4 * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64)
                                           @ np.abs(w_hat).astype(np.float64).T) + 1e-30


@pytest.mark.parametrize("shape", SHAPES)
def test_weight_only_blocks_fused_kernels_agree(shape):
    m, k, n, b = shape
    rng = np.random.default_rng(m * k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    _, codes, scale, _, bias = _problem(rng, m, k, n, b)
    want = reference.linear_w8_blocks(x, codes, scale, b, bias)
    tol = _weight_only_tolerance(x, codes, scale, b)
    generic = native_cpu.linear_w8_f32(x, codes, scale, bias, block_size=b, path="generic")
    assert np.all(np.abs(generic - want) <= tol + 4 * np.finfo(np.float32).eps * np.abs(bias))
    assert np.array_equal(native_cpu.linear_w8_f32(x, codes, scale, bias, block_size=b,
                                                   path="generic", threads=2), generic)
    for path in ("avx2", "vnni"):
        if native_cpu.path_supported(path):
            for threads in (1, 2):
                got = native_cpu.linear_w8_f32(x, codes, scale, bias, block_size=b, path=path,
                                               threads=threads)
                assert np.array_equal(got, generic), (path, threads)
    no_bias = native_cpu.linear_w8_f32(x, codes, scale, None, block_size=b, path="generic")
    assert np.array_equal(no_bias + bias, generic)      # the bias add is one rounding


@pytest.mark.parametrize("path", ("auto",) + INT8_PATHS)
@pytest.mark.parametrize("shape", [(1, 576, 17, 64), (40, 1024, 33, 128), (300, 512, 9, 64)])
def test_weight_only_blocks_every_path_close_to_reference(monkeypatch, path, shape):
    if path != "auto":
        skip_unless_runnable(path)
    monkeypatch.setenv(matmul.ENV, path)
    m, k, n, b = shape
    rng = np.random.default_rng(k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    _, codes, scale, _, bias = _problem(rng, m, k, n, b)
    y = matmul.weight_only_linear(torch.from_numpy(x), torch.from_numpy(codes),
                                  torch.from_numpy(scale), torch.from_numpy(bias), block_size=b)
    want = reference.linear_w8_blocks(x, codes, scale, b, bias)
    tol = _weight_only_tolerance(x, codes, scale, b) + 4 * np.finfo(np.float32).eps * abs(bias)
    assert y.shape == (m, n) and np.all(np.abs(y.numpy() - want) <= tol)


def test_dense_blocks_span_chunks(monkeypatch):
    """The dense path converts the weight in chunks of rows; each chunk takes its own scales."""
    monkeypatch.setattr(matmul, "CHUNK_BYTES", 4 * 64 * 20)      # 20 rows of K = 64 per chunk
    monkeypatch.setenv(matmul.ENV, "int_mm")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 128)).astype(np.float32)
    _, codes, scale, _, bias = _problem(rng, 6, 128, 53, 64)
    y = matmul.weight_only_linear(torch.from_numpy(x), torch.from_numpy(codes),
                                  torch.from_numpy(scale), torch.from_numpy(bias), block_size=64)
    want = reference.linear_w8_blocks(x, codes, scale, 64, bias)
    assert np.allclose(y.numpy(), want, rtol=1e-5, atol=1e-5)
    grad = rng.standard_normal((6, 53)).astype(np.float32)
    g = matmul.grad_input(torch.from_numpy(grad), torch.from_numpy(codes),
                          torch.from_numpy(scale), block_size=64)
    w_hat = codes.astype(np.float32) * np.repeat(scale, 64, axis=1)
    assert np.allclose(g.numpy(), grad.astype(np.float64) @ w_hat, rtol=1e-5, atol=1e-5)


def test_native_block_arguments_are_checked():
    if native_cpu.unavailable_reason() is not None:
        pytest.skip(native_cpu.unavailable_reason())
    x = np.zeros((2, 128), np.float32)
    q = np.zeros((2, 128), np.int8)
    w = np.zeros((3, 128), np.int8)
    with pytest.raises(ValueError, match="block_size must be a positive divisor of K = 128"):
        native_cpu.linear_w8_f32(x, w, np.zeros((3, 2), np.float32), block_size=96,
                                 path="generic")
    with pytest.raises(ValueError, match="multiple of 8"):
        native_cpu.linear_w8_f32(x, w, np.zeros((3, 32), np.float32), block_size=4,
                                 path="generic")
    with pytest.raises(ValueError, match=r"scale must have shape \(3, 2\)"):
        native_cpu.linear_w8_f32(x, w, np.zeros(3, np.float32), block_size=64, path="generic")
    with pytest.raises(ValueError, match=r"s_b must have shape \(3, 1\)"):
        native_cpu.linear_w8a8_f32(q, w, np.ones(2, np.float32), np.zeros((3, 2), np.float32),
                                   block_size=128, path="generic")


@pytest.mark.parametrize("features, w8a8, weight_only_1, weight_only_32", [
    (dict(avx2=True, fma=True, avx512=False, avx512_vnni=False, native=None),
     "avx2", "avx2", "dense"),
    (dict(avx2=True, fma=True, avx512=True, avx512_vnni=True, native=None),
     "vnni", "avx2", "dense"),
    (dict(avx2=True, fma=True, avx512=True, avx512_vnni=True, native="not built"),
     "float", "dense", "dense"),
    (dict(avx2=False, fma=False, avx512=False, avx512_vnni=False, native=None),
     "float", "dense", "dense"),
])
def test_auto_choice_for_block_scales(monkeypatch, features, w8a8, weight_only_1,
                                      weight_only_32):
    info = dict(model="test CPU", **features)
    monkeypatch.setattr(matmul, "cpu_info", lambda: info)
    monkeypatch.delenv(matmul.ENV, raising=False)
    assert matmul._int8_blocks_path_cpu() == w8a8
    assert matmul._weight_only_path_cpu(1, blocks=True) == weight_only_1
    assert matmul._weight_only_path_cpu(matmul.FUSED_W8_BLOCKS_MAX_ROWS + 1,
                                        blocks=True) == weight_only_32
