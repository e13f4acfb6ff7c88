"""torch backend, conv2d backward: the trainable bias's gradient from an NCHW dy is summed
by the backend itself (each image's channel rows first, then the images; aten's one-pass
sum over (0, 2, 3) was slow on the H200), from a channels_last dy by aten as before.  Both
against the float64 sum, on odd sizes, and through a whole expanded layer."""
import pytest
import torch
from torch import nn

import expanse_fast as xf
from expanse_fast.backends import torch_ref

SHAPES = [(1, 1, 1, 2), (3, 5, 7, 11), (2, 13, 1, 17), (4, 8, 6, 6), (0, 3, 4, 5)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_bias_grad_is_the_sum_over_images_and_pixels(shape, dtype):
    dy64 = torch.randn(shape, dtype=torch.float64)
    dy = dy64.to(dtype)
    got = torch_ref._bias_grad(dy)
    want = dy.double().sum((0, 2, 3))
    assert got.dtype == dtype and got.shape == (shape[1],)
    # float32 accumulation at least, as aten's own sum: its rounding is the output's
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    scale = want.abs().max().item() if want.numel() and shape[0] else 0.0
    assert torch.allclose(got.double(), want, rtol=tol, atol=tol * scale)


def test_only_dense_nchw_with_pixels_takes_it():
    assert torch_ref._rows_then_images(torch.randn(2, 3, 4, 5))
    assert not torch_ref._rows_then_images(
        torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last))
    assert not torch_ref._rows_then_images(torch.randn(2, 6, 4, 5)[:, 3:])
    assert not torch_ref._rows_then_images(torch.randn(2, 3, 1, 1))


@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_bias_grad_matches_float64(channels_last, monkeypatch):
    torch.manual_seed(0)
    layer = xf.ExpandedConv2d.from_conv(nn.Conv2d(5, 7, 3, padding=1), 3, 4)
    layer.backend = "torch"
    x = torch.randn(3, 8, 9, 11)
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    calls = []
    own = torch_ref._bias_grad
    monkeypatch.setattr(torch_ref, "_bias_grad", lambda dy: calls.append(dy.shape) or own(dy))
    dy = torch.randn(3, 11, 9, 11)
    layer(x).backward(dy)
    want = dy.double()[:, 7:].sum((0, 2, 3))
    assert torch.allclose(layer.bias_new.grad.double(), want, rtol=1e-5, atol=1e-4)
    assert calls == ([] if channels_last else [torch.Size([3, 4, 9, 11])])
