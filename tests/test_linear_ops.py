"""quantkit.linear_ops: the int8 Linear's custom ops, and when QuantLinear calls them."""

import pytest
import torch

from quantkit import linear_ops
from quantkit.nn import QuantLinear

MODES = [dict(activations=None), dict(activations="dynamic"),
         dict(activations=None, block_size=64), dict(activations="dynamic", block_size=64)]


@pytest.mark.parametrize("kw", MODES, ids=lambda kw: f"{kw['activations']}-{kw.get('block_size')}")
def test_eager_inference_skips_the_op_dispatch_with_the_same_bits(monkeypatch, kw):
    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.nn.Linear(128, 48), weight_method="max", **kw)
    x = torch.randn(5, 128)
    with torch.no_grad():
        direct = layer(x)
    traced = layer(x.clone().requires_grad_())      # autograd records: the custom op runs
    assert torch.equal(direct, traced.detach())

    def refuse(*args):
        raise AssertionError("the custom op was called")

    monkeypatch.setattr(linear_ops, "linear_w8", refuse)
    monkeypatch.setattr(linear_ops, "linear_w8a8", refuse)
    with torch.inference_mode():
        assert torch.equal(layer(x), direct)
    with pytest.raises(AssertionError, match="custom op"):
        layer(x.clone().requires_grad_())


def test_a_bias_that_wants_a_gradient_goes_through_the_op():
    torch.manual_seed(1)
    layer = QuantLinear.from_float(torch.nn.Linear(64, 8), weight_method="max")
    layer.bias.requires_grad_(True)
    layer(torch.randn(3, 64)).sum().backward()
    assert torch.equal(layer.bias.grad, torch.full((8,), 3.0))


@pytest.mark.parametrize("activations", [None, "dynamic"])
def test_meta_tensors_give_the_output_shape(activations):
    """A layer and input on the meta device (shape inference) go through the op's fake
    implementation: every mode returns a meta tensor of the output's shape."""
    layer = QuantLinear.from_float(torch.nn.Linear(8, 4), activations=activations).to("meta")
    y = layer(torch.empty(2, 3, 8, device="meta"))
    assert y.device.type == "meta" and tuple(y.shape) == (2, 3, 4)
