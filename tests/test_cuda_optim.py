"""The CUDA 8-bit AdamW step (csrc/optim.cu): bit for bit with the reference and the numba kernel.

Without a GPU the kernels run through the host emulation (``python3 csrc/build.py --emulate``:
the same source compiled with g++, each block as 256 threads with real barriers), which checks
the indexing, the two passes, the block reductions and the arithmetic. ``--gpu`` adds the same
comparison on a real device and the optimizer end to end on CUDA parameters.
"""

import numpy as np
import pytest
import torch

from quantkit import reference as R
from quantkit.backends import cuda_optim
from quantkit.optim import AdamW8bit
from cuda_cases import emulated_library



@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return emulated_library(tmp_path_factory.mktemp("emu"))


def _scalars(t, lr=1e-3, wd=1e-2, betas=(0.9, 0.999)):
    s = R.adamw_scalars(lr, betas[0], betas[1], 1e-8, wd, t)
    return np.array([s[k] for k in R.ADAMW_SCALARS], np.float32), s


def _ptr(a):
    return a.ctypes.data


def _emu_step(emu, p, g, state, block):
    m_codes, m_absmax, r_codes, r_absmax, t = state
    scalars, _ = _scalars(t)
    rows, length = p.shape
    code = emu.qk_adamw8bit_step_f32(_ptr(p), _ptr(g), _ptr(m_codes), _ptr(m_absmax),
                                     _ptr(r_codes), _ptr(r_absmax), rows, length, block,
                                     *R.M_CODE, *R.R_CODE, _ptr(scalars), 0, None)
    assert code == 0, f"cudaError {code}"


def _fresh(rows, length, block):
    zeros = np.zeros((rows, length), np.float32)
    return [*R.encode_moments(zeros, block, True), *R.encode_moments(zeros, block, False)]


@pytest.mark.parametrize("rows, length, block", [(1, 1, 64), (3, 64, 64), (2, 200, 64),
                                                 (4, 700, 256), (2, 1000, 128), (1, 4100, 4096)])
def test_emulated_step_equals_reference(emu, rows, length, block):
    rng = np.random.default_rng(rows * length + block)
    p = rng.standard_normal((rows, length)).astype(np.float32)
    ref_p, ref_state = p.copy(), _fresh(rows, length, block)
    k_p, k_state = p.copy(), [a.copy() for a in ref_state]
    for t in range(1, 4):
        g = (rng.standard_normal((rows, length)) * 10.0 ** rng.integers(-6, 1)).astype(np.float32)
        if t == 2:
            g[:, ::3] = 0.0                          # exact zeros must keep m exactly 0 there
        _, s = _scalars(t)
        ref_p, *ref_state = R.adamw8bit_step(ref_p, g, *ref_state, block, s)
        _emu_step(emu, k_p, g, (*k_state, t), block)
        assert np.array_equal(ref_p, k_p), f"parameters differ at step {t}"
        for a, b in zip(ref_state, k_state):
            assert np.array_equal(a, b), f"states differ at step {t}"


def test_emulated_float32_state_step_equals_numba(emu):
    from quantkit.backends import numba_optim

    rng = np.random.default_rng(5)
    n = 1000
    p = rng.standard_normal(n).astype(np.float32)
    m, r = np.zeros(n, np.float32), np.zeros(n, np.float32)
    p2, m2, r2 = p.copy(), m.copy(), r.copy()
    for t in range(1, 4):
        g = rng.standard_normal(n).astype(np.float32)
        scalars, s = _scalars(t)
        numba_optim.adamw32_step(p, g, m, r, *[s[k] for k in R.ADAMW32_KERNEL_SCALARS])
        assert emu.qk_adamw32_step_f32(_ptr(p2), _ptr(g), _ptr(m2), _ptr(r2), n, _ptr(scalars),
                                       0, None) == 0
        assert np.array_equal(p, p2) and np.array_equal(m, m2) and np.array_equal(r, r2)


def test_emulated_step_refuses_bad_arguments(emu):
    p = np.zeros((2, 64), np.float32)
    state = _fresh(2, 64, 64)
    scalars, _ = _scalars(1)
    for block, code in ((63, R.M_CODE), (96, R.M_CODE), (8192, R.M_CODE), (64, (100, 5))):
        err = emu.qk_adamw8bit_step_f32(_ptr(p), _ptr(p), *(_ptr(a) for a in state), 2, 64, block,
                                        *code, *R.R_CODE, _ptr(scalars), 0, None)
        assert err != 0, (block, code)


def test_optimizer_takes_the_cuda_kernels_on_cuda_parameters(emu, monkeypatch):
    """AdamW8bit's CUDA path (state on the device, the kernels, the gradient check in torch ops)
    run on CPU tensors with the emulated library: the same bits as the CPU path."""
    from quantkit.optim import adamw8bit

    monkeypatch.setattr(adamw8bit, "_cuda_library", lambda: emu)
    monkeypatch.setattr(adamw8bit, "_cuda_stream", lambda t: None)
    torch.manual_seed(0)
    params = [torch.randn(6, 300), torch.randn(40)]
    cpu = [q.clone().requires_grad_() for q in params]
    dev = [q.clone().requires_grad_() for q in params]
    opt_cpu = AdamW8bit(cpu, lr=1e-2, block_size=64, min_8bit_size=64)
    opt_dev = AdamW8bit(dev, lr=1e-2, block_size=64, min_8bit_size=64)
    monkeypatch.setattr(opt_dev, "_on_cuda", lambda p: True)
    for _ in range(3):
        grads = [torch.randn_like(q) for q in params]
        for a, b, g in zip(cpu, dev, grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt_cpu.step()
        opt_dev.step()
        for a, b in zip(cpu, dev):
            assert torch.equal(a, b)
    bad = torch.randn_like(dev[0])
    bad[2, 7] = float("nan")
    dev[0].grad = bad
    before = [q.detach().clone() for q in dev]
    with pytest.raises(ValueError, match="parameter 0 of group 0 has NaN"):
        opt_dev.step()
    assert all(torch.equal(a, b) for a, b in zip(before, dev))


@pytest.mark.gpu
def test_gpu_step_equals_cpu_kernel():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(1)
    params = [torch.randn(64, 1000), torch.randn(3, 4100), torch.randn(77)]
    cpu = [q.clone().requires_grad_() for q in params]
    gpu = [q.cuda().requires_grad_() for q in params]
    opt_cpu = AdamW8bit(cpu, lr=1e-2, min_8bit_size=1024)
    opt_gpu = AdamW8bit(gpu, lr=1e-2, min_8bit_size=1024)
    for _ in range(5):
        grads = [torch.randn_like(q) * 1e-2 for q in params]
        for a, b, g in zip(cpu, gpu, grads):
            a.grad, b.grad = g.clone(), g.cuda()
        opt_cpu.step()
        opt_gpu.step()
    for a, b in zip(cpu, gpu):
        assert torch.equal(a.detach(), b.detach().cpu())
    for a, b in zip(cpu, gpu):
        for key, value in opt_cpu.state[a].items():
            assert torch.equal(value, opt_gpu.state[b][key].cpu()), key
