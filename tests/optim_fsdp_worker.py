"""One rank of the FSDP2 test (tests/test_optim_fsdp.py): train a small model sharded with
``fully_shard`` on the gloo backend, every rank on the same batches, with AdamW8bit; print the
losses as JSON. With ``resume`` the optimizer is saved after 3 steps (one safetensors file per
rank), rebuilt, loaded, and training goes on; ``dcp`` does the same through
torch.distributed.checkpoint with the DTensor states of ``sharded_state_dict``."""

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist


def build(seed=0):
    torch.manual_seed(seed)
    # 5 x 300 weights shard unevenly (3 + 2 rows); 40 x 600 crosses blocks; a 1-d bias
    return torch.nn.Sequential(torch.nn.Linear(600, 40), torch.nn.Tanh(),
                               torch.nn.Linear(40, 300, bias=False), torch.nn.Tanh(),
                               torch.nn.Linear(300, 5))


def batches(steps):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 600, generator=g), torch.randint(0, 5, (16,), generator=g))
            for _ in range(steps)]


def classification_loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def train(model, opt, data, loss_of=classification_loss):
    """One optimizer step per batch of ``data``; the losses (``loss_of(model, batch)``)."""
    losses = []
    for batch in data:
        loss = loss_of(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main():
    from torch.distributed.fsdp import fully_shard

    from quantkit.optim import AdamW8bit, load_optimizer_state, save_optimizer_state

    mode = sys.argv[1]
    torch.set_num_threads(1)
    data = batches(5)
    if mode == "single":
        model = build()
        print(json.dumps(train(model, AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=1000),
                               data)))
        return
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    opt = AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=1000)
    if mode == "dcp":                  # torch.distributed.checkpoint of the sharded states
        import torch.distributed.checkpoint as dcp

        losses = train(model, opt, data[:3])
        folder = os.path.join(os.environ["QK_TEST_DIR"], "dcp")
        dcp.save({"optim": opt.sharded_state_dict()}, checkpoint_id=folder)
        opt = AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=1000)
        template = {"optim": opt.sharded_state_dict()}
        dcp.load(template, checkpoint_id=folder)
        opt.load_sharded_state_dict(template["optim"])
        losses += train(model, opt, data[3:])
    elif mode == "resume":
        losses = train(model, opt, data[:3])
        folder = os.environ["QK_TEST_DIR"]
        path = os.path.join(folder, f"optim-rank{rank}.safetensors")
        save_optimizer_state(opt, path)
        opt = AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=1000)
        load_optimizer_state(opt, path)
        losses += train(model, opt, data[3:])
    else:
        losses = train(model, opt, data)
    local_rows = [tuple(p.to_local().shape) for p in model.parameters()]
    if rank == 0:
        print(json.dumps(losses))
        print(json.dumps(local_rows), file=sys.stderr)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Everything is printed; leave without the interpreter's teardown, where a library thread
    # still joinable at exit occasionally aborts the process ("terminate called without an
    # active exception") after the work succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
