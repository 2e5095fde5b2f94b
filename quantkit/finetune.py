"""``quantkit finetune``: LoRA fine-tuning of a causal LM on an int8 (or float32) base.

:func:`finetune` (and the command) loads a model folder, quantizes its Linear layers weight-only
(``base="int8"``; ``lm_head`` stays float), wraps the decoder's Linear layers in LoRA adapters
(:mod:`quantkit.lora`), and trains them on text files with ``adamw8bit``
(:class:`quantkit.optim.AdamW8bit`) or torch's ``adamw``.

- Batches are drawn as they are needed: step ``k`` takes ``batch`` windows of ``seq + 1`` tokens at
  offsets from a generator seeded with ``(seed, k)``, so a run's data depend only on the seed and
  the step, and a resumed run sees exactly the batches the uninterrupted one would have.
- Every ``checkpoint_every`` steps (and at the end) ``checkpoint.safetensors`` is written to a
  temporary file and renamed, so an interrupted run leaves the last complete checkpoint intact.
  It holds the adapters, the optimizer state (tensors in safetensors, the rest as JSON metadata),
  the step and the losses; never pickle. ``resume=True`` continues from it bit for bit, and
  refuses a checkpoint made with other settings, another starting model or other training text.
- Outputs in ``out``: ``adapter.safetensors`` (:func:`quantkit.lora.load_adapter` reads it),
  ``loss.png`` (with matplotlib), ``checkpoint.safetensors``, ``result.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

from ._tensor_files import read_tensor_file, write_tensor_file
from .llm import UsageError

OPTIMIZERS = ("adamw8bit", "adamw")


def make_optimizer(name: str, params, lr: float):
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "adamw8bit":
        try:
            from .optim import AdamW8bit
        except ImportError:
            raise UsageError("--optimizer adamw8bit needs quantkit.optim (AdamW8bit), which this "
                             "install lacks; use --optimizer adamw") from None
        return AdamW8bit(params, lr=lr, weight_decay=0.0)
    raise UsageError(f"unknown optimizer {name!r}; choose {' or '.join(OPTIMIZERS)}")


def batch_at(ids, step: int, *, seed: int, batch: int, seq: int):
    """The ``(batch, seq + 1)`` token windows of step ``step`` (a pure function of seed and step)."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, ids.numel() - seq - 1 + 1, (batch,), generator=g)
    return torch.stack([ids[s:s + seq + 1] for s in starts.tolist()])


# ------------------------------------------------------------------------------ checkpoints


def _flat_optimizer_state(opt):
    import torch

    sd = opt.state_dict()
    tensors, plain = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


def _unflat_optimizer_state(tensors, meta):
    state = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["plain"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: Path, model, opt, step: int, losses: list, config: dict) -> None:
    """Adapters + optimizer state + step to ``path`` (temporary file, then renamed)."""
    from .lora import adapter_state_dict

    tensors = {f"adapter.{k}": v for k, v in adapter_state_dict(model).items()}
    opt_tensors, opt_meta = _flat_optimizer_state(opt)
    tensors.update(opt_tensors)
    meta = {"format": "quantkit.finetune", "step": str(step), "losses": json.dumps(losses),
            "optimizer": json.dumps(opt_meta), "config": json.dumps(config, sort_keys=True)}
    write_tensor_file(tensors, path, meta)


def load_checkpoint(path: Path, model, opt, config: dict):
    """Restore adapters and optimizer from ``path``; returns (step, losses)."""
    import torch
    from .lora import lora_layers

    try:
        meta, tensors = read_tensor_file(path)
    except ValueError as exc:
        raise UsageError(f"not a readable checkpoint: {exc}") from None
    if meta.get("format") != "quantkit.finetune":
        raise UsageError(f"{path}: not a quantkit finetune checkpoint")
    saved = json.loads(meta["config"])
    # every setting that changes what training computes; a key a checkpoint does not record
    # (written before it was recorded) is not compared
    differs = [k for k in ("rank", "alpha", "optimizer", "seq", "batch", "seed", "lr", "base",
                           "weights", "model", "data")
               if k in saved and saved.get(k) != config.get(k)]
    if differs:
        raise UsageError(f"{path}: checkpoint made with different {differs[0]} "
                         f"({saved.get(differs[0])!r}, now {config.get(differs[0])!r})")
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_A.copy_(tensors[f"adapter.{name}.lora_A"])
            layer.lora_B.copy_(tensors[f"adapter.{name}.lora_B"])
    opt.load_state_dict(_unflat_optimizer_state(tensors, json.loads(meta["optimizer"])))
    return int(meta["step"]), json.loads(meta["losses"])


# ------------------------------------------------------------------------------ training


def prepare_model(model, *, base: str, rank: int, alpha: float, weights: str = "mse"):
    """Quantize (``base="int8"``) and add LoRA adapters; returns the model to train."""
    import quantkit

    from .lora import add_lora

    if base == "int8":    # in place: no float copy of the weights stays alive while training
        model = quantkit.quantize_model(model, weights=weights, skip=["lm_head"], inplace=True)
    elif base != "float32":
        raise UsageError(f"--base must be int8 or float32, got {base!r}")
    try:
        return add_lora(model, r=rank, alpha=alpha)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _model_fingerprint(model) -> str:
    """The model a run starts from, for --resume to recognise: its class, parameter count and a
    CRC-32 of the first values of every parameter (the float weights, before quantization)."""
    import zlib

    import torch

    crc, count = 0, 0
    for p in model.parameters():
        count += p.numel()
        if p.device.type == "meta":          # no values: its shape stands for it
            crc = zlib.crc32(repr(tuple(p.shape)).encode(), crc)
            continue
        head = p.detach().reshape(-1)[:16].to(device="cpu", dtype=torch.float32).contiguous()
        crc = zlib.crc32(head.numpy().tobytes(), crc)
    return f"{type(model).__name__}:{count}:{crc:08x}"


def _data_fingerprint(ids) -> str:
    """The training token ids, for --resume to recognise: their count and CRC-32."""
    import zlib

    flat = ids.detach().reshape(-1).cpu().contiguous()
    return f"{flat.numel()}:{zlib.crc32(flat.numpy().tobytes()):08x}"


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def finetune(model, ids, out, *, rank=16, alpha=32, optimizer="adamw8bit", lr=2e-4, steps=100,
             seq=128, batch=4, seed=0, base="int8", weights="mse", checkpoint_every=50,
             resume=False, progress=None, log=None) -> dict:
    """Train LoRA adapters on ``model`` over the token ids ``ids``; write outputs to ``out``.

    ``model`` is a float causal LM (``model(input_ids=..., labels=...)``); it is quantized
    (``base="int8"``) and given adapters in place. Returns {"losses", "steps", "seconds",
    "tokens_per_s", "peak_rss", "model"}.
    """
    import torch

    check_settings(rank=rank, alpha=alpha, lr=lr, steps=steps, seq=seq, batch=batch,
                   checkpoint_every=checkpoint_every, weights=weights)
    if ids.numel() < seq + 2:
        raise UsageError(f"the text has {ids.numel()} tokens, fewer than --seq + 2 = {seq + 2}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"rank": rank, "alpha": alpha, "optimizer": optimizer, "seq": seq, "batch": batch,
              "seed": seed, "lr": lr, "base": base,
              "weights": weights if base == "int8" else None,
              "model": _model_fingerprint(model), "data": _data_fingerprint(ids)}
    torch.manual_seed(seed)
    model = prepare_model(model, base=base, rank=rank, alpha=alpha, weights=weights)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(optimizer, params, lr)
    ckpt = out / "checkpoint.safetensors"
    step, losses = 0, []
    if resume:
        if not ckpt.is_file():
            raise UsageError(f"--resume: no checkpoint at {ckpt}")
        step, losses = load_checkpoint(ckpt, model, opt, config)
    progress = sys.stderr.isatty() if progress is None else progress
    model.train()
    start, tokens = time.perf_counter(), 0
    try:
        while step < steps:
            x = batch_at(ids, step, seed=seed, batch=batch, seq=seq)
            loss = _lm_loss(model, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
            tokens += batch * seq
            rate = tokens / max(time.perf_counter() - start, 1e-9)
            if progress:
                done = int(30 * step / steps)
                print(f"\r[{'#' * done}{'.' * (30 - done)}] step {step}/{steps} loss "
                      f"{losses[-1]:.4f} {rate:.0f} tok/s", end="", file=sys.stderr, flush=True)
            elif log is not None and (step % max(1, steps // 10) == 0 or step == steps):
                print(f"step {step}/{steps} loss {losses[-1]:.4f} {rate:.0f} tok/s", file=log,
                      flush=True)
            if step == steps or (checkpoint_every and step % checkpoint_every == 0):
                save_checkpoint(ckpt, model, opt, step, losses, config)
    finally:
        if progress:
            print(file=sys.stderr)
    model.eval()
    seconds = time.perf_counter() - start
    from .lora import save_adapter

    save_adapter(model, out / "adapter.safetensors", metadata={"steps": step, **config})
    plot = _plot_losses(losses, out / "loss.png")
    result = {"losses": losses, "steps": step, "seconds": seconds,
              "tokens_per_s": tokens / seconds if seconds else math.nan,
              "peak_rss": peak_rss_bytes(), "config": config, "loss_png": plot}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    result["model"] = model
    return result


def _lm_loss(model, x):
    """Mean next-token cross-entropy of windows ``x`` (batch, seq + 1)."""
    import torch

    logits = model(input_ids=x[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             x[:, 1:].reshape(-1))


def _plot_losses(losses, png: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return str(png)


# ------------------------------------------------------------------------------ command


def check_settings(*, rank, alpha, lr, steps, seq, batch, checkpoint_every, weights) -> None:
    """UsageError (naming the option) for settings no run can use, before anything is loaded or
    written: counts >= 1 (checkpoint_every >= 0, 0 = only at the end), alpha and lr finite and
    > 0, weights a calibration method."""
    from .calibration._args import METHODS

    for name, value, least in (("--rank", rank, 1), ("--steps", steps, 1), ("--seq", seq, 1),
                               ("--batch", batch, 1), ("--checkpoint-every", checkpoint_every, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UsageError(f"{name} must be an integer >= {least}, got {value!r}")
    for name, value in (("--alpha", alpha), ("--lr", lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise UsageError(f"{name} must be a finite number > 0, got {value!r}")
    if weights not in METHODS:
        raise UsageError(f"--weights must be one of {', '.join(METHODS)}, got {weights!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="FOLDER",
                        help="model folder (default: SmolLM2-135M-Instruct, cached float32)")
    parser.add_argument("--text", nargs="+", metavar="FILE",
                        help="training text files (default: the Shakespeare training works)")
    parser.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--rank", type=int, default=16,
                        help="LoRA rank, 1 to the layer's width (default 16)")
    parser.add_argument("--alpha", type=float, default=32,
                        help="LoRA alpha, > 0; the update is scaled by alpha / rank (default 32)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw8bit",
                        help="default adamw8bit")
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate, > 0 (default 2e-4)")
    parser.add_argument("--steps", type=int, default=100, help="training steps, >= 1 (default 100)")
    parser.add_argument("--seq", type=int, default=128,
                        help="tokens per training window, >= 1 (default 128)")
    parser.add_argument("--batch", type=int, default=4, help="windows per step, >= 1 (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    parser.add_argument("--base", choices=("int8", "float32"), default="int8",
                        help="the frozen base's weights (default int8)")
    parser.add_argument("--weights", default="mse", help="int8 weight calibration (default mse)")
    parser.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                        help="write a checkpoint every N steps, 0 = only at the end (default 50)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT's checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from . import llm

    try:
        check_settings(rank=args.rank, alpha=args.alpha, lr=args.lr, steps=args.steps,
                       seq=args.seq, batch=args.batch, checkpoint_every=args.checkpoint_every,
                       weights=args.weights)
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise UsageError(f"-o {args.out}: is a file; give a folder for the outputs")
        try:
            folder = Path(args.model) if args.model else llm.smollm2_folder()
            model, tokenizer = llm.load_model(folder)
            texts = llm.read_texts(args.text) if args.text \
                else llm.read_texts(llm.shakespeare_split()[0])
        except ImportError as exc:
            raise UsageError(str(exc)) from None
        ids = llm.tokenize(tokenizer, texts)
        result = finetune(model, ids, args.out, rank=args.rank, alpha=args.alpha,
                          optimizer=args.optimizer, lr=args.lr, steps=args.steps, seq=args.seq,
                          batch=args.batch, seed=args.seed, base=args.base, weights=args.weights,
                          checkpoint_every=args.checkpoint_every, resume=args.resume,
                          progress=False if args.no_progress else None, log=sys.stdout)
    except UsageError as exc:
        print(f"quantkit: error: {exc}", file=sys.stderr)
        return 2
    print(f"{result['steps']} steps, final loss {result['losses'][-1]:.4f}, "
          f"{result['tokens_per_s']:.0f} tok/s, peak RSS {result['peak_rss'] / 2**20:.0f} MiB; "
          f"wrote {args.out}/adapter.safetensors")
    return 0
