"""AdamW with its two moments in 8-bit codes, one fused numba pass per parameter.

State per parameter (``optimizer.state[p]``):

* ``step``: float32 0-d tensor, the number of steps taken (as ``torch.optim.AdamW``);
* 8-bit states (parameters of two or more dimensions with at least ``min_8bit_size`` elements):
  ``m_codes`` int8 and ``r_codes`` uint8 of shape (rows, L) where rows = ``p.shape[0]`` and
  L the product of the other dimensions, ``m_absmax`` / ``r_absmax`` float32 (rows, blocks per
  row); r = sqrt(v);
* float32 states otherwise: ``m`` and ``r`` of (rows, L) (1-d parameters: (n, 1)).

A parameter distributed as a DTensor (FSDP2 ``fully_shard``) keeps its states for its local shard;
blocks never cross a row, so a shard along dim 0 holds exactly the blocks of its rows and the
sharded step computes bit for bit what one process computes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import reference
from .._constants import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE

_EIGHT_BIT_KEYS = {"m_codes": torch.int8, "m_absmax": torch.float32, "r_codes": torch.uint8,
                   "r_absmax": torch.float32}
_FLOAT_KEYS = {"m": torch.float32, "r": torch.float32}


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (sharing its storage), or ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """(rows, L) view of a tensor: rows along dim 0 (a 0-d or 1-d tensor is one column)."""
    if t.dim() <= 1:
        return t.reshape(-1, 1)
    return t.reshape(t.shape[0], -1)


def _check_row_sharding(p, pid) -> None:
    """ValueError unless the DTensor ``p`` is sharded along dim 0 only (FSDP2's layout)."""
    from torch.distributed.tensor import Replicate, Shard

    if not all(isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0)
               for pl in p.placements):
        raise ValueError(f"parameter {pid} is a DTensor placed as {p.placements}; sharded "
                         "state dicts need shards along dim 0 (Shard(0) or Replicate)")


def _as_dtensor(local: torch.Tensor, p) -> torch.Tensor:
    """A (rows, C) state of ``p``'s local shard as a DTensor sharded like ``p`` along its rows."""
    from torch.distributed.tensor import DTensor

    rows = p.shape[0] if p.dim() >= 1 else 1
    shape = (rows, local.shape[1])
    return DTensor.from_local(local.contiguous(), p.device_mesh, p.placements,
                              run_check=False, shape=shape, stride=(shape[1], 1))


def _cuda_library():
    """quantkit's CUDA library with the optimizer's entry points declared."""
    from ..backends import cuda_library, cuda_optim

    lib = cuda_library.library()
    cuda_optim.declare(lib)
    return lib


def _cuda_stream(t: torch.Tensor):
    """The handle of torch's current stream on ``t``'s device (what the kernels launch on)."""
    return torch.cuda.current_stream(t.device).cuda_stream


def _check_number(name, value, low, high, low_open=False, high_open=False):
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or \
            isinstance(value, bool) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or value > high or (high_open and value == high):
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as ``torch.optim.AdamW``) with 8-bit moment states.

    Per step ``t`` and element, in float32 (``reference.adamw_update``)::

        m = beta1 * m + (1 - beta1) * g
        r = sqrt(beta2 * r * r + (1 - beta2) * g * g)                     r = sqrt(v)
        p = p * (1 - lr * weight_decay) - lr / (1 - beta1**t) * m / (r / sqrt(1 - beta2**t) + eps)

    m and r are decoded from their codes before and encoded after (per block of ``block_size``
    values of one row, one float32 absmax each): about 2.03 bytes of state per parameter instead
    of 8. Parameters with fewer than ``min_8bit_size`` elements, and 1-d ones, keep float32
    moments. A gradient that is exactly 0 on every step leaves m exactly 0, so its parameter moves
    only by weight decay.

    Before anything is updated, every gradient is checked: a NaN/Inf (or above 2**60) raises a
    ``ValueError`` naming the parameter, and no parameter or state changes. That check reads every
    gradient once more (on the CPU about a fifth of a step's time); ``check_finite=False`` skips
    it, as torch's AdamW does, for callers that already check (e.g.
    ``clip_grad_norm_(..., error_if_nonfinite=True)``): a non-finite gradient then makes its
    parameter NaN and the moment codes of its whole block meaningless. Gradients are never
    modified.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 block_size=256, min_8bit_size=4096, check_finite=True):
        _check_number("lr", lr, 0.0, math.inf)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair of numbers, got {betas!r}")
        _check_number("betas[0]", betas[0], 0.0, 1.0, high_open=True)
        _check_number("betas[1]", betas[1], 0.0, 1.0, high_open=True)
        _check_number("eps", eps, 0.0, math.inf, low_open=True)
        _check_number("weight_decay", weight_decay, 0.0, math.inf)
        if isinstance(block_size, bool) or not isinstance(block_size, int):
            raise TypeError(f"block_size must be an int, got {block_size!r}")
        if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE) or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two in [{MIN_BLOCK_SIZE}, "
                             f"{MAX_BLOCK_SIZE}], got {block_size}")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) \
                or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be True or False, got {check_finite!r}")
        self.check_finite = check_finite
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        block_size=block_size, min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.dtype != torch.float32:
                    raise TypeError(f"parameter {pi} of group {gi} is {p.dtype}; "
                                    "AdamW8bit takes float32 parameters")
                if p.device.type not in ("cpu", "cuda"):
                    raise ValueError(f"parameter {pi} of group {gi} is on {p.device}; "
                                     "AdamW8bit runs on CPU and CUDA tensors")

    def __getstate__(self):
        # torch's Optimizer pickles defaults, state and param_groups only
        return {**super().__getstate__(), "check_finite": self.check_finite}

    def __setstate__(self, state):
        super().__setstate__({"check_finite": True, **state})

    # ----------------------------------------------------------------------------- the step

    def uses_8bit_state(self, p: torch.Tensor, group: dict) -> bool:
        """Whether ``p`` keeps 8-bit moments (2+ dimensions, at least min_8bit_size elements)."""
        return p.dim() >= 2 and p.numel() >= group["min_8bit_size"]

    @staticmethod
    def _on_cuda(p: torch.Tensor) -> bool:
        """Whether ``p``'s step runs on the CUDA kernels (csrc/optim.cu)."""
        return _local(p).device.type == "cuda"

    def _init_state(self, p, group):
        rows = _as_rows(_local(p.detach()))
        state = self.state[p]
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        on = dict(device=rows.device)       # the moments live beside the (local) parameter
        if self.uses_8bit_state(p, group):
            n_rows, length = rows.shape
            per_row = max(1, length // group["block_size"])
            state["m_codes"] = torch.zeros((n_rows, length), dtype=torch.int8, **on)
            state["m_absmax"] = torch.zeros((n_rows, per_row), dtype=torch.float32, **on)
            state["r_codes"] = torch.zeros((n_rows, length), dtype=torch.uint8, **on)
            state["r_absmax"] = torch.zeros((n_rows, per_row), dtype=torch.float32, **on)
        else:
            state["m"] = torch.zeros(rows.shape, dtype=torch.float32, **on)
            state["r"] = torch.zeros(rows.shape, dtype=torch.float32, **on)

    def _check_gradients(self):
        """``(param, group, gradient)`` for every parameter with a gradient, after checking all of
        them; the gradient as the step takes it: a flat C-contiguous NumPy array on the CPU (a
        view of the user's tensor, or a copy where its layout needs one), the tensor on CUDA."""
        from ..backends import numba_optim

        work = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse or grad.layout != torch.strided:
                    raise ValueError(f"parameter {pi} of group {gi} has a sparse gradient; "
                                     "AdamW8bit takes dense gradients")
                if grad.dtype != torch.float32:
                    raise TypeError(f"the gradient of parameter {pi} of group {gi} is "
                                    f"{grad.dtype}; expected float32")
                local_g = _local(grad)
                if local_g.shape != _local(p).shape:
                    raise ValueError(f"the gradient of parameter {pi} of group {gi} has shape "
                                     f"{tuple(local_g.shape)}, the parameter "
                                     f"{tuple(_local(p).shape)}")
                if self._on_cuda(p):
                    g = local_g.detach()
                    bad = self.check_finite and int(
                        (~(g.abs() <= float(numba_optim.GRAD_LIMIT))).sum())
                else:
                    g = np.ascontiguousarray(local_g.detach().numpy()).reshape(-1)
                    bad = self.check_finite and numba_optim.count_bad_gradients(g)
                if bad:
                    raise ValueError(f"the gradient of parameter {pi} of group {gi} has NaN, "
                                     "Inf or values above 2**60; no parameter was updated")
                work.append((p, group, g))
        return work

    @torch.no_grad()
    def step(self, closure=None):
        """One step for every parameter with a gradient; returns ``closure()``'s loss if given."""
        from ..backends import numba_optim

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._check_gradients()
        scalars_of = {}   # (group, step) -> the step's float32 constants, shared by its params:
        #                   (8-bit kernel's, float32-state kernel's, CUDA's array)
        for p, group, g in reversed(work):   # the last gradients checked are still in cache
            state = self.state[p]
            if not state:
                self._init_state(p, group)
            step = state["step"].numpy()   # a 0-d float32 CPU tensor: counted in place
            step += 1                       # (without a torch op's dispatch per parameter)
            key = (id(group), int(step))
            scalars = scalars_of.get(key)
            if scalars is None:
                beta1, beta2 = group["betas"]
                s = reference.adamw_scalars(group["lr"], beta1, beta2, group["eps"],
                                            group["weight_decay"], key[1])
                scalars = scalars_of[key] = (
                    [s[name] for name in reference.ADAMW8BIT_KERNEL_SCALARS],
                    [s[name] for name in reference.ADAMW32_KERNEL_SCALARS],
                    np.array([s[name] for name in reference.ADAMW_SCALARS], np.float32))
            if not isinstance(g, np.ndarray):
                self._step_cuda(p, state, group, scalars[2])
                continue
            p_rows, moments = self._cpu_views(p, state)
            copied = p_rows is None       # a layout the kernels cannot step in place
            if copied:
                local_p = _local(p).detach()
                p_rows = np.ascontiguousarray(_as_rows(local_p).numpy())
            g_rows = g.reshape(p_rows.shape)
            if "m_codes" in state:
                numba_optim.adamw8bit_step(p_rows, g_rows, *moments, group["block_size"],
                                           *scalars[0])
            else:
                numba_optim.adamw32_step(p_rows.reshape(-1), g_rows.reshape(-1),
                                         *(a.reshape(-1) for a in moments), *scalars[1])
            if copied:
                local_p.copy_(torch.from_numpy(p_rows).reshape(local_p.shape))
        return loss

    def _cpu_views(self, p, state):
        """``(p_rows, moments)``: NumPy views of a CPU parameter as (rows, L) (None when its
        layout is not one C-contiguous block) and of its moment states in the kernels' argument
        order. Kept per parameter while its storage, shape and strides and the state tensors
        stay the same objects (``load_state_dict`` or ``p.data = ...`` make new ones), so a step
        does not rebuild them: on many small tensors that rebuilding cost as much as the kernels.
        """
        local_p = _local(p)
        names = _EIGHT_BIT_KEYS if "m_codes" in state else _FLOAT_KEYS
        tensors = tuple(state[name] for name in names)
        key = (local_p.data_ptr(), local_p.shape, local_p.stride())
        cache = self.__dict__.setdefault("_cpu_view_cache", {})
        cached = cache.get(p)
        if cached is not None and cached[0] == key and all(
                a is b for a, b in zip(cached[1], tensors)):
            return cached[2]
        detached = local_p.detach()
        rows = _as_rows(detached)
        contiguous = rows.is_contiguous() and rows.data_ptr() == detached.data_ptr()
        views = (rows.numpy() if contiguous else None, tuple(t.numpy() for t in tensors))
        cache[p] = (key, tensors, views)
        return views

    @staticmethod
    def _step_cuda(p, state, group, scalars):
        """The step of a CUDA parameter on csrc/optim.cu's kernels (same bits as the CPU's)."""
        from ..backends import cuda_optim

        lib = _cuda_library()
        local_p = _local(p).detach()
        stream = _cuda_stream(local_p)
        rows = _as_rows(local_p)
        contiguous = rows.is_contiguous() and rows.data_ptr() == local_p.data_ptr()
        p_rows = rows if contiguous else rows.contiguous()
        g_rows = _as_rows(_local(p.grad).detach()).contiguous()
        if "m_codes" in state:
            cuda_optim.adamw8bit_step(lib, stream, p_rows, g_rows, state["m_codes"],
                                      state["m_absmax"], state["r_codes"], state["r_absmax"],
                                      group["block_size"], reference.M_CODE, reference.R_CODE,
                                      scalars)
        else:
            cuda_optim.adamw32_step(lib, stream, p_rows, g_rows, state["m"], state["r"],
                                    scalars)
        if not contiguous:
            local_p.copy_(p_rows.reshape(local_p.shape))

    # ---------------------------------------------------------------------- inspection

    @torch.no_grad()
    def moments(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(exp_avg, exp_avg_sq)`` of ``p`` decoded to float32, shaped like ``p``'s local tensor:
        the first and second moments as ``torch.optim.AdamW`` would hold them (``exp_avg_sq`` is
        ``r * r``, the stored ``r = sqrt(v)`` squared in float32). Zeros before the first step.
        For inspection and comparisons; the step never makes these copies."""
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"p must be a parameter of this optimizer, got {type(p).__name__}")
        group = next((g for g in self.param_groups if any(q is p for q in g["params"])), None)
        if group is None:
            raise ValueError("p is not a parameter of this optimizer")
        local = _local(p.detach())
        state = self.state[p]
        if not state:
            zeros = torch.zeros_like(local)
            return zeros, zeros.clone()
        if "m_codes" in state:
            block = group["block_size"]
            m = reference.decode_moments(state["m_codes"].cpu().numpy(),
                                         state["m_absmax"].cpu().numpy(), block, True)
            r = reference.decode_moments(state["r_codes"].cpu().numpy(),
                                         state["r_absmax"].cpu().numpy(), block, False)
            m, r = torch.from_numpy(m), torch.from_numpy(r)
        else:
            m, r = state["m"].cpu(), state["r"].cpu()
        m = m.reshape(local.shape).to(local.device)
        r = r.reshape(local.shape).to(local.device)
        return m, r * r

    # ------------------------------------------------------------------------- state dicts

    def sharded_state_dict(self) -> dict:
        """``state_dict()`` with the states of DTensor parameters as DTensors, for
        ``torch.distributed.checkpoint`` (``dcp.save`` / ``dcp.load``).

        Each state of a sharded parameter is the local shard's state wrapped with the parameter's
        device mesh and placements, its global shape the parameter's rows by the state's columns
        (states are sharded along their rows exactly as the parameter is along dim 0, uneven
        shards included). Every parameter gets its (zero) state first, so the same call on a fresh
        optimizer gives the template ``dcp.load`` fills in place; then
        :meth:`load_sharded_state_dict`. States of ordinary tensors stay as they are.
        """
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self._init_state(p, group)
        sd = self.state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, state in sd["state"].items():
            p = params[pid]
            if not hasattr(p, "device_mesh"):
                continue
            _check_row_sharding(p, pid)
            for key, value in list(state.items()):
                if key != "step":
                    state[key] = _as_dtensor(value, p)
        return sd

    def load_sharded_state_dict(self, state_dict) -> None:
        """:meth:`load_state_dict` of a :meth:`sharded_state_dict` (DTensor states become their
        local shards, which must be this rank's shards of the same parameters)."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict):
            raise ValueError("state_dict must have 'state' and 'param_groups'")
        local = dict(state_dict, state={
            pid: {key: (_local(v) if key != "step" else v) for key, v in state.items()}
            for pid, state in state_dict["state"].items()})
        self.load_state_dict(local)

    def load_state_dict(self, state_dict):
        """As ``torch.optim.Optimizer.load_state_dict``, after checking the state's layout.

        Raises ``ValueError`` when a state does not fit its parameter (other shapes, another
        block size, 8-bit states where float32 ones are expected or the reverse).
        """
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if groups is None or "state" not in state_dict:
            raise ValueError("state_dict must have 'state' and 'param_groups'")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} parameter groups, the optimizer "
                             f"{len(self.param_groups)}")
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"group {gi} of state_dict has {len(saved['params'])} "
                                 f"parameters, the optimizer {len(group['params'])}")
            block_size = saved.get("block_size", group["block_size"])
            min_size = saved.get("min_8bit_size", group["min_8bit_size"])
            probe = dict(group, block_size=block_size, min_8bit_size=min_size)
            for pi, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                if pid in state_dict["state"]:
                    self._check_saved_state(state_dict["state"][pid], p, probe, gi, pi)
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if "step" in state:   # each parameter's own 0-d CPU counter (step() adds in place)
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
            for key, dtype in {**_EIGHT_BIT_KEYS, **_FLOAT_KEYS}.items():
                # torch casts floating states to the parameter dtype; the kernels take their
                # states C-contiguous (a loaded tensor may be a strided view)
                if key in state:
                    state[key] = state[key].to(dtype).contiguous()

    def _check_saved_state(self, saved, p, group, gi, pi):
        where = f"the state of parameter {pi} of group {gi}"
        rows, length = _as_rows(_local(p.detach())).shape
        if self.uses_8bit_state(p, group):
            per_row = max(1, length // group["block_size"])
            expected = {"m_codes": (rows, length), "r_codes": (rows, length),
                        "m_absmax": (rows, per_row), "r_absmax": (rows, per_row)}
        else:
            expected = {"m": (rows, length), "r": (rows, length)}
        if "step" not in saved:
            raise ValueError(f"{where} has no 'step'")
        for key, shape in expected.items():
            value = saved.get(key)
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{where} lacks {key!r} (it was saved for another layout)")
            if tuple(value.shape) != shape:
                raise ValueError(f"{where}: {key!r} has shape {tuple(value.shape)}, expected "
                                 f"{shape} for a parameter of shape {tuple(_local(p).shape)}")
            want = {**_EIGHT_BIT_KEYS, **_FLOAT_KEYS}[key]
            if value.dtype != want:
                raise ValueError(f"{where}: {key!r} is {value.dtype}, expected {want}")
        extra = set(saved) - set(expected) - {"step"}
        if extra:
            raise ValueError(f"{where} has unexpected entries {sorted(extra)}")


class Adam8bit(AdamW8bit):
    """:class:`AdamW8bit` without weight decay (``weight_decay=0``)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, *, block_size=256,
                 min_8bit_size=4096, check_finite=True):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0,
                         block_size=block_size, min_8bit_size=min_8bit_size,
                         check_finite=check_finite)
