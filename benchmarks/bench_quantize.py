"""Core throughput: int8 quantize / dequantize against torch's quantized tensors and a copy.

One run measures, on the same data (64M float32 elements; 4096x4096 for per channel):

* the machine's copy bandwidth: torch ``copy_`` on 2 threads and NumPy ``copyto`` on 1 thread
  (a copy moves 8 bytes per float32 element: one read, one write);
* ``quantkit.quantize`` (the public call, output allocated), the same with ``out=``, the same with
  quantkit's buffer cache off (every output on fresh pages the OS must zero: the cost of a first
  call), and baselines ``torch.quantize_per_tensor`` and NumPy ``clip(rint(x * inv))``;
* ``quantkit.dequantize`` (allocated, fresh pages and ``out=``) against torch's ``q.dequantize()``;
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

from quantkit import _buffers, dequantize, quantize

GOALS = {"quantize": 2.5, "dequantize": 3.0, "quantize per channel": 5.0}
BLOCK = 256


def _copy_fns(x: np.ndarray) -> dict:
    """The copies that measure the machine's bandwidth (2-thread torch, 1-thread NumPy)."""
    src = torch.from_numpy(x)
    dst = torch.empty_like(src)
    dst_np = np.empty_like(x)

    def torch_copy():
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            dst.copy_(src)
        finally:
            torch.set_num_threads(threads)

    return {"copy, 2 threads (torch copy_)": torch_copy,
            "copy, 1 thread (numpy copyto)": lambda: np.copyto(dst_np, x)}


def _fresh_pages(fn):
    """fn with quantkit's output-buffer cache off: each output lands on newly mapped pages."""
    def run():
        saved = _buffers._CACHE.limit
        _buffers._CACHE.limit = 0
        try:
            fn()
        finally:
            _buffers._CACHE.limit = saved
    return run


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_quantize_throughput(bench):
    n = bench.size(64 << 20, 1 << 20)
    side = bench.size(4096, 512)
    repeats = bench.size(11, 1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n, dtype=np.float32)
    alpha = float(np.abs(x).max()) * 0.8        # some clipping, as a calibrated alpha has
    scale = alpha / 127
    xt = torch.from_numpy(x)
    inv = np.float32(127 / alpha)
    codes = np.empty(n, np.int8)
    q = quantize(x, alpha)
    values = np.empty(n, np.float32)
    tq = torch.quantize_per_tensor(xt, scale, 0, torch.qint8)

    # Per channel: a (side, side) weight with one alpha per row.
    w = rng.standard_normal((side, side), dtype=np.float32) * rng.uniform(
        0.01, 1.0, (side, 1)).astype(np.float32)
    w_alpha = np.abs(w).max(axis=1)
    wt = torch.from_numpy(w)
    w_scales = torch.from_numpy((w_alpha / 127).astype(np.float64))
    w_zeros = torch.zeros(side, dtype=torch.int64)
    m = w.size

    # Blockwise over the same elements as per tensor.
    padded = np.zeros(-(-n // BLOCK) * BLOCK, np.float32)
    padded[:n] = np.abs(x)
    b_alpha = padded.reshape(-1, BLOCK).max(axis=1)
    del padded

    # Each group is timed interleaved (round-robin), so noise hits what is compared alike.
    fns = {
        **_copy_fns(x),
        "quantize (quantkit, allocating)": lambda: quantize(x, alpha),
        "quantize (quantkit, out=)": lambda: quantize(x, alpha, out=codes),
        "quantize (quantkit, fresh pages)": _fresh_pages(lambda: quantize(x, alpha)),
        "torch.quantize_per_tensor": lambda: torch.quantize_per_tensor(xt, scale, 0, torch.qint8),
        "dequantize (quantkit, allocating)": lambda: dequantize(q),
        "dequantize (quantkit, out=)": lambda: dequantize(q, out=values),
        "dequantize (quantkit, fresh pages)": _fresh_pages(lambda: dequantize(q)),
        "torch q.dequantize()": lambda: tq.dequantize(),
        "quantize per channel (quantkit)": lambda: quantize(w, w_alpha, axis=0),
        "torch.quantize_per_channel":
            lambda: torch.quantize_per_channel(wt, w_scales, w_zeros, 0, torch.qint8),
        f"quantize blockwise {BLOCK} (quantkit)": lambda: quantize(x, b_alpha, block_size=BLOCK),
    }
    seconds = bench.time_many(fns, repeats=repeats)
    seconds["numpy clip(rint(x*inv))"] = bench.time(
        lambda: np.clip(np.rint(x * inv), -127, 127).astype(np.int8), repeats=min(repeats, 3))
    order = ["copy, 2 threads (torch copy_)", "copy, 1 thread (numpy copyto)",
             "quantize (quantkit, allocating)", "quantize (quantkit, out=)",
             "quantize (quantkit, fresh pages)",
             "torch.quantize_per_tensor", "numpy clip(rint(x*inv))",
             "dequantize (quantkit, allocating)", "dequantize (quantkit, out=)",
             "dequantize (quantkit, fresh pages)",
             "torch q.dequantize()", "quantize per channel (quantkit)",
             "torch.quantize_per_channel", f"quantize blockwise {BLOCK} (quantkit)"]
    per_byte = {"copy": 8}
    rows = {}   # name -> (seconds, bytes moved, elements)
    for name in order:
        count = m if "per channel" in name or "per_channel" in name else n
        rows[name] = (seconds[name], per_byte.get(name.split(",")[0], 5) * count, count)

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
        "quantize (fresh pages)": speedup("torch.quantize_per_tensor",
                                          "quantize (quantkit, fresh pages)"),
        "dequantize": speedup("torch q.dequantize()", "dequantize (quantkit, allocating)"),
        "dequantize (out=)": speedup("torch q.dequantize()", "dequantize (quantkit, out=)"),
        "dequantize (fresh pages)": speedup("torch q.dequantize()",
                                            "dequantize (quantkit, fresh pages)"),
        "quantize per channel": speedup("torch.quantize_per_channel",
                                        "quantize per channel (quantkit)"),
    }
    baseline_of = {"quantize (quantkit, allocating)": "quantize",
                   "quantize (quantkit, out=)": "quantize (out=)",
                   "quantize (quantkit, fresh pages)": "quantize (fresh pages)",
                   "dequantize (quantkit, fresh pages)": "dequantize (fresh pages)",
                   "dequantize (quantkit, allocating)": "dequantize",
                   "dequantize (quantkit, out=)": "dequantize (out=)",
                   "quantize per channel (quantkit)": "quantize per channel"}
    result_rows, table = {}, []
    for name, (secs, nbytes, count) in rows.items():
        gbs = nbytes / secs / 1e9
        entry = {"ms": secs * 1e3, "gb_per_s": gbs, "gelem_per_s": count / secs / 1e9,
                 "fraction_of_copy": gbs / copy_gbs,
                 "speedup_vs_torch": ratios.get(baseline_of.get(name))}
        result_rows[name] = entry
        gain = entry["speedup_vs_torch"]
        table.append([name, entry["ms"], entry["gelem_per_s"], gbs, entry["fraction_of_copy"],
                      f"{gain:.2f}x" if gain else "-"])
    fraction = result_rows["quantize (quantkit, allocating)"]["fraction_of_copy"]
    fraction_out = result_rows["quantize (quantkit, out=)"]["fraction_of_copy"]
    fraction_fresh = result_rows["quantize (quantkit, fresh pages)"]["fraction_of_copy"]
    result = {"elements": n, "per_channel_shape": [side, side], "block_size": BLOCK,
              "repeats": repeats,
              "torch_threads": torch.get_num_threads(), "copy_gb_per_s": copy_gbs,
              "rows": result_rows, "speedup_vs_torch": ratios, "goals": GOALS,
              "quantize_fraction_of_copy": fraction, "quantize_out_fraction_of_copy": fraction_out}
    markdown = "\n".join([
        "## Quantize / dequantize throughput",
        "",
        f"{n / 2**20:.0f}M float32 elements (per channel: {side}x{side}); medians of {repeats} "
        "calls interleaved round-robin after a warm-up. GB/s counts 5 bytes per element for "
        "quantize and dequantize, 8 for a copy; the fraction is of the 2-thread copy bandwidth "
        f"measured in the same run ({copy_gbs:.1f} GB/s).",
        "",
        bench.table(["op", "ms", "G elem/s", "GB/s", "of copy", "vs torch"], table),
        "",
        f"quantize reaches {fraction:.2f} of copy bandwidth allocating its output (reused pages "
        f"from quantkit's buffer cache), {fraction_out:.2f} with `out=`, {fraction_fresh:.2f} on "
        f"fresh pages (goal 0.9). Goals vs torch: quantize >= 2.5x ({ratios['quantize']:.2f}x; "
        f"{ratios['quantize (fresh pages)']:.2f}x on fresh pages), dequantize >= 3x "
        f"({ratios['dequantize']:.2f}x; {ratios['dequantize (fresh pages)']:.2f}x on fresh "
        f"pages), per channel >= 5x ({ratios['quantize per channel']:.2f}x).",
    ])
    bench.record("quantize_throughput", result, markdown)

    if not bench.quick:
        failed = [f"{k}: {ratios[k]:.2f}x < {goal}x" for k, goal in GOALS.items()
                  if ratios[k] < goal]
        assert not failed, "below the goals against torch: " + "; ".join(failed)
