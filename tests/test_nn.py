"""QuantLinear and quantize_model: exact arithmetic, autograd, torch.compile, state, checkpoints."""

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import quantkit
from quantkit import reference
from quantkit.nn import QuantLinear, load_quantized, quantize_model, quantize_rows

MODES = [None, "dynamic", "static"]


def _linear(in_f=48, out_f=24, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def _from_float(linear, mode, **kw):
    return QuantLinear.from_float(linear, activations=mode,
                                  act_alpha=3.0 if mode == "static" else None, **kw)


def _mlp(seed=0, act=nn.ReLU):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), act(), nn.Linear(32, 32), act(), nn.Linear(32, 4))


def _exact_w8a8(x2, layer, alpha_rows):
    """The W8A8 output from reference codes and an int64 matmul (independent of torch._int_mm)."""
    xq = reference.quantize_per_channel(x2.numpy(), alpha_rows, axis=0).astype(np.int64)
    acc = torch.from_numpy(xq @ layer.weight.numpy().astype(np.int64).T).to(torch.float32)
    s_x = torch.from_numpy(reference.scale_from_alpha(alpha_rows))
    y = acc * (s_x[:, None] * layer.weight_scale[None, :])
    return y + layer.bias if layer.bias is not None else y


# ------------------------------------------------------------------------------------ construction

def test_weight_is_mse_calibrated_per_output_channel():
    from quantkit.calibration import calibrate

    lin = _linear()
    layer = QuantLinear.from_float(lin)
    w = lin.weight.detach().numpy()
    alpha = np.asarray(calibrate(w, "mse", axis=0), dtype=np.float32)
    assert np.array_equal(layer.weight.numpy(), reference.quantize_per_channel(w, alpha, axis=0))
    assert np.array_equal(layer.weight_scale.numpy(), reference.scale_from_alpha(alpha))
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert torch.equal(layer.bias, lin.bias.detach()) and not layer.bias.requires_grad
    assert set(layer.state_dict()) == {"weight", "weight_scale", "bias"}


def test_from_float_leaves_the_linear_alone():
    lin = _linear()
    before = copy.deepcopy(lin.state_dict())
    QuantLinear.from_float(lin, activations="static", act_alpha=2.0)
    assert all(torch.equal(before[k], v) for k, v in lin.state_dict().items())


def test_bad_construction():
    lin = _linear()
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_float(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="activations"):
        QuantLinear.from_float(lin, activations="int4")
    with pytest.raises(ValueError, match="act_alpha"):
        QuantLinear.from_float(lin, activations="static")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="act_alpha"):
            QuantLinear.from_float(lin, activations="static", act_alpha=bad)
    with pytest.raises(ValueError, match="only used"):
        QuantLinear.from_float(lin, activations="dynamic", act_alpha=1.0)
    with pytest.raises(TypeError, match="weight_method"):
        QuantLinear.from_float(lin, weight_method=None)
    nan = _linear()
    with torch.no_grad():
        nan.weight[3, 5] = float("nan")
    with pytest.raises(ValueError):
        QuantLinear.from_float(nan)


@pytest.mark.parametrize("bad", [1e-40, 3.7e-37, 1e39, -1e-30, np.float64(1e300),
                                 float(np.finfo(np.float32).max)])
def test_act_alpha_is_checked_as_the_kernels_use_it(bad):
    """float32(act_alpha) must be finite and 0 or in [MIN_POSITIVE_ALPHA, MAX_ALPHA]."""
    with pytest.raises(ValueError, match="act_alpha"):
        QuantLinear.from_float(_linear(), activations="static", act_alpha=bad)


def test_act_alpha_kinds():
    from quantkit._constants import MAX_ALPHA, MIN_POSITIVE_ALPHA

    lin = _linear()
    for bad in ("2.0", True, [1.0, 2.0], object()):
        with pytest.raises(TypeError, match="act_alpha"):
            QuantLinear.from_float(lin, activations="static", act_alpha=bad)
    x = torch.randn(3, 48)
    for good in (MIN_POSITIVE_ALPHA, MAX_ALPHA, np.float32(2.5), torch.tensor(2.5), 3):
        layer = QuantLinear.from_float(lin, activations="static", act_alpha=good)
        assert float(layer.input_alpha) == float(np.float32(good))
        assert torch.isfinite(layer(x)).all()


def test_act_alpha_zero_gives_the_bias():
    """alpha = 0 is legal (DESIGN.md section 1): zero activation codes, s_x = 0, y = bias."""
    lin = _linear()
    layer = QuantLinear.from_float(lin, activations="static", act_alpha=0.0)
    assert float(layer.input_alpha) == 0.0 and layer.quant_stats["act_alpha"] == 0.0
    x = torch.randn(5, 48)
    assert torch.equal(layer(x), lin.bias.detach().expand(5, 24))


@pytest.mark.parametrize("mode", MODES)
def test_bad_input(mode):
    layer = _from_float(_linear(), mode)
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 48, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(\.\.\., 48\)"):
        layer(torch.randn(2, 47))
    with pytest.raises(ValueError):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError):
        layer(np.ones((2, 48), np.float32))


def test_non_finite_activations_are_refused():
    layer = _from_float(_linear(), "dynamic")
    x = torch.randn(3, 48)
    x[1, 7] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer(x)
    static = _from_float(_linear(), "static")
    x[1, 7] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        static(x)


# -------------------------------------------------------------------------------------- arithmetic

def test_weight_only_formula():
    layer = _from_float(_linear(), None)
    x = torch.randn(5, 3, 48)
    before = x.clone()
    y = layer(x)
    assert torch.equal(x, before)
    expected = (x.reshape(-1, 48) @ layer.weight.float().t()) * layer.weight_scale + layer.bias
    torch.testing.assert_close(y.reshape(-1, 24), expected, rtol=1e-6, atol=1e-6)
    assert y.shape == (5, 3, 24) and y.is_contiguous()


def test_weight_only_chunked_matmul_spans_chunks(monkeypatch):
    import quantkit.matmul as qmm

    monkeypatch.setenv("QUANTKIT_MATMUL", "float")           # the dense (chunked) weight-only path
    monkeypatch.setattr(qmm, "CHUNK_BYTES", 64 * 4 * 16)     # 16 rows a chunk: 13 chunks
    lin = _linear(64, 200)
    layer = QuantLinear.from_float(lin)
    x = torch.randn(7, 64)
    expected = (x @ layer.weight.float().t()) * layer.weight_scale + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def _tie_rows():
    """Rows whose products x * 127 / alpha land on .5 ties, +-alpha, zeros and tiny values."""
    alpha = np.float32(127.0)                                  # inv = 1: x itself is x * inv
    ties = np.arange(-127, 127, dtype=np.float32) + np.float32(0.5)
    rows = [np.resize(np.concatenate([ties, [alpha, -alpha]]), 256)]
    rows.append(np.zeros(256, np.float32))                    # alpha = 0: codes 0, scale 0
    rng = np.random.default_rng(0)
    rows.append(rng.standard_normal(256).astype(np.float32) * np.float32(1e-30))
    rows.append(rng.standard_t(3, 256).astype(np.float32))
    rows.append(np.full(256, -2.5, np.float32))
    return np.stack(rows)


def test_activation_codes_bit_exact_with_reference():
    x = torch.from_numpy(_tie_rows())
    codes, scale = quantize_rows(x)
    alpha = np.abs(x.numpy()).max(axis=1)
    assert np.array_equal(codes.numpy(), reference.quantize_per_channel(x.numpy(), alpha, axis=0))
    assert np.array_equal(scale.numpy(), reference.scale_from_alpha(alpha))
    fixed = torch.tensor(2.0)
    codes, scale = quantize_rows(x, fixed)
    assert np.array_equal(codes.numpy(), reference.quantize_per_tensor(x.numpy(), np.float32(2.0)))


def test_fused_row_codes_equal_calibrate_then_quantize():
    """The one-pass |row|max kernel: the alpha of calibrate(x, "max", axis=0), the reference codes,
    on magnitudes from subnormal to float32 max, -0, the MIN_POSITIVE_ALPHA boundary, empty rows."""
    from quantkit import calibrate
    from quantkit._constants import MIN_POSITIVE_ALPHA

    rng = np.random.default_rng(7)
    edge = np.float32(MIN_POSITIVE_ALPHA)
    rows = [np.zeros(40, np.float32), np.full(40, -0.0, np.float32),
            np.full(40, np.nextafter(edge, np.float32(0)), np.float32), np.full(40, edge),
            np.full(40, np.float32(1e-45)), np.full(40, np.finfo(np.float32).max),
            np.linspace(-3, 3, 40, dtype=np.float32)]
    for exponent in (-40, -20, 0, 20, 38):
        rows.append((rng.standard_normal(40) * 10.0 ** exponent).astype(np.float32))
    x = np.stack(rows)
    for data in (x, rng.standard_t(2, (300, 97)).astype(np.float32), np.zeros((5, 0), np.float32)):
        codes, scale = quantize_rows(torch.from_numpy(data))
        alpha = (np.asarray(calibrate(torch.from_numpy(data), "max", axis=0), np.float32)
                 if data.size else np.zeros(data.shape[0], np.float32))
        assert np.array_equal(codes.numpy(), reference.quantize_per_channel(data, alpha, axis=0))
        assert np.array_equal(scale.numpy(), reference.scale_from_alpha(alpha))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_fused_row_codes_refuse_non_finite_anywhere(bad):
    x = torch.randn(9, 130)
    x[8, 129] = bad
    before = x.clone()
    with pytest.raises(ValueError, match=r"non-finite.*\(8, 129\)"):
        quantize_rows(x)
    assert torch.equal(x.isnan(), before.isnan()) and torch.equal(x.nan_to_num(), before.nan_to_num())


def test_torch_path_bit_exact_with_reference():
    """The torch-ops path (used off the CPU) gives the reference codes too, on CPU tensors."""
    from quantkit.linear_ops import _quantize_rows_torch

    rng = np.random.default_rng(1)
    x = np.concatenate([_tie_rows(), rng.standard_normal((64, 256)).astype(np.float32) * 3])
    alpha = np.abs(x).max(axis=1).astype(np.float32)
    codes, scale = _quantize_rows_torch(torch.from_numpy(x), torch.from_numpy(alpha))
    assert np.array_equal(codes.numpy(), reference.quantize_per_channel(x, alpha, axis=0))
    assert np.array_equal(scale.numpy(), reference.scale_from_alpha(alpha))


@pytest.mark.parametrize("shape", [(1, 48), (7, 48), (2, 5, 48), (0, 48), (33, 48)])
def test_dynamic_w8a8_exact(shape):
    layer = _from_float(_linear(), "dynamic")
    torch.manual_seed(1)
    x = torch.randn(*shape) * 2
    x2 = x.reshape(-1, 48)
    y = layer(x)
    assert y.shape == (*shape[:-1], 24)
    alpha = np.abs(x2.numpy()).max(axis=1) if x2.shape[0] else np.zeros(0, np.float32)
    assert torch.equal(y.reshape(-1, 24), _exact_w8a8(x2, layer, alpha.astype(np.float32)))


def test_dynamic_row_of_subnormals_gives_zero_codes():
    """A row whose max is below MIN_POSITIVE_ALPHA (127 / alpha would overflow) quantizes to 0."""
    layer = _from_float(_linear(), "dynamic")
    x = torch.randn(3, 48)
    x[1] *= 1e-40
    y = layer(x)
    assert torch.equal(y[1], layer.bias.detach())
    assert torch.equal(y[[0, 2]], layer(x[[0, 2]]))


def test_static_w8a8_exact_and_clips():
    layer = _from_float(_linear(bias=False), "static")
    assert float(layer.input_alpha) == 3.0
    x = torch.randn(9, 48) * 3                                   # some |x| > alpha: clipped
    alpha = np.full(9, 3.0, np.float32)
    assert torch.equal(layer(x), _exact_w8a8(x, layer, alpha))


@pytest.mark.parametrize("mode", MODES)
def test_close_to_float(mode):
    lin = _linear(256, 128)
    layer = QuantLinear.from_float(lin, activations=mode,
                                   act_alpha=4.0 if mode == "static" else None)
    x = torch.randn(64, 256)
    with torch.no_grad():
        ref = lin(x)
    rel = float((layer(x) - ref).norm() / ref.norm())
    assert rel < {None: 5e-3, "dynamic": 1.5e-2, "static": 2e-2}[mode]


def test_int_mm_odd_shapes():
    """torch._int_mm on the CPU takes any shape here; checked against an int64 matmul."""
    for m, k, n in [(1, 3, 5), (17, 100, 30), (64, 384, 1536)]:
        layer = _from_float(_linear(k, n), "dynamic")
        x = torch.randn(m, k)
        alpha = np.abs(x.numpy()).max(axis=1)
        assert torch.equal(layer(x), _exact_w8a8(x, layer, alpha))


# -------------------------------------------------------------------------------- autograd, compile

@pytest.mark.parametrize("mode", MODES)
def test_backward_to_the_input(mode):
    layer = _from_float(_linear(), mode)
    x = torch.randn(6, 48, requires_grad=True)
    g = torch.randn(6, 24)
    layer(x).backward(g)
    torch.testing.assert_close(x.grad, g @ layer.dequantized_weight(), rtol=1e-5, atol=1e-6)
    assert layer.bias.grad is None
    layer.bias.requires_grad_(True)
    x.grad = None
    layer(x).backward(g)
    torch.testing.assert_close(layer.bias.grad, g.sum(0))


def test_lora_adapter_trains_on_a_frozen_int8_base():
    torch.manual_seed(0)
    base = QuantLinear.from_float(_linear(32, 16))
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    down, up = nn.Linear(32, 4, bias=False), nn.Linear(4, 16, bias=False)
    nn.init.zeros_(up.weight)
    opt = torch.optim.Adam([*down.parameters(), *up.parameters()], lr=1e-2)
    x, target = torch.randn(64, 32), torch.randn(64, 16)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = ((base(x) + up(down(x)) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.equal(frozen[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile(mode):
    torch._dynamo.reset()
    model = quantize_model(_mlp(), activations=mode,
                           calib_data=[torch.randn(8, 16) for _ in range(2)])
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(5, 16, requires_grad=True)
    y = compiled(x)
    assert torch.equal(y, model(x))              # the int8 products are opaque custom ops
    y.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    model(x).sum().backward()
    torch.testing.assert_close(grad, x.grad)


def test_custom_ops_pass_opcheck():
    layer = _from_float(_linear(), "static")
    x = torch.randn(4, 48, requires_grad=True)
    args = [(torch.ops.quantkit.linear_w8, (x, layer.weight, layer.weight_scale, layer.bias)),
            (torch.ops.quantkit.linear_w8a8, (x, layer.weight, layer.weight_scale, None, None)),
            (torch.ops.quantkit.linear_w8a8, (x, layer.weight, layer.weight_scale, layer.bias,
                                              layer.input_alpha))]
    for op, a in args:
        torch.library.opcheck(op, a, test_utils=("test_schema", "test_faketensor",
                                                 "test_autograd_registration"))


# ------------------------------------------------------------------------------------------ models

def test_quantize_model_replaces_linears_and_reports():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    q = quantize_model(model, skip=["4"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # a copy
    assert isinstance(model[0], nn.Linear)
    assert isinstance(q[0], QuantLinear) and isinstance(q[2], QuantLinear)
    assert isinstance(q[4], nn.Linear)
    report = q.quantkit_report
    assert [r["name"] for r in report] == ["0", "2"]
    for r in report:
        assert r["bytes_before"] == 4 * r["shape"][0] * r["shape"][1]
        assert r["bytes_after"] == r["shape"][0] * r["shape"][1] + 4 * r["shape"][0]
        assert 0 < r["alpha_min"] <= r["alpha_max"] and r["sqnr_db"] > 30
    assert "total: 2 layers" in str(report) and report.totals()["ratio"] > 3


def test_quantize_model_inplace_and_root_linear():
    model = _mlp()
    assert quantize_model(model, inplace=True) is model and isinstance(model[0], QuantLinear)
    lin = _linear()
    q = quantize_model(lin)
    assert isinstance(q, QuantLinear) and isinstance(lin, nn.Linear)


def test_quantize_model_without_linears_warns():
    model = nn.Sequential(nn.ReLU(), nn.Conv1d(2, 2, 1))
    with pytest.warns(UserWarning, match="no nn.Linear"):
        out = quantize_model(model)
    assert isinstance(out[1], nn.Conv1d)
    with pytest.warns(UserWarning):
        quantize_model(_mlp(), skip=["*"])


def test_quantize_model_static_calibration():
    model = _mlp()
    batches = [torch.randn(8, 16) for _ in range(3)]
    q = quantize_model(model, activations="static", calib_data=batches)
    for name in ("0", "2", "4"):
        assert q.get_submodule(name).activations == "static"
        assert float(q.get_submodule(name).input_alpha) > 0
    assert all("act_alpha" in r for r in q.quantkit_report)
    x = torch.randn(8, 16)
    with torch.no_grad():
        rel = float((q(x) - model(x)).norm() / model(x).norm())
    assert rel < 0.05
    # keyword batches (dicts) and positional ones (tuples) both reach the model
    by_tuple = quantize_model(model, activations="static", calib_data=[(b,) for b in batches])
    by_dict = quantize_model(model, activations="static",
                             calib_data=[{"input": b} for b in batches])
    assert torch.equal(by_tuple[0].input_alpha, q[0].input_alpha)
    assert torch.equal(by_dict[0].input_alpha, q[0].input_alpha)
    with pytest.raises(ValueError, match="calib_data"):
        quantize_model(model, activations="static")
    with pytest.raises(ValueError, match="never reached|empty"):
        quantize_model(model, activations="static", calib_data=[])
    bad = [torch.randn(8, 16)]
    bad[0][2, 3] = float("nan")
    with pytest.raises(ValueError, match="layer '0'.*non-finite"):
        quantize_model(model, activations="static", calib_data=bad)
    with pytest.raises(ValueError, match="activations"):
        quantize_model(model, activations="int4")
    with pytest.raises(TypeError):
        quantize_model("not a model")


def _snapshot(model):
    """Module types, parameters and buffers (cloned) and requires_grad flags of ``model``."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            [(n, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()],
            [(n, b.clone()) for n, b in model.named_buffers()])


def _equal(a, b):
    """torch.equal, with NaN equal to NaN in the same places."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0),
                                                                 b.nan_to_num(0.0))
    return torch.equal(a, b)


def _assert_unchanged(model, snapshot):
    types, params, buffers = _snapshot(model)
    assert types == snapshot[0]
    assert len(params) == len(snapshot[1]) and len(buffers) == len(snapshot[2])
    for (n, p, g), (n0, p0, g0) in zip(params, snapshot[1]):
        assert (n, g) == (n0, g0) and _equal(p, p0)
    for (n, b), (n0, b0) in zip(buffers, snapshot[2]):
        assert n == n0 and _equal(b, b0)


def test_quantize_model_static_layer_with_all_zero_inputs_gives_the_bias():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight.fill_(-1.0)
        model[0].bias.fill_(-1.0)            # the ReLU output is always 0: a dead layer
    q = quantize_model(model, activations="static", calib_data=[torch.rand(4, 8)])
    assert float(q[2].input_alpha) == 0.0
    x = torch.rand(3, 8)
    assert torch.equal(q(x), model[2].bias.detach().expand(3, 4))


def test_quantize_model_inplace_failure_names_the_layer_and_changes_nothing():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[1, 1] = float("nan")
    before = _snapshot(model)
    with pytest.raises(ValueError, match="layer '2'"):
        quantize_model(model, inplace=True)
    _assert_unchanged(model, before)


# ----------------------------------------------------------------------------- state, checkpoints

@pytest.mark.parametrize("mode", MODES)
def test_state_dict_round_trip(mode):
    calib = [torch.randn(8, 16)]
    q = quantize_model(_mlp(0), activations=mode, calib_data=calib)
    fresh = quantize_model(_mlp(1), activations=mode, calib_data=calib)
    x = torch.randn(5, 16)
    assert not torch.equal(fresh(x), q(x))
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))
    empty = QuantLinear(16, 32, activations=mode)
    empty.load_state_dict(q[0].state_dict())
    assert torch.equal(empty(x), q[0](x))


@pytest.mark.parametrize("mode", MODES)
def test_save_load_round_trip(tmp_path, mode):
    q = quantize_model(_mlp(0), activations=mode, calib_data=[torch.randn(8, 16)], skip=["4"])
    path = tmp_path / "q.safetensors"
    quantkit.save(q, path, metadata={"model": "mlp"})
    ckpt = quantkit.load(path)
    assert isinstance(ckpt["0.weight"], quantkit.QTensor) and ckpt["0.weight"].axis == 0
    assert ckpt.modules["2"]["activations"] == mode and "4" not in ckpt.modules
    assert ckpt.metadata["model"] == "mlp"
    fresh = load_quantized(_mlp(1), path)
    x = torch.randn(5, 16)
    assert torch.equal(fresh(x), q(x))
    assert isinstance(fresh[0], QuantLinear) and isinstance(fresh[4], nn.Linear)
    again = load_quantized(fresh, ckpt)                  # into an already quantized model
    assert torch.equal(again(x), q(x))


def test_load_quantized_refuses_mismatch_without_touching_the_model(tmp_path):
    path = tmp_path / "q.safetensors"
    quantkit.save(quantize_model(_mlp()), path)
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 5))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="'4'"):
        load_quantized(other, path)
    assert isinstance(other[0], nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    wider = nn.Sequential(*_mlp(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="missing"):
        load_quantized(wider, path)
    assert isinstance(wider[0], nn.Linear)


def test_save_state_dict_of_a_quantized_model(tmp_path):
    q = quantize_model(_mlp())
    quantkit.save(q.state_dict(), tmp_path / "s.safetensors")
    ckpt = quantkit.load(tmp_path / "s.safetensors")
    assert isinstance(ckpt["2.weight"], quantkit.QTensor)
    fresh = quantize_model(_mlp(1))
    fresh.load_state_dict(ckpt.state_dict())
    x = torch.randn(3, 16)
    assert torch.equal(fresh(x), q(x))


def test_no_warnings_in_normal_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = quantize_model(_mlp(), activations="dynamic")
        q(torch.randn(2, 16))


# ----------------------------------------------------------------------- block-scaled weights

def _block_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 96), nn.ReLU(),
                         nn.Linear(96, 8))


@pytest.mark.parametrize("method", ["mse", "max", "percentile"])
def test_block_weights_are_calibrated_per_block(method):
    lin = _linear(256, 12, seed=3)
    layer = QuantLinear.from_float(lin, weight_method=method, block_size=64)
    w = lin.weight.detach()
    alpha = quantkit.calibrate(w, method, block_size=64)
    q = quantkit.quantize(w, alpha, block_size=64)
    assert layer.block_size == 64 and layer.weight_scale.shape == (12 * 4,)
    assert torch.equal(layer.weight, q.data) and torch.equal(layer.weight_scale, q.scale)
    want = reference.dequantize_blockwise(q.data.numpy(), q.scale.numpy(), 64)
    assert np.array_equal(layer.dequantized_weight().numpy(), want)
    assert layer.qtensor().block_size == 64
    assert torch.equal(layer.qtensor().dequantize(), layer.dequantized_weight())
    per_row = QuantLinear.from_float(lin, weight_method=method)
    err = lambda m: float(((m.dequantized_weight() - w) ** 2).sum())   # noqa: E731
    assert err(layer) < err(per_row)              # finer scales: smaller weight error


@pytest.mark.parametrize("mode", MODES)
def test_block_forward(mode):
    lin = _linear(192, 20, seed=4)
    layer = _from_float(lin, mode, block_size=64)
    x = torch.randn(3, 5, 192)
    y = layer(x)
    assert y.shape == (3, 5, 20)
    w_hat = layer.dequantized_weight()
    x2 = x.reshape(-1, 192)
    if mode is None:
        want = reference.linear_w8_blocks(x2.numpy(), layer.weight.numpy(),
                                          layer.weight_scale.view(20, 3).numpy(), 64,
                                          layer.bias.detach().numpy())
        assert np.allclose(y.reshape(-1, 20).numpy(), want, rtol=1e-5, atol=1e-5)
    else:
        codes, s_x = quantize_rows(x2, layer.input_alpha)
        want = reference.linear_w8a8_blocks(codes.numpy(), s_x.numpy(), layer.weight.numpy(),
                                            layer.weight_scale.view(20, 3).numpy(), 64,
                                            layer.bias.detach().numpy())
        assert np.array_equal(y.reshape(-1, 20).numpy(), want)
    close = torch.nn.functional.linear(x, w_hat, layer.bias)
    atol = {None: 1e-5, "dynamic": 0.05, "static": 0.2}[mode]     # static clips beyond 3.0
    assert torch.allclose(y, close, atol=atol)


@pytest.mark.parametrize("mode", [None, "dynamic"])
def test_block_backward_is_the_dequantized_linear(mode):
    layer = _from_float(_linear(128, 16, seed=5), mode, block_size=64)
    x = torch.randn(6, 128, requires_grad=True)
    layer(x).pow(2).sum().backward()
    xr = x.detach().clone().requires_grad_()
    y = layer(xr.detach())           # the same forward values for the chain rule
    torch.nn.functional.linear(xr, layer.dequantized_weight()).mul(2 * y).sum().backward()
    assert torch.allclose(x.grad, xr.grad, rtol=1e-5, atol=1e-6)


def test_block_size_errors():
    with pytest.raises(ValueError, match="block_size=64 does not divide in_features=100"):
        QuantLinear(100, 4, block_size=64)
    with pytest.raises(ValueError, match="power of two"):
        QuantLinear(96, 4, block_size=48)
    with pytest.raises(TypeError, match="block_size must be an int"):
        QuantLinear.from_float(_linear(128, 4), block_size=64.0)
    with pytest.raises(ValueError, match="power of two"):
        quantize_model(_block_mlp(), block_size=3)


def test_quantize_model_block_size_keeps_per_channel_where_it_cannot():
    with pytest.warns(UserWarning, match=r"does not divide in_features of 1 layer\(s\) \(4\)"):
        q = quantize_model(_block_mlp(), block_size=64)
    assert (q[0].block_size, q[2].block_size, q[4].block_size) == (64, 64, None)
    assert [r["block_size"] for r in q.quantkit_report] == [64, 64, None]
    t = q.quantkit_report.totals()
    assert t["bytes_after"] == sum(m.weight.numel() + 4 * m.weight_scale.numel()
                                   for m in (q[0], q[2], q[4]))


@pytest.mark.parametrize("mode", MODES)
def test_block_save_load_round_trip(tmp_path, mode):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_model(_block_mlp(), activations=mode, block_size=64,
                           calib_data=[torch.randn(8, 128)])
    path = tmp_path / "q.safetensors"
    quantkit.save(q, path)
    ckpt = quantkit.load(path)
    assert ckpt["0.weight"].block_size == 64 and ckpt["4.weight"].axis == 0
    assert ckpt.modules["0"]["block_size"] == 64 and "block_size" not in ckpt.modules["4"]
    fresh = load_quantized(_block_mlp(1), path)
    x = torch.randn(5, 128)
    assert torch.equal(fresh(x), q(x))
    assert fresh[2].block_size == 64 and fresh[4].block_size is None


def test_load_quantized_refuses_a_bad_block_size_entry(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_model(_block_mlp(), block_size=64)
    path = tmp_path / "q.safetensors"
    quantkit.save(q, path)
    ckpt = quantkit.load(path)
    ckpt.modules["0"]["block_size"] = 48
    model = _block_mlp(1)
    with pytest.raises(ValueError, match="module '0': bad checkpoint entry"):
        load_quantized(model, ckpt)
    assert isinstance(model[0], nn.Linear)


def test_block_weights_with_smoothing():
    calib = [torch.randn(16, 128) * torch.linspace(0.1, 8, 128)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_model(_block_mlp(), activations="dynamic", smooth=0.5, calib_data=calib,
                           block_size=64)
    with torch.no_grad():
        float_y = _block_mlp()(calib[0])
    assert q[0].block_size == 64 and q[0].input_scale is not None
    with torch.no_grad():
        rel = float((q(calib[0]) - float_y).norm() / float_y.norm())
    assert rel < 0.05


def _bad_value(ckpt, case):
    if case == "code_-128":
        ckpt["2.weight"].data[0, 0] = -128
    elif case == "negative_scale":
        ckpt["2.weight"].scale[1] = -1.0
    elif case == "nan_scale":
        ckpt["2.weight"].scale[1] = float("nan")
    elif case == "nan_alpha":
        ckpt["2.input_alpha"].fill_(float("nan"))
    elif case == "tiny_alpha":
        ckpt["2.input_alpha"].fill_(1e-40)


@pytest.mark.parametrize("case", ["code_-128", "negative_scale", "nan_scale", "nan_alpha",
                                  "tiny_alpha"])
def test_load_quantized_refuses_bad_values_without_touching_the_model(tmp_path, case):
    """Values are checked before any layer is swapped: the second layer's -128 code, bad scale or
    bad static alpha leaves the float model exactly as it was (types, values, requires_grad)."""
    path = tmp_path / "q.safetensors"
    quantkit.save(quantize_model(_mlp(), activations="static", calib_data=[torch.randn(8, 16)]),
                  path)
    ckpt = quantkit.load(path)
    _bad_value(ckpt, case)
    model = _mlp(1)
    model[0].weight.requires_grad_(False)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"'2\.(weight|weight_scale|input_alpha)'"):
        load_quantized(model, ckpt)
    _assert_unchanged(model, before)


def test_load_quantized_refuses_a_minus_128_file_without_touching_the_model(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "q.safetensors"
    quantkit.save(quantize_model(_mlp()), path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["2.weight"][0, 0] = -128        # quantkit.save refuses this: written by safetensors
    save_file(tensors, str(path), metadata=meta)
    model = _mlp(1)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="'2.weight'.*-128"):
        load_quantized(model, path)
    _assert_unchanged(model, before)


_GOOD_ENTRY = {"type": "QuantLinear", "in_features": 16, "out_features": 32, "bias": True,
               "activations": None}


@pytest.mark.parametrize("modules, match", [
    ({"0": 5}, "module '0'.*JSON object"),
    ({"0": [1, 2]}, "module '0'.*JSON object"),
    ({"0": {**_GOOD_ENTRY, "type": None}}, "module '0'.*type"),
    ({"0": {k: v for k, v in _GOOD_ENTRY.items() if k != "activations"}},
     "module '0'.*activations"),
    ({"0": {**_GOOD_ENTRY, "activations": "int4"}}, "module '0'.*activations"),
    ({"0": {**_GOOD_ENTRY, "activations": [1]}}, "module '0'.*activations"),
    ({"0": {**_GOOD_ENTRY, "in_features": "16"}}, "module '0'.*in_features"),
    ({"0": {**_GOOD_ENTRY, "in_features": None}}, "module '0'.*in_features"),
    ({"0": {**_GOOD_ENTRY, "bias": 1}}, "module '0'.*bias"),
    ({"0": {**_GOOD_ENTRY, "input_scale": "yes"}}, "module '0'.*input_scale"),
    ({"0": {**_GOOD_ENTRY, "group_size": 32}}, "module '0'.*unknown key"),
    ([["0", _GOOD_ENTRY]], "quantkit.modules must be a JSON object"),
])
def test_load_quantized_refuses_malformed_module_entries(tmp_path, modules, match):
    path = tmp_path / "q.safetensors"
    quantkit.save(quantize_model(_mlp()), path)
    ckpt = quantkit.load(path)
    ckpt.modules = modules
    model = _mlp(1)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_quantized(model, ckpt)
    _assert_unchanged(model, before)


def test_load_quantized_refuses_a_malformed_modules_entry_in_a_file(tmp_path):
    import json

    path = tmp_path / "q.safetensors"
    quantkit.save(quantize_model(nn.Sequential(nn.Linear(4, 3))), path)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"]["quantkit.modules"] = json.dumps({"0": 5})
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])
    model = nn.Sequential(nn.Linear(4, 3))
    before = _snapshot(model)
    with pytest.raises(ValueError, match="module '0'"):
        load_quantized(model, path)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("activations", ("dynamic", "static"))
def test_w8a8_layer_of_one_input_feature(activations):
    """in_features = 1 (K = 1), where torch._int_mm gives wrong sums: every path is exact."""
    torch.manual_seed(0)
    lin = nn.Linear(1, 8)
    q = QuantLinear.from_float(lin, activations=activations,
                               act_alpha=4.0 if activations == "static" else None)
    x = torch.randn(300, 1)
    for _ in range(8):   # the timed choice runs each candidate: every call must be right
        y = q(x)
        assert torch.allclose(y, lin(x), rtol=0, atol=0.05)


@pytest.mark.parametrize("key, value, match", [
    ("weight", torch.full((24, 48), 200.0), "'weight'.*holds torch.float32.*needs torch.int8"),
    ("weight", torch.full((24, 48), 255, dtype=torch.uint8), "'weight'.*torch.uint8"),
    ("weight", torch.full((24, 48), -128, dtype=torch.int16), "'weight'.*torch.int16"),
    ("weight_scale", torch.full((24,), float("nan")), "'weight_scale'.*finite"),
    ("weight_scale", torch.full((24,), -1.0), "'weight_scale'.*>= 0"),
    ("weight_scale", torch.ones(24, dtype=torch.float64), "'weight_scale'.*float64"),
    ("input_alpha", torch.tensor(-1.0), "'input_alpha'"),
    ("input_alpha", torch.tensor(float("inf")), "'input_alpha'"),
])
def test_load_state_dict_refuses_casts_and_bad_values(key, value, match):
    """torch's copy_ would cast silently (200.0 -> int8 -56); the layer is left as it was."""
    src = _from_float(_linear(), "static")
    layer = _from_float(_linear(seed=1), "static")
    before = copy.deepcopy(layer.state_dict())
    state = src.state_dict()
    state[key] = value
    with pytest.raises(ValueError, match=match):
        layer.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def test_a_float_checkpoint_does_not_load_into_int8_codes():
    """strict=False (partial loading) of a float nn.Linear state: refused, not cast to zeros."""
    layer = _from_float(_linear(), "dynamic")
    with pytest.raises(ValueError, match="'0.weight'.*float checkpoint"):
        nn.Sequential(layer).load_state_dict(nn.Sequential(_linear(seed=3)).state_dict(),
                                             strict=False)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_compute_in_float32_and_keep_the_input_dtype(mode, dtype):
    layer = _from_float(_linear(), mode)
    x = torch.randn(5, 48).to(dtype)
    want = layer(x.to(torch.float32)).to(dtype)
    cast = copy.deepcopy(layer).to(dtype)          # a module cast keeps the float32 state
    for name in ("weight_scale", "bias", "input_alpha"):
        t = getattr(cast, name)
        assert t is None or t.dtype == torch.float32, name
    assert cast.weight.dtype == torch.int8
    for m in (layer, cast):
        y = m(x)
        assert y.dtype == dtype and torch.equal(y, want)
    half = nn.Sequential(copy.deepcopy(layer)).half()
    assert half[0].weight_scale.dtype == torch.float32
    assert torch.equal(half(x.half()), layer(x.half().float()).half())


def test_input_passed_by_keyword_as_to_nn_linear():
    layer = _from_float(_linear(), "dynamic")
    x = torch.randn(3, 48)
    assert torch.equal(layer(input=x), layer(x))


class _ScaledLinear(nn.Linear):
    def forward(self, input):
        return super().forward(input) * 2.0


def test_linears_whose_replacement_would_not_run_stay_float_with_a_warning():
    """A subclass with its own forward, MultiheadAttention's out_proj (read as .weight) and
    TransformerEncoderLayer's feed-forward (its fast path reads the weights) stay float."""
    torch.manual_seed(0)
    m = nn.Sequential(_ScaledLinear(16, 8), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match=r"1 nn.Linear layer\(s\) kept.*0 \(_ScaledLinear "
                                         r"overrides forward\)"):
        q = quantize_model(m)
    assert type(q[0]) is _ScaledLinear and isinstance(q[1], QuantLinear)
    x = torch.randn(4, 16)
    assert torch.allclose(q(x), m(x), rtol=0, atol=0.05 * float(m(x).abs().max()))
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    xs = torch.randn(2, 5, 32)
    with pytest.warns(UserWarning, match="out_proj"):
        qm = quantize_model(mha)
    assert torch.equal(qm(xs, xs, xs)[0], mha(xs, xs, xs)[0])
    enc = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    with pytest.warns(UserWarning, match="linear1.*fast path"):
        qe = quantize_model(enc)
    with torch.no_grad():
        assert torch.allclose(qe(xs), enc(xs), atol=1e-5)


def test_hooks_on_a_replaced_linear_stay_attached():
    m = nn.Sequential(nn.Linear(16, 8), nn.ReLU())
    seen = []
    handle = m[0].register_forward_hook(lambda mod, args, out: seen.append(out.shape) or out * 0)
    q = quantize_model(m)                      # a copy: the copied hooks run
    assert torch.equal(q(torch.randn(3, 16)), torch.zeros(3, 8)) and seen == [(3, 8)]
    quantize_model(m, inplace=True)            # in place: the user's handle still works
    assert isinstance(m[0], QuantLinear) and torch.equal(m(torch.randn(3, 16)), torch.zeros(3, 8))
    handle.remove()
    assert m(torch.randn(3, 16)).abs().sum() > 0 and len(m[0]._forward_hooks) == 0


def test_static_calibration_runs_in_eval_mode_and_restores_the_modes():
    """Dropout off while observing (train mode would scale the kept activations by 2)."""
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 8)).train()
    data = [torch.randn(256, 16)]
    q_train = quantize_model(m, activations="static", calib_data=data)
    q_eval = quantize_model(m.eval(), activations="static", calib_data=data)
    assert float(q_train[2].input_alpha) == float(q_eval[2].input_alpha)
    m.train()
    quantize_model(m, activations="static", calib_data=data, inplace=True)
    assert all(mod.training for mod in m.modules())


def test_calibration_of_a_layer_called_by_keyword():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 8)

        def forward(self, x):
            return self.lin(input=x)

    torch.manual_seed(0)
    m = KW()
    q = quantize_model(m, activations="static", calib_data=[torch.randn(64, 16)])
    x = torch.randn(5, 16)
    assert torch.allclose(q(x), m(x), atol=0.05)


@pytest.mark.parametrize("mode", MODES)
def test_jit_trace_records_the_op_not_a_constant(mode):
    m = nn.Sequential(_linear(), nn.ReLU())
    q = quantize_model(m, activations=mode,
                       calib_data=[torch.randn(32, 48)] if mode == "static" else None)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(q, torch.randn(4, 48))
        x = torch.randn(4, 48)
        assert torch.equal(traced(x), q(x))


@pytest.mark.parametrize("mode", MODES)
def test_a_linear_used_in_two_places_is_quantized_at_both_and_stays_shared(tmp_path, mode):
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    m = nn.Sequential(lin, nn.ReLU(), lin)
    data = [torch.randn(32, 16)] if mode == "static" else None
    q = quantize_model(m, activations=mode, calib_data=data)
    assert isinstance(q[0], QuantLinear) and q[0] is q[2] and len(q.quantkit_report) == 1
    x = torch.randn(4, 16)
    assert torch.allclose(q(x), m(x), atol=0.05)
    path = tmp_path / "shared.safetensors"
    quantkit.save(q, path)
    fresh_lin = nn.Linear(16, 16)
    fresh = load_quantized(nn.Sequential(fresh_lin, nn.ReLU(), fresh_lin), path)
    assert fresh[0] is fresh[2] and isinstance(fresh[0], QuantLinear)
    assert torch.equal(fresh(x), q(x))


def test_constructor_and_from_float_name_what_is_wrong():
    for bad in (128.5, "128", None, True):
        with pytest.raises(TypeError, match="in_features must be an int"):
            QuantLinear(bad, 16)
    with pytest.raises(ValueError, match="out_features must be >= 0"):
        QuantLinear(16, -1)
    assert QuantLinear(np.int64(16), 4).in_features == 16
    with pytest.raises(ValueError, match="meta device"):
        QuantLinear.from_float(nn.Linear(64, 4, device="meta"))


@pytest.mark.parametrize("training", [True, False])
def test_from_float_keeps_the_layer_mode(training):
    lin = _linear().train(training)
    assert QuantLinear.from_float(lin).training is training


def test_conv1d_layers_left_float_are_named():
    class Conv1D(nn.Module):     # transformers' GPT-2 projection: weight (in, out)
        def __init__(self, nf, nx):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.zeros(nf))

        def forward(self, x):
            return torch.addmm(self.bias, x, self.weight)

    m = nn.Sequential(Conv1D(8, 16), nn.Linear(8, 4))
    with pytest.warns(UserWarning, match=r"1 Conv1D layer\(s\) stay float.*: 0"):
        q = quantize_model(m)
    assert isinstance(q[1], QuantLinear) and type(q[0]).__name__ == "Conv1D"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block_size", [None, 64])
def test_double_backward_through_the_input_gradient(mode, block_size):
    """A gradient penalty on the input: the input gradient's own gradient is W_hat's (the
    straight-through convention of the first backward), as for nn.Linear on the dequantized
    weight."""
    torch.manual_seed(0)
    layer = _from_float(_linear(128, 24), mode, block_size=block_size)
    ref = nn.Linear(128, 24)
    with torch.no_grad():
        ref.weight.copy_(layer.dequantized_weight())
        ref.bias.copy_(layer.bias)
    x = torch.randn(6, 128)
    grads = []
    for f in (layer, ref):
        xi = x.clone().requires_grad_(True)
        y = f(xi)
        g, = torch.autograd.grad((y ** 2).sum(), xi, create_graph=True)
        (g ** 2).sum().backward()
        grads.append(xi.grad)
    if mode is None:   # weight-only: the same function up to float rounding
        assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-4)
    else:              # W8A8: finite and of the float layer's size (activations are rounded)
        assert torch.isfinite(grads[0]).all()
        assert torch.allclose(grads[0].norm(), grads[1].norm(), rtol=0.05)


def _command_checkpoint(tmp_path, arch, *args):
    """A float checkpoint of ``arch()`` quantized by the `quantkit quantize` command: its path."""
    from safetensors.torch import save_file

    from quantkit.cli import main

    src = tmp_path / "float.safetensors"
    save_file(arch().state_dict(), str(src))
    out = tmp_path / "int8.safetensors"
    assert main(["quantize", str(src), "-o", str(out), *args]) == 0
    return out


@pytest.mark.parametrize("granularity", ["channel", "tensor", "block:64"])
def test_load_quantized_takes_a_checkpoint_from_the_command(tmp_path, granularity):
    """`quantkit quantize` records no modules: each int8 weight of an nn.Linear becomes a
    weight-only QuantLinear with the file's codes and scales."""
    torch.manual_seed(0)

    def arch():
        return nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 16))

    out = _command_checkpoint(tmp_path, arch, "--granularity", granularity)
    model = load_quantized(arch(), out)
    stored = quantkit.load(out)
    x = torch.randn(5, 128)
    ref = arch()
    with torch.no_grad():
        for i in (0, 2):
            assert isinstance(model[i], QuantLinear) and model[i].activations is None
            ref[i].weight.copy_(torch.as_tensor(stored[f"{i}.weight"].dequantize()))
            ref[i].bias.copy_(stored[f"{i}.bias"])
        assert torch.allclose(model(x), ref(x), atol=1e-5)


def test_load_quantized_names_an_int8_tensor_of_no_linear(tmp_path):
    def arch():
        return nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 4))

    out = _command_checkpoint(tmp_path, arch)
    with pytest.raises(ValueError, match="'0.weight' is int8.*Embedding.*--skip"):
        load_quantized(arch(), out)


def test_pruned_and_reparametrized_linears_quantize_their_effective_weight():
    """Hooks that rebuild .weight (pruning, weight_norm, spectral_norm) are not moved to the
    QuantLinear (it has their result); the layer quantizes and runs."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    for wrap in (lambda m: prune.l1_unstructured(m, "weight", amount=0.5),
                 lambda m: nn.utils.weight_norm(m), lambda m: nn.utils.spectral_norm(m)):
        model = nn.Sequential(nn.Linear(16, 8), nn.ReLU()).eval()
        wrap(model[0])
        x = torch.randn(4, 16)
        with torch.no_grad():
            want = model(x)
        q = quantize_model(model, weights="max", inplace=True)
        with torch.no_grad():
            assert torch.allclose(q(x), want, atol=0.05)


def test_full_backward_hooks_move_with_the_layer():
    model = nn.Sequential(nn.Linear(8, 4))
    fired = []
    model[0].register_full_backward_hook(lambda mod, gin, gout: fired.append(1))
    q = quantize_model(model, weights="max")
    q(torch.randn(2, 8, requires_grad=True)).sum().backward()
    assert fired == [1]


def test_skip_names_a_shared_linear_at_any_of_its_paths():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = self.b = nn.Linear(8, 8)

        def forward(self, x):
            return self.b(self.a(x))

    for skip in ("a", "b"):
        with pytest.warns(UserWarning, match="no nn.Linear"):
            q = quantize_model(Shared(), weights="max", skip=[skip])
        assert type(q.a) is nn.Linear and q.a is q.b
    q = quantize_model(Shared(), weights="max")
    assert isinstance(q.a, QuantLinear) and q.a is q.b


def test_a_command_checkpoint_loads_into_an_already_quantized_model(tmp_path):
    torch.manual_seed(0)

    def arch():
        return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))

    out = _command_checkpoint(tmp_path, arch, "--granularity", "tensor")
    into_float = load_quantized(arch(), out)
    into_quantized = load_quantized(quantize_model(arch(), weights="max"), out)
    x = torch.randn(3, 16)
    assert torch.equal(into_quantized(x), into_float(x))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows, k, n", [(1, 64, 32), (16, 64, 24), (17, 128, 64), (300, 12, 16),
                                        (5, 1, 8), (40, 384, 1536)])
def test_quantlinear_on_cuda_matches_the_cpu(mode, rows, k, n):
    """A QuantLinear moved to the GPU: W8A8 gives the CPU's bits (exact int32 products, the same
    float32 rescale), weight-only the CPU's values up to float32 rounding; any row count."""
    torch.manual_seed(0)
    layer = _from_float(_linear(k, n), mode)
    x = torch.randn(rows, k)
    want = layer(x)
    cuda = copy.deepcopy(layer).to("cuda")
    assert cuda.weight.dtype == torch.int8 and cuda.weight_scale.dtype == torch.float32
    got = cuda(x.to("cuda")).cpu()
    if mode is None:
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    else:
        assert torch.equal(got, want)
    half = cuda(x.to("cuda", torch.bfloat16))
    assert half.dtype == torch.bfloat16 and half.is_cuda
