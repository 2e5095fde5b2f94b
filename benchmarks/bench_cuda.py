"""CUDA throughput: quantkit's kernels against the device's copy bandwidth and torch's CUDA kernels.

Runs only with ``--gpu`` (marked ``gpu``). One run measures, on the same 256M float32 elements
(1 GiB; 16M with ``--quick``):

* device-to-device copy (``dst.copy_(src)``, 8 bytes per element moved): the ceiling;
* quantize per tensor, per channel (a 16384-row matrix, axis 0), blockwise (block 256), and
  dequantize per tensor: the kernels alone (the C ABI called directly on preallocated buffers, as a
  fused op inside a model would run) and the public call (``quantkit.quantize``: host-side alpha
  checks, allocation, reading back the non-finite count: one synchronisation per call);
* ``torch.quantize_per_tensor`` and ``q.dequantize()`` on CUDA;
* the calibration statistics: |x|max per tensor and a 2048-bin histogram of |x|.

quantize and dequantize move 5 bytes per element, |x|max and the histogram 4. Bandwidth is reported
as GB/s, as a fraction of the measured copy bandwidth and, for known cards, of the datasheet peak.
Full mode asserts issue 4's goals: the per-tensor quantize and dequantize kernels reach 85% of the
copy bandwidth and beat torch's kernels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantkit import reference

pytestmark = pytest.mark.gpu

#: Datasheet memory bandwidth, GB/s, of cards this was aimed at.
PEAK_GBS = {"T4": 320.0, "H200": 4800.0}
GOAL_OF_COPY = 0.85


def _peak(name: str):
    for key, gbs in PEAK_GBS.items():
        if key in name:
            return gbs
    return None


def _timer(bench, inner: int):
    """seconds per call of fn, the median over bench's repeats of ``inner`` back-to-back calls."""
    def time(fn):
        def many():
            for _ in range(inner):
                fn()

        return bench.time(many, sync=torch.cuda.synchronize) / inner

    return time


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_cuda_throughput(bench):
    from quantkit import dequantize, quantize
    from quantkit.backends import cuda_library, cuda_quantize, cuda_stats

    lib = cuda_library.library()
    device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device)
    n = bench.size(256 << 20, 16 << 20)
    time = _timer(bench, bench.size(10, 2))
    stream = torch.cuda.current_stream(device).cuda_stream
    dev = device.index

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, device=device, generator=g)
    alpha = float(x.abs().max()) * 0.8
    scale = alpha / 127
    inv = torch.from_numpy(reference.inv_scale_from_alpha(np.float32(alpha)).reshape(1)).to(device)
    scl = torch.from_numpy(reference.scale_from_alpha(np.float32(alpha)).reshape(1)).to(device)
    codes = torch.empty(n, dtype=torch.int8, device=device)
    values = torch.empty(n, dtype=torch.float32, device=device)
    counter = torch.empty(1, dtype=torch.int64, device=device)
    dst = torch.empty_like(x)

    rows = {}  # name -> (seconds, bytes moved)
    rows["device-to-device copy (torch copy_)"] = (time(lambda: dst.copy_(x)), 8 * n)

    def kernel(fn, *args):
        def call():
            code = fn(*args)
            if code:
                raise RuntimeError(cuda_library.error_string(code))

        return call

    rows["quantize per tensor (kernel)"] = (time(kernel(
        lib.qk_quantize_int8_f32, x.data_ptr(), codes.data_ptr(), n, inv.data_ptr(),
        counter.data_ptr(), dev, stream)), 5 * n)
    rows["quantize per tensor (quantkit.quantize)"] = (time(lambda: quantize(x, alpha)), 5 * n)
    rows["torch.quantize_per_tensor"] = (
        time(lambda: torch.quantize_per_tensor(x, scale, 0, torch.qint8)), 5 * n)

    rows["dequantize per tensor (kernel)"] = (time(kernel(
        lib.qk_dequantize_int8_f32, codes.data_ptr(), values.data_ptr(), n, scl.data_ptr(), dev,
        stream)), 5 * n)
    q = quantize(x, alpha)
    rows["dequantize per tensor (quantkit.dequantize)"] = (time(lambda: dequantize(q)), 5 * n)
    tq = torch.quantize_per_tensor(x, scale, 0, torch.qint8)
    rows["torch q.dequantize()"] = (time(lambda: tq.dequantize()), 5 * n)

    # Per channel: (rows, n / rows) with one alpha per row; blockwise with block 256.
    n_rows = 16384
    w = x.reshape(n_rows, -1)
    inv_rows = torch.full((n_rows,), float(inv), device=device)
    rows["quantize per channel, axis 0 (kernel)"] = (time(kernel(
        lib.qk_quantize_int8_per_channel_f32, x.data_ptr(), codes.data_ptr(), 1, n_rows,
        w.shape[1], inv_rows.data_ptr(), counter.data_ptr(), dev, stream)), 5 * n)
    inv_cols = torch.full((w.shape[1],), float(inv), device=device)
    rows["quantize per channel, axis 1 (kernel)"] = (time(kernel(
        lib.qk_quantize_int8_per_channel_f32, x.data_ptr(), codes.data_ptr(), n_rows, w.shape[1],
        1, inv_cols.data_ptr(), counter.data_ptr(), dev, stream)), 5 * n)
    inv_blocks = torch.full((n // 256,), float(inv), device=device)
    rows["quantize blockwise 256 (kernel)"] = (time(kernel(
        lib.qk_quantize_int8_blockwise_f32, x.data_ptr(), codes.data_ptr(), n, 256,
        inv_blocks.data_ptr(), counter.data_ptr(), dev, stream)), 5 * n)
    rows["dequantize per channel, axis 0 (kernel)"] = (time(kernel(
        lib.qk_dequantize_int8_per_channel_f32, codes.data_ptr(), values.data_ptr(), 1, n_rows,
        w.shape[1], inv_rows.data_ptr(), dev, stream)), 5 * n)

    # Calibration statistics.
    rows["|x|max per tensor (quantkit absmax)"] = (time(lambda: cuda_quantize.absmax(x)), 4 * n)
    rows["|x|max per tensor (torch x.abs().max())"] = (time(lambda: x.abs().max()), 4 * n)
    rows["|x|max per block 256 (quantkit absmax)"] = (
        time(lambda: cuda_quantize.absmax(x, block_size=256)), 4 * n)
    rows["|x| histogram, 2048 bins (quantkit abs_histogram)"] = (
        time(lambda: cuda_stats.abs_histogram(x, 2048, alpha)), 4 * n)
    rows["torch.histc(x.abs(), 2048)"] = (
        time(lambda: torch.histc(x.abs(), 2048, 0, alpha)), 4 * n)

    copy_gbs = 8 * n / rows["device-to-device copy (torch copy_)"][0] / 1e9
    peak = _peak(name)
    table, result = [], {"device": name, "elements": n, "copy_GBps": copy_gbs, "peak_GBps": peak,
                         "rows": {}}
    for label, (seconds, moved) in rows.items():
        gbs = moved / seconds / 1e9
        result["rows"][label] = {"ms": seconds * 1e3, "GBps": gbs, "of_copy": gbs / copy_gbs,
                                 "of_peak": gbs / peak if peak else None}
        table.append([label, seconds * 1e3, gbs, gbs / copy_gbs,
                      f"{gbs / peak:.2f}" if peak else "-"])

    markdown = (f"## CUDA kernels ({name}, {n / 2**20:.0f}M float32 elements)\n\n"
                f"Copy bandwidth measured in this run: {copy_gbs:.0f} GB/s"
                + (f" ({copy_gbs / peak:.0%} of the {peak:.0f} GB/s datasheet peak)"
                   if peak else "")
                + ". quantize/dequantize move 5 B per element, statistics 4 B, a copy 8 B.\n\n"
                + bench.table(["op", "ms", "GB/s", "of copy", "of peak"], table))
    bench.record("cuda", result, markdown)
    print("\n" + markdown)

    if not bench.quick:
        r = result["rows"]
        assert r["quantize per tensor (kernel)"]["of_copy"] >= GOAL_OF_COPY, markdown
        assert r["dequantize per tensor (kernel)"]["of_copy"] >= GOAL_OF_COPY, markdown
        assert (r["quantize per tensor (kernel)"]["GBps"]
                > r["torch.quantize_per_tensor"]["GBps"]), markdown
        assert (r["dequantize per tensor (kernel)"]["GBps"]
                > r["torch q.dequantize()"]["GBps"]), markdown
