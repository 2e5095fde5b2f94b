"""The output-buffer cache: reuse only after release, bounded, never shared while in use."""

import gc

import numpy as np
import pytest
import torch

from quantkit import _buffers, dequantize, quantize, reference


@pytest.fixture
def cache(monkeypatch):
    fresh = _buffers._Cache(8 << 20)
    monkeypatch.setattr(_buffers, "_CACHE", fresh)
    return fresh


def test_small_arrays_bypass_the_cache(cache):
    a = _buffers.empty((10,), np.float32)
    assert a.base is None and cache.held_bytes == 0


def test_block_returns_when_the_last_user_dies_and_is_reused(cache):
    a = _buffers.empty((1 << 20,), np.int8)
    address = a.ctypes.data
    view = a[::2]
    del a
    gc.collect()
    assert cache.held_bytes == 0            # the view still holds the block
    del view
    gc.collect()
    assert cache.held_bytes == 1 << 20
    b = _buffers.empty((1024, 1024), np.int8)
    assert b.ctypes.data == address and cache.held_bytes == 0
    c = _buffers.empty((1024, 1024), np.int8)   # b is alive: c must get other memory
    assert c.ctypes.data != b.ctypes.data


def test_torch_tensors_keep_their_block(cache):
    x = np.random.default_rng(0).standard_normal(1 << 21).astype(np.float32)
    q = quantize(torch.from_numpy(x), 3.0)
    codes = q.data
    del q
    gc.collect()
    assert cache.held_bytes == 0
    other = quantize(x * 2, 3.0)                 # must not reuse the live block
    assert other.data.ctypes.data != codes.data_ptr()
    assert np.array_equal(codes.numpy(), reference.quantize_per_tensor(x, 3.0))


def test_cache_is_bounded_and_evicts_oldest(cache):
    arrays = [_buffers.empty((3 << 20,), np.int8) for _ in range(4)]
    del arrays
    gc.collect()
    assert cache.held_bytes <= 8 << 20
    _buffers.clear()
    assert cache.held_bytes == 0


def test_reused_memory_gives_correct_results(cache):
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = rng.standard_normal((512, 1024)).astype(np.float32)
        q = quantize(x, 2.5)
        assert np.array_equal(q.data, reference.quantize_per_tensor(x, 2.5))
        assert np.array_equal(dequantize(q), reference.dequantize_per_tensor(q.data, q.scale))
        del q
        gc.collect()


def test_env_limit_is_checked(monkeypatch):
    monkeypatch.setenv("QUANTKIT_BUFFER_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="QUANTKIT_BUFFER_CACHE_MB"):
        _buffers._limit_from_env()
    monkeypatch.setenv("QUANTKIT_BUFFER_CACHE_MB", "0")
    assert _buffers._limit_from_env() == 0


def test_large_buffers_start_on_a_cache_line():
    for nbytes in (_buffers.MIN_BYTES, _buffers.MIN_BYTES + 4, 3 << 20):
        a = _buffers.empty((nbytes // 4,), np.float32)
        assert a.ctypes.data % _buffers.ALIGNMENT == 0
        assert a.flags.c_contiguous and a.nbytes == nbytes // 4 * 4
