"""quantkit.lora: adapters on a frozen int8 base, safetensors adapters, merging, PEFT."""

import pytest
import torch
from torch import nn

import quantkit
from quantkit import lora
from quantkit.nn import QuantLinear

transformers = pytest.importorskip("transformers", reason="needs the llm extra (transformers)")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def qmodel():
    return quantkit.quantize_model(tiny_llama(), skip=["lm_head"])


def _ids(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (2, 16), generator=g)


def test_fresh_adapter_changes_nothing_and_only_adapters_train(qmodel):
    import copy

    m = copy.deepcopy(qmodel)
    ids = _ids()
    before = m(input_ids=ids).logits
    lora.add_lora(m, r=4, alpha=8)
    assert len(lora.lora_layers(m)) == 14
    assert torch.equal(m(input_ids=ids).logits, before)          # B = 0
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    out = m(input_ids=ids, labels=ids)
    out.loss.backward()
    layer = m.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base, QuantLinear)
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    assert m.model.embed_tokens.weight.grad is None


def test_lora_forward_is_base_plus_scaled_low_rank():
    torch.manual_seed(0)
    base = QuantLinear.from_float(nn.Linear(32, 16))
    layer = lora.LoRALinear(base, 4, 12)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 32)
    expect = base(x) + (x @ layer.lora_A.t() @ layer.lora_B.t()) * 3.0
    assert torch.equal(layer(x), expect)
    merged = x @ layer.merged_weight().t() + base.bias
    assert torch.allclose(layer(x), merged, atol=1e-4)


def test_save_load_merge_round_trip(qmodel, tmp_path):
    import copy

    m = lora.add_lora(copy.deepcopy(qmodel), r=4, alpha=8, target=["q_proj", "v_proj"])
    with torch.no_grad():
        for layer in lora.lora_layers(m).values():
            layer.lora_B.normal_(std=0.05)
    ids = _ids()
    want = m(input_ids=ids).logits
    path = tmp_path / "adapter.safetensors"
    lora.save_adapter(m, path, metadata={"steps": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]
    fresh = lora.load_adapter(copy.deepcopy(qmodel), path)
    assert torch.equal(fresh(input_ids=ids).logits, want)
    merged = lora.merge_lora(fresh)
    assert not lora.lora_layers(merged)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
    assert torch.allclose(merged(input_ids=ids).logits, want, atol=2e-3)


def test_load_adapter_refuses_mismatch(qmodel, tmp_path):
    import copy

    m = lora.add_lora(copy.deepcopy(qmodel), r=4, target=["q_proj"])
    path = tmp_path / "a.safetensors"
    lora.save_adapter(m, path)
    other = tiny_llama()
    other.model.layers[0].self_attn.q_proj = nn.Linear(64, 32, bias=False)
    with pytest.raises(ValueError, match="lora_B"):
        lora.load_adapter(other, path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable"):
        lora.load_adapter(copy.deepcopy(qmodel), tmp_path / "junk.safetensors")


@pytest.mark.parametrize("r", [0, 65, -1])
def test_bad_rank_is_refused(qmodel, r):
    import copy

    with pytest.raises(ValueError, match="rank"):
        lora.add_lora(copy.deepcopy(qmodel), r=r)


def test_no_matching_target_is_refused(qmodel):
    with pytest.raises(ValueError, match="no QuantLinear"):
        lora.add_lora(qmodel, target=["nothing_here"])


def test_peft_get_peft_model_on_a_quantkit_model(qmodel):
    import copy
    import warnings

    peft = pytest.importorskip("peft", reason="needs the llm extra (peft)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(qmodel), lora.peft_config(
            r=4, lora_alpha=8, target_modules=list(lora.LLAMA_TARGETS)))
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.get_base_layer(), QuantLinear)
    ids = _ids()
    assert torch.equal(pm(input_ids=ids).logits, qmodel(input_ids=ids).logits)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    want = pm(input_ids=ids).logits
    with pytest.raises(NotImplementedError):
        q.merge()
    merged = lora.merge_peft(pm.base_model.model)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
    assert torch.allclose(merged(input_ids=ids).logits, want, atol=2e-3)


# ------------------------------------------------------------ refused input leaves the model alone

def _snapshot(model):
    """Module types, cloned parameters and requires_grad flags of ``model``."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            [(n, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()])


def _assert_unchanged(model, snapshot):
    types, params = _snapshot(model)
    assert types == snapshot[0]
    assert len(params) == len(snapshot[1])
    for (n, p, g), (n0, p0, g0) in zip(params, snapshot[1]):
        assert (n, g) == (n0, g0) and p.dtype == p0.dtype and torch.equal(p, p0)


def _two_layers(quantized=True):
    torch.manual_seed(0)
    m = nn.Sequential()
    m.q_proj = nn.Linear(16, 16)
    m.v_proj = nn.Linear(16, 16)
    m.other = nn.Linear(16, 4)
    return quantkit.quantize_model(m) if quantized else m


@pytest.mark.parametrize("kwargs, error", [
    ({"alpha": "x"}, TypeError), ({"alpha": True}, TypeError), ({"alpha": None}, TypeError),
    ({"alpha": float("nan")}, ValueError), ({"alpha": float("inf")}, ValueError),
    ({"alpha": 0}, ValueError), ({"alpha": -8.0}, ValueError),
    ({"target": 5}, TypeError), ({"target": ["q_proj", 1]}, TypeError),
    ({"target": None}, TypeError), ({"r": 4.0}, ValueError), ({"r": 17}, ValueError),
])
def test_add_lora_refuses_bad_arguments_before_touching_the_model(kwargs, error):
    model = _two_layers(quantized=False)
    before = _snapshot(model)
    with pytest.raises(error, match="alpha|target|rank"):
        lora.add_lora(model, **{"r": 4, "alpha": 8, "target": ["q_proj", "v_proj"], **kwargs})
    _assert_unchanged(model, before)
    assert not lora.lora_layers(model)


def test_lora_linear_refuses_bad_alpha_before_freezing_the_base():
    base = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="alpha"):
        lora.LoRALinear(base, 2, float("nan"))
    assert all(p.requires_grad for p in base.parameters())


def _adapter_file(path, layers, tensors=None, **meta):
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    if tensors is None:
        tensors = {f"{n}.{k}": torch.randn(shape, generator=g) for n in ("q_proj", "v_proj")
                   for k, shape in (("lora_A", (4, 16)), ("lora_B", (16, 4)))}
    metadata = {"format": "quantkit.lora", **meta}
    if layers is not None:
        metadata["layers"] = layers if isinstance(layers, str) else json.dumps(layers)
    save_file(tensors, str(path), metadata=metadata)
    return path


_GOOD = {"r": 4, "alpha": 8}


@pytest.mark.parametrize("layers, match", [
    ({"q_proj": _GOOD, "v_proj": {"r": 4, "alpha": "abc"}}, "'v_proj'.*alpha"),
    ({"q_proj": _GOOD, "v_proj": {"r": 4}}, "'v_proj'.*entry"),
    ({"q_proj": _GOOD, "v_proj": {"r": 4, "alpha": 8, "dropout": 0.1}}, "'v_proj'.*entry"),
    ({"q_proj": _GOOD, "v_proj": {"r": 0, "alpha": 8}}, "'v_proj'.*rank"),
    ({"q_proj": _GOOD, "v_proj": {"r": "4", "alpha": 8}}, "'v_proj'.*rank"),
    ({"q_proj": _GOOD, "v_proj": {"r": 4, "alpha": -1}}, "'v_proj'.*alpha"),
    ({"q_proj": _GOOD, "v_proj": 4}, "'v_proj'.*entry"),
    ({"q_proj": _GOOD}, "'v_proj.lora_A'.*no layer"),
    ({"q_proj": _GOOD, "v_proj": _GOOD, "nope": _GOOD}, "'nope'"),
    (None, "no 'layers'"),
    ("{not json", "malformed 'layers'"),
    ("[1, 2]", "'layers' metadata must be a JSON object"),
])
def test_load_adapter_checks_the_whole_file_before_touching_the_model(tmp_path, layers, match):
    path = _adapter_file(tmp_path / "a.safetensors", layers)
    model = _two_layers()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match) as info:
        lora.load_adapter(model, path)
    assert str(path) in str(info.value)
    _assert_unchanged(model, before)


def test_load_adapter_of_a_good_file_wraps_both_layers(tmp_path):
    path = _adapter_file(tmp_path / "a.safetensors", {"q_proj": _GOOD, "v_proj": _GOOD})
    model = lora.load_adapter(_two_layers(), path)
    assert set(lora.lora_layers(model)) == {"q_proj", "v_proj"}
    assert model.v_proj.scaling == 2.0 and isinstance(model.v_proj.base, QuantLinear)


def test_adapter_takes_other_float_dtypes_and_keyword_input():
    torch.manual_seed(0)
    base = QuantLinear.from_float(nn.Linear(32, 16), activations="dynamic")
    layer = lora.LoRALinear(base, 4, 8.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 32)
    assert torch.equal(layer(input=x), layer(x))
    xb = x.to(torch.bfloat16)
    y = layer(xb)
    assert y.dtype == torch.bfloat16
    want = base(xb) + ((xb.float() @ layer.lora_A.t() @ layer.lora_B.t()) * layer.scaling
                       ).to(torch.bfloat16)
    assert torch.equal(y, want)


def test_add_lora_twice_adds_no_adapter_inside_an_adapter():
    """A pattern such as "*" also matches each adapter's .base: it is not wrapped again, and
    the adapters added first stay trainable."""
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    lora.add_lora(m, r=4, target="0")
    first = m[0]
    lora.add_lora(m, r=2, target="*")
    assert m[0] is first and isinstance(m[2], lora.LoRALinear)
    assert not isinstance(m[0].base, lora.LoRALinear)
    assert first.lora_A.requires_grad and first.lora_B.requires_grad
    trainable = sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert trainable == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    with pytest.raises(ValueError, match="without an adapter.*'0' already has one"):
        lora.add_lora(m, r=2, target="0")


def test_an_adapter_of_the_model_itself_loads_only_into_a_lora_layer(tmp_path):
    torch.manual_seed(0)
    base = QuantLinear.from_float(nn.Linear(64, 32))
    w = lora.LoRALinear(base, 4, 8.0)
    with torch.no_grad():
        w.lora_B.normal_()
    path = tmp_path / "root.safetensors"
    lora.save_adapter(w, path)
    target = QuantLinear.from_float(nn.Linear(64, 32))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="for the model itself.*LoRALinear"):
        lora.load_adapter(target, path)
    assert list(target.children()) == []
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    into = lora.LoRALinear(target, 4, 1.0)
    lora.load_adapter(into, path)
    assert torch.equal(into.lora_B, w.lora_B) and into.alpha == 8.0


def test_rank_may_be_a_numpy_integer():
    import numpy as np

    m = nn.Sequential(nn.Linear(64, 32))
    lora.add_lora(m, r=np.int64(4), target="0")
    assert m[0].r == 4 and type(m[0].r) is int and m[0].lora_A.shape == (4, 64)


def test_merge_keeps_an_nn_linear_base_dtype():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 16).to(torch.bfloat16))
    lora.add_lora(m, r=4, target="0")
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    y = m(x)
    lora.merge_lora(m)
    assert type(m[0]) is nn.Linear and m[0].weight.dtype == torch.bfloat16
    assert m(x).dtype == torch.bfloat16 and torch.allclose(m(x).float(), y.float(), atol=0.05)
