"""SmoothQuant-style smoothing: move activation range into the weights, exactly in float.

For a Linear ``y = x @ W.T + b`` with input channels j, and any positive per-channel factors s_j::

    y = (x / s) @ (W * s).T + b           (W * s: column j of W multiplied by s_j)

holds exactly in real arithmetic, so the float model computes the same function up to float32
rounding. With the factors of Xiao et al. 2023 (SmoothQuant), from calibration inputs X::

    s_j = max|X_j| ** a / max|W[:, j]| ** (1 - a)          (a = ``alpha``, 0 <= a <= 1)

the outlier channels of x (large max|X_j|) are divided down and the matching weight columns
scaled up, so a per-row int8 activation range is no longer spent on a few channels. A channel
where max|X_j| or max|W[:, j]| is 0 gets s_j = 1 (nothing to balance).

:class:`SmoothLinear` is an ``nn.Linear`` whose ``weight`` is already ``W * s`` and which
multiplies its input by the float32 buffer ``input_scale = float32(1 / s)`` first;
:class:`quantkit.nn.QuantLinear` keeps that multiplier when it quantizes a SmoothLinear, so the
int8 product stays ``q(x * input_scale) @ q(W * s).T`` (int8 x int8 -> exact int32).
"""

from __future__ import annotations

import copy
import fnmatch
import numbers
import warnings

import torch
from torch import nn

__all__ = ["SmoothLinear", "smoothing_factors", "smooth_model", "input_absmax", "run_batch"]


class SmoothLinear(nn.Linear):
    """``nn.Linear`` applied to ``x * input_scale``: ``y = (x * input_scale) @ weight.T + bias``.

    ``input_scale`` is a float32 buffer of shape ``(in_features,)``. Built by
    :meth:`from_linear`, which sets ``weight = W * s`` (columns) and ``input_scale = 1 / s``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("input_scale", torch.ones(in_features, device=device,
                                                       dtype=torch.float32))

    @classmethod
    def from_linear(cls, linear: nn.Linear, s: torch.Tensor) -> "SmoothLinear":
        """A SmoothLinear computing what ``linear`` computes, with factors ``s`` (left unchanged)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        s = torch.as_tensor(s, dtype=torch.float32, device=linear.weight.device)
        if s.shape != (linear.in_features,):
            raise ValueError(f"smoothing factors must have shape ({linear.in_features},), got "
                             f"{tuple(s.shape)}")
        if not (bool(torch.isfinite(s).all()) and bool((s > 0).all())):
            raise ValueError("smoothing factors must be finite and > 0")
        old = getattr(linear, "input_scale", None)     # an already smoothed layer composes
        # skip_init: no random initialisation of a weight that is overwritten below
        layer = nn.utils.skip_init(cls, linear.in_features, linear.out_features,
                                   bias=linear.bias is not None, device=linear.weight.device,
                                   dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight * s.to(linear.weight.dtype)[None, :])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
            inv = torch.ones_like(s) / s
            layer.input_scale.copy_(inv if old is None else old * inv)
        layer.weight.requires_grad_(linear.weight.requires_grad)
        if linear.bias is not None:
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x * self.input_scale.to(x.dtype), self.weight, self.bias)


def run_with_input_hooks(model: nn.Module, calib_data, modules: dict, names, hook_for) -> None:
    """Run every calibration batch through ``model`` in eval mode (dropout off, as at inference)
    and without grad, with ``hook_for(name)`` as a forward pre-hook on ``modules[name]`` for each
    name (called as ``hook(module, (input,))`` also where the layer is called as
    ``layer(input=x)``); afterwards the hooks are removed and every module's training flag is
    restored."""
    def positional(hook):
        def wrapped(module, args, kwargs):
            if args or "input" in kwargs:
                hook(module, args if args else (kwargs["input"],))
        return wrapped

    modes = [(m, m.training) for m in model.modules()]
    handles = [modules[n].register_forward_pre_hook(positional(hook_for(n)), with_kwargs=True)
               for n in names]
    try:
        model.eval()
        with torch.no_grad():
            for batch in calib_data:
                run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training


def run_batch(model: nn.Module, batch):
    """Run one calibration batch: a tuple/list is unpacked, a dict passed as keywords."""
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number in [0, 1], got {alpha!r}")
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return alpha


def replaceable_linears(model: nn.Module, skip=()) -> tuple[list, list]:
    """(names, kept): the ``nn.Linear`` modules of ``model`` (not matched by the fnmatch patterns
    ``skip``) that a layer of the same interface (SmoothLinear, QuantLinear) can replace, and
    ``"name (why)"`` for each one that must stay as it is because a replacement's forward would
    not be what runs: a subclass that overrides ``forward`` (its own computation would be lost),
    ``nn.MultiheadAttention``'s ``out_proj`` (the attention reads its ``.weight`` itself) and
    ``nn.TransformerEncoderLayer``'s ``linear1`` / ``linear2`` (its inference fast path reads
    their weights). The one rule of quantize_model and smooth_model."""
    if isinstance(skip, str):
        skip = (skip,)
    modules = dict(model.named_modules())
    # a module used at two paths is one module: skipped at one path, it stays at every path
    skipped = {id(m) for n, m in model.named_modules(remove_duplicate=False)
               if any(fnmatch.fnmatchcase(n, p) for p in skip)}
    names, kept = [], []
    for name, m in modules.items():
        if not isinstance(m, nn.Linear) or id(m) in skipped:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = modules.get(parent_name) if name else None
        why = None
        if isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear):
            why = "nn.MultiheadAttention reads its weight directly"
        elif isinstance(parent, nn.TransformerEncoderLayer) and child in ("linear1", "linear2"):
            why = "nn.TransformerEncoderLayer's fast path reads its weight directly"
        elif type(m).forward not in (nn.Linear.forward, SmoothLinear.forward):
            why = f"{type(m).__name__} overrides forward"
        if why is None:
            names.append(name)
        else:
            kept.append(f"{name or '<the model>'} ({why})")
    return names, kept


def warn_kept(caller: str, kept: list) -> None:
    """The warning naming the Linear layers replaceable_linears keeps as they are."""
    if kept:
        warnings.warn(f"{caller}: {len(kept)} nn.Linear layer(s) kept as they are: "
                      f"{', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''}", stacklevel=3)


def _selected(model: nn.Module, skip) -> list[str]:
    names, kept = replaceable_linears(model, skip)
    warn_kept("smooth_model", kept)
    return [name for name in names if name]


def input_absmax(model: nn.Module, names, calib_data) -> dict:
    """``max|X_j|`` per input channel of each named Linear, over every batch of ``calib_data``.

    A batch is run as in :func:`quantkit.nn.quantize_model` (tuple unpacked, dict as keywords).
    Raises ValueError when the data is empty, never reaches a layer, or holds NaN/Inf there.
    """
    modules = dict(model.named_modules())
    amax = {}

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach().float()
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"calibration data at the input of layer {name!r} has NaN/Inf")
            m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).cpu()
            amax[name] = m if name not in amax else torch.maximum(amax[name], m)
        return hook

    run_with_input_hooks(model, calib_data, modules, names, hook_for)
    unseen = [n for n in names if n not in amax]
    if unseen:
        raise ValueError(f"calibration data never reached layer {unseen[0]!r} "
                         f"({len(unseen)} layer(s) unseen); is calib_data empty?")
    return amax


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5):
    """``s_j = max|X_j| ** alpha / max|W[:, j]| ** (1 - alpha)``, 1 where either max is 0.

    Computed in float64 and rounded to float32 once.
    """
    alpha = _check_alpha(alpha)
    a = torch.as_tensor(act_absmax, dtype=torch.float64).cpu()
    w = weight.detach().abs().amax(dim=0).to(device="cpu", dtype=torch.float64)
    if a.shape != w.shape:
        raise ValueError(f"act_absmax has shape {tuple(a.shape)}, the weight has "
                         f"{w.numel()} input channels")
    ok = (a > 0) & (w > 0)
    s = torch.where(ok, a.clamp(min=1e-300) ** alpha / w.clamp(min=1e-300) ** (1 - alpha),
                    torch.ones_like(a))
    s = s.to(torch.float32)
    # a factor that over/underflows float32 (extreme ranges) is left at 1
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))


def smooth_model(model: nn.Module, calib_data, *, alpha: float = 0.5, skip=(),
                 inplace: bool = False) -> nn.Module:
    """Replace every ``nn.Linear`` (not matched by ``skip``) by its :class:`SmoothLinear`.

    Args:
        model: an ``nn.Module``; copied first (``copy.deepcopy``) unless ``inplace=True``.
        calib_data: an iterable of model inputs (as :func:`quantkit.nn.quantize_model`); the
            per-channel input maxima are observed on the float model. Use training text, not the
            text you evaluate on.
        alpha: the migration strength a in [0, 1] (0: s = 1 / max|W_j|, 1: s = max|X_j|).
        skip: fnmatch patterns of module names to leave as they are (e.g. ``["lm_head"]``).
        inplace: modify ``model`` itself.

    The result computes the same function as ``model`` up to float32 rounding; quantize it with
    :func:`quantkit.nn.quantize_model` (or pass ``smooth=`` there). Raises TypeError for a
    non-module or a non-real alpha, ValueError for alpha outside [0, 1], no Linear to smooth,
    empty calibration data or calibration data that never reaches a layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"smooth_model expects an nn.Module, got {type(model).__name__}")
    alpha = _check_alpha(alpha)
    if calib_data is None:
        raise ValueError("smooth_model needs calib_data: an iterable of model inputs")
    names = _selected(model, skip)
    if not names:
        raise ValueError("smooth_model: the model has no nn.Linear layer to smooth (after skip)")
    amax = input_absmax(model, names, calib_data)     # observed before any copy or change
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for name in names:
        linear = modules[name]
        s = smoothing_factors(amax[name], linear.weight, alpha)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, SmoothLinear.from_linear(linear, s))
    model.quantkit_smoothing = {"alpha": alpha, "layers": len(names)}
    return model
