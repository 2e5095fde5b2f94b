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
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))   # -1 is ambiguous with 0 rows


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


def _real(name: str, value) -> float:
    """``value`` as a Python float. Accepted: ``int``, ``float``, NumPy integer and floating
    scalars, 0-d real CPU tensors (as ``torch.optim.AdamW`` takes them); anything else (bools,
    strings, None, complex numbers, other tensors) raises ``TypeError`` naming ``name``. A
    value beyond float64 raises ``ValueError``."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.device.type != "cpu" or value.dtype == torch.bool \
                or value.is_complex():
            raise TypeError(f"{name} must be a number or a 0-d real CPU tensor, got a tensor of "
                            f"shape {tuple(value.shape)}, {value.dtype} on {value.device}")
        return float(value)
    if isinstance(value, (bool, np.bool_)) or \
            not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite in float32, got {value!r}") from None


def _check_number(name, value, low, high, low_open=False, high_open=False) -> float:
    """``value`` (see :func:`_real`) as a float after checking it: finite (``TypeError``
    otherwise), in the interval from ``low`` to ``high`` (closed unless ``low_open`` /
    ``high_open``) and finite in float32, the precision the kernels take it in (``ValueError``
    otherwise)."""
    x = _real(name, value)
    if not math.isfinite(x):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if x < low or (low_open and x == low) or x > high or (high_open and x == high):
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")
    if abs(x) > _FLOAT32_MAX_ROUNDED:
        raise ValueError(f"{name} must be finite in float32 (at most {_FLOAT32_MAX:.7g}), "
                         f"got {value!r}")
    return x


def _check_int(name, value, low, high=None) -> int:
    """``value`` as an int after checking it is an ``int`` or a NumPy integer, not a bool
    (``TypeError``), and in [low, high] (``ValueError``; no upper bound when ``high`` is None)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    n = int(value)
    if n < low or (high is not None and n > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {bound}, got {n}")
    return n


#: The largest finite float32, and the largest float64 that rounds to a finite float32 (just
#: under half an ulp above it).
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_MAX_ROUNDED = float(np.nextafter(_FLOAT32_MAX + 2.0 ** 103, 0.0))

#: The hyperparameters of a parameter group, in the order the messages name them.
_HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "block_size", "min_8bit_size")


def _check_hyperparameters(group: dict, where: str = "") -> dict:
    """The hyperparameters of a parameter group (``_HYPERPARAMETERS``) as the step takes them:
    floats, a tuple of two floats, ints. Checks, naming the entry after the prefix ``where``:

    * every entry is there (``ValueError``); numbers are real numbers (:func:`_real`);
    * lr >= 0, weight_decay >= 0, eps > 0, betas a pair (tuple or list) in [0, 1), all finite
      in float32 and eps not 0 in float32;
    * block_size an int, a power of two in [MIN_BLOCK_SIZE, MAX_BLOCK_SIZE]; min_8bit_size an
      int >= 0;
    * the float32 scalars of step 1 (:func:`_step_scalars`): later steps have no larger step
      size and no smaller eps, so every step's scalars are then finite with ``r_eps > 0``.
    """
    missing = [key for key in _HYPERPARAMETERS if key not in group]
    if missing:
        raise ValueError(f"{where}the parameter group has no {missing[0]!r}")
    lr = _check_number(f"{where}lr", group["lr"], 0.0, math.inf)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{where}betas must be a pair of numbers, got {betas!r}")
    beta1 = _check_number(f"{where}betas[0]", betas[0], 0.0, 1.0, high_open=True)
    beta2 = _check_number(f"{where}betas[1]", betas[1], 0.0, 1.0, high_open=True)
    eps = _check_number(f"{where}eps", group["eps"], 0.0, math.inf, low_open=True)
    if np.float32(eps) == 0:
        raise ValueError(f"{where}eps must be > 0 in float32 (at least "
                         f"{float(np.finfo(np.float32).smallest_subnormal):.3g}), got "
                         f"{group['eps']!r}")
    weight_decay = _check_number(f"{where}weight_decay", group["weight_decay"], 0.0, math.inf)
    block_size = _check_int(f"{where}block_size", group["block_size"], MIN_BLOCK_SIZE,
                            MAX_BLOCK_SIZE)
    if block_size & (block_size - 1):
        raise ValueError(f"{where}block_size must be a power of two in [{MIN_BLOCK_SIZE}, "
                         f"{MAX_BLOCK_SIZE}], got {block_size}")
    min_8bit_size = _check_int(f"{where}min_8bit_size", group["min_8bit_size"], 0)
    hyper = {"lr": lr, "betas": (beta1, beta2), "eps": eps, "weight_decay": weight_decay,
             "block_size": block_size, "min_8bit_size": min_8bit_size}
    _step_scalars(hyper, 1, where)
    return hyper


def _step_scalars(hyper: dict, step: int, where: str = "") -> tuple:
    """The float32 constants of step ``step`` (``reference.adamw_scalars``) for checked
    hyperparameters: ``(8-bit kernel's, float32-state kernel's, CUDA's array)``. ``ValueError``
    naming the hyperparameters when one is not finite in float32 or ``r_eps`` (eps times
    sqrt(1 - betas[1]**step)) rounds to 0, which would make 0 / 0 of a zero gradient."""
    beta1, beta2 = hyper["betas"]
    with np.errstate(over="ignore"):
        s = reference.adamw_scalars(hyper["lr"], beta1, beta2, hyper["eps"],
                                    hyper["weight_decay"], step)
    if not np.isfinite(s["decay"]):
        raise ValueError(f"{where}1 - lr * weight_decay is not finite in float32 (lr "
                         f"{hyper['lr']!r}, weight_decay {hyper['weight_decay']!r})")
    if not (np.isfinite(s["step_size"]) and np.isfinite(s["r_step_size"])):
        raise ValueError(f"{where}the step size lr / (1 - betas[0]**{step}) is not finite in "
                         f"float32 (lr {hyper['lr']!r}, betas[0] {beta1!r})")
    if not (s["r_eps"] > 0 and s["bc2_sqrt"] > 0):
        raise ValueError(f"{where}eps * sqrt(1 - betas[1]**{step}) rounds to 0 in float32 (eps "
                         f"{hyper['eps']!r}, betas[1] {beta2!r}); eps must be larger")
    return ([s[name] for name in reference.ADAMW8BIT_KERNEL_SCALARS],
            [s[name] for name in reference.ADAMW32_KERNEL_SCALARS],
            np.array([s[name] for name in reference.ADAMW_SCALARS], np.float32))


def _check_params(params: list, gi: int) -> None:
    """``TypeError`` unless every entry of ``params`` (tensors, or ``(name, tensor)`` pairs) is
    a float32 tensor; ``ValueError`` unless it is on the CPU or CUDA."""
    for pi, p in enumerate(params):
        if isinstance(p, tuple) and len(p) == 2:
            p = p[1]
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameter {pi} of group {gi} is a {type(p).__name__}; "
                            "AdamW8bit takes float32 tensors")
        if p.dtype != torch.float32:
            raise TypeError(f"parameter {pi} of group {gi} is {p.dtype}; "
                            "AdamW8bit takes float32 parameters")
        if p.device.type not in ("cpu", "cuda"):
            raise ValueError(f"parameter {pi} of group {gi} is on {p.device}; "
                             "AdamW8bit runs on CPU and CUDA tensors")


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

    Hyperparameters are checked where they enter (constructor, ``add_param_group``,
    ``load_state_dict``) and again, with every group, at each step, as float32 values
    (``_check_hyperparameters``): a number may be an int, a float, a NumPy scalar or a 0-d CPU
    tensor. Before anything is updated, the hyperparameters, the states' layouts and every
    gradient are checked: a NaN/Inf gradient (or one above 2**60) raises a ``ValueError`` naming
    the parameter, and no parameter, state or step counter changes. That check reads every
    gradient once more (on the CPU about a fifth of a step's time); ``check_finite=False`` skips
    it, as torch's AdamW does, for callers that already check (e.g.
    ``clip_grad_norm_(..., error_if_nonfinite=True)``): a non-finite gradient then makes its
    parameter NaN and the moment codes of its whole block meaningless. Gradients are never
    modified.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 block_size=256, min_8bit_size=4096, check_finite=True):
        defaults = _check_hyperparameters({
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
            "block_size": block_size, "min_8bit_size": min_8bit_size})
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be True or False, got {check_finite!r}")
        self.check_finite = check_finite
        super().__init__(params, defaults)   # each group through add_param_group's checks

    def add_param_group(self, param_group: dict) -> None:
        """``torch.optim.Optimizer.add_param_group`` after the constructor's checks: the group's
        hyperparameters, its own or the defaults (:func:`_check_hyperparameters`), and its
        parameters (float32, on the CPU or CUDA). The group is stored with the checked values
        (floats, ints); a refused group leaves the optimizer as it was."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError("param_group must have 'params'")
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("param_group['params'] must be an ordered collection (a list), "
                            "got a set")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        _check_params(params, len(self.param_groups))
        hyper = _check_hyperparameters({**self.defaults, **param_group},
                                       f"parameter group {len(self.param_groups)}: ")
        super().add_param_group({**param_group, "params": params, **hyper})

    def __getstate__(self):
        # torch's Optimizer pickles defaults, state and param_groups only
        return {**super().__getstate__(), "check_finite": self.check_finite}

    def __setstate__(self, state):
        super().__setstate__({"check_finite": True, **state})

    def _layouts(self) -> dict:
        """param -> (shape, block_size) its state was last checked against (:meth:`_plan_step`);
        a cache beside the state, emptied by ``load_state_dict``."""
        if not hasattr(self, "_checked_layouts"):
            self._checked_layouts = {}
        return self._checked_layouts

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

    @staticmethod
    def _state_fits(p, state: dict, block_size: int) -> bool:
        """Whether ``p``'s state is what the step writes in place: ``step`` a one-element
        float32 CPU tensor, the moment states of the shapes that ``p``'s (rows, L) view and
        ``block_size`` give them (the kernels index them by those). False after ``p.data`` took
        another shape, the group another block size, or a state entry was replaced by hand."""
        # runs for every parameter at every step: plain comparisons, no containers built
        step = state.get("step")
        if type(step) is not torch.Tensor or step.numel() != 1 \
                or step.dtype != torch.float32 or step.device.type != "cpu":
            return False
        shape = _local(p).shape
        rows, length = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 \
            else (math.prod(shape), 1)
        try:
            if "m_codes" in state:
                per_row = max(1, length // block_size)
                m, r = state["m_codes"], state["r_codes"]
                m_max, r_max = state["m_absmax"], state["r_absmax"]
                return (m.shape == (rows, length) and r.shape == (rows, length)
                        and m_max.shape == (rows, per_row) and r_max.shape == (rows, per_row))
            return state["m"].shape == (rows, length) and state["r"].shape == (rows, length)
        except (KeyError, AttributeError):   # an entry missing or not a tensor
            return False

    def _plan_step(self):
        """``(param, group's checked hyperparameters, gradient, scalars)`` for every parameter
        with a gradient, everything a step needs, checked before anything changes:

        * every gradient (:meth:`_check_gradients`);
        * every group's hyperparameters, as the constructor checks them
          (:func:`_check_hyperparameters`; a group may have been edited since);
        * each existing state against its parameter's shape and group's block size (once per
          shape and block size: a state is re-checked when either changed since);
        * the float32 scalars of each parameter's next step (:func:`_step_scalars`);
        * the CUDA library, when a parameter is on CUDA.
        """
        work = self._check_gradients()
        hyper = {id(group): _check_hyperparameters(group, f"parameter group {gi}: ")
                 for gi, group in enumerate(self.param_groups)}
        group_index = {id(group): gi for gi, group in enumerate(self.param_groups)}
        scalars_of = {}   # (group, step) -> the step's scalars, shared by the group's parameters
        layouts = self._layouts()
        plan = []
        for p, group, g in work:
            h = hyper[id(group)]
            state = self.state.get(p)
            step = 1
            if state:
                layout = (_local(p).shape, h["block_size"])
                if layouts.get(p) != layout:
                    if not self._state_fits(p, state, h["block_size"]):
                        gi = group_index[id(group)]
                        pi = next(i for i, q in enumerate(group["params"]) if q is p)
                        raise ValueError(f"the state of parameter {pi} of group {gi} does not "
                                         f"fit its shape {tuple(layout[0])} and block_size "
                                         f"{h['block_size']}; no parameter was updated")
                    layouts[p] = layout
                step = int(state["step"]) + 1
            key = (id(group), step)
            if key not in scalars_of:
                scalars_of[key] = _step_scalars(h, step,
                                                f"parameter group {group_index[id(group)]}: ")
            plan.append((p, h, g, scalars_of[key]))
        if any(not isinstance(g, np.ndarray) for _, _, g, _ in plan):
            _cuda_library()
        return plan

    @torch.no_grad()
    def step(self, closure=None):
        """One step for every parameter with a gradient; returns ``closure()``'s loss if given.

        Everything is checked first (:meth:`_plan_step`); a step that raises has changed no
        parameter, state or step counter."""
        from ..backends import numba_optim

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = self._plan_step()
        for p, hyper, g, scalars in reversed(plan):   # the last gradients checked are in cache
            state = self.state[p]
            if not state:
                self._init_state(p, hyper)
            step = state["step"].numpy()   # a 0-d float32 CPU tensor: counted in place
            step += 1                       # (without a torch op's dispatch per parameter)
            if not isinstance(g, np.ndarray):
                self._step_cuda(p, state, hyper, scalars[2])
                continue
            p_rows, moments = self._cpu_views(p, state)
            copied = p_rows is None       # a layout the kernels cannot step in place
            if copied:
                local_p = _local(p).detach()
                p_rows = np.ascontiguousarray(_as_rows(local_p).numpy())
            g_rows = g.reshape(p_rows.shape)
            if "m_codes" in state:
                numba_optim.adamw8bit_step(p_rows, g_rows, *moments, hyper["block_size"],
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
        """As ``torch.optim.Optimizer.load_state_dict``, after checking the whole state dict
        (:meth:`_check_state_dict`): one that does not fit raises ``ValueError`` naming the entry
        and leaves the optimizer as it was. The groups take the checked hyperparameters (floats,
        ints), and the optimizer's current value for one a saved group lacks."""
        checked = self._check_state_dict(state_dict)
        super().load_state_dict(checked)
        self._layouts().clear()
        for state in self.state.values():
            if "step" in state:   # each parameter's own 0-d CPU counter (step() adds in place)
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
            for key, dtype in {**_EIGHT_BIT_KEYS, **_FLOAT_KEYS}.items():
                # torch casts floating states to the parameter dtype; the kernels take their
                # states C-contiguous (a loaded tensor may be a strided view)
                if key in state:
                    state[key] = state[key].to(dtype).contiguous()

    def _check_state_dict(self, state_dict) -> dict:
        """``state_dict`` with each group's hyperparameters replaced by their checked values,
        after checking, with ``ValueError`` naming the entry:

        * 'state' is a dict, 'param_groups' a list of dicts with a list 'params', as many groups
          and parameters per group as the optimizer has, no parameter id listed twice;
        * each group's hyperparameters as the constructor checks them
          (:func:`_check_hyperparameters`);
        * every 'state' entry belongs to a listed parameter id and is the state the step would
          have made for that parameter (:meth:`_check_saved_state`).
        """
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) \
                or not isinstance(state_dict.get("param_groups"), (list, tuple)):
            raise ValueError("state_dict must have 'state' (a dict) and 'param_groups' (a list)")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} parameter groups, the optimizer "
                             f"{len(self.param_groups)}")
        checked_groups, owner = [], {}   # owner: saved parameter id -> (param, hyper, gi, pi)
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            where = f"state_dict['param_groups'][{gi}]"
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
                raise ValueError(f"{where} must be a dict with a list 'params'")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"group {gi} of state_dict has {len(saved['params'])} "
                                 f"parameters, the optimizer {len(group['params'])}")
            current = {key: group[key] for key in _HYPERPARAMETERS if key in group}
            try:
                hyper = _check_hyperparameters({**current, **saved}, f"{where}: ")
            except TypeError as e:   # a value of the wrong type inside the state dict
                raise ValueError(str(e)) from None
            for pi, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                if isinstance(pid, bool) or not isinstance(pid, (int, str)) or pid in owner:
                    raise ValueError(f"{where}['params'][{pi}] is {pid!r}; parameter ids must "
                                     "be distinct ints (or strings)")
                owner[pid] = (p, hyper, gi, pi)
            checked_groups.append({**saved, **hyper})
        for pid, saved in state_dict["state"].items():
            if pid not in owner:
                raise ValueError(f"state_dict['state'] has an entry for parameter id {pid!r}, "
                                 "which no parameter group lists")
            self._check_saved_state(saved, *owner[pid])
        return {**state_dict, "param_groups": checked_groups}

    def _check_saved_state(self, saved, p, group, gi, pi):
        """``ValueError`` unless ``saved`` is a state the step could have made for ``p`` under
        the (checked) hyperparameters ``group``: a dict holding 'step' (a whole number >= 0, see
        :func:`_check_saved_step`) and exactly the tensors of ``p``'s layout (8-bit or float32,
        see :meth:`uses_8bit_state`), each of its shape and dtype, dense, on the CPU or CUDA,
        with values the kernels can decode: absmaxes and float32 moments finite, absmaxes and
        ``r`` >= 0, m codes in [-127, 127]."""
        where = f"the state of parameter {pi} of group {gi}"
        if not isinstance(saved, dict):
            raise ValueError(f"{where} is a {type(saved).__name__}, expected a dict")
        rows, length = _as_rows(_local(p.detach())).shape
        if self.uses_8bit_state(p, group):
            per_row = max(1, length // group["block_size"])
            expected = {"m_codes": (rows, length), "r_codes": (rows, length),
                        "m_absmax": (rows, per_row), "r_absmax": (rows, per_row)}
        else:
            expected = {"m": (rows, length), "r": (rows, length)}
        if "step" not in saved:
            raise ValueError(f"{where} has no 'step'")
        _check_saved_step(saved["step"], where)
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
            if value.layout != torch.strided or value.device.type not in ("cpu", "cuda"):
                raise ValueError(f"{where}: {key!r} is a {value.layout} tensor on "
                                 f"{value.device}; expected a dense CPU or CUDA tensor")
            _check_saved_values(key, value, where)
        extra = set(saved) - set(expected) - {"step"}
        if extra:
            raise ValueError(f"{where} has unexpected entries {sorted(extra)}")


def _check_saved_step(value, where: str) -> None:
    """``ValueError`` unless a saved 'step' is a number or a 0-d real CPU tensor (see
    :func:`_real`) that is a whole number >= 0, finite in float32 (the counter's type)."""
    try:
        x = _real(f"{where}: 'step'", value)
    except TypeError as e:
        raise ValueError(str(e)) from None
    if not (math.isfinite(x) and x >= 0 and x.is_integer() and abs(x) <= _FLOAT32_MAX):
        raise ValueError(f"{where}: 'step' must be a whole number >= 0, got {value!r}")


def _check_saved_values(key: str, value: torch.Tensor, where: str) -> None:
    """``ValueError`` unless the saved state tensor ``value`` (entry ``key``) holds values the
    kernels decode to finite moments: absmaxes finite and >= 0, ``m`` finite, ``r`` finite and
    >= 0, m codes in [-127, 127] (r codes: every uint8 is a code)."""
    if key in ("m_absmax", "r_absmax", "r"):
        good = torch.isfinite(value) & (value >= 0)
        expected = "finite values >= 0"
    elif key == "m":
        good = torch.isfinite(value)
        expected = "finite values"
    elif key == "m_codes":
        good = value != -128
        expected = "codes in [-127, 127]"
    else:
        return
    if not bool(good.all()):
        raise ValueError(f"{where}: {key!r} must hold {expected}; {int((~good).sum())} of "
                         "its values do not")


class Adam8bit(AdamW8bit):
    """:class:`AdamW8bit` without weight decay (``weight_decay=0``)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, *, block_size=256,
                 min_8bit_size=4096, check_finite=True):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0,
                         block_size=block_size, min_8bit_size=min_8bit_size,
                         check_finite=check_finite)
