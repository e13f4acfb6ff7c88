"""torch backend, conv2d forward: the newest filters ride along in the last frozen block's
convolution.  The frozen channels must still come out bit for bit as the pretrained layer
computed them, the newest ones as the float64 staircase, and a shape whose library does not
keep the frozen bits falls back to separate convolutions."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import expanse_fast as xf
from expanse_fast.backends import torch_ref

CASES = [
    # (cin, cout, new_in, new_out, kernel, stride, padding, dilation, bias, hw)
    (32, 32, 8, 8, 3, 1, 1, 1, False, 12),
    (32, 64, 8, 16, 3, 2, 1, 1, False, 11),
    (32, 64, 8, 16, 1, 2, 0, 1, False, 8),
    (3, 32, 0, 8, 3, 1, 1, 1, False, 9),     # first layer: data input never grows
    (5, 7, 3, 2, 3, 1, 2, 2, True, 10),      # odd widths, bias, dilation
    (16, 24, 4, 6, (3, 1), (1, 2), (1, 0), 1, True, 7),
]


def _layer(cin, cout, new_in, new_out, k, s, p, d, bias):
    conv = nn.Conv2d(cin, cout, k, s, p, d, bias=bias)
    layer = xf.ExpandedConv2d.from_conv(conv, new_in, new_out)
    layer.backend = "torch"
    return conv, layer


@pytest.mark.parametrize("case", CASES)
def test_frozen_rows_bit_identical_new_rows_exact(case):
    torch.manual_seed(0)
    *shape, hw = case
    conv, layer = _layer(*shape)
    cin, cout = case[0], case[1]
    x = torch.randn(4, cin + case[2], hw, hw)
    for _ in range(2):  # the first call checks the shape, the second runs on its verdict
        with torch.no_grad():
            y = layer(x)
        assert torch.equal(y[:, :cout], conv(x[:, :cin].contiguous()))
        ref = F.conv2d(x.double(), layer.dense_weight().double(),
                       None if layer.dense_bias() is None else layer.dense_bias().double(),
                       layer.stride, layer.padding, layer.dilation)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


def test_three_groups_keep_every_task():
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    layer = xf.ExpandedConv2d.from_conv(conv, 2, 3)
    layer.backend = "torch"
    x1 = torch.randn(3, 8, 9, 9)
    with torch.no_grad():
        layer.weight_new.add_(0.1)  # as after training task 1
        task1 = layer(x1)
    layer.expand(4, 5)
    layer.backend = "torch"
    x = torch.cat([x1, torch.randn(3, 4, 9, 9)], dim=1)
    with torch.no_grad():
        y = layer(x)
        assert torch.equal(y[:, :8], conv(x[:, :6].contiguous()))
        torch.testing.assert_close(y[:, :11], task1, rtol=1e-6, atol=1e-6)
        assert torch.equal(y[:, 8:11], layer.to_conv(task=1)(x[:, :8].contiguous())[:, 8:])


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_joint(mult):
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 6 * mult, 3, padding=1, groups=6)
    layer = xf.ExpandedConv2d.from_conv(conv, 2, 2 * mult)
    layer.backend = "torch"
    x = torch.randn(3, 8, 7, 7, requires_grad=True)
    for _ in range(2):
        y = layer(x)
        assert torch.equal(y[:, :6 * mult].detach(), conv(x[:, :6].detach().contiguous()))
    ref = F.conv2d(x.detach().double(), layer.dense_weight().double(),
                   layer.dense_bias().double(), 1, 1, 1, 8)
    torch.testing.assert_close(y.detach().double(), ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    assert layer.weight_new.grad is not None and layer.weight_frozen.grad is None


def test_shape_that_loses_bits_falls_back(monkeypatch):
    """A library whose wide convolution changed the frozen bits: that call and every later
    one of that shape convolve apart, so they give the same bits.  (The first call kept the
    joint convolution's newest channels: on an AMD EPYC CPU they rounded differently from
    the next call's on the same input.)"""
    torch.manual_seed(3)
    conv, layer = _layer(12, 10, 4, 6, 3, 1, 1, 1, True)
    x = torch.randn(2, 16, 6, 6)
    calls = []
    real_same_bits = torch_ref._same_bits

    def lying_same_bits(a, b):
        calls.append(1)
        return False

    monkeypatch.setattr(torch_ref, "_same_bits", lying_same_bits)
    monkeypatch.setattr(torch_ref, "_JOINT_EXACT", {})
    real_conv = torch_ref._conv
    widths = []

    def spy_conv(x_, w, *args, **kw):
        widths.append(w.shape[0])
        return real_conv(x_, w, *args, **kw)

    monkeypatch.setattr(torch_ref, "_conv", spy_conv)
    with torch.no_grad():
        first = layer(x)
        second = layer(x)
    assert len(calls) == 1 and list(torch_ref._JOINT_EXACT.values()) == [False]
    # joined (10 frozen + 6 new rows) and checked against the frozen block alone, then apart
    # in that call and the next
    assert widths == [16, 10, 10, 6, 10, 6]
    ref = conv(x[:, :12].contiguous())
    assert torch.equal(first[:, :10], ref) and torch.equal(first, second)
    assert real_same_bits(ref, ref)


@pytest.mark.parametrize("depthwise", [False, True])
def test_input_gradient_keeps_channels_last(depthwise):
    """A channels_last model gets channels_last input gradients (the elementwise backward
    ops after it would otherwise mix layouts, several times slower)."""
    torch.manual_seed(4)
    conv = nn.Conv2d(6, 6, 3, padding=1, bias=False, groups=6 if depthwise else 1)
    layer = xf.ExpandedConv2d.from_conv(conv, 2, 2)
    layer.backend = "torch"
    layer.skip_old_input_grad = True
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    layer(x).square().sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    assert torch.count_nonzero(x.grad[:, :6]) == 0 and torch.count_nonzero(x.grad[:, 6:]) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_pretrained_channel_in_a_channels_last_model_stays_exact(dtype):
    """A channels_last model whose conv reads one channel: aten convolved the 1-channel slice
    of the widened channels_last input along another path (1 ulp off), and source_model's
    plain conv lost the pretrained weight's channels_last strides (the same bytes, convolved
    another way).  Both now keep the pretrained bits."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 1, 3, padding=1), nn.ReLU(), nn.Conv2d(1, 4, 3, padding=1),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).to(dtype).eval()
    model = model.to(memory_format=torch.channels_last)
    big = xf.expand(model, width=1, new_classes=0, backend="torch").eval()
    src = xf.source_model(big, task=0).eval()
    assert src[2].weight.stride() == model[2].weight.stride() == (9, 1, 3, 1)
    for n in (1, 2, 3, 8):
        x = torch.randn(n, 3, 8, 8, dtype=dtype).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            want = model(x)
            assert torch.equal(src(x), want), n
            assert torch.equal(big(x)[:, :3], want), n


@pytest.mark.parametrize("o0", [1, 8])
def test_a_one_channel_slice_of_a_channels_last_input_convolves_as_the_pretrained(o0):
    torch.manual_seed(0)
    conv = nn.Conv2d(1, o0, 3, padding=1)
    layer = xf.ExpandedConv2d.from_conv(conv, new_in=2, new_out=2)
    layer.backend = "torch"
    x0 = torch.randn(4, 1, 8, 8)
    xe = torch.cat([x0, torch.randn(4, 2, 8, 8)], 1).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(layer(xe)[:, :o0], conv(x0))


@pytest.mark.parametrize("mode", ["isolated"])  # (coupled, widened twice: to rounding, README)
def test_a_channels_last_model_widened_again_stays_exact(mode):
    """A second expand() rebuilt the frozen weights NCHW-contiguous: a channels_last model
    then convolved its old channels along another path (1 ulp off, 1-channel conv or not).
    The frozen, newest and coupling weights keep the model's channels_last strides."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                          nn.Conv2d(8, 1, 1), nn.ReLU(), nn.Conv2d(1, 6, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    model = model.eval().to(memory_format=torch.channels_last)
    big = xf.expand(model, width=2, new_classes=2, mode=mode, backend="torch").eval()
    big2 = xf.expand(big, width=1, new_classes=1, mode=mode).eval()
    assert big2[0].weight_frozen.stride() == big[0].weight_frozen.stride() == (27, 1, 9, 3)
    src = xf.source_model(big2, task=0).eval()
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(4, 3, 8, 8).contiguous(memory_format=fmt)
        with torch.no_grad():
            want = model(x)
            assert torch.equal(big2(x)[:, :3], want)
            assert torch.equal(src(x), want)


def test_a_verdict_is_kept_per_weight_layout(monkeypatch):
    """Two layers of one shape whose frozen weights lie in other memory formats may round
    otherwise alone: each is checked for itself, and each keeps the pretrained bits."""
    monkeypatch.setattr(torch_ref, "_JOINT_EXACT", {})
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9)
    outs = []
    for fmt in (torch.contiguous_format, torch.channels_last, torch.contiguous_format):
        conv = nn.Conv2d(8, 16, 3, padding=1).to(memory_format=fmt)
        layer = xf.ExpandedConv2d.from_conv(conv, 0, 3)
        layer.backend = "torch"
        with torch.no_grad():
            assert torch.equal(layer(x)[:, :16], conv(x)), fmt
        outs.append(len(torch_ref._JOINT_EXACT))
    assert outs == [1, 2, 2]
