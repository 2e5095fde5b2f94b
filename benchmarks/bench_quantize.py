"""Core throughput: int8 quantize / dequantize against torch's quantized tensors and a copy.

One run measures, on the same data (64M float32 elements; 4096x4096 for per channel):

* the machine's copy bandwidth: torch ``copy_`` on 2 threads and NumPy ``copyto`` on 1 thread
  (a copy moves 8 bytes per float32 element: one read, one write);
* ``quantkit.quantize`` (the public call, output allocated), the same with ``out=``, and baselines
  ``torch.quantize_per_tensor`` and NumPy ``clip(rint(x * inv))``;
* ``quantkit.dequantize`` (allocated and ``out=``) against torch's ``q.dequantize()``;
* per-channel quantize of a 4096x4096 weight against ``torch.quantize_per_channel``;
* blockwise quantize (block 256).

quantize moves 5 bytes per element (4 read, 1 written) and dequantize 5 (1 read, 4 written); their
GB/s are reported as a fraction of the 2-thread copy bandwidth. Full mode asserts issue 2's goals
against torch: quantize >= 2.5x, dequantize >= 3x, per channel >= 5x. (CUDA: bench_cuda.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantkit import dequantize, quantize

GOALS = {"quantize": 2.5, "dequantize": 3.0, "quantize per channel": 5.0}
BLOCK = 256


def _copy_rows(bench, x: np.ndarray):
    n = x.size
    src = torch.from_numpy(x)
    dst = torch.empty_like(src)
    dst_np = np.empty_like(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        t_torch = bench.time(lambda: dst.copy_(src))
    finally:
        torch.set_num_threads(threads)
    t_numpy = bench.time(lambda: np.copyto(dst_np, x))
    return {"copy, 2 threads (torch copy_)": (t_torch, 8 * n, n),
            "copy, 1 thread (numpy copyto)": (t_numpy, 8 * n, n)}


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_quantize_throughput(bench):
    n = bench.size(64 << 20, 1 << 20)
    side = bench.size(4096, 512)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n, dtype=np.float32)
    alpha = float(np.abs(x).max()) * 0.8        # some clipping, as a calibrated alpha has
    scale = alpha / 127
    xt = torch.from_numpy(x)

    rows = _copy_rows(bench, x)  # name -> (seconds, bytes moved, elements)

    # Per tensor quantize.
    codes = np.empty(n, np.int8)
    rows["quantize (quantkit, allocating)"] = (bench.time(lambda: quantize(x, alpha)), 5 * n, n)
    rows["quantize (quantkit, out=)"] = (bench.time(lambda: quantize(x, alpha, out=codes)),
                                         5 * n, n)
    rows["torch.quantize_per_tensor"] = (
        bench.time(lambda: torch.quantize_per_tensor(xt, scale, 0, torch.qint8)), 5 * n, n)
    inv = np.float32(127 / alpha)
    rows["numpy clip(rint(x*inv))"] = (
        bench.time(lambda: np.clip(np.rint(x * inv), -127, 127).astype(np.int8),
                   repeats=min(bench.repeats, 3)), 5 * n, n)

    # Dequantize.
    q = quantize(x, alpha)
    values = np.empty(n, np.float32)
    tq = torch.quantize_per_tensor(xt, scale, 0, torch.qint8)
    rows["dequantize (quantkit, allocating)"] = (bench.time(lambda: dequantize(q)), 5 * n, n)
    rows["dequantize (quantkit, out=)"] = (bench.time(lambda: dequantize(q, out=values)), 5 * n, n)
    rows["torch q.dequantize()"] = (bench.time(lambda: tq.dequantize()), 5 * n, n)

    # Per channel, a (side, side) weight with one alpha per row.
    w = rng.standard_normal((side, side), dtype=np.float32) * rng.uniform(
        0.01, 1.0, (side, 1)).astype(np.float32)
    w_alpha = np.abs(w).max(axis=1)
    wt = torch.from_numpy(w)
    w_scales = torch.from_numpy((w_alpha / 127).astype(np.float64))
    w_zeros = torch.zeros(side, dtype=torch.int64)
    m = w.size
    rows["quantize per channel (quantkit)"] = (
        bench.time(lambda: quantize(w, w_alpha, axis=0)), 5 * m, m)
    rows["torch.quantize_per_channel"] = (
        bench.time(lambda: torch.quantize_per_channel(wt, w_scales, w_zeros, 0, torch.qint8)),
        5 * m, m)

    # Blockwise over the 64M elements.
    padded = np.zeros(-(-n // BLOCK) * BLOCK, np.float32)
    padded[:n] = np.abs(x)
    b_alpha = padded.reshape(-1, BLOCK).max(axis=1)
    del padded
    rows[f"quantize blockwise {BLOCK} (quantkit)"] = (
        bench.time(lambda: quantize(x, b_alpha, block_size=BLOCK)), 5 * n, n)

    # What was timed computes the same thing: the out= codes equal the allocated ones, and torch's
    # codes (x / scale, range [-128, 127]) differ by at most one step, at rounding ties only.
    ours = quantize(x, alpha).data
    assert np.array_equal(codes, ours)
    diff = np.abs(ours.astype(np.int16) - tq.int_repr().numpy().astype(np.int16))
    assert diff.max() <= 1 and np.count_nonzero(diff) <= n * 1e-3
    assert np.allclose(values, dequantize(q), rtol=0, atol=0)

    t_copy, copy_bytes, _ = rows["copy, 2 threads (torch copy_)"]
    copy_gbs = copy_bytes / t_copy / 1e9

    def speedup(baseline, ours):
        return rows[baseline][0] / rows[ours][0]

    ratios = {
        "quantize": speedup("torch.quantize_per_tensor", "quantize (quantkit, allocating)"),
        "quantize (out=)": speedup("torch.quantize_per_tensor", "quantize (quantkit, out=)"),
        "dequantize": speedup("torch q.dequantize()", "dequantize (quantkit, allocating)"),
        "dequantize (out=)": speedup("torch q.dequantize()", "dequantize (quantkit, out=)"),
        "quantize per channel": speedup("torch.quantize_per_channel",
                                        "quantize per channel (quantkit)"),
    }
    baseline_of = {"quantize (quantkit, allocating)": "quantize",
                   "quantize (quantkit, out=)": "quantize (out=)",
                   "dequantize (quantkit, allocating)": "dequantize",
                   "dequantize (quantkit, out=)": "dequantize (out=)",
                   "quantize per channel (quantkit)": "quantize per channel"}
    result_rows, table = {}, []
    for name, (seconds, nbytes, count) in rows.items():
        gbs = nbytes / seconds / 1e9
        entry = {"ms": seconds * 1e3, "gb_per_s": gbs, "gelem_per_s": count / seconds / 1e9,
                 "fraction_of_copy": gbs / copy_gbs,
                 "speedup_vs_torch": ratios.get(baseline_of.get(name))}
        result_rows[name] = entry
        speedup = entry["speedup_vs_torch"]
        table.append([name, entry["ms"], entry["gelem_per_s"], gbs, entry["fraction_of_copy"],
                      f"{speedup:.2f}x" if speedup else "-"])
    fraction = result_rows["quantize (quantkit, allocating)"]["fraction_of_copy"]
    fraction_out = result_rows["quantize (quantkit, out=)"]["fraction_of_copy"]
    result = {"elements": n, "per_channel_shape": [side, side], "block_size": BLOCK,
              "torch_threads": torch.get_num_threads(), "copy_gb_per_s": copy_gbs,
              "rows": result_rows, "speedup_vs_torch": ratios, "goals": GOALS,
              "quantize_fraction_of_copy": fraction, "quantize_out_fraction_of_copy": fraction_out}
    markdown = "\n".join([
        "## Quantize / dequantize throughput",
        "",
        f"{n / 2**20:.0f}M float32 elements (per channel: {side}x{side}); GB/s counts 5 bytes per "
        "element for quantize and dequantize, 8 for a copy; the fraction is of the 2-thread copy "
        f"bandwidth measured in the same run ({copy_gbs:.1f} GB/s).",
        "",
        bench.table(["op", "ms", "G elem/s", "GB/s", "of copy", "vs torch"], table),
        "",
        f"quantize reaches {fraction:.2f} of copy bandwidth allocating its output, "
        f"{fraction_out:.2f} with `out=` (goal 0.9). Goals vs torch: quantize >= 2.5x "
        f"({ratios['quantize']:.2f}x), dequantize >= 3x ({ratios['dequantize']:.2f}x), "
        f"per channel >= 5x ({ratios['quantize per channel']:.2f}x).",
    ])
    bench.record("quantize_throughput", result, markdown)

    if not bench.quick:
        failed = [f"{k}: {ratios[k]:.2f}x < {goal}x" for k, goal in GOALS.items()
                  if ratios[k] < goal]
        assert not failed, "below the goals against torch: " + "; ".join(failed)
