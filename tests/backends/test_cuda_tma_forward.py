"""The cuda backend's experimental forward through the copy engine (TMA), on an H100/H200.

``EXPANSE_FAST_CUDA_PIPELINE=tma`` loads the linear forward's k-tiles with 2-D bulk tensor
copies completing on mbarriers (csrc/tma.cuh) instead of per-thread ``cp.async`` and a
proxy fence per k-tile; the backward stays on the default kernels.  Its own file, run after
the extension's other tests by the GPU run's plugin (not in its priority list): a fault here
(a trap in a copy that never lands) cannot fail the rest.  Every case against the layer in
float64 on the torch backend; where an operand is not one the engine takes (16-byte
alignment), the cp.async forward runs instead and must agree as well.
"""
import copy

import pytest
import torch

import expanse_fast as xf
from expanse_fast.backends import cuda

pytestmark = pytest.mark.gpu

TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.fixture
def dev(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    device = torch.device("cuda")
    ok, why = cuda.availability(device)
    if not ok:
        pytest.skip(f"cuda backend unavailable: {why}")
    monkeypatch.setenv("EXPANSE_FAST_CUDA_PIPELINE", "tma")
    monkeypatch.delenv("EXPANSE_FAST_CUDA_SWIZZLE", raising=False)
    monkeypatch.delenv("EXPANSE_FAST_CUDA_WGMMA", raising=False)
    if cuda.linear_math(torch.bfloat16, device) != "wgmma-tma":
        pytest.skip("the TMA forward is the wgmma kernels' (an H100/H200's)")
    return device


def random_layer(in_groups, out_groups, mode, dtype, device, activation=""):
    torch.manual_seed(sum(in_groups) * 31 + sum(out_groups))
    layer = xf.ExpandedLinear(in_groups, out_groups, mode=mode, device=device, dtype=dtype,
                              activation=activation)
    with torch.no_grad():
        for p in (layer.weight_frozen, layer.weight_new, layer.weight_couple,
                  layer.bias_frozen, layer.bias_new):
            if p is not None:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return layer


def float64_copy(layer):
    cpu = copy.deepcopy(layer).to(torch.device("cpu"), torch.float64)
    cpu.backend = "torch"
    return cpu


def rel_err(out, ref):
    return ((out.detach().double().cpu() - ref).norm() / ref.norm()).item()


# (rows, in groups, out groups, layout, activation): 16-byte rows (the engine takes them), a
# staircase whose k_end is no multiple of the 64-wide k-tile (the engine's zeros end the
# phase), one row, and an odd width (not 16-byte rows: the cp.async forward runs)
CASES = {
    "aligned": (300, (256, 64), (256, 64), "isolated", ""),
    "staircase_coupled": (257, (136, 64, 72), (128, 72, 40), "coupled", "gelu"),
    "one_row": (1, (64, 64), (64, 64), "isolated", "relu"),
    "hidden_4096": (1024, (4096, 1024), (4096, 1024), "isolated", ""),
    "odd_width_falls_back": (37, (37, 11), (29, 13), "coupled", "silu"),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_tma_forward_matches_float64(dev, case, dtype):
    rows, ins, outs, mode, act = CASES[case]
    layer = random_layer(ins, outs, mode, dtype, dev, act)
    layer.backend = "cuda"
    x = torch.randn(rows, sum(ins), device=dev, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
    torch.cuda.synchronize(dev)
    ref = float64_copy(layer)(x.cpu().double())
    assert y.shape == ref.shape and y.dtype == dtype
    err = rel_err(y, ref)
    assert err < TOL[dtype], f"{case} {dtype}: rel err {err:.3g}"


def test_tma_forward_and_backward_train_the_new_rows(dev):
    """fwd+bwd with the TMA forward: the new rows' gradient as on the torch backend."""
    dtype = torch.bfloat16
    layer = random_layer((256, 64), (256, 64), "isolated", dtype, dev)
    layer.backend = "cuda"
    x = torch.randn(512, 320, device=dev, dtype=dtype)
    dy = torch.randn(512, 320, device=dev, dtype=dtype)
    cpu = float64_copy(layer)
    layer(x).backward(dy)
    cpu(x.cpu().double()).backward(dy.cpu().double())
    err = rel_err(layer.weight_new.grad, cpu.weight_new.grad)
    assert err < TOL[dtype], f"dW_new rel err {err:.3g}"
