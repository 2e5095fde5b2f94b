"""The products of the int8 Linear, and the one place that chooses how each one is computed.

Two products (DESIGN.md section 6 has the arithmetic of each mode):

* :func:`int8_product` (W8A8): ``acc = q_x @ W.T``, int8 codes in [-127, 127], exact in int32.
  Every path gives the same bits.
* :func:`weight_only_linear`: ``y = x @ W_hat.T + b``, ``W_hat = float32(W) * s_w``. The fused
  kernels read the int8 weight once and keep float32 lane sums in a fixed order
  (csrc/cpu/linear_int8.c), rescaling each sum by ``s_w``; the dense path gives torch's
  ``addmm`` chunks of the dequantized weight with the bias. Paths agree to float32 rounding, not
  bit for bit.

Paths (``QUANTKIT_MATMUL`` forces one for every CPU tensor; unset or ``auto`` chooses):

============  =================================================  =============================
path          W8A8 int32 product                                 weight-only
============  =================================================  =============================
``amx``       quantkit's AMX-INT8 kernel (csrc/cpu; tiles of     as ``vnni``
              16 x 64 codes, signed x signed, no offset)
``vnni``      quantkit's AVX-512 VNNI kernel (csrc/cpu)          quantkit's fused AVX-512
                                                                 kernel below 32 rows (the
                                                                 AVX2 kernel's bits), AVX2
                                                                 from 32
``avx2``      quantkit's AVX2 kernel (csrc/cpu)                  quantkit's fused AVX2 kernel
``generic``   quantkit's portable C kernel (any CPU; slow)       quantkit's fused portable C
``int_mm``    ``torch._int_mm`` (oneDNN)                         dense (torch.mm on chunks)
``float``     float32 products of the codes in K chunks of at    dense
              most 1040 (exact: each partial sum is an integer
              below 2^24 in magnitude)
============  =================================================  =============================

``auto`` on the CPU starts from the CPU's features (read once, from the library's cpuid check,
or ``/proc/cpuinfo`` without it). W8A8: with AVX-512 VNNI, ``vnni`` (a large weight read once
while a few rows pass over it: memory-bound, where ``torch._int_mm`` repacks the weight every
call) or ``int_mm`` (oneDNN's packed vpdpbusd kernel, best once the weight is reused by many
rows); with AVX2 and FMA but no VNNI (where ``torch._int_mm`` is 15-20x slower than float32),
``avx2`` or ``float``; without AVX2 or without the compiled library, ``float`` (``int_mm`` with
VNNI). Which candidate is fastest depends on the machine, not only on its features (on two AVX-512
VNNI EPYC generations ``torch._int_mm`` won at one row on one and lost on the other), so the
first products of each shape class (rows rounded up to a power of two, K, N, threads) run the
candidates in turn, each timed, and the class keeps the fastest (:func:`tuned_paths`); one row
without VNNI always takes ``avx2``, and more than :data:`TUNE_MAX_ROWS` rows on a VNNI CPU take
``int_mm``. On a CPU with AMX-INT8 (and the OS's grant of its tile state), products of at least
:data:`AMX_MIN_ROWS` rows time ``amx`` as well, at every size. Every W8A8 path gives the same bits,
so timing changes only speed. The VNNI kernel subtracts 128 times each weight row's sum;
:func:`weight_row_sums` keeps those per weight tensor. Weight-only: the fused kernel (few rows:
memory-bound; its AVX-512 form on AVX-512 VNNI CPUs, AVX2 elsewhere, the same bits) up to
:data:`FUSED_W8_MAX_ROWS_AVX512` rows on AVX-512 CPUs and at every size on AVX2 ones, dense
otherwise: a fixed rule, because its paths agree only to float32 rounding. CUDA tensors always
take ``int_mm`` and dense.

Block-scaled weights (``block_size`` B: one scale per B consecutive weights of a row, scales
(N, K / B)) take the same choice for weight-only (the fused AVX2 kernel dequantizes each weight
before its multiply-add); for W8A8, quantkit's kernel of the CPU's best path (``vnni``, ``avx2``)
for every shape, one exact int32 product per block, with the AMX kernel timed beside ``vnni``
from :data:`AMX_MIN_ROWS` rows where the CPU has it and B is a multiple of 64 (a forced
``amx`` runs ``vnni`` for other B); the torch paths (``int_mm``, ``float``) loop over the blocks
in torch ops with the same float32 operations, so every path gives the same bits.

A forced path this CPU cannot run raises RuntimeError naming the path and what it needs; an
unknown ``QUANTKIT_MATMUL`` value is a ValueError listing the choices.
"""

from __future__ import annotations

import functools
import os
import platform
import time
import weakref

import numpy as np
import torch

from ._constants import QMAX

PATHS = ("auto", "amx", "vnni", "avx2", "generic", "int_mm", "float")
#: quantkit's own kernels (csrc/cpu); the others are torch products.
NATIVE_PATHS = ("amx", "vnni", "avx2", "generic")
ENV = "QUANTKIT_MATMUL"
#: Largest K whose int8 products sum exactly in float32: 1040 * 127 * 127 = 16774160 < 2^24.
EXACT_FLOAT_K = (1 << 24) // (QMAX * QMAX)
#: On an AVX-512 VNNI CPU, the static W8A8 choice (int8_product's, and the first candidate the
#: timing tries): quantkit's VNNI kernel for at most this many rows with K >= VNNI_MIN_K,
#: torch._int_mm otherwise (the Zen 5 crossovers, docs/PERF-NOTES.md).
VNNI_MAX_ROWS = 32
VNNI_MIN_K = 2048
#: On a CPU with AMX-INT8, products of at least this many rows (one full activation tile) also
#: time quantkit's AMX kernel.
AMX_MIN_ROWS = 16
#: auto on an AVX-512 CPU: the fused weight-only kernel up to this many rows, dense above (the
#: crossover measured at 64 rows on a Zen 4 EPYC and below 16 on a Zen 5 one; at 32 the two
#: paths were level on the Zen 4).
FUSED_W8_MAX_ROWS_AVX512 = 32
#: Block-scaled weights: quantkit's fused weight-only kernel (eight-lane order only) below this
#: many rows on AVX2 CPUs (the per-row kernel's own switch to its packed order), dense above.
FUSED_W8_BLOCKS_MAX_ROWS = 31
#: Bytes of one float32 chunk of the weight on the dense paths when the activations are smaller:
#: it stays in cache until the matmul reads it. With larger activations a chunk takes as many
#: bytes as they do (``_chunk_bytes``).
CHUNK_BYTES = 4 << 20
#: auto, W8A8: where the fastest path depends on the machine and not only on its features, the
#: first products of each shape class time the candidate paths in turn and the class keeps the
#: fastest for the rest of the process (module docstring). On a VNNI CPU products of more rows
#: than this take int_mm untimed (compute-bound: oneDNN's packed kernel).
TUNE_MAX_ROWS = 256
_TUNE_SAMPLES = 3     # timed calls of each candidate before a shape class keeps the fastest
_clock = time.perf_counter
_tuned: dict = {}     # (product, row class, K, N, threads, candidates) -> path
_tuning: dict = {}    # the same keys -> {candidate: [seconds of its timed calls]}
_row_sums: dict = {}  # id(weight) -> (weakref to it, version, data_ptr, shape, int32 row sums)


# ------------------------------------------------------------------------------ the CPU


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """{"model", "avx2", "fma", "avx512", "avx512_vnni", "amx_int8", "native"}: this CPU and the
    library.

    ``native`` is None when quantkit's CPU library is usable, else the reason it is not. With the
    library, the features are what it detects (``amx_int8``: AMX-TILE and AMX-INT8 with the tile
    state granted by the OS); without it, the ``/proc/cpuinfo`` flags.
    """
    from .backends import native_cpu

    info = {"model": platform.processor() or platform.machine(), "avx2": False, "fma": False,
            "avx512": False, "avx512_vnni": False, "amx_int8": False}
    flags = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    info["model"] = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    info["native"] = native_cpu.unavailable_reason()
    if info["native"] is None:
        bits = native_cpu.features()
        info["avx2"] = info["fma"] = bool(bits & native_cpu.FEATURE_AVX2)
        info["avx512"] = bool(bits & native_cpu.FEATURE_AVX512)
        info["avx512_vnni"] = bool(bits & native_cpu.FEATURE_AVX512_VNNI)
        info["amx_int8"] = bool(bits & native_cpu.FEATURE_AMX_INT8)
    else:
        info["avx2"], info["fma"] = "avx2" in flags, "fma" in flags
        info["avx512"] = {"avx512f", "avx512bw", "avx512vl"} <= flags
        info["avx512_vnni"] = "avx512_vnni" in flags
        info["amx_int8"] = {"amx_tile", "amx_int8"} <= flags
    return info


def describe() -> dict:
    """The CPU, its features, the static path of each product here and the paths tuned so far
    (for reports and benchmarks)."""
    info = dict(cpu_info())
    info["forced"] = _forced()
    info["w8a8"] = _int8_path_cpu(256, 4096)
    info["w8a8_batch1"] = _int8_path_cpu(1, 4096)
    info["weight_only_batch1"] = _weight_only_path_cpu(1)
    info["weight_only_batch256"] = _weight_only_path_cpu(256)
    info["tuned"] = tuned_paths()
    return info


def _forced() -> str:
    value = os.environ.get(ENV, "auto").strip() or "auto"
    if value not in PATHS:
        raise ValueError(f"{ENV} must be one of {', '.join(PATHS)}; got {value!r}")
    return value


def _require(path: str) -> None:
    """RuntimeError unless this CPU and this install can run the quantkit kernel ``path``."""
    info = cpu_info()
    if info["native"] is not None:
        raise RuntimeError(f"{ENV}={path} needs quantkit's CPU library: {info['native']}")
    if path in ("avx2", "vnni", "amx") and not (info["avx2"] and info["fma"]):
        raise RuntimeError(f"{ENV}={path} cannot run on this CPU ({info['model']}): it lacks "
                           "AVX2/FMA; use generic, int_mm or float")
    if path in ("vnni", "amx") and not (info["avx512"] and info["avx512_vnni"]):
        raise RuntimeError(f"{ENV}={path} cannot run on this CPU ({info['model']}): it lacks "
                           "AVX-512 BW/VL or AVX-512 VNNI; use avx2, generic, int_mm or float")
    if path == "amx" and not info["amx_int8"]:
        raise RuntimeError(f"{ENV}=amx cannot run on this CPU ({info['model']}): it lacks "
                           "AMX-INT8 (or the OS does not grant its tile state); use vnni, avx2, "
                           "generic, int_mm or float")


def _forced_int8_path():
    """The W8A8 path ``QUANTKIT_MATMUL`` forces (checked runnable here), or None for auto."""
    forced = _forced()
    if forced == "auto":
        return None
    if forced in NATIVE_PATHS:
        _require(forced)
    return forced


def _int8_candidates_cpu(rows: int, k: int) -> tuple:
    """The W8A8 paths worth timing for a (rows, k) x (k, n) product on the CPU, the static
    choice first (the only one where the machine decides nothing)."""
    forced = _forced_int8_path()
    if forced is not None:
        return (forced,)
    info = cpu_info()
    if info["avx512_vnni"]:
        if info["native"] is not None:
            return ("int_mm",)
        amx = ("amx",) if info["amx_int8"] and rows >= AMX_MIN_ROWS else ()
        if rows > TUNE_MAX_ROWS:
            return ("int_mm",) + amx
        if rows <= VNNI_MAX_ROWS and k >= VNNI_MIN_K:
            return ("vnni", "int_mm") + amx
        return ("int_mm", "vnni") + amx
    if info["native"] is None and info["avx2"] and info["fma"]:
        return ("avx2",) if rows == 1 else ("avx2", "float")
    return ("float",)


def _int8_path_cpu(rows: int, k: int) -> str:
    """The static W8A8 path for a (rows, k) x (k, n) product on the CPU (before any timing)."""
    return _int8_candidates_cpu(rows, k)[0]


def _int8_blocks_path_cpu() -> str:
    """The static W8A8 path for block-scaled weights on the CPU (any shape)."""
    forced = _forced_int8_path()
    if forced is not None:
        return forced
    info = cpu_info()
    if info["native"] is None and info["avx2"] and info["fma"]:
        return "vnni" if info["avx512"] and info["avx512_vnni"] else "avx2"
    return "float"


def _int8_blocks_candidates_cpu(rows: int, block_size: int) -> tuple:
    """The W8A8 paths worth timing for block-scaled weights: the static one, and on a CPU with
    AMX-INT8 the AMX kernel too where it takes the blocks (a multiple of 64 long), from
    :data:`AMX_MIN_ROWS` rows."""
    path = _int8_blocks_path_cpu()
    if (path == "vnni" and _forced() == "auto" and cpu_info()["amx_int8"]
            and rows >= AMX_MIN_ROWS and block_size % 64 == 0):
        return ("vnni", "amx")
    return (path,)


def _weight_only_path_cpu(rows: int, blocks: bool = False) -> str:
    """"avx2" / "generic" (fused kernels) or "dense"; ``blocks``: block-scaled weights.

    A fixed rule, not timing: the paths agree only to float32 rounding, and a choice that
    changed with the machine's load would make outputs (and a resumed fine-tune) differ."""
    forced = _forced()
    if forced in NATIVE_PATHS:
        _require(forced)
        return "vnni" if forced == "amx" else forced
    if forced != "auto":
        return "dense"
    info = cpu_info()
    if info["native"] is not None or not (info["avx2"] and info["fma"]):
        return "dense"
    if info["avx512"] and rows > FUSED_W8_MAX_ROWS_AVX512:
        return "dense"
    if blocks and rows > FUSED_W8_BLOCKS_MAX_ROWS:
        return "dense"
    # the AVX-512 form exists for per-row scales (block scales: the AVX2 kernel on every CPU)
    return "vnni" if info["avx512"] and info["avx512_vnni"] and not blocks else "avx2"


def _row_class(rows: int) -> int:
    """Rows rounded up to a power of two: products in one class share a tuned path."""
    return 1 << max(0, rows - 1).bit_length()


def _fastest(product: str, rows: int, k: int, n: int, candidates: tuple, run):
    """``run(path)`` on the path tuned for this shape class. While the class is new, each call
    runs the candidate with the fewest timed calls so far (round robin) and is timed; once every
    candidate has _TUNE_SAMPLES calls, the one with the lowest time is kept. Each call computes
    its product once: tuning costs only the calls that ran on a slower candidate, and the calls
    it times are the workload's own (in a model, the layers of that shape one after the other,
    their weights as cold or warm as they really are). One candidate: no timing."""
    if len(candidates) == 1:
        return run(candidates[0])
    key = (product, _row_class(rows), k, n, _threads(), candidates)
    path = _tuned.get(key)
    if path is not None:
        return run(path)
    samples = _tuning.setdefault(key, {cand: [] for cand in candidates})
    cand = min(candidates, key=lambda c: len(samples[c]))
    start = _clock()
    out = run(cand)
    samples[cand].append(_clock() - start)
    if all(len(t) >= _TUNE_SAMPLES for t in samples.values()):
        _tuned[key] = min(candidates, key=lambda c: min(samples[c]))
        del _tuning[key]
    return out


def tuned_paths() -> dict:
    """The paths chosen by timing so far:
    ``{"w8a8 rows<=R K=k N=n threads=t of vnni/int_mm": path, ...}``."""
    return {f"{p} rows<={r} K={k} N={n} threads={t} of {'/'.join(c)}": path
            for (p, r, k, n, t, c), path in sorted(_tuned.items())}


def clear_tuned() -> None:
    """Forget the tuned paths (the next products of each shape class time their candidates)."""
    _tuned.clear()
    _tuning.clear()


# --------------------------------------------------------------------------- the products


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _chunk_bytes(activation_elements: int) -> int:
    """Bytes of one float32 chunk of the weight beside float32 activations of that many elements:
    CHUNK_BYTES, or the activations' own bytes when larger.

    Every chunk's product reads all of the activations (forward) or updates all of the result
    (input gradient), so k chunks move those bytes k times; chunks as large as the activations
    keep that traffic below twice the chunk bytes, while the temporary never exceeds what the
    caller already holds (or CHUNK_BYTES)."""
    return max(CHUNK_BYTES, 4 * activation_elements)


def _rows_per_chunk(in_features: int, chunk_bytes: int = None) -> int:
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return max(16, chunk_bytes // (4 * max(1, in_features)))


def int8_product(codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``codes @ weight.T`` exactly in int32: codes (M, K), weight (N, K), int8 in [-127, 127]."""
    m, n = codes.shape[0], weight.shape[0]
    if m == 0 or n == 0 or codes.shape[1] == 0:
        return torch.zeros((m, n), dtype=torch.int32, device=codes.device)
    if codes.device.type != "cpu":
        return _int8_product_device(codes, weight)
    return _int8_product_on(_int8_path_cpu(m, codes.shape[1]), codes, weight)


def _int8_product_device(codes: torch.Tensor, weight: torch.Tensor, int_mm=None) -> torch.Tensor:
    """int8_product of non-empty tensors on a GPU: ``torch._int_mm`` where its CUDA kernel takes
    the shape (more than 16 rows, K and N multiples of 8); 16 rows or fewer are padded with zero
    rows to 17 (a zero row adds nothing to the others); K or N not a multiple of 8 take float64
    products (exact: every sum is below 2^31, far below 2^53; float32 could run as TF32).
    ``int_mm`` stands in for ``torch._int_mm`` in tests."""
    int_mm = int_mm or torch._int_mm
    (m, k), n = codes.shape, weight.shape[0]
    if k % 8 or n % 8:
        return (codes.to(torch.float64) @ weight.to(torch.float64).t()).to(torch.int32)
    if m <= 16:
        padded = torch.zeros((17, k), dtype=torch.int8, device=codes.device)
        padded[:m] = codes
        return int_mm(padded, weight.t())[:m]
    return int_mm(codes, weight.t())


def weight_row_sums(weight: torch.Tensor):
    """``sum_k W[j, k]`` of each row of a CPU int8 weight (int32 NumPy (N,)), for the "vnni"
    kernels (they subtract 128 times it; computing it costs as much as a one-row product).

    Kept per weight tensor while it is unchanged: the same tensor object, the same storage and
    the same version counter (torch bumps it on every in-place change, ``copy_`` included).
    Inference tensors have no version counter: their sums are computed on every call. A write
    into the weight through a NumPy view bypasses the counter: call :func:`clear_row_sums`
    after one."""
    from .backends import native_cpu

    try:
        version = weight._version
    except RuntimeError:          # an inference tensor
        return native_cpu.row_sums(weight.numpy())
    key = id(weight)
    entry = _row_sums.get(key)
    if (entry is not None and entry[0]() is weight and entry[1:4]
            == (version, weight.data_ptr(), tuple(weight.shape))):
        return entry[4]
    sums = native_cpu.row_sums(weight.numpy())

    def forget(ref, key=key):
        if _row_sums.get(key, (None,))[0] is ref:
            del _row_sums[key]

    _row_sums[key] = (weakref.ref(weight, forget), version, weight.data_ptr(),
                      tuple(weight.shape), sums)
    return sums


def clear_row_sums() -> None:
    """Forget the kept weight row sums (:func:`weight_row_sums`)."""
    _row_sums.clear()


def _int8_product_on(path: str, codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """int8_product of non-empty CPU tensors on ``path``."""
    if path in NATIVE_PATHS:
        from .backends import native_cpu

        sums = weight_row_sums(weight) if path == "vnni" else None
        return torch.from_numpy(native_cpu.gemm_s8s8s32(codes.numpy(), weight.numpy(), path=path,
                                                        threads=_threads(), b_row_sums=sums))
    if path == "int_mm" and codes.shape[1] > 1:
        return torch._int_mm(codes, weight.t())       # W.t() as a view is oneDNN's fast layout
    # torch._int_mm on the CPU returns wrong sums at K == 1 (torch 2.13, oneDNN; tested): the
    # exact float32 products give the same int32 there
    return _int8_product_float(codes, weight)


def w8a8_linear(codes: torch.Tensor, s_x: torch.Tensor, weight: torch.Tensor,
                weight_scale: torch.Tensor, bias, block_size=None) -> torch.Tensor:
    """``float32(codes @ weight.T) * (s_x[:, None] * weight_scale[None, :]) + bias``.

    The int32 product is exact on every path; each float32 operation of the rescale is rounded
    once, in that order, so every path gives the same bits. quantkit's kernels rescale each tile
    as it is computed; the other paths rescale the int32 result in one fused numba pass (CPU) or
    in torch ops. With ``block_size`` (weight_scale (N, K / B)), see :func:`w8a8_linear_blocks`.
    """
    if block_size is not None:
        return w8a8_linear_blocks(codes, s_x, weight, weight_scale, bias, block_size)
    (m, k), n = codes.shape, weight.shape[0]
    if codes.device.type == "cpu":
        if not (m and n and k):   # an empty product: zeros, then the rescale adds the bias
            return _w8a8_linear_cpu("float", codes, s_x, weight, weight_scale, bias)
        candidates = _int8_candidates_cpu(m, k)
        # before any timing: a weight's first call would otherwise charge its sums to "vnni"
        sums = weight_row_sums(weight) if "vnni" in candidates else None

        def run(path):
            return _w8a8_linear_cpu(path, codes, s_x, weight, weight_scale, bias, sums)

        return _fastest("w8a8", m, k, n, candidates, run)
    acc = int8_product(codes, weight)
    y = acc.to(torch.float32).mul_(s_x[:, None] * weight_scale[None, :])
    if bias is not None:
        y.add_(bias)
    return y


def _w8a8_linear_cpu(path: str, codes, s_x, weight, weight_scale, bias,
                     sums=None) -> torch.Tensor:
    """w8a8_linear of CPU tensors on ``path``: quantkit's kernels rescale as they go; the torch
    paths give the exact int32 product to the fused numba rescale. ``sums``: the weight's row
    sums for "vnni" (:func:`weight_row_sums`), or None."""
    b = None if bias is None else bias.detach().numpy()
    if path in NATIVE_PATHS:
        from .backends import native_cpu

        return torch.from_numpy(native_cpu.linear_w8a8_f32(
            codes.numpy(), weight.numpy(), s_x.numpy(), weight_scale.numpy(), b, path=path,
            threads=_threads(), b_row_sums=sums if path == "vnni" else None))
    from .backends.numba_nn import rescale_int32_numba

    acc = _int8_product_on(path, codes, weight).contiguous()  # a fresh int32 product, ours
    a = acc.numpy()
    # rescaled in place: each float32 replaces its own int32, so the layer holds one (M, N) buffer
    rescale_int32_numba(a, s_x.numpy(), weight_scale.numpy(), b, out=a.view(np.float32))
    return acc.view(torch.float32)


def w8a8_linear_blocks(codes: torch.Tensor, s_x: torch.Tensor, weight: torch.Tensor,
                       weight_scale: torch.Tensor, bias, block_size: int) -> torch.Tensor:
    """W8A8 with block-scaled weights (:func:`quantkit.reference.linear_w8a8_blocks`):
    ``t = sum_g float32(C_g) * S[:, g]`` in block order from 0, then ``t * s_x[:, None] + bias``,
    ``C_g`` the exact int32 product over block g; the same bits on every path."""
    m, n = codes.shape[0], weight.shape[0]
    if codes.device.type == "cpu" and m and n:
        candidates = _int8_blocks_candidates_cpu(m, block_size)
        if candidates[0] in NATIVE_PATHS:
            from .backends import native_cpu

            def run(path):
                return torch.from_numpy(native_cpu.linear_w8a8_f32(
                    codes.numpy(), weight.numpy(), s_x.numpy(), weight_scale.numpy(),
                    None if bias is None else bias.detach().numpy(), block_size=block_size,
                    path=path, threads=_threads()))

            return _fastest(f"w8a8 blocks of {block_size}", m, codes.shape[1], n, candidates,
                            run)
    t = torch.zeros((m, n), dtype=torch.float32, device=codes.device)
    for g in range(weight_scale.shape[1]):
        cols = slice(g * block_size, (g + 1) * block_size)
        acc = int8_product(codes[:, cols].contiguous(), weight[:, cols].contiguous())
        t = t + acc.to(torch.float32) * weight_scale[:, g]
    y = t * s_x[:, None]
    return y if bias is None else y + bias


def _int8_product_float(codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """int8_product from float32 matmuls of at most EXACT_FLOAT_K terms, summed in int32."""
    m, k = codes.shape
    n = weight.shape[0]
    acc = torch.zeros((m, n), dtype=torch.int32)
    x = codes.to(torch.float32)
    rows = _rows_per_chunk(min(k, EXACT_FLOAT_K))
    for r0 in range(0, n, rows):
        for k0 in range(0, k, EXACT_FLOAT_K):
            w = weight[r0:r0 + rows, k0:k0 + EXACT_FLOAT_K].to(torch.float32)
            acc[:, r0:r0 + rows] += torch.mm(x[:, k0:k0 + EXACT_FLOAT_K], w.t()).to(torch.int32)
    return acc


def weight_only_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       bias, block_size=None) -> torch.Tensor:
    """``x @ W_hat.T + bias`` for 2-D float32 x (row-major), ``W_hat`` the dequantized weight.

    The fused kernels (few rows) read the int8 weight once and compute
    ``float32(x @ float32(W).T) * s_w + b`` per row scale, or dequantize each weight before its
    multiply-add with ``block_size`` B (weight_scale (N, K / B),
    :func:`quantkit.reference.linear_w8_blocks`). The dense path (many rows: compute-bound)
    dequantizes cache-sized chunks of rows, ``float32(W) * s_w[:, None]`` (or per block), and
    gives each to one ``addmm`` with the bias, so it costs what float32 ``nn.Linear`` costs plus
    one pass over the int8 weight. Paths agree to float32 rounding, not bit for bit.
    """
    if x.device.type == "cpu" and x.shape[0] and weight.shape[0]:
        path = _weight_only_path_cpu(x.shape[0], blocks=block_size is not None)
        return _weight_only_linear_cpu(path, x, weight, weight_scale, bias, block_size)
    return _dense_linear(x, weight, weight_scale, bias, block_size)


def _weight_only_linear_cpu(path: str, x, weight, weight_scale, bias, block_size):
    """weight_only_linear of CPU tensors on ``path`` (a fused kernel, or "dense")."""
    if path == "dense":
        return _dense_linear(x, weight, weight_scale, bias, block_size)
    from .backends import native_cpu

    return torch.from_numpy(native_cpu.linear_w8_f32(
        x.detach().numpy(), weight.numpy(), weight_scale.numpy(),
        None if bias is None else bias.detach().numpy(), block_size=block_size, path=path,
        threads=_threads()))


def _dequantized_rows(weight: torch.Tensor, weight_scale: torch.Tensor, start: int, stop: int,
                      block_size):
    """Rows [start, stop) of the dequantized weight in float32: ``float32(codes) * s_w[:, None]``
    per row, or ``float32(codes) * S[:, k // B]`` with block scales (N, K / B): an exact
    conversion, then one rounded product per weight. On the CPU both passes write into a reused,
    cache-line aligned buffer (a fresh one would page-fault on every call), by torch's own
    threads: the product that follows runs on the same thread pool, so no other pool's workers
    are still spinning beside it. Two passes, because torch's mixed int8 x float32 ``mul`` runs
    2-4x slower than a conversion plus an in-place float32 ``mul_``."""
    from . import _buffers

    codes = weight[start:stop]
    if codes.device.type == "cpu" and 4 * codes.numel() >= _buffers.MIN_BYTES:
        out = torch.from_numpy(_buffers.empty(tuple(codes.shape), np.float32)).copy_(codes)
    else:   # small: torch's allocator reuses its own blocks
        out = codes.to(torch.float32)
    if block_size is None:
        return out.mul_(weight_scale[start:stop, None])
    rows, k = codes.shape
    out.view(rows, k // block_size, block_size).mul_(weight_scale[start:stop, :, None])
    return out


def _dense_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias,
                  block_size) -> torch.Tensor:
    """``x @ W_hat.T + bias``: one ``addmm`` when the float32 weight fits in one chunk
    (:func:`_chunk_bytes` of x), else the weight dequantized in chunks of rows, each an ``addmm``
    into rows of the transposed result (returned as a transposed view)."""
    n, k = weight.shape
    chunk_bytes = _chunk_bytes(x.numel())
    if 4 * n * k <= chunk_bytes:
        w_hat = _dequantized_rows(weight, weight_scale, 0, n, block_size)
        return torch.mm(x, w_hat.t()) if bias is None else torch.addmm(bias, x, w_hat.t())
    out = torch.empty((n, x.shape[0]), dtype=torch.float32, device=x.device)   # y transposed
    rows = _rows_per_chunk(k, chunk_bytes)
    for start in range(0, n, rows):
        chunk = _dequantized_rows(weight, weight_scale, start, start + rows, block_size)
        if bias is None:
            torch.mm(chunk, x.t(), out=out[start:start + rows])
        else:
            torch.addmm(bias[start:start + rows, None], chunk, x.t(), out=out[start:start + rows])
    return out.t()


def grad_input(grad: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               block_size=None):
    """``grad @ W_hat``, the weight dequantized in chunks of rows (:func:`_chunk_bytes` of the
    result)."""
    out = torch.zeros((grad.shape[0], weight.shape[1]), dtype=torch.float32, device=grad.device)
    rows = _rows_per_chunk(weight.shape[1], _chunk_bytes(out.numel()))
    for start in range(0, weight.shape[0], rows):
        out.addmm_(grad[:, start:start + rows],
                   _dequantized_rows(weight, weight_scale, start, start + rows, block_size))
    return out
