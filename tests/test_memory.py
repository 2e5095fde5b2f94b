"""quantkit.memory: the fine-tune memory planner and the ``quantkit memory`` command."""

import json

import numpy as np
import pytest

from quantkit import memory
from quantkit.cli import main

GB = 10 ** 9


def _rows(n):
    return {r["setup"].split(" r=")[0].split(",")[0]: r
            for r in memory.plan(memory.shape_from_params(n))}


def test_seed_figure_7b_float32_full_finetune():
    r = _rows(7e9)["float32 full fine-tune"]
    assert (r["weights"], r["gradients"], r["states"]) == (28 * GB, 28 * GB, 56 * GB)
    assert r["total"] == 112 * GB and r["activations"] == 0


def test_8bit_states_are_2_03_bytes_per_param():
    r = _rows(1e9)["float32 + 8-bit AdamW states"]
    assert r["states"] == int(2 * (1 + 4 / 256) * 1e9) == 2_031_250_000


def test_int8_base_lora_from_config_counts_shapes(tmp_path):
    cfg = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100,
           "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = memory.load_shape(tmp_path)
    # per layer: q 64x64, k/v 64x32 each, o 64x64, gate/up 64x128, down 128x64
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3
    assert shape.linear_params == 2 * per_layer
    assert shape.params == 2 * per_layer + 100 * 64 + 5 * 64
    assert memory.lora_params(shape, 4) == 2 * 4 * (128 + 96 * 2 + 128 + 192 * 3)
    lora = memory.plan(shape, rank=4)[4]
    n_lora = memory.lora_params(shape, 4)
    base = shape.linear_params + 4 * shape.linear_rows + 4 * (shape.params - shape.linear_params)
    assert lora["weights"] == base + 4 * n_lora and lora["gradients"] == 4 * n_lora
    assert lora["states"] == int(2 * memory.STATE_8BIT * n_lora)


def test_activations_scale_with_batch_and_seq():
    shape = memory.shape_from_params(1e8)
    a1 = memory.activation_bytes(shape, 128, 1)
    assert memory.activation_bytes(shape, 128, 4) == 4 * a1
    assert memory.activation_bytes(shape, 256, 1) > 2 * a1     # attention scores grow as s^2


@pytest.mark.parametrize("text, value", [("7e9", 7e9), ("7B", 7e9), ("135M", 135e6),
                                         ("1_000", 1000)])
def test_parse_count(text, value):
    assert memory.parse_count(text) == value


@pytest.mark.parametrize("text, value", [("16GB", 16 * GB), ("16GiB", 16 * 2 ** 30),
                                         ("500MB", 500 * 10 ** 6), ("1024", 1024)])
def test_parse_bytes(text, value):
    assert memory.parse_bytes(text) == value


def test_command_marks_what_fits_a_t4(capsys):
    assert main(["memory", "--params", "7e9", "--gpu", "t4"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert lines["float32 full fine-tune"].rstrip().endswith("no")
    assert "112 GB" in lines["float32 full fine-tune"]
    assert lines["int8 base + LoRA r=16, 8-bit AdamW"].rstrip().endswith("yes")


@pytest.mark.parametrize("argv, message", [
    (["--params", "-3"], "positive"), (["--params", "lots"], "not a number"),
    (["--params", "7e9", "--gpu", "v100"], "unknown GPU"),
    (["--params", "7e9", "--budget", "big"], "not a size"),
    (["--params", "7e9", "--seq", "128"], "go together"),
    (["--params", "7e9", "--rank", "0"], "--rank"),
    (["--params", "7e9", "--rank", "100000000000"], "--rank"),
    (["--params", "1"], "too small"),
    (["--params", "7e9", "--budget", "1e400GB"], "finite"),
    (["--model", "/nonexistent-folder"], "no config.json"),
    ([], "required"),
])
def test_bad_input_is_one_line_exit_2(argv, message, capsys):
    assert main(["memory", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("quantkit: error:")


@pytest.mark.parametrize("config, message", [
    ({"hidden_size": 0, "num_hidden_layers": 2, "num_attention_heads": 2}, ">= 1"),
    ({"hidden_size": 64, "num_hidden_layers": -2, "num_attention_heads": 2}, ">= 1"),
    ({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 0}, ">= 1"),
])
def test_bad_config_is_one_line_exit_2(config, message, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["memory", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_guessed_layouts_never_give_negative_sizes():
    for n in np.unique(np.logspace(6, 13, 3000).astype(np.int64)):
        for row in memory.plan(memory.shape_from_params(n)):
            assert min(row["weights"], row["gradients"], row["states"], row["total"]) >= 0, (n, row)
