"""Whole models, drawn at random from a seed: small MLPs (BatchNorm1d, ReLU, GELU, SiLU,
Tanh, Dropout, layers with and without bias) and CNNs (a folded BatchNorm, a residual add,
depthwise and reflect-padded convs, a strided 1x1 or 3x3), widened once or twice, isolated
or coupled, fused or not.  Each is held to its own plain copy (``merge``, float64, every
gradient formed): the same outputs, the same input gradient, and for the isolated layout
the task-0 model bit for bit the pretrained one."""
import pytest
import torch

import expanse_fast as xf
from models import random_model, random_widened, widen_at_random
from reference import DEVICE, assert_close_on_device, on_device, usable_backends

SEEDS = range(60)


@pytest.mark.parametrize("seed", SEEDS)
def test_widened_model_is_its_plain_copy(seed):
    r, base, shape = random_model(seed)
    big, mode = widen_at_random(r, base, "torch")
    plain = xf.merge(big).eval()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    y, y_plain = big(x), plain(x_plain)
    assert y.shape == y_plain.shape
    torch.testing.assert_close(y, y_plain, rtol=1e-9, atol=1e-9)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_plain.backward(dy)
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=1e-8, atol=1e-9)
    if mode == "isolated":
        with torch.no_grad():
            assert torch.equal(xf.source_model(big, 0).eval()(x.detach()), base(x.detach()))


# the kernels (Triton; on a GPU the CUDA extension too), in float32; on a GPU these carry
# the gpu mark and run in benchmarks/gpu/run.sh.  Fewer seeds: on a CPU Triton interprets.
KERNEL_CASES = on_device([(b, seed) for b in usable_backends(DEVICE, ("triton", "cuda"))
                          for seed in range(8)])


@pytest.mark.parametrize("backend,seed", KERNEL_CASES)
def test_kernels_widen_like_the_plain_copy(backend, seed):
    big, plain, shape = random_widened(seed, backend)  # plain: float64, every gradient formed
    big = big.float().to(DEVICE)
    x64 = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x = x64.detach().float().to(DEVICE).requires_grad_()
    y, y64 = big(x), plain(x64)
    dy = torch.randn_like(y64)
    y.backward(dy.float().to(DEVICE))
    y64.backward(dy)
    assert_close_on_device(y.detach(), y64.detach())
    assert_close_on_device(x.grad, x64.grad)
