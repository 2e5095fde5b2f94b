"""quantkit.finetune: LoRA training on an int8 base, checkpoints and exact resume."""

import json

import pytest
import torch
from safetensors import safe_open

from quantkit import finetune as ft
from quantkit.cli import main

transformers = pytest.importorskip("transformers", reason="needs the llm extra (transformers)")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


IDS = torch.arange(2000) % 37          # a pattern the adapters can learn in a few steps
KW = dict(rank=4, alpha=8, optimizer="adamw", lr=1e-2, seq=16, batch=2, seed=5, weights="max")


def _adapter(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_batches_depend_only_on_seed_and_step():
    a = ft.batch_at(IDS, 7, seed=1, batch=3, seq=10)
    assert a.shape == (3, 11) and torch.equal(a, ft.batch_at(IDS, 7, seed=1, batch=3, seq=10))
    assert not torch.equal(a, ft.batch_at(IDS, 8, seed=1, batch=3, seq=10))


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_resume_is_bit_identical(tmp_path, optimizer):
    if optimizer == "adamw8bit":
        pytest.importorskip("quantkit.optim", reason="quantkit.optim.AdamW8bit not in this tree")
    kw = dict(KW, optimizer=optimizer)
    full = ft.finetune(tiny_llama(), IDS, tmp_path / "full", steps=6, checkpoint_every=3, **kw)
    assert full["losses"][-1] < full["losses"][0]
    ft.finetune(tiny_llama(), IDS, tmp_path / "part", steps=3, checkpoint_every=3, **kw)
    resumed = ft.finetune(tiny_llama(), IDS, tmp_path / "part", steps=6, checkpoint_every=3,
                          resume=True, **kw)
    assert resumed["losses"] == full["losses"]
    a, b = _adapter(tmp_path / "full" / "adapter.safetensors"), \
        _adapter(tmp_path / "part" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    names = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert not [n for n in names if n.endswith(".tmp")]
    assert {"adapter.safetensors", "checkpoint.safetensors", "result.json"} <= set(names)
    assert json.loads((tmp_path / "full" / "result.json").read_text())["steps"] == 6


def test_resume_with_other_settings_is_refused(tmp_path):
    ft.finetune(tiny_llama(), IDS, tmp_path, steps=2, checkpoint_every=2, **KW)
    with pytest.raises(ft.UsageError, match="different rank"):
        ft.finetune(tiny_llama(), IDS, tmp_path, steps=4, resume=True, **dict(KW, rank=2))


@pytest.mark.parametrize("change, match", [
    (dict(weights="mse"), "different weights"),
    (dict(model_seed=1), "different model"),
    (dict(ids=(torch.arange(2000) % 31)), "different data"),
])
def test_resume_with_another_model_text_or_weights_is_refused(tmp_path, change, match):
    ft.finetune(tiny_llama(), IDS, tmp_path, steps=2, checkpoint_every=2, **KW)
    kw = dict(KW)
    kw.update({k: v for k, v in change.items() if k in KW})
    model = tiny_llama(change.get("model_seed", 0))
    with pytest.raises(ft.UsageError, match=match):
        ft.finetune(model, change.get("ids", IDS), tmp_path, steps=4, resume=True, **kw)


def test_checkpoint_every_zero_still_writes_the_final_checkpoint(tmp_path):
    full = ft.finetune(tiny_llama(), IDS, tmp_path / "a", steps=4, checkpoint_every=0, **KW)
    assert (tmp_path / "a" / "checkpoint.safetensors").is_file()
    ft.finetune(tiny_llama(), IDS, tmp_path / "b", steps=2, checkpoint_every=0, **KW)
    resumed = ft.finetune(tiny_llama(), IDS, tmp_path / "b", steps=4, checkpoint_every=0,
                          resume=True, **KW)
    assert resumed["losses"] == full["losses"]


def test_float32_base_trains_too(tmp_path):
    r = ft.finetune(tiny_llama(), IDS, tmp_path, steps=4, base="float32", **KW)
    assert r["losses"][-1] < r["losses"][0]


def _folder(tmp_path):
    m = tiny_llama()
    m.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_rank_above_layer_width_is_a_usage_error(tmp_path):
    with pytest.raises(ft.UsageError, match="rank"):
        ft.finetune(tiny_llama(), IDS, tmp_path, steps=1, **dict(KW, rank=999))


def test_command_bad_rank_and_folder_without_tokenizer_exit_2(tmp_path, capsys):
    folder = _folder(tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    argv = ["finetune", "--model", str(folder), "--text", str(text), "-o", str(tmp_path / "o"),
            "--optimizer", "adamw", "--steps", "1"]
    capsys.readouterr()
    for extra, message in ((["--rank", "0"], "--rank"), ([], "tokenizer")):
        assert main(argv + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and err[-1].startswith("quantkit: error:")


@pytest.mark.parametrize("extra, message", [
    (["--lr", "nan"], "--lr"), (["--lr", "0"], "--lr"), (["--alpha", "inf"], "--alpha"),
    (["--steps", "0"], "--steps"), (["--seq", "-1"], "--seq"), (["--batch", "0"], "--batch"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"), (["--weights", "median"], "--weights"),
])
def test_command_refuses_bad_settings_before_loading_or_writing(tmp_path, capsys, extra, message):
    """No model is loaded (the folder does not exist) and no output folder is made."""
    out = tmp_path / "o"
    assert main(["finetune", "--model", str(tmp_path / "missing"), "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("quantkit: error:")
    assert not out.exists()


def test_command_refuses_folder_without_config_and_empty_text(tmp_path, capsys):
    text = tmp_path / "empty.txt"
    text.write_text("")
    assert main(["finetune", "--model", str(tmp_path), "--text", str(text), "-o",
                 str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_command_refuses_an_output_that_is_a_file_before_loading(tmp_path, capsys):
    out = tmp_path / "afile"
    out.write_text("keep me")
    assert main(["finetune", "--model", str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert "is a file" in capsys.readouterr().err and out.read_text() == "keep me"
