"""The blocks a layer hands its op each call (ExpandedBlocks._block_tensors): read from the
parameter dict where they are, and from plain attributes otherwise (a missing bias, a
parametrized weight)."""
import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

import expanse_fast as xf

NAMES = ("weight_frozen", "bias_frozen", "weight_new", "bias_new", "weight_couple")


def _ids(v):
    return v if isinstance(v, str) else ""


def _layers():
    torch.manual_seed(0)
    yield "linear", xf.ExpandedLinear.from_linear(nn.Linear(6, 5), 3, 4)
    yield "linear_no_bias", xf.ExpandedLinear.from_linear(nn.Linear(6, 5, bias=False), 3, 4)
    yield "linear_coupled", xf.ExpandedLinear.from_linear(nn.Linear(6, 5), 3, 4,
                                                          mode="coupled")
    yield "conv", xf.ExpandedConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1), 2, 2)


@pytest.mark.parametrize("name,layer", list(_layers()), ids=_ids)
def test_block_tensors_are_the_attributes(name, layer):
    got = layer._block_tensors()
    for n, t in zip(NAMES, got):
        assert t is getattr(layer, n), n
    assert (got[4] is not None) == name.endswith("coupled")
    assert (got[1] is None) == name.endswith("no_bias")


class _Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("name,layer", list(_layers()), ids=_ids)
def test_a_parametrized_block_is_what_the_op_gets(name, layer):
    x = torch.randn(2, layer.weight_new.shape[1], 5, 5) if name == "conv" else \
        torch.randn(2, layer.weight_new.shape[1])
    bias = layer.bias_new
    before = layer(x).detach()
    parametrize.register_parametrization(layer, "weight_new", _Doubled())
    after = layer(x)
    o_f = layer.weight_frozen.shape[0]
    torch.testing.assert_close(after[:, :o_f], before[:, :o_f], rtol=0, atol=0)
    b = 0 if bias is None else (bias.view(1, -1, 1, 1) if name == "conv" else bias)
    torch.testing.assert_close(after[:, o_f:] - b, 2 * (before[:, o_f:] - b))
    after.sum().backward()
    assert layer.parametrizations.weight_new.original.grad is not None
