"""ExpandedConv2d with nn.Conv2d's other padding modes (reflect, replicate, circular): the
input is padded first, as nn.Conv2d does, so the frozen channels stay the pretrained conv's
bit for bit, the trainable ones match the float64 staircase forward and backward, and the
plain copies keep the mode."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import expanse_fast as xf
from expanse_fast.nn.conv import PADDING_MODES
from reference import DEVICE, on_device, usable_backends

MODES = [m for m in PADDING_MODES if m != "zeros"]
SHAPES = [  # (cin, cout, new_in, new_out, kernel, stride, padding, dilation, depthwise)
    (5, 7, 3, 2, 3, 1, 1, 1, False),
    (4, 6, 2, 3, (3, 5), 2, (1, 2), 1, False),
    (6, 6, 2, 2, 3, 1, 2, 2, True),
]


def _conv(cin, cout, new_in, new_out, k, s, p, d, depthwise, mode):
    conv = nn.Conv2d(cin, cout, k, s, p, d, groups=cin if depthwise else 1, padding_mode=mode)
    layer = xf.ExpandedConv2d.from_conv(conv, new_in, new_out)
    layer.backend = "torch"
    return conv, layer


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES)
def test_frozen_channels_bit_for_bit_and_gradients(mode, shape):
    torch.manual_seed(0)
    conv, layer = _conv(*shape, mode)
    cin, cout, new_in = shape[0], shape[1], shape[2]
    assert f"padding_mode={mode!r}" in repr(layer)
    x = torch.randn(3, cin + new_in, 9, 10, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(y[:, :cout], conv(x[:, :cin].contiguous()))
    # float64 staircase: the plain conv of the same weights, mode included
    dense = layer.to_conv().double()
    assert dense.padding_mode == mode
    x64 = x.detach().double().requires_grad_()
    dy = torch.randn_like(y)
    y.backward(dy)
    dense(x64).backward(dy.double())
    torch.testing.assert_close(y.detach().double(), dense(x64).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    new_rows = slice(cout, None)
    torch.testing.assert_close(layer.weight_new.grad.double(), dense.weight.grad[new_rows],
                               rtol=1e-5, atol=1e-5)


def test_widened_model_keeps_the_mode_through_plain_copies():
    torch.manual_seed(1)
    base = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding="same", padding_mode="circular"),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(6, 4)).eval()
    big = xf.expand(base, width=0.5, new_classes=2)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(big(x)[:, :4], base(x))
        src = xf.source_model(big, 0)
        assert [m.padding_mode for m in src if isinstance(m, nn.Conv2d)] == ["reflect",
                                                                              "circular"]
        assert torch.equal(src(x), base(x))
        torch.testing.assert_close(xf.merge(big)(x), big(x), rtol=1e-6, atol=1e-6)


def test_unknown_padding_mode_is_refused():
    with pytest.raises(ValueError, match=r"padding_mode must be one of .* got 'mirror'"):
        xf.ExpandedConv2d((3, 1), (4, 2), 3, padding=1, padding_mode="mirror")


def test_depthwise_reflect_matches_the_functional_form():
    """The padding is the input's, before any channel is read: the same as padding by hand."""
    torch.manual_seed(2)
    conv, layer = _conv(4, 4, 2, 2, 3, 1, 1, 1, True, "reflect")
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        by_hand = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), layer.dense_weight(),
                           layer.dense_bias(), groups=6)
        torch.testing.assert_close(layer(x), by_hand, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", on_device(usable_backends(DEVICE)))
def test_every_backend_pads_like_the_plain_conv(backend):
    torch.manual_seed(3)
    conv, layer = _conv(5, 7, 3, 2, 3, 2, 1, 1, False, "replicate")
    layer = layer.to(DEVICE)
    layer.backend = backend
    dense = layer.to_conv().double()
    x = torch.randn(2, 8, 7, 6, device=DEVICE, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    dense(x64).backward(dy.double())
    tol = 2e-3 if DEVICE.type == "cpu" else 1e-2  # cuDNN and the kernels may use TF32
    torch.testing.assert_close(y.detach().double(), dense(x64).detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol)
