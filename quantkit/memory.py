"""``quantkit memory``: what a fine-tune needs in memory, before it starts.

Bytes per parameter of each setup (``GB`` = 10^9 bytes, as GPU makers count):

===========================  ========  =========  =======================================
setup                        weights   gradients  optimizer states (AdamW: m and v)
===========================  ========  =========  =======================================
float32 full fine-tune       4         4          8
bf16 mixed precision         2         2          12 (float32 master copy 4 + m 4 + v 4)
8-bit states (AdamW8bit)     4         4          2 x (1 + 4/256) = 2.03125
int8 base + LoRA, float32    1 + 4/K   adapters:  adapters: 8 per adapter parameter
  adapter states             (base)    4 each
int8 base + LoRA, 8-bit      1 + 4/K   4 each     2.03125 per adapter parameter
float32 base + LoRA          4         4 each     8 per adapter parameter
===========================  ========  =========  =======================================

(7B, float32 full fine-tune: 28 + 28 + 56 = 112 GB.) 8-bit states hold int8 codes and one
float32 scale per block of 256 values for each of m and v. The int8 base keeps one float32 scale
per output row of K inputs; embeddings and norms stay float32; LoRA adds ``r * (in + out)``
float32 parameters per adapted layer.

Activations (with ``--seq`` and ``--batch``): what a Llama-style decoder saves for the backward,
after Korthikanti et al. 2022 (their ``34 s b d + 5 a s^2 b`` bytes in 16 bits, without dropout
masks, with a gated MLP of width f instead of 4d), in float32 bytes per layer and token:
``34 d + 16 f + 10 h s``, plus ``12 V`` per token for the logits, their log-softmax and its
gradient (d hidden size, h heads, s sequence length, V vocabulary). Checked against SmolLM2 LoRA
fine-tunes (benchmarks/bench_finetune.py): the totals land 7-8% above the tensors' measured peak.
On the CPU, glibc's malloc keeps freed heap pages, so a process's RSS peak runs about 1.4x that
unless ``MALLOC_MMAP_THRESHOLD_=65536`` returns freed tensors to the OS.

From a parameter count alone the layout is a Llama-like guess (``d = (128 N / 12)^(1/3)``,
``L = d / 128`` layers, ``f = 8d/3``); a model folder's ``config.json`` gives the real shapes.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

GB = 10 ** 9
#: GPU memory of the names ``--gpu`` accepts, in bytes (the marketed size, 10^9 bytes per GB).
GPUS = {"t4": 16 * GB, "a100-40": 40 * GB, "a100-80": 80 * GB, "h100-80": 80 * GB,
        "l4": 24 * GB, "rtx4090": 24 * GB}
#: Bytes per value of an 8-bit optimizer state: one int8 code plus a float32 scale per 256.
STATE_8BIT = 1 + 4 / 256
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UsageError(ValueError):
    """Bad input from the command line: one line on stderr, exit code 2."""


@dataclass(frozen=True)
class Shape:
    """What the planner needs of a decoder-only model."""

    params: int          # every parameter, tied embeddings counted once
    linear: list         # (in_features, out_features, count) of the Linear layers in the blocks
    hidden: int
    layers: int
    heads: int
    mlp: int
    vocab: int
    guessed: bool = False

    @property
    def linear_params(self) -> int:
        return sum(i * o * c for i, o, c in self.linear)

    @property
    def linear_rows(self) -> int:
        return sum(o * c for _, o, c in self.linear)


#: The smallest --params a layout is guessed for: below it the guessed Linear layers alone would
#: hold more parameters than given (53248 at hidden size 64).
MIN_GUESSED_PARAMS = 10 ** 6


def shape_from_params(n: float) -> Shape:
    """A Llama-like layout with about ``n`` parameters (32 layers of 4096 for 7e9)."""
    n = int(n)
    d = max(64, int(round((128 * n / 12) ** (1 / 3) / 64)) * 64)
    layers = max(1, round(d / 128))
    f = int(round(8 * d / 3 / 64)) * 64
    linear = [(d, d, 4 * layers), (d, f, 2 * layers), (f, d, layers)]
    shape = Shape(n, linear, d, layers, max(1, d // 128), f, 32000, guessed=True)
    if n < MIN_GUESSED_PARAMS:
        raise UsageError(f"--params {n} is too small to guess a layout from (at least "
                         f"{MIN_GUESSED_PARAMS:.0e}); give --model FOLDER with the model's "
                         "config.json")
    return shape


def shape_from_config(config: dict) -> Shape:
    """The layout of a Llama-style ``config.json`` (hidden_size, num_hidden_layers, ...)."""
    try:
        d = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        f = int(config.get("intermediate_size", 4 * d))
        vocab = int(config.get("vocab_size", 32000))
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"config.json lacks a usable {exc} (needs hidden_size, "
                         "num_hidden_layers, num_attention_heads)") from None
    if min(d, layers, heads, f, vocab) < 1:
        raise UsageError("config.json: hidden_size, num_hidden_layers, num_attention_heads, "
                         "intermediate_size and vocab_size must be >= 1, got "
                         f"{d}, {layers}, {heads}, {f}, {vocab}")
    try:
        kv = int(config.get("num_key_value_heads", heads))
        head_dim = int(config.get("head_dim", d // heads))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"config.json: num_key_value_heads / head_dim unusable ({exc})") from None
    if kv < 1 or head_dim < 1:
        raise UsageError(f"config.json: num_key_value_heads and head_dim must be >= 1, got "
                         f"{kv}, {head_dim}")
    q_out, kv_out = heads * head_dim, kv * head_dim
    linear = [(d, q_out, layers), (d, kv_out, 2 * layers), (q_out, d, layers),
              (d, f, 2 * layers), (f, d, layers)]
    lin = sum(i * o * c for i, o, c in linear)
    embed = vocab * d * (1 if config.get("tie_word_embeddings", False) else 2)
    norms = (2 * layers + 1) * d
    return Shape(lin + embed + norms, linear, d, layers, heads, f, vocab)


def load_shape(folder) -> Shape:
    path = Path(folder)
    config = path / "config.json" if path.is_dir() else path
    if not config.is_file():
        raise UsageError(f"{folder}: no config.json there")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{config}: not a readable JSON config ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{config}: not a JSON object")
    return shape_from_config(data)


def parse_count(text) -> float:
    """A positive parameter count: ``7e9``, ``7B``, ``135M``, ``1_000_000``."""
    s = str(text).strip().replace("_", "").replace(",", "")
    mult = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
    try:
        value = float(s[:-1]) * mult[s[-1].lower()] if s and s[-1].lower() in mult else float(s)
    except ValueError:
        raise UsageError(f"--params {text!r} is not a number (e.g. 7e9 or 7B)") from None
    if not (math.isfinite(value) and value >= 1):
        raise UsageError(f"--params must be a positive number of parameters, got {text!r}")
    return value


def parse_bytes(text) -> int:
    """``16GB`` (10^9), ``16GiB`` (2^30), ``500MB``, ``512MiB``, or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(i?)b?\s*", str(text), re.I)
    if not m:
        raise UsageError(f"--budget {text!r} is not a size (e.g. 16GB or 24GiB)")
    value, prefix, binary = float(m.group(1)), m.group(2).lower(), bool(m.group(3))
    power = "kmgt".index(prefix) + 1 if prefix else 0
    size = value * (1024 if binary else 1000) ** power
    if not (size > 0 and math.isfinite(size)):
        raise UsageError(f"--budget must be a positive, finite size, got {text!r}")
    return int(size)


def activation_bytes(shape: Shape, seq: int, batch: int) -> int:
    """float32 activations a decoder keeps for its backward (see the module docstring)."""
    per_token_layer = 34 * shape.hidden + 16 * shape.mlp + 10 * shape.heads * seq
    return batch * seq * (shape.layers * per_token_layer + 12 * shape.vocab)


def lora_params(shape: Shape, rank: int) -> int:
    """Parameters of rank-``rank`` adapters on every Linear of the blocks: r * (in + out)."""
    return sum(rank * (i + o) * c for i, o, c in shape.linear)


def plan(shape: Shape, *, rank: int = 16, seq: int | None = None,
         batch: int | None = None) -> list[dict]:
    """One dict per setup: name, weights, gradients, states, activations, total (bytes)."""
    n = shape.params
    if rank < 1 or rank > min(shape.hidden, shape.mlp):
        raise UsageError(f"--rank must be in [1, {min(shape.hidden, shape.mlp)}] (at most the "
                         f"smallest Linear dimension), got {rank}")
    act = activation_bytes(shape, seq, batch) if seq and batch else 0
    lora = lora_params(shape, rank)
    rest = max(0, n - shape.linear_params)  # a guessed layout's Linears may hold more than n
    int8_base = shape.linear_params + 4 * shape.linear_rows + 4 * rest
    rows = [
        ("float32 full fine-tune", 4 * n, 4 * n, 8 * n),
        ("bf16 mixed precision", 2 * n, 2 * n, 12 * n),
        ("float32 + 8-bit AdamW states", 4 * n, 4 * n, 2 * STATE_8BIT * n),
        (f"int8 base + LoRA r={rank}, float32 AdamW", int8_base + 4 * lora, 4 * lora, 8 * lora),
        (f"int8 base + LoRA r={rank}, 8-bit AdamW", int8_base + 4 * lora, 4 * lora,
         2 * STATE_8BIT * lora),
        (f"float32 base + LoRA r={rank}, float32 AdamW", 4 * n + 4 * lora, 4 * lora, 8 * lora),
    ]
    out = []
    for name, w, g, s in rows:
        # bf16 mixed precision keeps its activations in 16 bits
        a = act // 2 if name.startswith("bf16") else act
        out.append({"setup": name, "weights": int(w), "gradients": int(g), "states": int(s),
                    "activations": int(a), "total": int(w + g + s + a)})
    return out


def _gb(n: int) -> str:
    return f"{n / GB:.3g} GB" if n >= 0.1 * GB else f"{n / 1e6:.3g} MB"


def format_plan(rows: list[dict], budget: int | None, budget_name: str | None) -> str:
    cols = ["setup", "weights", "gradients", "opt. states", "activations", "total"]
    cells = [[r["setup"], _gb(r["weights"]), _gb(r["gradients"]), _gb(r["states"]),
              _gb(r["activations"]) if r["activations"] else "-", _gb(r["total"])] for r in rows]
    if budget is not None:
        cols.append(f"fits {budget_name}")
        for c, r in zip(cells, rows):
            c.append("yes" if r["total"] <= budget else "no")
    widths = [max(len(str(x[i])) for x in [cols, *cells]) for i in range(len(cols))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in [cols, *cells]]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--params", metavar="N", help="parameter count, e.g. 7e9 or 135M")
    src.add_argument("--model", metavar="FOLDER", help="a model folder with a config.json")
    parser.add_argument("--seq", type=int, metavar="S", help="sequence length (activations)")
    parser.add_argument("--batch", type=int, metavar="B", help="batch size (activations)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    fit = parser.add_mutually_exclusive_group()
    fit.add_argument("--gpu", metavar="NAME", help=f"mark what fits: {', '.join(GPUS)}")
    fit.add_argument("--budget", metavar="SIZE", help="mark what fits in SIZE, e.g. 16GB")


def run(args) -> int:
    try:
        if args.params is not None:
            shape = shape_from_params(parse_count(args.params))
        else:
            shape = load_shape(args.model)
        for name in ("seq", "batch"):
            v = getattr(args, name)
            if v is not None and v < 1:
                raise UsageError(f"--{name} must be >= 1, got {v}")
        if (args.seq is None) != (args.batch is None):
            raise UsageError("--seq and --batch go together (activations need both)")
        budget = budget_name = None
        if args.gpu is not None:
            key = args.gpu.strip().lower()
            if key not in GPUS:
                raise UsageError(f"unknown GPU {args.gpu!r}; known: {', '.join(GPUS)} "
                                 "(or give --budget SIZE)")
            budget, budget_name = GPUS[key], f"{key} ({GPUS[key] // GB} GB)"
        elif args.budget is not None:
            budget, budget_name = parse_bytes(args.budget), args.budget
        rows = plan(shape, rank=args.rank, seq=args.seq, batch=args.batch)
    except UsageError as exc:
        print(f"quantkit: error: {exc}", file=sys.stderr)
        return 2
    guess = " (layout guessed from the count: Llama-like)" if shape.guessed else ""
    print(f"{shape.params / 1e9:.4g}B parameters{guess}; hidden {shape.hidden}, "
          f"{shape.layers} layers" + (f"; activations for batch {args.batch} x seq {args.seq}"
                                      if args.seq else "; no activations (give --seq, --batch)"))
    print(format_plan(rows, budget, budget_name))
    return 0
