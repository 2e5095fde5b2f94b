"""quantkit.smooth: SmoothQuant smoothing is exact in float, checks its input, copies the model."""

import pytest
import torch
from torch import nn

import quantkit
from quantkit.nn import QuantLinear, load_quantized
from quantkit.smooth import SmoothLinear, smooth_model, smoothing_factors

transformers = pytest.importorskip("transformers", reason="needs the llm extra (transformers)")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # LLM-like outlier input channels: a few norm weights much larger
        for layer in m.model.layers:
            layer.input_layernorm.weight[[3, 17]] = 40.0
            layer.post_attention_layernorm.weight[[5]] = 25.0
    return m


def calib(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (1, 32), generator=g) for _ in range(n)]


def test_factors_follow_the_formula():
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([[1.0, -2.0, 3.0, 0.0], [-0.5, 1.0, 1.0, 0.0]])
    s = smoothing_factors(act, w, alpha=0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5 ** 0.5, 1.0, 1.0]))
    assert torch.equal(smoothing_factors(act, w, alpha=1.0)[:2], torch.tensor([4.0, 1.0]))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.85, 1.0])
def test_smoothed_float_model_gives_the_same_outputs(alpha):
    m = tiny_llama()
    sm = smooth_model(m, calib(), alpha=alpha, skip=["lm_head"])
    assert isinstance(sm.model.layers[0].self_attn.q_proj, SmoothLinear)
    assert not isinstance(sm.lm_head, SmoothLinear)
    x = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = m(x).logits, sm(x).logits
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    s = 1 / sm.model.layers[0].self_attn.q_proj.input_scale
    assert float(s.max() / s.min()) > 1.5 or alpha == 0.0   # the factors really move range


def test_smooth_linear_is_exact_on_random_inputs():
    torch.manual_seed(0)
    lin = nn.Linear(48, 16)
    s = torch.rand(48) * 10 + 0.1
    sl = SmoothLinear.from_linear(lin, s)
    x = torch.randn(7, 48)
    assert torch.allclose(sl(x), lin(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(sl.input_scale, torch.ones(48) / s)


def test_the_users_model_is_not_modified():
    m = tiny_llama()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    smooth_model(m, calib(), alpha=0.5)
    quantkit.quantize_model(m, activations="dynamic", smooth=0.5, calib_data=calib(),
                            weights="max", skip=["lm_head"])
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(x, (SmoothLinear, QuantLinear)) for x in m.modules())


def test_inplace_modifies_the_model():
    m = tiny_llama()
    out = smooth_model(m, calib(), alpha=0.5, inplace=True)
    assert out is m and isinstance(m.model.layers[1].mlp.down_proj, SmoothLinear)


def test_bad_input_errors():
    m = tiny_llama()
    with pytest.raises(TypeError):
        smooth_model("not a model", calib())
    with pytest.raises(TypeError):
        smooth_model(m, calib(), alpha="0.5")
    with pytest.raises(TypeError):
        smooth_model(m, calib(), alpha=True)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        smooth_model(m, calib(), alpha=1.5)
    with pytest.raises(ValueError, match="calib_data"):
        smooth_model(m, None)
    with pytest.raises(ValueError, match="never reached"):
        smooth_model(m, [])
    with pytest.raises(ValueError, match="no nn.Linear"):
        smooth_model(m, calib(), skip=["*"])
    with pytest.raises(ValueError, match="calib_data"):
        quantkit.quantize_model(m, activations="dynamic", smooth=0.5)
    with pytest.raises(ValueError, match="shape"):
        SmoothLinear.from_linear(nn.Linear(4, 2), torch.ones(3))
    with pytest.raises(ValueError, match="> 0"):
        SmoothLinear.from_linear(nn.Linear(4, 2), torch.tensor([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="NaN"):
        smooth_model(nn.Sequential(nn.Linear(4, 2)), [torch.tensor([[1.0, float("nan"), 0, 0]])])


def test_smoothing_lowers_w8a8_error_on_outlier_channels():
    """Per-row int8 activations lose the small channels next to an outlier; smoothing keeps them."""
    m = tiny_llama()
    x = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = m(x).logits
        errs = {}
        for alpha in (None, 0.5):
            q = quantkit.quantize_model(m, activations="dynamic", smooth=alpha, weights="max",
                                        calib_data=calib(), skip=["lm_head"])
            errs[alpha] = float((q(x).logits - ref).pow(2).mean())
    assert errs[0.5] < 0.5 * errs[None]


def test_smoothed_quantized_model_round_trips_a_checkpoint(tmp_path):
    m = tiny_llama()
    q = quantkit.quantize_model(m, activations="static", smooth=0.5, calib_data=calib(),
                                weights="max", skip=["lm_head"])
    path = tmp_path / "q.safetensors"
    quantkit.save(q, path)
    loaded = load_quantized(tiny_llama(), path)
    layer = loaded.model.layers[0].mlp.gate_proj
    assert isinstance(layer, QuantLinear) and layer.input_scale is not None
    x = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, q(x).logits)


def test_smooth_model_keeps_linears_it_cannot_replace():
    """The rule of quantize_model (smooth.replaceable_linears): a subclass with its own forward
    stays as it is, with a warning."""
    class Doubled(nn.Linear):
        def forward(self, input):
            return super().forward(input) * 2.0

    torch.manual_seed(0)
    m = nn.Sequential(Doubled(16, 8), nn.Linear(8, 4))
    data = [torch.randn(32, 16)]
    with pytest.warns(UserWarning, match=r"smooth_model: 1 nn.Linear.*Doubled overrides forward"):
        s = smooth_model(m, data)
    assert type(s[0]) is Doubled and isinstance(s[1], SmoothLinear)
    x = torch.randn(5, 16)
    assert torch.allclose(s(x), m(x), atol=1e-5)
