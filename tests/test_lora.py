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
