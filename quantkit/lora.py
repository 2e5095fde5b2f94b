"""Low-rank adapters (LoRA, Hu et al. 2021) on a frozen int8 base, with or without PEFT.

:func:`add_lora` wraps each targeted :class:`~quantkit.nn.QuantLinear` (or ``nn.Linear``) in a
:class:`LoRALinear`: ``y = base(x) + (x @ A.T @ B.T) * (alpha / r)``, ``A`` of shape ``(r, in)``
initialised as PEFT does (Kaiming-uniform, ``a = sqrt(5)``), ``B`` of shape ``(out, r)`` zero, so a
fresh adapter changes nothing. Every other parameter of the model is frozen. The int8 base gets
no gradient of its own; gradients reach its input through quantkit's custom-op autograd.

Adapters are saved as safetensors (:func:`save_adapter`, written to a temporary file and renamed),
loaded with every name and shape checked (:func:`load_adapter`), and merged back into float
weights (:func:`merge_lora`: ``W = dequantized W + (alpha / r) B @ A``, an ``nn.Linear``).

PEFT: :func:`peft_config` returns a ``peft.LoraConfig`` with QuantLinear registered as a custom
layer type (:class:`PeftQuantLinear`), so ``peft.get_peft_model(qmodel, config)`` works.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
import numbers

import torch
from torch import nn

from ._tensor_files import read_tensor_file, write_tensor_file
from .nn import QuantLinear

#: The Linear layers of a Llama-style decoder block.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FORMAT = "quantkit.lora"


class LoRALinear(nn.Module):
    """A frozen base layer plus a trainable rank-``r`` update scaled by ``alpha / r``.

    ``r`` and ``alpha`` are checked (see :func:`add_lora`) before ``base`` is frozen."""

    def __init__(self, base: nn.Module, r: int, alpha: float):
        super().__init__()
        in_f, out_f = base.in_features, base.out_features
        _check_rank(r, in_f, out_f)
        alpha = _check_alpha(alpha)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.scaling = int(r), alpha, alpha / int(r)
        self.lora_A = nn.Parameter(torch.empty(self.r, in_f, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_f, self.r, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def forward(self, input):
        x = input   # nn.Linear's argument name: a caller may pass it by keyword
        # the adapter computes in its own dtype (float32) and adds in the base output's dtype
        delta = (x.to(self.lora_A.dtype) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling
        y = self.base(x)
        return y + delta.to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        """The float32 weight of base plus adapter: ``W + (alpha / r) B @ A``."""
        w = (self.base.dequantized_weight() if isinstance(self.base, QuantLinear)
             else self.base.weight.detach().to(torch.float32))
        return w + (self.lora_B.detach() @ self.lora_A.detach()) * self.scaling

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha:g}"


def _check_rank(r, in_f, out_f):
    if not isinstance(r, numbers.Integral) or isinstance(r, bool) or r < 1 or r > min(in_f, out_f):
        raise ValueError(f"LoRA rank must be an integer in [1, {min(in_f, out_f)}] (the layer's "
                         f"smaller width) for a {in_f} -> {out_f} layer, got {r!r}")


def _check_alpha(alpha) -> float:
    """The LoRA alpha as a float: a real number (bools and strings are a TypeError), finite and
    > 0 (ValueError otherwise)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"LoRA alpha must be a real number, got {alpha!r}")
    value = float(alpha)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"LoRA alpha must be finite and > 0, got {alpha!r}")
    return value


def _check_target(target) -> tuple:
    """``target`` as a tuple of names / patterns: a string, or an iterable of strings."""
    if isinstance(target, str):
        return (target,)
    try:
        names = tuple(target)
    except TypeError:
        names = None
    if names is None or not all(isinstance(t, str) for t in names):
        raise TypeError(f"target must be a layer name or pattern, or a sequence of them, got "
                        f"{target!r}")
    return names


def _wrap(model: nn.Module, modules: dict, name: str, base: nn.Module, r: int,
          alpha: float) -> LoRALinear:
    """Put a LoRALinear over ``base`` at ``name`` in ``model``, on the device of ``base``."""
    wrapped = LoRALinear(base, r, alpha)
    dev = next((t.device for t in base.buffers()), None) or next(
        (t.device for t in base.parameters()), torch.device("cpu"))
    wrapped = wrapped.to(dev)
    parent, _, child = name.rpartition(".")
    setattr(modules[parent] if parent else model, child, wrapped)
    return wrapped


def _matches(name: str, target) -> bool:
    """``target`` is a sequence of names matched against the module's last component, or of
    fnmatch patterns against its full name."""
    last = name.rpartition(".")[2]
    return any(last == t or fnmatch.fnmatchcase(name, t) for t in target)


def add_lora(model: nn.Module, r: int = 16, alpha: float = 32, target=LLAMA_TARGETS) -> nn.Module:
    """Wrap every QuantLinear / nn.Linear whose name matches ``target`` in a LoRALinear (in place).

    Every parameter outside the adapters is frozen; a layer that already has an adapter is not
    wrapped again (a pattern such as ``"*"`` also matches the ``.base`` inside an adapter), and
    adapters added earlier stay trainable. Checked before anything changes: ``target``
    (a name or pattern, or a sequence of them: TypeError otherwise), ``alpha`` (a real number,
    finite and > 0; TypeError for bools and strings, ValueError otherwise), that some layer
    matches and that the rank ``r`` fits every matched layer (ValueError); a refused call leaves
    ``model`` as it was. Returns ``model``.
    """
    target = _check_target(target)
    alpha = _check_alpha(alpha)
    adapted = [m for m in model.modules() if isinstance(m, LoRALinear)]
    wrapped = {id(m.base) for m in adapted}   # a layer that has an adapter gets no second one
    chosen = [(n, m) for n, m in model.named_modules()
              if n and isinstance(m, (QuantLinear, nn.Linear)) and id(m) not in wrapped
              and _matches(n, target)]
    if not chosen:
        already = [n for n, m in model.named_modules()
                   if isinstance(m, LoRALinear) and _matches(n, target)]
        raise ValueError(f"add_lora: no QuantLinear or nn.Linear layer without an adapter "
                         f"matches target {list(target)}"
                         + (f" ({already[0]!r} already has one)" if already else ""))
    for name, m in chosen:
        _check_rank(r, m.in_features, m.out_features)
    trained = {id(p) for m in adapted for p in (m.lora_A, m.lora_B)}
    for p in model.parameters():
        if id(p) not in trained:        # adapters added earlier stay trainable
            p.requires_grad_(False)
    modules = dict(model.named_modules())
    for name, m in chosen:
        _wrap(model, modules, name, m, r, alpha)
    return model


def lora_layers(model: nn.Module) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state_dict(model: nn.Module) -> dict:
    """``{layer.lora_A: ..., layer.lora_B: ...}`` of every adapter (detached CPU float32)."""
    out = {}
    for name, m in lora_layers(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach().cpu().contiguous()
        out[f"{name}.lora_B"] = m.lora_B.detach().cpu().contiguous()
    return out


def save_adapter(model: nn.Module, path, metadata: dict | None = None) -> None:
    """Write the adapters to a safetensors file (a temporary file renamed when complete)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA adapter (see add_lora)")
    meta = {"format": ADAPTER_FORMAT, "layers": json.dumps(
        {n: {"r": m.r, "alpha": m.alpha} for n, m in layers.items()}, sort_keys=True)}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    write_tensor_file(adapter_state_dict(model), path, meta)


def _read_adapter(path) -> tuple[dict, dict]:
    """``({layer: (r, alpha)}, tensors)`` of an adapter file.

    Checked: the file reads as safetensors, its format is quantkit.lora, its ``layers`` metadata
    is a JSON object mapping each layer name to ``{"r": ..., "alpha": ...}`` (no other key) with
    a valid alpha (see :func:`add_lora`). ValueError naming the file (and the layer) otherwise;
    the rank is checked against the model's layer by :func:`_check_adapter_fits`.
    """
    meta, tensors = read_tensor_file(path)
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path}: not a quantkit LoRA adapter (format {meta.get('format')!r})")
    if "layers" not in meta:
        raise ValueError(f"{path}: adapter metadata has no 'layers' entry")
    try:
        layers = json.loads(meta["layers"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed 'layers' metadata (not JSON: {exc})") from None
    if not isinstance(layers, dict):
        raise ValueError(f"{path}: 'layers' metadata must be a JSON object, got {layers!r}")
    specs = {}
    for name, spec in layers.items():
        if not isinstance(spec, dict) or set(spec) != {"r", "alpha"}:
            raise ValueError(f"{path}: layer {name!r}: entry must be {{\"r\": rank, \"alpha\": "
                             f"number}}, got {spec!r}")
        try:
            specs[name] = (spec["r"], _check_alpha(spec["alpha"]))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: layer {name!r}: {exc}") from None
    return specs, tensors


def _check_adapter_fits(path, modules: dict, specs: dict, tensors: dict) -> None:
    """Every layer of ``specs`` is a linear layer of the model whose widths its rank fits, with
    float32 ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)``; no tensor belongs to no layer.
    ValueError naming the file and the layer or tensor otherwise."""
    for name, (r, _) in specs.items():
        m = modules.get(name)
        if not isinstance(m, (LoRALinear, QuantLinear, nn.Linear)):
            raise ValueError(f"{path}: adapter for layer {name!r}, which the model does not have "
                             f"as a linear layer")
        try:
            _check_rank(r, m.in_features, m.out_features)
        except ValueError as exc:
            raise ValueError(f"{path}: layer {name!r}: {exc}") from None
        if name == "" and not (isinstance(m, LoRALinear) and m.r == r):
            # the model itself cannot be wrapped in place (it would become its own child)
            raise ValueError(f"{path}: the adapter is for the model itself (layer ''), rank {r}: "
                             f"load it into a LoRALinear of that rank (quantkit.lora.LoRALinear("
                             f"layer, {r}, alpha)), not into a {type(m).__name__}")
        for key, shape in ((f"{name}.lora_A", (r, m.in_features)),
                           (f"{name}.lora_B", (m.out_features, r))):
            t = tensors.get(key)
            if t is None or tuple(t.shape) != shape or t.dtype != torch.float32:
                got = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
                raise ValueError(f"{path}: tensor {key!r} is {got}, the model needs float32 "
                                 f"{shape}")
    known = {f"{name}.lora_{ab}" for name in specs for ab in "AB"}
    extra = sorted(set(tensors) - known)
    if extra:
        raise ValueError(f"{path}: tensor {extra[0]!r} belongs to no layer of the adapter's "
                         f"'layers' metadata")


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Load adapters saved by :func:`save_adapter` into ``model``.

    Layers the model lacks adapters on are wrapped first (with the saved rank and alpha). The
    whole file is read and checked before the model is touched (see :func:`_read_adapter` and
    :func:`_check_adapter_fits`: metadata, names, ranks, alphas, shapes); a bad file raises
    ValueError naming it and leaves ``model`` as it was.
    """
    specs, tensors = _read_adapter(path)
    modules = dict(model.named_modules())
    _check_adapter_fits(path, modules, specs, tensors)
    for name, (r, alpha) in specs.items():
        m = modules[name]
        if not isinstance(m, LoRALinear) or m.r != r:
            base = m.base if isinstance(m, LoRALinear) else m
            m = _wrap(model, modules, name, base, r, alpha)
        m.alpha, m.scaling = alpha, alpha / m.r
        with torch.no_grad():
            m.lora_A.copy_(tensors[f"{name}.lora_A"])
            m.lora_B.copy_(tensors[f"{name}.lora_B"])
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by an ``nn.Linear`` holding its merged weight (in place), on the
    adapter's device: float32 over a QuantLinear base, the base's dtype over an nn.Linear."""
    modules = dict(model.named_modules())
    for name, m in lora_layers(model).items():
        dtype = m.base.weight.dtype if not isinstance(m.base, QuantLinear) else torch.float32
        linear = nn.Linear(m.in_features, m.out_features, bias=m.base.bias is not None,
                           device=m.lora_A.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(m.merged_weight())
            if m.base.bias is not None:
                linear.bias.copy_(m.base.bias.detach())
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, linear)
    return model


# ------------------------------------------------------------------------------ PEFT


@functools.lru_cache(maxsize=1)
def _peft_linear_class():
    from peft.tuners.lora.layer import Linear as PeftLinear

    class PeftQuantLinear(PeftLinear):
        """PEFT's LoRA Linear over a QuantLinear base. The forward is PEFT's; an update cannot be
        merged into int8 codes, so merge/unmerge refuse (:func:`merge_peft` gives float weights)."""

        def merge(self, *args, **kwargs):
            raise NotImplementedError("cannot merge a LoRA update into int8 QuantLinear codes; "
                                      "use quantkit.lora.merge_peft(model) for float weights")

        def unmerge(self, *args, **kwargs):
            raise NotImplementedError("a QuantLinear LoRA layer is never merged")

    return PeftQuantLinear


def peft_config(**kwargs):
    """A ``peft.LoraConfig(**kwargs)`` that knows QuantLinear (``task_type`` etc. as PEFT's)."""
    from peft import LoraConfig

    config = LoraConfig(**kwargs)
    register_peft(config)
    return config


def register_peft(config) -> None:
    """Register QuantLinear as a custom layer type on a ``peft.LoraConfig``."""
    config._register_custom_module({QuantLinear: _peft_linear_class()})


def merge_peft(model: nn.Module) -> nn.Module:
    """Replace PEFT LoRA layers over QuantLinear bases by merged float32 ``nn.Linear`` (in place).

    Uses the active adapter of each layer: ``W = dequantized W + scaling * B @ A``.
    """
    from peft.tuners.lora.layer import LoraLayer

    modules = dict(model.named_modules())
    for name, m in list(modules.items()):
        if not (isinstance(m, LoraLayer) and isinstance(m.get_base_layer(), QuantLinear)):
            continue
        base = m.get_base_layer()
        w = base.dequantized_weight()
        for adapter in m.active_adapters:
            w = w + (m.lora_B[adapter].weight.detach() @ m.lora_A[adapter].weight.detach()) \
                * m.scaling[adapter]
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(w)
            if base.bias is not None:
                linear.bias.copy_(base.bias.detach())
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, linear)
    return model
