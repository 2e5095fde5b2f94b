"""One rank of the FSDP2 fine-tune test (tests/test_finetune_fsdp.py): a tiny Llama with an int8
base (quantize_model), LoRA adapters (quantkit.lora.add_lora) and AdamW8bit, every decoder layer
and the root sharded with ``fully_shard`` on the gloo backend, every rank on the same batches;
prints the losses as JSON (``single``: one process, no sharding)."""

import json
import os
import sys

import torch
import torch.distributed as dist
from optim_fsdp_worker import train


def build():
    import transformers

    import quantkit
    from quantkit.lora import add_lora

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    qmodel = quantkit.quantize_model(model, weights="max", skip=["lm_head"])
    # rank 6: A (6, in) and B (out, 6) split 3 + 3 rows; B (out, 6) of 64/128 rows splits evenly,
    # A of 6 rows too; 8-bit states from 200 values on (blocks within each shard's rows)
    return add_lora(qmodel, r=6, alpha=12)


def batches(steps):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 96, (2, 24), generator=g) for _ in range(steps)]


def causal_lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def main():
    from torch.distributed.fsdp import fully_shard

    from quantkit.optim import AdamW8bit

    torch.set_num_threads(1)
    data = batches(5)
    model = build()
    if sys.argv[1] == "sharded":
        dist.init_process_group("gloo")
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW8bit(trainable, lr=1e-2, min_8bit_size=200)
    losses = train(model, opt, data, causal_lm_loss)
    if sys.argv[1] == "sharded":
        kinds = sorted({type(p).__name__ for p in trainable})
        eight_bit = sum("m_codes" in opt.state[p] for p in trainable)
        print(json.dumps({"kinds": kinds, "eight_bit": eight_bit}), file=sys.stderr)
        dist.destroy_process_group()
    print(json.dumps(losses))


if __name__ == "__main__":
    main()
    # Everything is printed; leave without the interpreter's teardown, where a library thread
    # still joinable at exit occasionally aborts the process ("terminate called without an
    # active exception") after the work succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
