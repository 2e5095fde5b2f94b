"""The int8 Linear's torch operators: per-row activation codes and the two products.

``quantize_rows`` gives the W8A8 activation codes (one alpha per row, ``max|row|`` or a static
alpha). ``quantkit::linear_w8`` (weight-only), ``quantkit::linear_w8a8`` (W8A8) and
``quantkit::linear_int8_grad_input`` (their backward) are torch custom ops with fake
implementations, so ``torch.compile`` treats them as opaque calls, and with an autograd formula
so gradients reach the input: ``dL/dx = dL/dy @ W_hat`` in every mode (activation rounding and
clipping are passed straight through), the bias gets ``sum(dL/dy)`` when it requires a gradient,
and the int8 weights none. How each product is computed is :mod:`quantkit.matmul`'s choice; the
arithmetic of each mode is in :mod:`quantkit.nn`'s docstring and docs/DESIGN.md section 6.

Importing this module registers the ops (once per process); :mod:`quantkit.nn` imports it.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import matmul
from ._constants import MAX_ALPHA, MIN_POSITIVE_ALPHA, QMAX
from .ops import quantize

_F32_MAX = float(np.finfo(np.float32).max)
_PLAIN_BIAS = (type(None), torch.Tensor, torch.nn.Parameter)


# --------------------------------------------------------------------------------------------------
# The int8 products, eager implementations (quantkit.matmul chooses how each product runs)
# --------------------------------------------------------------------------------------------------

def quantize_rows(x: torch.Tensor, alpha: Optional[torch.Tensor] = None):
    """int8 codes of a 2-D float32 tensor, one alpha per row (``max|row|`` when ``alpha`` is None).

    Returns ``(codes, scale)`` with ``codes = clamp(rint(x * float32(127 / alpha)), -127, 127)``
    (0 where alpha == 0) and ``scale = float32(alpha / 127)`` (one per row), exactly
    :func:`quantkit.reference.quantize_per_channel` with ``axis=0``. A given ``alpha`` is a 0-d
    tensor, the same for every row. CPU tensors run on the numba kernels (``max|row|`` and the
    codes in one fused pass, equal to ``calibrate(x, "max", axis=0)`` then ``quantize``); others
    on torch ops with a true float32 division (``127.0 / t`` in torch computes
    ``127 * (1 / t)``, rounded twice: not DESIGN.md's multiplier). Non-finite input raises ValueError.
    """
    rows = x.shape[0]
    if x.device.type == "cpu":
        if alpha is None:
            from .backends.numba_nn import quantize_rows_absmax_numba

            codes, scale, bad = quantize_rows_absmax_numba(x.detach().contiguous().numpy())
            if bad:
                from .calibration import calibrate   # raises, naming the first NaN/Inf

                calibrate(x, "max", axis=0)
            return torch.from_numpy(codes), torch.from_numpy(scale)
        q = quantize(x, alpha.detach().cpu())     # per tensor: the same codes as per row
        return q.data, q.scale.expand(rows).contiguous()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("input has non-finite values (NaN or Inf)")
    if alpha is None:
        alpha = x.abs().amax(dim=1) if x.shape[1] else x.new_zeros(rows)
        # as calibrate(): a row max below MIN_POSITIVE_ALPHA (127 / alpha overflows) becomes 0,
        # one above MAX_ALPHA (127 * scale overflows) MAX_ALPHA
        alpha = torch.where(alpha < MIN_POSITIVE_ALPHA, torch.zeros_like(alpha), alpha)
        alpha = alpha.clamp(max=MAX_ALPHA)
    return _quantize_rows_torch(x, alpha.to(torch.float32).expand(rows).contiguous())


def _quantize_rows_torch(x: torch.Tensor, alpha: torch.Tensor):
    """:func:`quantize_rows` in torch ops (any device), ``alpha`` one float32 per row."""
    qmax = torch.full_like(alpha, float(QMAX))
    inv = torch.where(alpha > 0, qmax / alpha, torch.zeros_like(alpha))
    inv = inv.clamp(max=_F32_MAX)
    codes = torch.round(x * inv[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return codes, alpha / qmax


def _block_size(weight: torch.Tensor, weight_scale: torch.Tensor):
    """None for per-row scales ``(N,)``; B for block scales ``(N, K / B)``."""
    return None if weight_scale.dim() == 1 else weight.shape[1] // weight_scale.shape[1]


def _linear_w8(x, weight, weight_scale, bias):
    """Weight-only: ``x @ W_hat.T + b``, ``W_hat`` the weight dequantized per row or per block."""
    return matmul.weight_only_linear(x, weight, weight_scale, bias,
                                     _block_size(weight, weight_scale))


def _linear_w8a8(x, weight, weight_scale, bias, input_alpha):
    """W8A8: quantize the rows of x, exact int32 ``q_x @ W.T``, then ``acc * (s_x * s_w) + b``."""
    codes, s_x = quantize_rows(x, input_alpha)
    return matmul.w8a8_linear(codes, s_x, weight, weight_scale, bias,
                              _block_size(weight, weight_scale))


# --------------------------------------------------------------------------------------------------
# torch custom ops: opaque to torch.compile (fake implementations give the output shape)
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("quantkit::linear_w8", mutates_args=())
def linear_w8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Weight-only int8 linear on 2-D float32 ``x``: ``x @ W_hat.T + b``.

    ``weight_scale`` is ``(N,)`` (per row) or ``(N, K / B)`` (per block of B weights of a row)."""
    return _linear_w8(x, weight, weight_scale, bias)


@torch.library.custom_op("quantkit::linear_w8a8", mutates_args=())
def linear_w8a8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: Optional[torch.Tensor], input_alpha: Optional[torch.Tensor]) -> torch.Tensor:
    """W8A8 int8 linear on 2-D float32 ``x``; per-row alpha when ``input_alpha`` is None."""
    return _linear_w8a8(x, weight, weight_scale, bias, input_alpha)


@torch.library.custom_op("quantkit::linear_int8_grad_input", mutates_args=())
def linear_int8_grad_input(grad: torch.Tensor, weight: torch.Tensor,
                           weight_scale: torch.Tensor) -> torch.Tensor:
    """``grad @ W_hat``: the gradient of an int8 linear with respect to its input."""
    return matmul.grad_input(grad, weight, weight_scale, _block_size(weight, weight_scale))


@linear_w8.register_fake
def _(x, weight, weight_scale, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


@linear_w8a8.register_fake
def _(x, weight, weight_scale, bias, input_alpha):
    return x.new_empty((x.shape[0], weight.shape[0]))


@linear_int8_grad_input.register_fake
def _(grad, weight, weight_scale):
    return grad.new_empty((grad.shape[0], weight.shape[1]))


def _setup_context(ctx, inputs, output):
    _, weight, weight_scale, bias = inputs[:4]
    ctx.save_for_backward(weight, weight_scale)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    weight, weight_scale = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = linear_int8_grad_input(grad, weight, weight_scale) if ctx.needs_input_grad[0] else None
    grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return grad_x, None, None, grad_bias


def _backward_w8a8(ctx, grad):
    return (*_backward(ctx, grad), None)


def _setup_grad_input(ctx, inputs, output):
    _, weight, weight_scale = inputs
    ctx.save_for_backward(weight, weight_scale)


def _backward_grad_input(ctx, grad):
    # grad_input(g) = g @ W_hat is linear in g: its own gradient is grad @ W_hat.T (double
    # backward, e.g. a gradient penalty on the layer's input)
    weight, weight_scale = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None
    return linear_w8(grad.contiguous(), weight, weight_scale, None), None, None


linear_w8.register_autograd(_backward, setup_context=_setup_context)
linear_w8a8.register_autograd(_backward_w8a8, setup_context=_setup_context)
linear_int8_grad_input.register_autograd(_backward_grad_input, setup_context=_setup_grad_input)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias,
                input_alpha=None, *, w8a8: bool) -> torch.Tensor:
    """A QuantLinear's product on 2-D float32 ``x``: ``quantkit::linear_w8a8`` when ``w8a8``,
    else ``quantkit::linear_w8``.

    The custom op is called where it matters: under ``torch.compile``/``torch.export`` tracing
    and ``torch.jit.trace`` (which would record the direct path's NumPy result as a constant),
    when autograd records (a gradient is wanted for x or the bias), for tensor subclasses and for
    meta tensors (its fake implementation gives the output's shape).
    Otherwise (eager inference on plain tensors) its implementation runs directly: the same
    computation without the op's dispatch, which costs 10-15 us a call, as much as the whole
    product of a small layer at batch 1.
    """
    direct = (type(x) is torch.Tensor and type(bias) in _PLAIN_BIAS and x.device.type != "meta"
              and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
              and not (torch.is_grad_enabled()
                       and (x.requires_grad or (bias is not None and bias.requires_grad))))
    if w8a8:
        if direct:
            return _linear_w8a8(x, weight, weight_scale, bias, input_alpha)
        return linear_w8a8(x, weight, weight_scale, bias, input_alpha)
    if direct:
        return _linear_w8(x, weight, weight_scale, bias)
    return linear_w8(x, weight, weight_scale, bias)
