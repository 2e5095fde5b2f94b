"""The synthetic demo of ``quantkit demo`` without the demo extra: a small transformer-like
float32 checkpoint, quantized with each method and compared with float32 on its outputs."""

from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..convert import Granularity, SafetensorsSource
from .commands import run_quantize
from .table import Table, human_bytes


def synthetic_checkpoint(path: Path, seed: int = 0) -> dict:
    """Write a small transformer-like float32 checkpoint (heavy-tailed weights with outliers)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    d, hidden, layers, vocab = 256, 1024, 2, 1000
    tensors = {"embeddings.weight": rng.standard_normal((vocab, d)).astype(np.float32) * 0.05}
    for k in range(layers):
        p = f"layers.{k}."
        for name, shape in (("attn.qkv.weight", (3 * d, d)), ("attn.out.weight", (d, d)),
                            ("mlp.up.weight", (hidden, d)), ("mlp.down.weight", (d, hidden))):
            w = rng.standard_t(4, shape) * (0.5 / math.sqrt(shape[1]))
            w *= rng.uniform(0.3, 1.5, (shape[0], 1))          # channels of different scales
            outliers = rng.random(shape) < 2e-4
            w[outliers] *= 12
            tensors[p + name] = w.astype(np.float32)
            tensors[p + name.replace("weight", "bias")] = (
                rng.standard_normal(shape[0]) * 0.01).astype(np.float32)
        tensors[p + "norm.weight"] = np.ones(d, np.float32)
    save_file(tensors, str(path), metadata={"description": "quantkit synthetic demo model"})
    return tensors


def _synthetic_forward(weights: dict, x: np.ndarray) -> np.ndarray:
    """A small transformer over the synthetic checkpoint's layers: attention, MLP, norm."""
    layers = sorted({k.split(".")[1] for k in weights if k.startswith("layers.")})
    for k in layers:
        p = f"layers.{k}."

        def linear(h, name):
            return h @ weights[p + name + ".weight"].T + weights[p + name + ".bias"]

        qkv = linear(x, "attn.qkv")
        d = x.shape[1]
        q, kk, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
        att = q @ kk.T / math.sqrt(d)
        att = np.exp(att - att.max(axis=1, keepdims=True))
        att /= att.sum(axis=1, keepdims=True)
        x = x + linear(att @ v, "attn.out")
        h = np.maximum(linear(x, "mlp.up"), 0)
        x = x + linear(h, "mlp.down")
        x = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + 1e-6) * weights[p + "norm.weight"]
    return x


def synthetic_demo(stdout=None) -> int:
    """quantize a synthetic checkpoint with each method, and compare outputs with float32."""
    from ..io import load

    stdout = stdout or sys.stdout
    with tempfile.TemporaryDirectory(prefix="quantkit-demo-") as tmp:
        src = Path(tmp) / "synthetic.safetensors"
        weights = synthetic_checkpoint(src)
        dst = Path(tmp) / "synthetic-int8.safetensors"
        print("$ quantkit quantize synthetic.safetensors -o synthetic-int8.safetensors "
              "--method mse --granularity channel --skip 'embeddings.*'", file=stdout)
        run_quantize(SafetensorsSource(src), dst, method="mse", stdout=stdout,
                     skip=["embeddings.*"])
        rng = np.random.default_rng(1)
        tokens = weights["embeddings.weight"][rng.integers(0, 1000, 64)]
        reference = _synthetic_forward(weights, tokens)
        rows = []
        for label, method, granularity in (("int8 mse, per channel (quantkit)", "mse", "channel"),
                                           ("int8 max, per channel", "max", "channel"),
                                           ("int8 mse, per tensor (quantkit)", "mse", "tensor"),
                                           ("int8 max, per tensor", "max", "tensor")):
            if method == "mse" and granularity == "channel":
                path = dst
            else:
                path = Path(tmp) / f"{method}-{granularity}.safetensors"
                with open(os.devnull, "w") as quiet:
                    run_quantize(SafetensorsSource(src), path, method=method,
                                 granularity=Granularity(granularity), stdout=quiet,
                                 skip=["embeddings.*"])
            loaded = load(path)
            approx = {k: (v.dequantize().numpy() if hasattr(v, "dequantize") else v.numpy())
                      for k, v in loaded.items()}
            out = _synthetic_forward(approx, tokens)
            cos = np.sum(out * reference, 1) / (np.linalg.norm(out, axis=1)
                                                 * np.linalg.norm(reference, axis=1))
            rel = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
            rows.append([label, f"{cos.mean():.5f}", f"{cos.min():.5f}", f"{rel:.2e}",
                         human_bytes(path.stat().st_size)])
        rows.insert(0, ["float32", "1.00000", "1.00000", "0", human_bytes(src.stat().st_size)])
        print("\nOutputs of a 2-layer synthetic transformer on 64 inputs, compared with float32:",
              file=stdout)
        table = Table(["model", "mean cos", "worst cos", "rel. error", "file"],
                      [max(len(r[0]) for r in rows), 9, 9, 10, 10],
                      [False, True, True, True, True], stdout)
        table.header()
        for r in rows:
            table.emit(table.line(r))
    return 0
