"""quantkit.matmul and backends/native_cpu: every path of the int8 Linear products.

W8A8 (``int8_product``): every path equals an int64 matmul bit for bit, on random codes, the
extremes +-127, zeros, odd shapes and K on both sides of the float path's exact bound. Weight-only:
the AVX2 and portable C fused kernels give identical bits and agree with a float64 product to
float32 rounding; the dense path too. A path this CPU cannot run is skipped, saying why.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit import matmul
from quantkit.backends import native_cpu
from quantkit.nn import QuantLinear

from matmul_cases import FUSED_PATHS, INT8_PATHS, guarded, skip_unless_runnable



def _codes(rng, shape, extremes=False):
    if extremes:
        return rng.choice(np.array([-127, 127, 0], np.int8), size=shape)
    return rng.integers(-127, 128, size=shape, dtype=np.int8)


def _exact(a, b):
    return a.astype(np.int64) @ b.astype(np.int64).T


SHAPES = [(1, 1, 1), (1, 37, 5), (2, 31, 4), (3, 32, 16), (5, 33, 17), (7, 100, 9), (16, 384, 64),
          (1, 4096, 33), (9, 1041, 20), (4, 2049, 8), (33, 3000, 70), (64, 576, 1536),
          (32, 17, 3), (37, 1100, 21),
          (64, 1, 8), (300, 1, 17), (1, 1, 3), (7, 2, 5)]   # K = 1: torch._int_mm is wrong there


@pytest.mark.parametrize("path", INT8_PATHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_product_is_exact(monkeypatch, path, shape):
    skip_unless_runnable(path)
    monkeypatch.setenv(matmul.ENV, path)
    rng = np.random.default_rng(sum(shape))
    m, k, n = shape
    for extremes in (False, True):
        a, b = _codes(rng, (m, k), extremes), _codes(rng, (n, k), extremes)
        acc = matmul.int8_product(torch.from_numpy(a), torch.from_numpy(b))
        assert acc.dtype == torch.int32 and tuple(acc.shape) == (m, n)
        assert np.array_equal(acc.numpy(), _exact(a, b))


@pytest.mark.parametrize("path", INT8_PATHS)
def test_int8_product_worst_case_sums(monkeypatch, path):
    """All +127 against all -127: the largest |sum| (127^2 K), no int16 pair saturates."""
    skip_unless_runnable(path)
    monkeypatch.setenv(matmul.ENV, path)
    for k in (2, 64, 1040, 1041, 8192, 70001):   # 70001: the VNNI a + 128 sums wrap int32
        a = np.full((3, k), 127, np.int8)
        b = np.stack([np.full(k, -127, np.int8), np.full(k, 127, np.int8), np.zeros(k, np.int8)])
        acc = matmul.int8_product(torch.from_numpy(a), torch.from_numpy(b)).numpy()
        assert np.array_equal(acc, _exact(a, b)), k


@pytest.mark.parametrize("path", INT8_PATHS)
def test_int8_product_empty(monkeypatch, path):
    skip_unless_runnable(path)
    monkeypatch.setenv(matmul.ENV, path)
    for m, k, n in [(0, 8, 4), (3, 0, 4), (3, 8, 0)]:
        acc = matmul.int8_product(torch.zeros((m, k), dtype=torch.int8),
                                  torch.zeros((n, k), dtype=torch.int8))
        assert tuple(acc.shape) == (m, n) and not acc.any()


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 40),
       seed=st.integers(0, 2**31))
def test_native_paths_equal_int64_any_shape(m, k, n, seed):
    if native_cpu.unavailable_reason() is not None:
        pytest.skip(native_cpu.unavailable_reason())
    rng = np.random.default_rng(seed)
    a, b = _codes(rng, (m, k)), _codes(rng, (n, k))
    for path in FUSED_PATHS:
        if native_cpu.path_supported(path):
            for threads in (1, 2):
                got = native_cpu.gemm_s8s8s32(a, b, path=path, threads=threads)
                assert np.array_equal(got, _exact(a, b))


# Shapes at the AMX kernel's edges: rows around its tiles of 16 activation rows and pairs of
# them, weight rows around its work items of 32 (one or two weight tiles), K around its tiles of 64,
# and several passes over the weight (K = 4096 and 4097: 14-16 activation tiles per pass).
AMX_EDGES = [(15, 64, 16), (16, 64, 16), (17, 65, 17), (31, 127, 31), (32, 128, 32),
             (33, 129, 33), (47, 63, 48), (48, 192, 49), (1, 1, 1), (3, 2, 70),
             (600, 4096, 40), (513, 4097, 33), (40, 20000, 3)]


@pytest.mark.parametrize("m, k, n", AMX_EDGES)
def test_amx_kernel_at_its_tile_edges(m, k, n):
    """The AMX kernel (packed activation tiles, a padded weight panel per work item, passes over
    the weight) against int64 products, also from row-strided views, with 1 and 2 threads; the
    rescaled product gives the bits of the generic path."""
    skip_unless_runnable("amx")
    rng = np.random.default_rng(m * 7919 + k * 31 + n)
    for extremes in (False, True):
        big_a, big_b = _codes(rng, (m, k + 9), extremes), _codes(rng, (n, k + 70), extremes)
        a, b = big_a[:, 5:5 + k], big_b[:, 3:3 + k]     # row strides k + 9 and k + 70
        # scales of both signs with exact zeros (a zero product without a bias stays -0.0 or
        # +0.0, as on every path)
        s_a = (rng.uniform(1e-3, 1, m) * rng.choice([-1, 0, 1], m)).astype(np.float32)
        s_b = (rng.uniform(1e-3, 1, n) * rng.choice([-1, 1], n)).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32)
        for threads in (1, 2):
            assert np.array_equal(native_cpu.gemm_s8s8s32(a, b, path="amx", threads=threads),
                                  _exact(a, b))
            for b_ in (bias, None):
                want = native_cpu.linear_w8a8_f32(a, b, s_a, s_b, b_, path="generic")
                got = native_cpu.linear_w8a8_f32(a, b, s_a, s_b, b_, path="amx", threads=threads)
                assert np.array_equal(got.view(np.int32), want.view(np.int32))


def _same_bits_nan_anywhere(got, want):
    """Identical float32 bits, except that a NaN matches any NaN (where two NaNs meet in one
    operation, which payload survives is the compiler's operand order: IEEE 754 leaves it open)."""
    nan = np.isnan(want)
    return (np.array_equal(np.isnan(got), nan)
            and np.array_equal(got[~nan].view(np.int32), want[~nan].view(np.int32)))


def test_amx_rescale_gives_nan_where_the_scalar_paths_do():
    """NaN activation scales, weight scales and biases (quiet and signalling, several payloads)
    give NaN exactly where the scalar rescale of the generic path gives it, and the same bits
    everywhere else."""
    skip_unless_runnable("amx")
    rng = np.random.default_rng(5)
    a, b = _codes(rng, (20, 70)), _codes(rng, (21, 70))
    s_a = rng.uniform(0.5, 1, 20).astype(np.float32)
    s_b = rng.uniform(0.5, 1, 21).astype(np.float32)
    bias = rng.standard_normal(21).astype(np.float32)
    s_a[4] = np.array([0x7FC00000], np.uint32).view(np.float32)[0]
    s_a[7] = np.array([0x7F812345], np.uint32).view(np.float32)[0]      # signalling
    s_b[[4, 7, 9]] = np.array([0xFFC54321] * 3, np.uint32).view(np.float32)
    bias[[9, 11]] = np.array([0x7FC0BEEF] * 2, np.uint32).view(np.float32)
    for b_ in (bias, None):
        want = native_cpu.linear_w8a8_f32(a, b, s_a, s_b, b_, path="generic")
        got = native_cpu.linear_w8a8_f32(a, b, s_a, s_b, b_, path="amx")
        assert np.isnan(want).any() and _same_bits_nan_anywhere(got, want)


@pytest.mark.parametrize("path", FUSED_PATHS)
@pytest.mark.parametrize("m, k, n", [(1, 100, 20), (7, 64, 33), (17, 129, 31), (40, 1000, 17)])
def test_native_kernels_read_nothing_past_their_inputs(path, m, k, n):
    """Every input of the int8 product, the W8A8 rescale and the fused weight-only product ends
    at an inaccessible page (a read past it crashes the test); results as from ordinary arrays."""
    skip_unless_runnable(path)
    rng = np.random.default_rng(m * k + n)
    a, b = _codes(rng, (m, k)), _codes(rng, (n, k))
    s_a = rng.uniform(0.5, 1, m).astype(np.float32)
    s_b = rng.uniform(0.5, 1, n).astype(np.float32)
    x, w, scale, bias = _weight_only_inputs(rng, m, k, n)
    assert np.array_equal(native_cpu.gemm_s8s8s32(guarded(a), guarded(b), path=path, threads=2),
                          _exact(a, b))
    want = native_cpu.linear_w8a8_f32(a, b, s_a, s_b, bias, path="generic")
    got = native_cpu.linear_w8a8_f32(guarded(a), guarded(b), guarded(s_a), guarded(s_b),
                                     guarded(bias), path=path, threads=2)
    assert np.array_equal(got, want)
    want = native_cpu.linear_w8_f32(x, w, scale, bias, path="generic")
    got = native_cpu.linear_w8_f32(guarded(x), guarded(w), guarded(scale), guarded(bias),
                                   path=path, threads=2)
    assert np.array_equal(got, want)


def test_native_gemm_takes_strided_rows():
    """Row-strided views run in place; column-strided ones are copied; results are exact."""
    if native_cpu.unavailable_reason() is not None:
        pytest.skip(native_cpu.unavailable_reason())
    rng = np.random.default_rng(3)
    big_a, big_b = _codes(rng, (10, 90)), _codes(rng, (12, 90))
    a, b = big_a[::2, 5:70], big_b[1::3, 5:70]
    before = a.copy()
    for path in FUSED_PATHS:
        if native_cpu.path_supported(path):
            assert np.array_equal(native_cpu.gemm_s8s8s32(a, b, path=path), _exact(a, b))
            assert np.array_equal(native_cpu.gemm_s8s8s32(big_a[:, ::2], big_b[:, ::2], path=path),
                                  _exact(big_a[:, ::2], big_b[:, ::2]))
    assert np.array_equal(a, before)


def test_native_gemm_rejects_bad_arguments():
    if native_cpu.unavailable_reason() is not None:
        pytest.skip(native_cpu.unavailable_reason())
    a = np.zeros((2, 8), np.int8)
    with pytest.raises(TypeError, match="a must be int8"):
        native_cpu.gemm_s8s8s32(a.astype(np.int16), a)
    with pytest.raises(ValueError, match="second dimensions differ"):
        native_cpu.gemm_s8s8s32(a, np.zeros((2, 9), np.int8))
    with pytest.raises(ValueError, match="path must be one of"):
        native_cpu.path_supported("sse9")



# ------------------------------------------------------------------------- weight row sums


def test_row_sums_are_exact_and_checked():
    if native_cpu.unavailable_reason() is not None:
        pytest.skip(native_cpu.unavailable_reason())
    rng = np.random.default_rng(11)
    b = rng.integers(-128, 128, size=(9, 5000), dtype=np.int8)
    b[0] = -128
    b[1] = 127
    got = native_cpu.row_sums(b)
    assert got.dtype == np.int32 and got.flags.c_contiguous
    assert np.array_equal(got, b.astype(np.int64).sum(axis=1))
    assert np.array_equal(native_cpu.row_sums(b[::2, 3:]), b[::2, 3:].astype(np.int64).sum(1))
    a = _codes(rng, (2, 5000))
    for bad in (got[:-1], got.astype(np.int64), np.zeros((9, 1), np.int32), list(got)):
        with pytest.raises(ValueError, match="b_row_sums must be a C-contiguous int32 array"):
            native_cpu.gemm_s8s8s32(a, b, b_row_sums=bad)
    with pytest.raises(ValueError, match="per-row scales only"):
        native_cpu.linear_w8a8_f32(a, b, np.ones(2, np.float32), np.ones((9, 1), np.float32),
                                   block_size=5000, b_row_sums=got)


@pytest.mark.parametrize("path", FUSED_PATHS)
@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 40),
       seed=st.integers(0, 2**31))
def test_given_row_sums_give_the_same_bits(path, m, k, n, seed):
    """Every native path with the weight's row sums passed equals the int64 product (and the
    W8A8 rescale equals the path's own without them), the sums' only user being "vnni"."""
    skip_unless_runnable(path)
    rng = np.random.default_rng(seed)
    a, b = _codes(rng, (m, k), extremes=seed % 3 == 0), _codes(rng, (n, k), extremes=seed % 3 == 0)
    sums = native_cpu.row_sums(b)
    for threads in (1, 2):
        got = native_cpu.gemm_s8s8s32(a, b, path=path, threads=threads, b_row_sums=sums)
        assert np.array_equal(got, _exact(a, b))
    s_a = (rng.random(m) + 0.5).astype(np.float32)
    s_b = (rng.random(n) * 1e-2).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    with_sums = native_cpu.linear_w8a8_f32(a, b, s_a, s_b, bias, path=path, threads=2,
                                           b_row_sums=sums)
    assert np.array_equal(with_sums, native_cpu.linear_w8a8_f32(a, b, s_a, s_b, bias, path=path))


def test_kept_row_sums_follow_the_weight(monkeypatch):
    """The sums kept for a weight are reused while it is unchanged and recomputed after an
    in-place change (copy_, a new storage); a dropped weight's entry goes away; inference
    tensors are summed on every call. The layer's output follows its weight on the vnni path."""
    torch.manual_seed(1)
    w = torch.randint(-127, 128, (6, 80), dtype=torch.int8)
    first = matmul.weight_row_sums(w)
    assert matmul.weight_row_sums(w) is first
    assert np.array_equal(first, w.numpy().astype(np.int64).sum(1))
    w.copy_(torch.randint(-127, 128, (6, 80), dtype=torch.int8))
    again = matmul.weight_row_sums(w)
    assert again is not first and np.array_equal(again, w.numpy().astype(np.int64).sum(1))
    w.set_(torch.randint(-127, 128, (6, 80), dtype=torch.int8))
    assert np.array_equal(matmul.weight_row_sums(w), w.numpy().astype(np.int64).sum(1))
    key = id(w)
    del w
    assert key not in matmul._row_sums
    with torch.inference_mode():
        v = torch.randint(-127, 128, (3, 10), dtype=torch.int8)
    assert np.array_equal(matmul.weight_row_sums(v), v.numpy().astype(np.int64).sum(1))
    matmul.clear_row_sums()
    assert not matmul._row_sums

    skip_unless_runnable("vnni")
    monkeypatch.setenv(matmul.ENV, "vnni")
    layer = QuantLinear.from_float(torch.nn.Linear(300, 20), activations="dynamic")
    x = torch.randn(3, 300)
    layer(x)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-127, 128, layer.weight.shape, dtype=torch.int8))
    monkeypatch.setenv(matmul.ENV, "generic")
    expected = layer(x)
    monkeypatch.setenv(matmul.ENV, "vnni")
    assert torch.equal(layer(x), expected)


# ---------------------------------------------------------------------------------- weight-only


def _weight_only_inputs(rng, m, k, n):
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = _codes(rng, (n, k))
    scale = (rng.random(n) * 1e-2).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    return x, w, scale, bias


def _close_to_float64(y, x, w, scale, bias):
    """|y - exact| within float32 rounding of the sum of |terms| (K-term float32 sums)."""
    exact = (x.astype(np.float64) @ w.astype(np.float64).T) * scale + bias
    bound = (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T) * scale
    k = x.shape[1]
    assert np.all(np.abs(y - exact) <= 2 * (k + 2) * 2.0 ** -24 * bound + 1e-6 * np.abs(exact)
                  + 1e-30)


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_weight_only_paths_agree_bit_for_bit(shape):
    if native_cpu.unavailable_reason() is not None:
        pytest.skip(native_cpu.unavailable_reason())
    m, k, n = shape
    rng = np.random.default_rng(k)
    x, w, scale, bias = _weight_only_inputs(rng, m, k, n)
    generic = native_cpu.linear_w8_f32(x, w, scale, bias, path="generic")
    _close_to_float64(generic, x, w, scale, bias)
    assert np.array_equal(native_cpu.linear_w8_f32(x, w, scale, bias, path="generic", threads=2),
                          generic)
    for path in FUSED_PATHS:     # vnni, amx: the AVX-512 form below 32 rows, AVX2 above
        if path == "generic" or not native_cpu.path_supported(path):
            continue
        for threads in (1, 2):
            got = native_cpu.linear_w8_f32(x, w, scale, bias, path=path, threads=threads)
            assert np.array_equal(got, generic), path
        no_bias = native_cpu.linear_w8_f32(x, w, scale, None, path=path)
        assert np.array_equal(no_bias, native_cpu.linear_w8_f32(x, w, scale, None,
                                                                path="generic")), path


@pytest.mark.parametrize("path", ("avx2", "generic", "float"))
def test_weight_only_linear_every_path(monkeypatch, path):
    skip_unless_runnable(path)
    monkeypatch.setenv(matmul.ENV, path)
    rng = np.random.default_rng(7)
    for m, k, n in [(1, 4096, 20), (3, 37, 5), (64, 384, 100)]:
        x, w, scale, bias = _weight_only_inputs(rng, m, k, n)
        xt = torch.from_numpy(x)
        before = xt.clone()
        y = matmul.weight_only_linear(xt, torch.from_numpy(w), torch.from_numpy(scale),
                                      torch.from_numpy(bias)).numpy()
        _close_to_float64(y, x, w, scale, bias)
        assert torch.equal(xt, before)


@pytest.mark.parametrize("m", list(range(1, 14)) + [29, 30, 31, 32, 33])
def test_fused_weight_only_rows_around_its_tiles(m):
    """The AVX-512 form (tiles of six rows of x by four weight rows, two rows per vector) and the
    AVX2 one (pairs of rows) give the portable kernel's bits for every remainder of rows, weight
    rows past the last group of four, K with and without a tail of K % 8 terms, and row strides
    beyond K; from 32 rows every path takes the chain order."""
    if native_cpu.unavailable_reason() is not None:
        pytest.skip(native_cpu.unavailable_reason())
    rng = np.random.default_rng(m)
    for k, n in ((131, 23), (8, 4), (1, 5), (1040, 9)):
        x, w, scale, bias = _weight_only_inputs(rng, m, k + 7, n)
        x, w = x[:, 3:3 + k], w[:, 2:2 + k]                 # row strides k + 7
        for b in (bias, None):
            want = native_cpu.linear_w8_f32(x, w, scale, b, path="generic")
            for path in FUSED_PATHS:
                if path != "generic" and native_cpu.path_supported(path):
                    for threads in (1, 2):
                        got = native_cpu.linear_w8_f32(x, w, scale, b, path=path,
                                                       threads=threads)
                        assert np.array_equal(got.view(np.int32), want.view(np.int32)), path


def test_fused_weight_only_nonfinite_input_propagates():
    """NaN/Inf in x reach the outputs that use them (the kernel does not hide them)."""
    if native_cpu.unavailable_reason() is not None:
        pytest.skip(native_cpu.unavailable_reason())
    rng = np.random.default_rng(1)
    x, w, scale, bias = _weight_only_inputs(rng, 2, 40, 8)
    x[0, 3] = np.nan
    x[1, 39] = np.inf
    w[:, 39] = 1
    for path in FUSED_PATHS:
        if native_cpu.path_supported(path):
            y = native_cpu.linear_w8_f32(x, w, scale, bias, path=path)
            assert np.isnan(y[0]).all() and np.isposinf(y[1]).all()


# ------------------------------------------------------------------------- choice and forcing


def test_unknown_path_is_a_value_error_listing_the_choices(monkeypatch):
    monkeypatch.setenv(matmul.ENV, "fast")
    with pytest.raises(ValueError, match="auto, amx, vnni, avx2, generic, int_mm, float"):
        matmul.int8_product(torch.ones((2, 3), dtype=torch.int8),
                            torch.ones((4, 3), dtype=torch.int8))


def test_forced_avx2_without_the_feature_names_it(monkeypatch):
    info = dict(matmul.cpu_info(), avx2=False, fma=False, native=None, model="an old CPU")
    monkeypatch.setattr(matmul, "cpu_info", lambda: info)
    monkeypatch.setenv(matmul.ENV, "avx2")
    with pytest.raises(RuntimeError, match="avx2 cannot run on this CPU .*lacks AVX2/FMA"):
        matmul.int8_product(torch.ones((2, 3), dtype=torch.int8),
                            torch.ones((4, 3), dtype=torch.int8))
    with pytest.raises(RuntimeError, match="lacks AVX2/FMA"):
        matmul.weight_only_linear(torch.ones(2, 3), torch.ones((4, 3), dtype=torch.int8),
                                  torch.ones(4), None)


def test_forced_vnni_without_the_feature_names_it(monkeypatch):
    info = dict(matmul.cpu_info(), avx2=True, fma=True, avx512=True, avx512_vnni=False,
                native=None, model="an AVX-512 CPU without VNNI")
    monkeypatch.setattr(matmul, "cpu_info", lambda: info)
    monkeypatch.setenv(matmul.ENV, "vnni")
    with pytest.raises(RuntimeError, match="vnni cannot run on this CPU .*lacks AVX-512 BW/VL or "
                                           "AVX-512 VNNI"):
        matmul.int8_product(torch.ones((2, 3), dtype=torch.int8),
                            torch.ones((4, 3), dtype=torch.int8))


def test_forced_amx_without_the_feature_names_it(monkeypatch):
    info = dict(matmul.cpu_info(), avx2=True, fma=True, avx512=True, avx512_vnni=True,
                amx_int8=False, native=None, model="a VNNI CPU without AMX")
    monkeypatch.setattr(matmul, "cpu_info", lambda: info)
    monkeypatch.setenv(matmul.ENV, "amx")
    with pytest.raises(RuntimeError, match="amx cannot run on this CPU .*lacks AMX-INT8"):
        matmul.int8_product(torch.ones((2, 3), dtype=torch.int8),
                            torch.ones((4, 3), dtype=torch.int8))


@pytest.mark.parametrize("path, need", [("vnni", "need AVX-512 BW/VL and VNNI"),
                                        ("amx", "need AVX-512 BW/VL, VNNI and AMX-INT8")])
def test_library_refuses_a_path_the_cpu_lacks(path, need):
    """The C library checks the CPU (and for AMX the OS's grant) itself: a forced VNNI or AMX call
    never runs an illegal instruction."""
    if native_cpu.unavailable_reason() is not None:
        pytest.skip(native_cpu.unavailable_reason())
    a = np.ones((2, 3), np.int8)
    if native_cpu.path_supported(path):
        assert np.array_equal(native_cpu.gemm_s8s8s32(a, a, path=path), np.full((2, 2), 3))
    else:
        with pytest.raises(RuntimeError, match=f"'{path}'.*{need}"):
            native_cpu.gemm_s8s8s32(a, a, path=path)


def test_forced_native_without_the_library_says_how_to_build(monkeypatch):
    info = dict(matmul.cpu_info(), native="quantkit's CPU library is not built (x)")
    monkeypatch.setattr(matmul, "cpu_info", lambda: info)
    monkeypatch.setenv(matmul.ENV, "generic")
    with pytest.raises(RuntimeError, match="needs quantkit's CPU library"):
        matmul.int8_product(torch.ones((2, 3), dtype=torch.int8),
                            torch.ones((4, 3), dtype=torch.int8))


@pytest.mark.parametrize("features, w8a8_1, w8a8, weight_only_1, weight_only_256", [
    (dict(avx2=True, fma=True, avx512=False, avx512_vnni=False, amx_int8=False,
          native=None),
     "avx2", "avx2", "avx2", "avx2"),
    (dict(avx2=True, fma=True, avx512=True, avx512_vnni=True, amx_int8=False,
          native=None),
     "vnni", "int_mm", "vnni", "dense"),
    (dict(avx2=True, fma=True, avx512=True, avx512_vnni=True, amx_int8=False,
          native="not built"),
     "int_mm", "int_mm", "dense", "dense"),
    (dict(avx2=False, fma=False, avx512=False, avx512_vnni=False, amx_int8=False,
          native=None),
     "float", "float", "dense", "dense"),
    (dict(avx2=True, fma=True, avx512=False, avx512_vnni=False, amx_int8=False,
          native="not built"),
     "float", "float", "dense", "dense"),
])
def test_auto_choice_by_cpu_features(monkeypatch, features, w8a8_1, w8a8, weight_only_1,
                                     weight_only_256):
    info = dict(model="test CPU", **features)
    monkeypatch.setattr(matmul, "cpu_info", lambda: info)
    monkeypatch.delenv(matmul.ENV, raising=False)
    chosen = matmul.describe()
    assert (chosen["w8a8_batch1"], chosen["w8a8"], chosen["weight_only_batch1"],
            chosen["weight_only_batch256"]) == (w8a8_1, w8a8, weight_only_1, weight_only_256)


def test_vnni_choice_depends_on_the_shape(monkeypatch):
    """On a VNNI CPU: quantkit's kernel for few rows of a long K, torch._int_mm otherwise."""
    info = dict(model="test CPU", avx2=True, fma=True, avx512=True, avx512_vnni=True,
                amx_int8=False, native=None)
    monkeypatch.setattr(matmul, "cpu_info", lambda: info)
    monkeypatch.delenv(matmul.ENV, raising=False)
    assert matmul._int8_path_cpu(matmul.VNNI_MAX_ROWS, matmul.VNNI_MIN_K) == "vnni"
    assert matmul._int8_path_cpu(matmul.VNNI_MAX_ROWS + 1, matmul.VNNI_MIN_K) == "int_mm"
    assert matmul._int8_path_cpu(1, matmul.VNNI_MIN_K - 1) == "int_mm"


def test_cpu_info_reports_the_features():
    info = matmul.cpu_info()
    assert isinstance(info["model"], str) and info["model"]
    for key in ("avx2", "fma", "avx512", "avx512_vnni", "amx_int8"):
        assert isinstance(info[key], bool)


# -------------------------------------------------------------------------------- QuantLinear


@pytest.mark.parametrize("mode", ("dynamic", "static"))
def test_quantlinear_w8a8_same_bits_on_every_path(monkeypatch, mode):
    torch.manual_seed(0)
    lin = torch.nn.Linear(1100, 70)
    layer = QuantLinear.from_float(lin, activations=mode,
                                   act_alpha=2.5 if mode == "static" else None)
    x = torch.randn(13, 1100)
    outputs = {}
    for path in INT8_PATHS:
        if path in FUSED_PATHS and (native_cpu.unavailable_reason() is not None
                                    or not native_cpu.path_supported(path)):
            continue
        monkeypatch.setenv(matmul.ENV, path)
        outputs[path] = layer(x)
    first = next(iter(outputs.values()))
    assert len(outputs) >= 2
    for path, y in outputs.items():
        assert torch.equal(y, first), path


def test_load_refuses_weight_code_minus_128():
    layer = QuantLinear(8, 4)
    state = layer.state_dict()
    state["weight"] = state["weight"].clone()
    state["weight"][1, 2] = -128
    state["bias"] = torch.ones(4)
    with pytest.raises(ValueError, match=r"'weight'.*\[-127, 127\]"):
        layer.load_state_dict(state)
    assert not layer.bias.any()          # nothing was copied


@pytest.mark.parametrize("path", INT8_PATHS)
@pytest.mark.parametrize("shape", [(1, 5, 3), (7, 100, 17), (40, 1041, 33), (3, 0, 4)])
def test_w8a8_linear_rescale_is_the_reference(monkeypatch, path, shape):
    """float32(acc) * (s_x * s_w) + bias, each operation rounded once, on every path."""
    skip_unless_runnable(path)
    monkeypatch.setenv(matmul.ENV, path)
    m, k, n = shape
    rng = np.random.default_rng(k + 1)
    a, b = _codes(rng, (m, k)), _codes(rng, (n, k))
    s_x = (rng.random(m) * 1e-2).astype(np.float32)
    s_w = (rng.random(n) * 1e-2).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    acc = _exact(a, b).astype(np.float32)
    expected = acc * (s_x[:, None] * s_w[None, :]) + bias
    for with_bias in (True, False):
        y = matmul.w8a8_linear(torch.from_numpy(a), torch.from_numpy(s_x), torch.from_numpy(b),
                               torch.from_numpy(s_w), torch.from_numpy(bias) if with_bias else None)
        want = expected if with_bias else acc * (s_x[:, None] * s_w[None, :])
        assert np.array_equal(y.numpy(), want)


@pytest.mark.slow
@pytest.mark.parametrize("path", INT8_PATHS)
def test_int8_product_exact_at_model_sizes(monkeypatch, path):
    """Sizes of real layers (and K = 16384, sums near 2^28): exact on every path."""
    skip_unless_runnable(path)
    monkeypatch.setenv(matmul.ENV, path)
    rng = np.random.default_rng(11)
    for m, k, n in [(300, 4096, 1024), (33, 16384, 64), (1088, 384, 1536)]:
        a, b = _codes(rng, (m, k)), _codes(rng, (n, k))
        assert np.array_equal(matmul.int8_product(torch.from_numpy(a), torch.from_numpy(b)).numpy(),
                              _exact(a, b))


# ------------------------------------------------------------------------ tuning by timing


def test_tuning_keeps_the_fastest_candidate(monkeypatch):
    """A new shape class runs its candidates in turn, one per call, each timed; once each has
    _TUNE_SAMPLES calls the fastest is kept and later calls of the class take it untimed."""
    monkeypatch.delenv(matmul.ENV, raising=False)
    matmul.clear_tuned()
    costs = {"slow": 5.0, "fast": 1.0}
    now = [0.0]
    calls = []

    def run(path):
        calls.append(path)
        now[0] += costs[path]
        return path

    monkeypatch.setattr(matmul, "_clock", lambda: now[0])
    tuning = 2 * matmul._TUNE_SAMPLES
    outs = [matmul._fastest("test", 3, 8, 9, ("slow", "fast"), run) for _ in range(tuning)]
    assert outs == calls and calls.count("slow") == calls.count("fast") == matmul._TUNE_SAMPLES
    assert matmul._fastest("test", 4, 8, 9, ("slow", "fast"), run) == "fast"  # same class (4)
    assert calls[tuning:] == ["fast"]
    assert any(key.startswith("test rows<=4 K=8 N=9") for key in matmul.tuned_paths())
    costs.update(slow=0.5)                      # another class is timed afresh
    for _ in range(tuning):
        matmul._fastest("test", 5, 8, 9, ("slow", "fast"), run)
    assert matmul._fastest("test", 7, 8, 9, ("slow", "fast"), run) == "slow"
    assert matmul._fastest("test", 9, 8, 9, ("only",), lambda p: p) == "only"  # nothing to time
    matmul.clear_tuned()
    assert matmul.tuned_paths() == {}


def test_tuned_w8a8_gives_the_bits_of_every_path(monkeypatch):
    """Whatever the timing picks, W8A8 outputs are the same bits as each forced path's."""
    torch.manual_seed(3)
    layer = QuantLinear.from_float(torch.nn.Linear(300, 40), activations="dynamic")
    x = torch.randn(6, 300)
    monkeypatch.delenv(matmul.ENV, raising=False)
    matmul.clear_tuned()
    tuned = layer(x)
    for _ in range(4 * matmul._TUNE_SAMPLES):   # through the tuning calls and after
        assert torch.equal(layer(x), tuned)
    assert matmul.tuned_paths()
    for path in matmul._int8_candidates_cpu(6, 300):
        monkeypatch.setenv(matmul.ENV, path)
        assert torch.equal(layer(x), tuned), path


def test_forced_path_is_never_timed(monkeypatch):
    monkeypatch.setenv(matmul.ENV, "float")
    matmul.clear_tuned()
    layer = QuantLinear.from_float(torch.nn.Linear(64, 16), activations="dynamic")
    layer(torch.randn(5, 64))
    QuantLinear.from_float(torch.nn.Linear(64, 16))(torch.randn(5, 64))
    assert matmul.tuned_paths() == {}
    assert matmul._int8_candidates_cpu(5, 64) == ("float",)


@pytest.mark.parametrize("features, rows, w8a8", [
    (dict(avx2=True, fma=True, avx512=True, avx512_vnni=True, amx_int8=False,
          native=None), 1, ("vnni", "int_mm")),
    (dict(avx2=True, fma=True, avx512=True, avx512_vnni=True, amx_int8=False,
          native=None), 100,
     ("int_mm", "vnni")),
    (dict(avx2=True, fma=True, avx512=True, avx512_vnni=True, amx_int8=False,
          native=None), 1000, ("int_mm",)),
    (dict(avx2=True, fma=True, avx512=True, avx512_vnni=True, amx_int8=False,
          native="not built"), 1,
     ("int_mm",)),
    (dict(avx2=True, fma=True, avx512=False, avx512_vnni=False, amx_int8=False,
          native=None), 1, ("avx2",)),
    (dict(avx2=True, fma=True, avx512=False, avx512_vnni=False, amx_int8=False,
          native=None), 1000,
     ("avx2", "float")),
    (dict(avx2=False, fma=False, avx512=False, avx512_vnni=False, amx_int8=False,
          native=None), 16, ("float",)),
    (dict(avx2=True, fma=True, avx512=True, avx512_vnni=True, amx_int8=True,
          native=None), 1, ("vnni", "int_mm")),
    (dict(avx2=True, fma=True, avx512=True, avx512_vnni=True, amx_int8=True,
          native=None), 16, ("vnni", "int_mm", "amx")),
    (dict(avx2=True, fma=True, avx512=True, avx512_vnni=True, amx_int8=True,
          native=None), 100, ("int_mm", "vnni", "amx")),
    (dict(avx2=True, fma=True, avx512=True, avx512_vnni=True, amx_int8=True,
          native=None), 1000, ("int_mm", "amx")),
    (dict(avx2=True, fma=True, avx512=True, avx512_vnni=True, amx_int8=True,
          native="not built"), 1000, ("int_mm",)),
])
def test_w8a8_candidates_by_cpu_features_and_rows(monkeypatch, features, rows, w8a8):
    info = dict(model="test CPU", **features)
    monkeypatch.setattr(matmul, "cpu_info", lambda: info)
    monkeypatch.delenv(matmul.ENV, raising=False)
    assert matmul._int8_candidates_cpu(rows, 4096) == w8a8


def test_weight_only_is_never_timed(monkeypatch):
    """Weight-only paths differ in float32 rounding: the choice is a fixed rule, so a layer gives
    the same bits on every call (a resumed fine-tune depends on it)."""
    monkeypatch.delenv(matmul.ENV, raising=False)
    matmul.clear_tuned()
    torch.manual_seed(4)
    layer = QuantLinear.from_float(torch.nn.Linear(256, 64))
    x = torch.randn(20, 256)
    first = layer(x)
    for _ in range(10):
        assert torch.equal(layer(x), first)
    assert not any(key.startswith("weight-only") for key in matmul.tuned_paths())


@pytest.mark.parametrize("rows, chunks", [(3, 8), (40, 4), (400, 1)])
def test_dense_chunks_grow_with_the_activations(monkeypatch, rows, chunks):
    """A chunk of the dequantized weight takes CHUNK_BYTES or the activations' bytes, whichever is
    larger (every chunk's product reads all of x); the result does not depend on the chunking."""
    monkeypatch.setenv(matmul.ENV, "float")                 # the dense weight-only path
    monkeypatch.setattr(matmul, "CHUNK_BYTES", 4 * 32 * 16)   # 16 rows of K = 32
    calls = []
    dequantize = matmul._dequantized_rows

    def counted(*args):
        calls.append(args[2:4])
        return dequantize(*args)

    monkeypatch.setattr(matmul, "_dequantized_rows", counted)
    rng = np.random.default_rng(rows)
    x = torch.from_numpy(rng.standard_normal((rows, 32)).astype(np.float32))
    codes = torch.from_numpy(rng.integers(-127, 128, (128, 32)).astype(np.int8))
    scale = torch.from_numpy(rng.uniform(1e-3, 1e-2, 128).astype(np.float32))
    bias = torch.from_numpy(rng.standard_normal(128).astype(np.float32))
    y = matmul.weight_only_linear(x, codes, scale, bias)
    assert len(calls) == chunks
    expected = x @ (codes.float() * scale[:, None]).t() + bias
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    grad = torch.from_numpy(rng.standard_normal((rows, 128)).astype(np.float32))
    calls.clear()
    g = matmul.grad_input(grad, codes, scale)
    assert len(calls) == chunks          # the result grad @ W_hat has the size of x
    torch.testing.assert_close(g, grad @ (codes.float() * scale[:, None]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m, k, n", [(1, 64, 32), (16, 64, 8), (17, 64, 8), (300, 128, 24),
                                     (5, 1, 8), (40, 12, 16), (3, 64, 7), (1, 4096, 4096)])
def test_device_product_calls_int_mm_only_with_shapes_its_cuda_kernel_takes(m, k, n):
    """On a GPU torch._int_mm needs more than 16 rows and K, N multiples of 8: fewer rows are
    padded, other K or N take float64 products; every result is exact (checked here with a
    stand-in that refuses what the CUDA kernel refuses and computes on the CPU)."""
    calls = []

    def cuda_like_int_mm(a, b):
        assert a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0, (a.shape, b.shape)
        calls.append(a.shape)
        return torch._int_mm(a, b)

    rng = np.random.default_rng(m * 7 + k + n)
    a, b = _codes(rng, (m, k)), _codes(rng, (n, k))
    acc = matmul._int8_product_device(torch.from_numpy(a), torch.from_numpy(b),
                                      int_mm=cuda_like_int_mm)
    assert acc.dtype == torch.int32 and tuple(acc.shape) == (m, n)
    assert np.array_equal(acc.numpy(), _exact(a, b))
    assert bool(calls) == (k % 8 == 0 and n % 8 == 0)
