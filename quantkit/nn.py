"""PyTorch layers: :class:`QuantLinear` (an int8 ``nn.Linear``) and :func:`quantize_model`.

A QuantLinear holds ``weight`` (int8 codes, ``(out_features, in_features)``, one alpha per output
channel, i.e. per row) and ``weight_scale`` (float32, ``(out_features,)``, ``alpha / 127``) as
buffers, and a float32 ``bias``. With W = weight codes, s_w = weight_scale, b = bias, for an input
row x:

- weight-only (``activations=None``)::

      y = x @ (float32(W) * s_w[:, None]).T + b

  (no float32 copy of the weight is kept: the fused kernels for few rows read the int8 codes
  and scale each output's float32 sum; for many rows, chunks of at most 4 MiB of the weight are
  dequantized into a reused buffer for torch's matmul).

How each product is computed (quantkit's AVX2 or portable C kernels, ``torch._int_mm``, float32
matmuls) is chosen by :mod:`quantkit.matmul` from the CPU's features; ``QUANTKIT_MATMUL`` forces
one path. Every W8A8 path gives the same bits.

- ``"dynamic"`` (W8A8): each input row gets its own alpha ``a_x = max|x|`` and is quantized exactly
  as DESIGN.md section 1 says (``q_x = clamp(rint(x * float32(127 / a_x)), -127, 127)``, the
  same codes as :func:`quantkit.reference.quantize_per_channel`), then::

      acc = q_x @ W.T                                (int8 x int8 -> exact int32)
      y   = float32(acc) * (s_x[:, None] * s_w[None, :]) + b       s_x = float32(a_x / 127)

- ``"static"``: the same with one calibrated activation alpha for every row (float32 buffer
  ``input_alpha``, the clipping range; ``s_x = float32(alpha / 127)``, multiplier
  ``float32(127 / alpha)``; inputs beyond +-alpha clip to +-127). Alpha 0 (a layer whose
  calibration inputs were all zero) gives zero codes and ``s_x = 0``: the output is the bias.

- block-scaled weights (``block_size=B``, a power of two in [64, 4096] dividing in_features):
  ``weight_scale`` holds one scale per block of B consecutive weights of a row (flat, row-major:
  ``(out_features * in_features / B,)``, the layout of a blockwise :class:`QTensor`; S is its
  ``(out_features, in_features / B)`` view). Weight-only computes ``y = x @ W_hat.T + b`` with
  ``W_hat = float32(W) * S[:, k // B]``; W8A8 sums one exact int32 product per block,
  ``t = sum_g float32(q_x[:, g] @ W[:, g].T) * S[:, g]`` (in block order, float32), then
  ``y = t * s_x[:, None] + b`` (:func:`quantkit.reference.linear_w8a8_blocks`). Finer scales
  follow the weight's local range: the error is that of per-block quantization.

- smoothed (a layer built from a :class:`quantkit.smooth.SmoothLinear`): a float32 buffer
  ``input_scale`` (``(in_features,)``, ``float32(1 / s)``) multiplies x first, in float32, and
  every formula above applies to ``x * input_scale``; W's codes are those of ``W * s``. The
  product stays int8 x int8 -> int32 (DESIGN.md section 8).

On the CPU the activation codes come from the numba kernels (the row maxima through
``calibrate(x, "max", axis=0)``); the product and its rescale are :mod:`quantkit.matmul`'s
(fused in quantkit's CPU kernels, one numba pass after the torch-based products); elsewhere the
same arithmetic runs as torch ops.

Both products are torch custom ops (:mod:`quantkit.linear_ops`: ``quantkit::linear_w8``,
``quantkit::linear_w8a8``, and ``quantkit::linear_int8_grad_input`` for the backward) with fake
implementations, so ``torch.compile`` treats them as opaque calls, and with an autograd formula
so gradients reach the input (weights are frozen int8 buffers; the bias gets a gradient when it
requires one). The gradient to the input is that of the dequantized linear,
``dL/dx = dL/dy @ W_hat``, in every mode (activation rounding and clipping are passed straight
through).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional

import numpy as np
import torch
from torch import nn

from ._constants import QMAX
from .linear_ops import int8_linear, linear_w8, linear_w8a8, quantize_rows  # noqa: F401
from .ops import quantize
from .qtensor import QTensor, with_checked_scales
from .smooth import replaceable_linears, run_with_input_hooks, warn_kept

ACTIVATION_MODES = (None, "dynamic", "static")


# --------------------------------------------------------------------------------------------------
# QuantLinear
# --------------------------------------------------------------------------------------------------

def _weight_alpha(w: torch.Tensor, method: str, block_size=None) -> np.ndarray:
    """One alpha per output channel (row) of a Linear weight, or per block of ``block_size``
    weights of a row, from :func:`quantkit.calibrate`."""
    if not isinstance(method, str):
        raise TypeError(f"weight_method must be a calibration method name, got {method!r}")
    from .calibration import calibrate   # deferred: calibration is a sibling layer, loaded on use

    if block_size is None:
        return np.asarray(calibrate(w, method, axis=0), dtype=np.float32)
    return np.asarray(calibrate(w, method, block_size=block_size), dtype=np.float32)


def _check_layer_block_size(block_size, in_features: int):
    """None, or a power of two in [64, 4096] dividing ``in_features`` (ValueError otherwise)."""
    if block_size is None:
        return None
    from ._arrays import check_block_size

    block_size = check_block_size(block_size)
    if in_features % block_size:
        raise ValueError(f"block_size={block_size} does not divide in_features={in_features}: "
                         f"a block of weights must lie within one row")
    return block_size


def _check_mode(activations):
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"activations must be None, 'dynamic' or 'static', got {activations!r}")


def _check_static_alpha(value, name: str) -> np.float32:
    """A static activation alpha as the kernels take it: one real number (not a bool) that
    ``quantkit._arrays.alpha_array`` accepts (in float32: finite, 0 or in [MIN_POSITIVE_ALPHA,
    MAX_ALPHA]; 0 gives zero codes). TypeError / ValueError starting with ``name`` otherwise."""
    from ._arrays import alpha_array

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    a = np.asarray(value)
    if a.dtype.kind not in "fiu" or a.size != 1:
        raise TypeError(f"{name} must be one real number, got {value!r}")
    try:
        return alpha_array(a.reshape(()), ())[()]
    except (TypeError, ValueError) as exc:
        error = TypeError if isinstance(exc, TypeError) else ValueError
        raise error(f"{name} (the static activation alpha): {exc}") from None


class QuantLinear(nn.Module):
    """An int8 replacement for ``nn.Linear``; see the module docstring for the arithmetic.

    Buffers: ``weight`` (int8, ``(out_features, in_features)``), ``weight_scale`` (float32,
    ``(out_features,)``, or ``(out_features * in_features / block_size,)`` with ``block_size``), and
    for ``activations="static"`` ``input_alpha`` (float32, 0-d, the
    activation clipping range). ``bias`` (float32) is a Parameter that does not require grad.
    Build one with :meth:`from_float`; the constructor makes an all-zero layer for
    ``load_state_dict``. Inputs are floating point with last dimension ``in_features``; the layer
    computes in float32 (float16, bfloat16 and float64 inputs are converted) and returns the
    input's dtype, shape ``(*x.shape[:-1], out_features)``. Dtype casts of the module keep its
    float32 state float32.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 activations: Optional[str] = None, input_scale: bool = False,
                 block_size: Optional[int] = None, device=None):
        super().__init__()
        _check_mode(activations)
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        in_features, out_features = int(in_features), int(out_features)
        self.in_features = in_features
        self.out_features = out_features
        self.activations = activations
        self.block_size = _check_layer_block_size(block_size, self.in_features)
        scales = out_features if block_size is None else out_features * (in_features // block_size)
        self.register_buffer("weight", torch.zeros((out_features, in_features), dtype=torch.int8,
                                                   device=device))
        self.register_buffer("weight_scale", torch.zeros(scales, dtype=torch.float32,
                                                         device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=torch.float32, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.register_buffer("input_alpha", torch.zeros((), dtype=torch.float32, device=device)
                             if activations == "static" else None)
        self.register_buffer("input_scale", torch.ones(in_features, dtype=torch.float32,
                                                       device=device) if input_scale else None)
        #: Figures from :meth:`from_float` (alpha range, SQNR, bytes); {} for a loaded layer.
        self.quant_stats = {}

    @classmethod
    def from_float(cls, linear: nn.Linear, *, weight_method: str = "mse",
                   activations: Optional[str] = None, act_alpha=None,
                   block_size: Optional[int] = None) -> "QuantLinear":
        """Quantize an ``nn.Linear`` (which is left unchanged).

        Args:
            linear: the float layer.
            weight_method: calibration method for the per-output-channel weight alphas
                (``quantkit.calibrate(weight, weight_method, axis=0)``).
            activations: None (weight-only), "dynamic" (per-row alpha = max|row| at run time) or
                "static" (one alpha, ``act_alpha``, for every row).
            act_alpha: the activation clipping range for "static": a real number whose float32
                value is finite and 0 (zero codes: the output is the bias) or in
                [``MIN_POSITIVE_ALPHA``, ``MAX_ALPHA``]; see :func:`quantize_model` to find it
                from calibration data.
            block_size: None (one scale per output channel) or B, a power of two in [64, 4096]
                dividing ``in_features``: one scale per block of B consecutive weights of a row,
                calibrated per block (``calibrate(weight, weight_method, block_size=B)``).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float expects an nn.Linear, got {type(linear).__name__}")
        if linear.weight.device.type == "meta":
            raise ValueError("from_float: the layer's weight is on the meta device (no values to "
                             "quantize); load its weights first")
        _check_mode(activations)
        if activations == "static":
            if act_alpha is None:
                raise ValueError("activations='static' needs act_alpha (the activation clipping "
                                 "range); quantize_model(..., activations='static', "
                                 "calib_data=...) finds it from calibration data")
            act_alpha = _check_static_alpha(act_alpha, "act_alpha")
        elif act_alpha is not None:
            raise ValueError("act_alpha is only used with activations='static'")
        block_size = _check_layer_block_size(block_size, linear.in_features)
        w = linear.weight.detach().to(device="cpu", dtype=torch.float32)
        alpha = _weight_alpha(w, weight_method, block_size)
        q = (quantize(w, alpha, axis=0) if block_size is None
             else quantize(w, alpha, block_size=block_size))
        input_scale = getattr(linear, "input_scale", None)    # a SmoothLinear's multiplier
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    activations=activations, input_scale=input_scale is not None,
                    block_size=block_size)
        if input_scale is not None:
            layer.input_scale.copy_(input_scale.detach().to(device="cpu", dtype=torch.float32))
        layer.weight.copy_(q.data)
        layer.weight_scale.copy_(q.scale)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().to(torch.float32))
        if activations == "static":
            layer.input_alpha.fill_(float(act_alpha))
        layer.quant_stats = _weight_stats(w, q, alpha, linear.weight.element_size())
        if activations == "static":
            layer.quant_stats["act_alpha"] = float(act_alpha)
        layer.train(linear.training)     # the replaced layer's mode, not a new module's
        return layer.to(linear.weight.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # torch's copy_ would cast silently (a float weight of 200.0 becomes int8 -56, a float
        # checkpoint's weights int8 zeros): the buffers' dtypes must match exactly, and the values
        # must be what the kernels take (codes in [-QMAX, QMAX], scales finite and >= 0, a valid
        # static alpha). Checked before anything is copied: a refused state leaves the layer as
        # it was.
        for key in ("weight", "weight_scale", "input_alpha", "input_scale"):
            value, own = state_dict.get(prefix + key), getattr(self, key)
            if isinstance(value, torch.Tensor) and own is not None and value.dtype != own.dtype:
                hint = (" (a float checkpoint? quantize it with quantize_model, or load a quantkit "
                        "checkpoint with load_quantized)" if key == "weight" else "")
                raise ValueError(f"tensor {prefix + key!r}: the state dict holds {value.dtype}, "
                                 f"QuantLinear needs {own.dtype}{hint}")
        _check_quant_values(prefix, state_dict)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        # Dtype casts of the module (.half(), .bfloat16(), .double(), .to(dtype)) leave the
        # float32 scales, bias, input_alpha and input_scale float32 (section 1 of DESIGN.md: a
        # float16 scale rounds or underflows, a bfloat16 one is no scale the kernels take);
        # device moves apply as usual.
        def keep_float32(t):
            out = fn(t)
            if t.dtype == torch.float32 and out.dtype != torch.float32:
                out = t.to(device=out.device)
            return out

        return super()._apply(keep_float32, recurse)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input   # nn.Linear's argument name: a caller may pass it by keyword
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"QuantLinear expects a torch tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"QuantLinear expects floating-point input, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear expects input of shape (..., {self.in_features}), got "
                             f"{tuple(x.shape)}")
        x2 = x.reshape(-1, self.in_features).to(torch.float32)   # computed in float32
        if self.input_scale is not None:
            x2 = x2 * self.input_scale
        scale = self._scale_matrix()
        y = int8_linear(x2, self.weight, scale, self.bias, self.input_alpha,
                        w8a8=self.activations is not None)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _scale_matrix(self) -> torch.Tensor:
        """``weight_scale`` as the products take it: ``(N,)`` per row, ``(N, K / B)`` per block."""
        if self.block_size is None:
            return self.weight_scale
        return self.weight_scale.view(self.out_features, self.in_features // self.block_size)

    def dequantized_weight(self) -> torch.Tensor:
        """``float32(weight) * scale`` (per row, or per block of ``block_size`` weights; times
        ``input_scale[None, :]`` for a smoothed layer): the float weight this layer stands for."""
        scale = self._scale_matrix()
        if self.block_size is None:
            w = self.weight.to(torch.float32) * scale[:, None]
        else:
            w = self.weight.to(torch.float32) * scale.repeat_interleave(self.block_size, dim=1)
        return w if self.input_scale is None else w * self.input_scale[None, :]

    def qtensor(self) -> QTensor:
        """The weight as a QTensor (per channel along axis 0, or blockwise with ``block_size``),
        sharing this layer's buffers."""
        # the buffers' values were checked when they were made or loaded: no pass (or device
        # sync) over the scales here
        if self.block_size is None:
            return with_checked_scales(self.weight, self.weight_scale, axis=0)
        return with_checked_scales(self.weight, self.weight_scale, block_size=self.block_size)

    def checkpoint_entry(self) -> dict:
        """What a checkpoint records to rebuild this layer (``"quantkit.modules"``)."""
        entry = {"type": "QuantLinear", "in_features": self.in_features,
                 "out_features": self.out_features, "bias": self.bias is not None,
                 "activations": self.activations}
        if self.input_scale is not None:
            entry["input_scale"] = True
        if self.block_size is not None:
            entry["block_size"] = self.block_size
        return entry

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activations={self.activations!r}"
                + ("" if self.block_size is None else f", block_size={self.block_size}")
                + (", smoothed" if self.input_scale is not None else ""))


def _weight_stats(w: torch.Tensor, q: QTensor, alpha: np.ndarray, element_size: int) -> dict:
    """Alpha range, SQNR in dB (``10 log10(sum w^2 / sum (w - w_hat)^2)``) and weight bytes."""
    w64 = w.numpy().astype(np.float64)
    err = w64 - q.dequantize().numpy().astype(np.float64)
    signal, noise = float(np.sum(w64 * w64)), float(np.sum(err * err))
    if noise == 0:
        sqnr = math.inf
    else:
        sqnr = 10 * math.log10(signal / noise) if signal > 0 else -math.inf
    return {"alpha_min": float(alpha.min()) if alpha.size else 0.0,
            "alpha_max": float(alpha.max()) if alpha.size else 0.0,
            "sqnr_db": sqnr, "bytes_before": int(w.numel()) * int(element_size),
            "bytes_after": int(q.nbytes), "block_size": q.block_size}


# --------------------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------------------

class QuantReport(list):
    """One dict per quantized layer: name, shape, alpha_min, alpha_max, sqnr_db, bytes_before,
    bytes_after (weight bytes: float before; int8 codes plus float32 scales after) and, for
    "static", act_alpha. ``str(report)`` is a table with the totals."""

    def totals(self) -> dict:
        before = sum(r["bytes_before"] for r in self)
        after = sum(r["bytes_after"] for r in self)
        return {"layers": len(self), "bytes_before": before, "bytes_after": after,
                "ratio": before / after if after else math.nan}

    def __str__(self) -> str:
        cells = [[r["name"], "x".join(str(d) for d in r["shape"]),
                  f"{r['alpha_min']:.4g} - {r['alpha_max']:.4g}", f"{r['sqnr_db']:.2f}",
                  f"{r['bytes_before']:,}", f"{r['bytes_after']:,}"] for r in self]
        t = self.totals()
        cells.append([f"total: {t['layers']} layers", "", "", "", f"{t['bytes_before']:,}",
                      f"{t['bytes_after']:,}"])
        header = ["layer", "shape", "alpha range", "SQNR dB", "bytes before", "after"]
        widths = [max(len(str(row[i])) for row in [header, *cells]) for i in range(len(header))]

        def line(row):
            return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths)))

        return "\n".join([line(header), *map(line, cells)]) + f"  ({t['ratio']:.2f}x smaller)"


def _observe_inputs(model, names, calib_data, method):
    """The activation alpha of each named Linear's input over ``calib_data`` (an Observer each)."""
    from .calibration import Observer   # deferred: calibration is a sibling layer

    if calib_data is None:
        raise ValueError("activations='static' needs calib_data: an iterable of model inputs "
                         "(tuples are unpacked, dicts passed as keywords)")
    modules = dict(model.named_modules())
    observers = {name: Observer(method) for name in names}
    seen = dict.fromkeys(names, 0)

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach()
            scale = getattr(module, "input_scale", None)     # a SmoothLinear quantizes x * scale
            if scale is not None:
                x = x * scale
            try:
                observers[name].update(x.to(device="cpu", dtype=torch.float32).reshape(-1))
            except ValueError as exc:
                raise ValueError(f"calibration data at the input of layer {name!r}: {exc}") \
                    from None
            seen[name] += 1
        return hook

    run_with_input_hooks(model, calib_data, modules, names, hook_for)
    unseen = [name for name, count in seen.items() if count == 0]
    if unseen:
        raise ValueError(f"calibration data never reached layer {unseen[0]!r} "
                         f"({len(unseen)} layer(s) unseen); is calib_data empty?")
    return {name: float(obs.alpha()) for name, obs in observers.items()}


#: nn.Module's hook dictionaries, handed from a float Linear to the QuantLinear replacing it.
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
               "_backward_pre_hooks")


def _weight_hook_types() -> tuple:
    """Forward pre-hooks that rebuild ``module.weight`` from the float layer's own tensors
    (pruning masks, weight_norm's g and v, spectral_norm's u and v): the QuantLinear has none of
    them, and its int8 weight already holds their result."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return (BasePruningMethod, WeightNorm, SpectralNorm)


def _move_hooks(old: nn.Module, layer: nn.Module) -> None:
    """The hooks of the float layer ``old``, attached to its replacement ``layer`` (the same dicts,
    so the caller's handles still remove them), less the weight-rebuilding ones."""
    weight_hooks = _weight_hook_types()
    for attr in _HOOK_DICTS:
        hooks = getattr(old, attr)
        if any(isinstance(h, weight_hooks) for h in hooks.values()):
            hooks = type(hooks)((k, h) for k, h in hooks.items()
                                if not isinstance(h, weight_hooks))
        setattr(layer, attr, hooks)
    # which kind _backward_hooks holds (True: register_full_backward_hook); without it nn.Module
    # calls none of them
    layer._is_full_backward_hook = old._is_full_backward_hook


def quantize_model(model: nn.Module, *, weights: str = "mse", activations: Optional[str] = None,
                   calib_data=None, skip=(), act_method: str = "mse", smooth=None,
                   block_size: Optional[int] = None, inplace: bool = False) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by a :class:`QuantLinear`; return the model.

    Args:
        model: any ``nn.Module``. Copied first (``copy.deepcopy``) unless ``inplace=True``.
        weights: calibration method for the per-channel weight alphas ("mse", "max", ...).
        activations: None (weight-only), "dynamic" or "static" (see :class:`QuantLinear`).
        calib_data: for "static", an iterable of model inputs (a tuple is unpacked as positional
            arguments, a dict passed as keywords, anything else as the one argument); it is run
            through the float model with an ``Observer(act_method)`` on each Linear's input.
        skip: fnmatch patterns of module names (as in ``named_modules()``) to leave in float.
        act_method: calibration method of the activation Observers ("static" only).
        smooth: None, or the SmoothQuant migration strength alpha in [0, 1]: the model is first
            passed through :func:`quantkit.smooth.smooth_model` with ``calib_data`` (observed on
            the float model; needed then for any ``activations``) and the same ``skip``.
        block_size: None (one weight scale per output channel) or B, a power of two in
            [64, 4096]: one scale per block of B weights of a row (see :class:`QuantLinear`).
            Layers whose ``in_features`` B does not divide keep per-channel scales (a warning
            names them; the report's ``block_size`` is None for them).
        inplace: modify ``model`` itself instead of a copy.

    The returned model has ``quantkit_report``, a :class:`QuantReport` with one entry per replaced
    layer. A model with no Linear to replace is returned unchanged, with a warning. Every
    QuantLinear is built before any layer is replaced; an error names the layer. Hooks registered
    on a replaced Linear stay attached to its QuantLinear (whose ``weight`` is the int8 codes).
    Linear layers whose replacement's forward would not run stay float, with a warning naming
    them (:func:`quantkit.smooth.replaceable_linears`: subclasses with their own forward,
    ``nn.MultiheadAttention``'s ``out_proj``, ``nn.TransformerEncoderLayer``'s feed-forward).
    Static calibration runs the model in eval mode and restores its modes afterwards.
    """
    import copy

    _check_mode(activations)
    if block_size is not None:
        from ._arrays import check_block_size

        block_size = check_block_size(block_size)
    if isinstance(skip, str):
        skip = (skip,)
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model expects an nn.Module, got {type(model).__name__}")
    if activations == "static" and calib_data is None:
        raise ValueError("activations='static' needs calib_data: an iterable of model inputs")
    if smooth is not None:
        from .smooth import smooth_model

        if calib_data is None:
            raise ValueError("smooth= needs calib_data: an iterable of model inputs")
        if not isinstance(calib_data, (list, tuple)):
            calib_data = list(calib_data)        # read twice: smoothing and static observers
        model = smooth_model(model, calib_data, alpha=smooth, skip=skip, inplace=inplace)
        inplace = True                           # smooth_model already copied unless inplace
    if not inplace:
        model = copy.deepcopy(model)
    names, kept = replaceable_linears(model, skip)
    warn_kept("quantize_model", kept)
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    if conv1d:      # transformers' GPT-2-style projection: a Linear with a transposed weight
        warnings.warn(f"quantize_model: {len(conv1d)} Conv1D layer(s) stay float (only "
                      f"nn.Linear is replaced): {', '.join(conv1d[:3])}"
                      f"{', ...' if len(conv1d) > 3 else ''}", stacklevel=2)
    report = QuantReport()
    if not names:
        warnings.warn("quantize_model: the model has no nn.Linear layer to quantize (after skip); "
                      "it is returned unchanged", stacklevel=2)
        return model
    act_alphas = (_observe_inputs(model, names, calib_data, act_method)
                  if activations == "static" else {})
    modules = dict(model.named_modules())
    per_channel = [name for name in names
                   if block_size is not None and modules[name].in_features % block_size]
    if per_channel:
        warnings.warn(f"quantize_model: block_size={block_size} does not divide in_features of "
                      f"{len(per_channel)} layer(s) ({', '.join(per_channel[:3])}"
                      f"{', ...' if len(per_channel) > 3 else ''}); they keep per-channel weight "
                      f"scales", stacklevel=2)
    layers = {}
    for name in names:
        try:
            layers[name] = QuantLinear.from_float(
                modules[name], weight_method=weights, activations=activations,
                act_alpha=act_alphas.get(name),
                block_size=None if name in per_channel else block_size)
        except (TypeError, ValueError) as exc:
            error = TypeError if isinstance(exc, TypeError) else ValueError
            raise error(f"layer {name!r}: {exc}") from None
    by_module = {id(modules[name]): layer for name, layer in layers.items()}
    # every path to a replaced Linear: one used in two places (named_modules lists it once)
    paths = [(path, by_module[id(m)]) for path, m in model.named_modules(remove_duplicate=False)
             if id(m) in by_module]
    for name, layer in layers.items():
        _move_hooks(modules[name], layer)
    for path, layer in paths:
        if path == "":
            model = layer           # the model is itself a Linear
        else:
            parent_name, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    for name, layer in layers.items():
        report.append({"name": name, "shape": (layer.out_features, layer.in_features),
                       **layer.quant_stats})
    model.quantkit_report = report
    return model


_ENTRY_KEYS = {"type", "in_features", "out_features", "bias", "activations", "input_scale",
               "block_size"}


def _check_module_entry(name, entry) -> None:
    """One ``"quantkit.modules"`` entry: a JSON object with type "QuantLinear", int
    in_features / out_features, bool bias, a known activations mode, an optional bool
    input_scale and an optional block_size, and no other key. ValueError naming the module."""
    if not isinstance(entry, dict):
        raise ValueError(f"module {name!r}: checkpoint entry must be a JSON object, got {entry!r}")
    if entry.get("type") != "QuantLinear":
        raise ValueError(f"module {name!r}: unknown quantized module type {entry.get('type')!r}")
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise ValueError(f"module {name!r}: bad checkpoint entry {entry!r}: unknown key(s) "
                         f"{unknown}")
    for key, kind in (("in_features", int), ("out_features", int), ("bias", bool),
                      ("input_scale", bool)):
        value = entry.get(key, False if key == "input_scale" else None)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"module {name!r}: bad checkpoint entry {entry!r}: {key} must be "
                             f"{'an int' if kind is int else 'true or false'}")
    if "activations" not in entry or entry["activations"] not in ACTIVATION_MODES:
        raise ValueError(f"module {name!r}: bad checkpoint entry {entry!r}: activations must be "
                         f"null, 'dynamic' or 'static'")


def _replacement_layers(model: nn.Module, modules: dict, entries) -> dict:
    """The empty QuantLinear each checked ``"quantkit.modules"`` entry puts in ``model``, built
    beside it (``model`` is not changed). The root entry ``""`` must match a QuantLinear model."""
    if not isinstance(entries, dict):
        raise ValueError(f"checkpoint metadata quantkit.modules must be a JSON object, got "
                         f"{entries!r}")
    replacements = {}
    for name, entry in entries.items():
        _check_module_entry(name, entry)
        old = modules.get(name)
        if not isinstance(old, (nn.Linear, QuantLinear)):
            raise ValueError(f"module {name!r}: the checkpoint has a QuantLinear there, the model "
                             f"has {type(old).__name__ if old is not None else 'nothing'}")
        shape = (entry["in_features"], entry["out_features"], entry["bias"])
        if shape != (old.in_features, old.out_features, old.bias is not None):
            raise ValueError(f"module {name!r}: checkpoint layer (in, out, bias) = {shape}, model "
                             f"layer = {(old.in_features, old.out_features, old.bias is not None)}")
        if name == "":
            if not (isinstance(model, QuantLinear) and model.activations == entry["activations"]):
                raise ValueError("the checkpoint holds a single QuantLinear: load it into a "
                                 "QuantLinear built with the same activations mode")
            continue
        try:
            replacements[name] = QuantLinear(old.in_features, old.out_features,
                                             old.bias is not None,
                                             activations=entry["activations"],
                                             input_scale=entry.get("input_scale", False),
                                             block_size=entry.get("block_size"),
                                             device=old.weight.device)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"module {name!r}: bad checkpoint entry {entry!r}: {exc}") from None
    return replacements


def _check_state_fits(model: nn.Module, replacements: dict, state: dict) -> None:
    """``state`` has exactly the tensors ``model`` will have once ``replacements`` are swapped
    in, each of the same dtype and shape. ValueError naming a tensor otherwise."""
    expected = {}
    for key, value in model.state_dict().items():
        if not any(key.startswith(n + ".") for n in replacements):
            expected[key] = value
    for name, layer in replacements.items():
        expected.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        which = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise ValueError(f"checkpoint does not fit the model: {len(missing)} missing and "
                         f"{len(unexpected)} unexpected tensor(s), e.g. {which}")
    for key, value in expected.items():
        got = state[key]
        if not isinstance(got, torch.Tensor):
            raise ValueError(f"tensor {key!r}: checkpoint holds a {type(got).__name__}, model "
                             f"expects a torch tensor")
        if got.dtype != value.dtype or tuple(got.shape) != tuple(value.shape):
            raise ValueError(f"tensor {key!r}: checkpoint {got.dtype} {tuple(got.shape)}, model "
                             f"expects {value.dtype} {tuple(value.shape)}")


def _check_quant_values(prefix: str, state: dict) -> None:
    """The values a QuantLinear at ``prefix`` needs from ``state`` (dtypes and shapes checked
    before), for those of its tensors that ``state`` holds: weight codes in [-QMAX, QMAX], weight
    scales finite and >= 0, and a static ``input_alpha`` the kernels accept
    (:func:`_check_static_alpha`). ValueError naming the tensor."""
    from ._arrays import check_scale_values

    codes = state.get(prefix + "weight")
    if isinstance(codes, torch.Tensor) and codes.numel() and int(codes.min()) < -QMAX:
        raise ValueError(f"tensor {prefix + 'weight'!r}: int8 weight codes must lie in "
                         f"[-{QMAX}, {QMAX}]; the checkpoint has -128")
    scale = state.get(prefix + "weight_scale")
    if isinstance(scale, torch.Tensor):
        try:
            check_scale_values(scale)
        except ValueError as exc:
            raise ValueError(f"tensor {prefix + 'weight_scale'!r}: {exc}") from None
    alpha = state.get(prefix + "input_alpha")
    if isinstance(alpha, torch.Tensor):
        _check_static_alpha(alpha, f"tensor {prefix + 'input_alpha'!r}")


def load_quantized(model: nn.Module, source) -> nn.Module:
    """Load a checkpoint saved with ``quantkit.save(quantized_model, path)`` into ``model``.

    ``model`` is the float architecture (or an already quantized one): each layer the checkpoint
    records in ``"quantkit.modules"`` is replaced by an empty QuantLinear of the recorded mode,
    then every tensor is loaded (strict). ``source`` is a path or a :class:`quantkit.io.Checkpoint`.
    Everything is checked before ``model`` is touched: the ``"quantkit.modules"`` entries, the
    tensors' names, shapes and dtypes, and each QuantLinear's values (codes in [-127, 127],
    scales finite and >= 0, a valid static ``input_alpha``); a mismatch raises ValueError naming
    the module or tensor and leaves ``model`` as it was. ``model`` is modified in place and
    returned.
    """
    from .io import Checkpoint, load

    checkpoint = source if isinstance(source, Checkpoint) else load(source)
    state = checkpoint.state_dict()
    modules = dict(model.named_modules(remove_duplicate=False))   # a shared module at each path
    entries = _with_inferred_entries(checkpoint, modules, state)
    replacements = _replacement_layers(model, modules, entries)
    replacements = _one_layer_per_module(modules, replacements, entries)
    _check_state_fits(model, replacements, state)
    quantized = {name for name, m in modules.items() if isinstance(m, QuantLinear)}
    for name in sorted(quantized | set(replacements)):
        _check_quant_values(name + "." if name else "", state)
    for name, layer in replacements.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    model.load_state_dict(state, strict=True)
    return model


def _with_inferred_entries(checkpoint, modules: dict, state: dict) -> dict:
    """The checkpoint's ``"quantkit.modules"`` entries, plus a weight-only QuantLinear entry for
    each int8 ``PREFIX.weight`` that has none (a checkpoint written by ``quantkit quantize``)
    where the model has an ``nn.Linear`` at ``PREFIX``: per channel along axis 0, per block of a
    size dividing in_features, or per tensor (its one scale repeated per row in ``state``, the
    same weights). Any other int8 tensor: ValueError naming it."""
    from .io import SCALE_SUFFIX

    if not isinstance(checkpoint.modules, dict):
        return checkpoint.modules          # _replacement_layers refuses it with its message
    entries = dict(checkpoint.modules)
    described = {(n + "." if n else "") + "weight" for n in entries}
    for name, value in checkpoint.items():
        if not isinstance(value, QTensor) or name in described:
            continue
        prefix = "" if name == "weight" else (name[: -len(".weight")]
                                              if name.endswith(".weight") else None)
        layer = modules.get(prefix) if prefix is not None else None
        if isinstance(layer, QuantLinear):  # already int8 there: its tensors load into it
            if value.axis is None and value.block_size is None:
                state[name + SCALE_SUFFIX] = value.scale.reshape(1).expand(
                    layer.out_features).clone()
            continue
        if not isinstance(layer, nn.Linear):
            what = type(layer).__name__ if layer is not None else "no Linear layer"
            raise ValueError(f"tensor {name!r} is int8 in the checkpoint, but the model has "
                             f"{what} there, which has no int8 form here: quantize without it "
                             f"(quantkit quantize --skip), or read the file with quantkit.load")
        q_shape, k = tuple(value.data.shape), layer.in_features
        if q_shape != (layer.out_features, k):
            continue                       # _check_state_fits names the shape mismatch
        entry = {"type": "QuantLinear", "in_features": k, "out_features": layer.out_features,
                 "bias": layer.bias is not None, "activations": None}
        if value.block_size is not None:
            if k % value.block_size:
                raise ValueError(f"tensor {name!r}: blocks of {value.block_size} weights cross "
                                 f"the rows of a {k}-wide layer; quantize it per channel")
            entry["block_size"] = value.block_size
        elif value.axis is None:           # per tensor: the same scale for every row
            state[name + SCALE_SUFFIX] = value.scale.reshape(1).expand(
                layer.out_features).clone()
        elif value.axis != 0:
            raise ValueError(f"tensor {name!r} is quantized along axis {value.axis}; a "
                             f"QuantLinear keeps one scale per output row (axis 0)")
        entries[prefix] = entry
    return entries


def _one_layer_per_module(modules: dict, replacements: dict, entries: dict) -> dict:
    """``replacements`` with the paths that hold one module (a Linear used in two places) sharing
    one QuantLinear, as they share the Linear; their checkpoint entries must agree."""
    first, out = {}, {}
    for name, layer in replacements.items():
        other = first.setdefault(id(modules[name]), name)
        if other == name:
            out[name] = layer
        elif entries[name] != entries[other]:
            raise ValueError(f"modules {other!r} and {name!r} are one module of the model, but "
                             f"the checkpoint records them differently")
        else:
            out[name] = out[other]
    return out
