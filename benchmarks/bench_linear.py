"""QuantLinear against float32 nn.Linear and torch's dynamic int8 Linear: milliseconds and error.

One run measures, side by side, a single Linear(4096, 4096) (256 with ``--quick``) at batch 1, 16
and 256 with Normal inputs:

* float32 ``nn.Linear``;
* ``torch.ao.quantization.quantize_dynamic`` (int8 weights per tensor, activations per tensor);
* ``QuantLinear`` weight-only (weights per channel, MSE-calibrated; activations float32);
* ``QuantLinear`` W8A8 dynamic (plus per-token int8 activations, ``torch._int_mm``).

Timings rotate over several copies of each layer (4 of them: 256 MiB of float32 weights), so no
variant's weight stays in the 32 MiB L3 between calls (PERF-NOTES: otherwise int8 looks 3-4x better
than it is). Error is ``||y - y_float|| / ||y_float||``.

With the demo extra installed, the same variants also run on real all-MiniLM-L6-v2 activations:
the inputs of two of its layers (``attention.self.query``, 384 -> 384, and the post-GELU
``output.dense``, 1536 -> 384) captured on the demo's 72 sentences, with that layer's own weights.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from conftest import markdown_table
from quantkit.nn import QuantLinear

COPIES = 4


def _torch_dynamic(linear):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = torch.ao.quantization.quantize_dynamic(nn.Sequential(copy.deepcopy(linear)),
                                                         {nn.Linear}, dtype=torch.qint8)
    return wrapped[0]


def _variants(linear) -> dict:
    """{label: layer} for one float Linear (quantkit's weights calibrated once, "mse")."""
    weight_only = QuantLinear.from_float(linear)
    w8a8 = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None,
                       activations="dynamic")
    w8a8.load_state_dict(weight_only.state_dict())
    return {"float32 nn.Linear": linear, "torch dynamic int8": _torch_dynamic(linear),
            "quantkit weight-only": weight_only, "quantkit W8A8 dynamic": w8a8}


def _measure(bench, variants: dict, x: torch.Tensor, copies: int) -> dict:
    """{label: (seconds, relative error)}; each label's layer is cloned ``copies`` times and the
    variants' calls are interleaved (``bench.time_many``), so machine noise hits them alike."""
    calls = {}
    for label, layer in variants.items():
        layers = [layer] + [copy.deepcopy(layer) for _ in range(copies - 1)]
        turn = [0]

        def call(layers=layers, turn=turn):
            turn[0] = (turn[0] + 1) % len(layers)
            return layers[turn[0]](x)

        calls[label] = call
    with torch.inference_mode():
        reference = variants["float32 nn.Linear"](x)
        seconds = bench.time_many(calls, warmup=copies)
        results = {}
        for label, layer in variants.items():
            error = float((layer(x) - reference).norm() / reference.norm())
            results[label] = (seconds[label], error)
    return results


def _rows(source: str, batch, results: dict) -> list:
    base = results["float32 nn.Linear"][0]
    return [[source, batch, label, 1e3 * s, base / s, err] for label, (s, err) in results.items()]


def _minilm_inputs():
    """{layer name: (float Linear, its captured input rows)} for two MiniLM layers, or None."""
    from quantkit import demo

    if demo.missing_extra():
        return None
    model = demo.load_minilm()
    modules = dict(model.named_modules())
    wanted = ("encoder.layer.3.attention.self.query", "encoder.layer.3.output.dense")
    names = [n for n in modules if n.endswith(wanted)]
    assert len(names) == 2, f"MiniLM layers not found: {wanted}"
    captured = {n: [] for n in names}

    def hook_for(name):
        def hook(module, args):
            captured[name].append(args[0].detach().reshape(-1, module.in_features).clone())
        return hook

    hooks = [modules[n].register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        demo.embed(model, demo.SENTENCES)
    finally:
        for h in hooks:
            h.remove()
    return {n: (modules[n], torch.cat(captured[n])) for n in names}


def test_linear(bench):
    torch.manual_seed(0)
    size = bench.size(4096, 256)
    copies = bench.size(COPIES, 2)
    linear = nn.Linear(size, size)
    variants = _variants(linear)
    rows = []
    for batch in (1, 16, 256):
        x = torch.randn(batch, size)
        rows += _rows(f"Normal, {size}x{size}", batch, _measure(bench, variants, x, copies))

    real = _minilm_inputs()
    if real is not None:
        for name, (layer, x) in real.items():
            short = name.split("encoder.")[-1]
            rows += _rows(f"MiniLM {short} ({layer.in_features}->{layer.out_features})",
                          x.shape[0], _measure(bench, _variants(layer), x, copies))

    header = ["input", "batch", "layer", "ms", "speed vs float32", "rel. error"]
    note = ("" if real is not None else "\n\n(MiniLM rows skipped: install the demo extra.)")
    bench.record("linear", {"rows": [dict(zip(header, r)) for r in rows]},
                 "## QuantLinear vs nn.Linear and torch dynamic int8\n\n"
                 f"Linear layers rotated over {copies} copies; relative error "
                 "||y - y_float32|| / ||y_float32||.\n\n" + markdown_table(header, rows) + note)

    by = {(r[0], r[1], r[2]): r for r in rows}
    for batch in (1, 16, 256):
        key = (f"Normal, {size}x{size}", batch)
        # accuracy: per-channel MSE weights and per-token activations beat torch's per-tensor int8
        assert by[(*key, "quantkit W8A8 dynamic")][5] < by[(*key, "torch dynamic int8")][5]
        assert by[(*key, "quantkit weight-only")][5] < by[(*key, "quantkit W8A8 dynamic")][5]
    # Speed is reported, not asserted: on a shared 2-core machine one stall can flip a ratio.
    # (The whole-model speed goal is asserted by bench_minilm.py in full mode.)


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-s"])
