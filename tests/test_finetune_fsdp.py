"""The int8-base LoRA fine-tune under FSDP2: a tiny Llama quantized by quantize_model, LoRA
adapters, AdamW8bit, each decoder layer and the root sharded with ``fully_shard`` over 2 gloo
processes on 127.0.0.1, gives exactly the losses of one process. Marked slow: `.ci/run` runs it."""

import json
from pathlib import Path

import pytest

from distributed_cases import run_ranks

torch = pytest.importorskip("torch")
pytest.importorskip("transformers", reason="needs the llm extra (transformers)")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORKER = Path(__file__).with_name("finetune_fsdp_worker.py")


@pytest.mark.slow
def test_int8_lora_fine_tune_on_two_fsdp2_ranks_equals_one_process(tmp_path):
    single, _ = run_ranks(WORKER, "single", tmp_path)
    sharded, err = run_ranks(WORKER, "sharded", tmp_path, world=2)
    assert sharded == single  # exactly, every step
    assert single[-1] < single[0]  # the adapters learn
    info = json.loads([line for line in err.splitlines() if line.startswith("{")][-1])
    assert info["kinds"] == ["DTensor"]  # the adapters are sharded parameters
    assert info["eight_bit"] > 0  # and some take 8-bit states on their shards
