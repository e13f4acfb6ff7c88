"""Expanded models under torch.autocast: the expanded layers run in autocast's lower-precision
dtype, as nn.Linear and nn.Conv2d do, and trainable parameters still get float32 gradients
close to the full-precision ones."""
import pytest
import torch
from torch import nn

import expanse_fast as xf

DEVICES = ["cpu"] + [pytest.param("cuda", marks=pytest.mark.gpu)]


def _mlp():
    return nn.Sequential(nn.Linear(13, 32), nn.GELU(), nn.Linear(32, 24), nn.ReLU(),
                         nn.Linear(24, 5))


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


def _grads(model, x, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    y.float().square().sum().backward()
    return y, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("build,shape", [(_mlp, (64, 13)), (_cnn, (4, 3, 8, 8))],
                         ids=["mlp", "cnn"])
def test_expanded_model_under_autocast(device, build, shape):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    base = build().to(device)
    with torch.no_grad():
        for m in base.modules():  # running statistics that are not the defaults
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    big = xf.expand(base, width=0.25, new_classes=2).to(device)
    frozen = {n: p.detach().clone() for n, p in big.named_parameters() if not p.requires_grad}
    x = torch.randn(*shape, device=device)
    y16, g16 = _grads(big, x, autocast=True)
    y32, g32 = _grads(big, x, autocast=False)
    assert y16.dtype == torch.bfloat16 and y32.dtype == torch.float32
    assert _rel(y16, y32) < 2e-2
    assert g16.keys() == g32.keys() and g16
    largest = max(g.norm().item() for g in g32.values())
    for name in g16:
        assert g16[name].dtype == torch.float32, name  # the master weights' dtype
        if g32[name].norm() < 1e-6 * largest:
            # zero in exact arithmetic (a conv bias feeding a train-mode BatchNorm): both
            # gradients are rounding noise, bf16's larger
            assert g16[name].norm() < 1e-3 * largest, name
            continue
        assert _rel(g16[name], g32[name]) < 5e-2, name
    for name, p in big.named_parameters():  # autocast changed no stored weight
        if name in frozen:
            assert p.dtype == torch.float32 and torch.equal(p, frozen[name]), name


def test_float64_layers_stay_float64_under_autocast():
    """Autocast leaves float64 alone, for nn.Linear and nn.Conv2d as for the widened layers:
    the old outputs stay the pretrained layer's."""
    torch.manual_seed(0)
    lin, conv = nn.Linear(6, 4).double(), nn.Conv2d(3, 4, 3).double()
    wide_lin = xf.ExpandedLinear.from_linear(lin, 2, 3)
    wide_conv = xf.ExpandedConv2d.from_conv(conv, 2, 3)
    x, xc = torch.randn(5, 8, dtype=torch.float64), torch.randn(2, 5, 6, 6, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x[:, :6]).dtype == torch.float64  # what the plain layers do
        y, yc = wide_lin(x), wide_conv(xc)
    assert y.dtype == yc.dtype == torch.float64
    assert torch.equal(y[:, :4], lin(x[:, :6]))
    assert torch.equal(yc[:, :4], conv(xc[:, :3]))
