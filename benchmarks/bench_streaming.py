"""Streaming: the peak memory of ``quantkit quantize`` against the checkpoint's size.

Generates a sharded float32 checkpoint (3 GiB in full mode, 40 MiB in quick mode; one
tensor four times larger than the others) in a temporary folder, then runs, each in its own
process, with its peak RSS (``ru_maxrss`` read by a small launcher process):

* ``python -m quantkit quantize`` on a one-tensor checkpoint: the fixed cost (Python, torch, numba,
  the compiled kernels);
* loading every shard with ``safetensors.torch.load_file``: what any tool that holds the whole
  checkpoint in memory needs at least (its fixed cost: importing torch and safetensors);
* ``python -m quantkit quantize`` on the whole checkpoint (mse calibration, per channel).

Reports each peak RSS minus its fixed cost as a multiple of the largest tensor and as a fraction of
the checkpoint. Full mode asserts that quantize's peak stays below what loading the checkpoint
needs, and that its own memory (above the fixed cost) is under 4x the largest tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]


def _write_checkpoint(folder: Path, shapes: dict, shard_bytes: int, seed: int = 0) -> dict:
    """A sharded float32 checkpoint (Hugging Face layout: shards plus model.safetensors.index.json),
    written shard by shard so that at most one shard is in memory. Returns the weight map."""
    rng = np.random.default_rng(seed)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        nbytes = 4 * int(np.prod(shape))
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = shape
        size += nbytes
    shards.append(current)
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard.items():
            x = rng.standard_normal(shape, dtype=np.float32)
            if len(shape) == 2:   # heavy-ish tails and channels of different scales, like weights
                x *= rng.uniform(0.2, 1.0, (shape[0], 1)).astype(np.float32)
                x[rng.random(shape) < 1e-5] *= 20
            tensors[name] = x
            weight_map[name] = file
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return weight_map


# Runs argv[1:] and reports the peak RSS of that child alone. A small launcher is needed because
# Linux carries the RSS high-water mark of the process image an exec replaces into ru_maxrss: a
# child forked straight from this (large) pytest process would report at least pytest's own size.
_LAUNCHER = """
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call(sys.argv[1:])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
sys.stderr.write(f"\\nPEAK_RSS_KB {peak} SECONDS {seconds}\\n")
sys.exit(code)
"""


def _peak_rss(cmd: list) -> tuple:
    """(peak RSS in bytes, seconds, stdout) of a process running ``cmd``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, env=env,
                          cwd=ROOT, text=True)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
    last = proc.stderr.strip().splitlines()[-1].split()
    assert last[0] == "PEAK_RSS_KB", proc.stderr[-2000:]
    return int(last[1]) * 1024, float(last[3]), proc.stdout


def test_streaming_peak_memory(bench, tmp_path_factory):
    from quantkit.io import CheckpointReader

    work = tmp_path_factory.mktemp("streaming")
    try:
        big = bench.size((4096, 16384), (1024, 4096))      # 256 MiB / 16 MiB
        other = bench.size((4096, 4096), (512, 1024))      # 64 MiB / 2 MiB
        count = bench.size(44, 12)
        shapes = {"layers.0.big.weight": big}
        for k in range(count):
            shapes[f"layers.{k}.proj.weight"] = other
            shapes[f"layers.{k}.proj.bias"] = (other[0],)
        model = work / "model"
        model.mkdir()
        _write_checkpoint(model, shapes, shard_bytes=bench.size(600 << 20, 12 << 20))
        checkpoint_bytes = sum(4 * int(np.prod(s)) for s in shapes.values())
        largest = 4 * int(np.prod(big))
        free = shutil.disk_usage(work).free
        assert free > 2 * checkpoint_bytes, "not enough disk for the streaming benchmark"

        tiny = work / "tiny.safetensors"
        save_file({"w": np.ones((64, 64), np.float32)}, str(tiny))
        quantkit = [sys.executable, "-m", "quantkit", "quantize"]
        tiny_out = work / "tiny-int8.safetensors"
        base_rss, _, _ = _peak_rss(quantkit + [str(tiny), "-o", str(tiny_out)])
        # Load every shard and read every value (load_file maps the file lazily; a tool that
        # quantizes the loaded tensors reads them all).
        load_all = ("import sys, glob; from safetensors.torch import load_file; "
                    "d = {}; [d.update(load_file(f)) for f in sorted(glob.glob(sys.argv[1] + "
                    "'/*.safetensors'))]; print(sum(float(t.max()) for t in d.values()))")
        load_fixed, _, _ = _peak_rss([sys.executable, "-c", "import safetensors.torch"])
        load_rss, load_s, _ = _peak_rss([sys.executable, "-c", load_all, str(model)])
        out = work / "model-int8.safetensors"
        rss, seconds, table = _peak_rss(quantkit + [str(model), "-o", str(out)])

        reader = CheckpointReader(out)
        assert len(reader.quantized) == count + 1 and len(reader.keys()) == len(shapes)
        q = reader.get("layers.0.big.weight")
        assert tuple(q.shape) == big and "\r" not in table and "wrote" in table

        own = rss - base_rss
        result = {"checkpoint_bytes": checkpoint_bytes, "largest_tensor_bytes": largest,
                  "tensors": len(shapes), "shards": len(list(model.glob("*.safetensors"))),
                  "output_bytes": out.stat().st_size, "quantize_seconds": seconds,
                  "quantize_mb_per_s": checkpoint_bytes / seconds / 1e6,
                  "fixed_rss_bytes": base_rss, "quantize_peak_rss_bytes": rss,
                  "load_all_peak_rss_bytes": load_rss, "load_all_seconds": load_s,
                  "load_all_fixed_rss_bytes": load_fixed,
                  "load_all_own_rss_over_checkpoint": (load_rss - load_fixed) / checkpoint_bytes,
                  "quantize_own_rss_over_largest": own / largest,
                  "quantize_own_rss_over_checkpoint": own / checkpoint_bytes,
                  "quantize_peak_over_load_all_peak": rss / load_rss}
        mib = 1 << 20
        rows = [["checkpoint (float32, sharded)", f"{checkpoint_bytes / mib:.0f}", "-", "-"],
                ["largest tensor", f"{largest / mib:.0f}", "-", "-"],
                ["fixed cost: quantkit on a 16 KiB checkpoint", f"{base_rss / mib:.0f}", "-", "-"],
                ["fixed cost: import torch, safetensors", f"{load_fixed / mib:.0f}", "-", "-"],
                ["load every shard (safetensors load_file)", f"{load_rss / mib:.0f}",
                 f"{(load_rss - load_fixed) / largest:.2f}", f"{load_s:.1f}"],
                ["quantkit quantize (mse, per channel)", f"{rss / mib:.0f}",
                 f"{own / largest:.2f}", f"{seconds:.1f}"]]
        markdown = "\n".join([
            "## Streaming quantize: peak memory", "",
            f"`quantkit quantize` on a generated {checkpoint_bytes / 2**30:.2f} GiB float32 "
            f"checkpoint in {result['shards']} shards ({len(shapes)} tensors, the largest "
            f"{largest / mib:.0f} MiB); peak RSS of each process (`ru_maxrss`).", "",
            bench.table(["process", "peak RSS MiB", "(peak - fixed) / largest", "s"], rows), "",
            f"quantize's peak is {rss / load_rss:.2f}x that of just loading the checkpoint; above "
            f"the fixed cost it needs {own / largest:.2f}x the largest tensor "
            f"({own / checkpoint_bytes:.1%} of the checkpoint), and ran at "
            f"{result['quantize_mb_per_s']:.0f} MB/s of input.",
        ])
        bench.record("streaming", result, markdown)
        if not bench.quick:
            assert rss < load_rss, "quantize held more memory than loading the whole checkpoint"
            assert own < 4 * largest, f"quantize needed {own / largest:.2f}x the largest tensor"
    finally:
        shutil.rmtree(work, ignore_errors=True)
