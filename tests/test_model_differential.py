"""Whole models, drawn at random from a seed: small MLPs (BatchNorm1d, ReLU, GELU, SiLU,
Tanh, Dropout, layers with and without bias) and CNNs (a folded BatchNorm, a residual add,
depthwise and reflect-padded convs, a strided 1x1 or 3x3), widened once or twice, isolated
or coupled, fused or not.  Each is held to its own plain copy (``merge``, float64, every
gradient formed): the same outputs, the same input gradient, and for the isolated layout
the task-0 model bit for bit the pretrained one."""
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import expanse_fast as xf
from reference import DEVICE, on_device, usable_backends

SEEDS = range(60)


def _mlp(r: random.Random):
    widths = [r.randint(1, 9) for _ in range(r.randint(2, 4))]
    acts = [nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, lambda: nn.Dropout(0.0)]
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers.append(nn.Linear(a, b, bias=r.random() < 0.8))
        if r.random() < 0.3:
            layers.append(nn.BatchNorm1d(b))
        layers.append(r.choice(acts)())
    layers.append(nn.Linear(widths[-1], r.randint(1, 5)))
    return nn.Sequential(*layers), (r.randint(2, 7), widths[0])


class _CNN(nn.Module):
    def __init__(self, r: random.Random):
        super().__init__()
        c = r.randint(1, 6)
        self.stem = nn.Conv2d(2, c, 3, padding=1, bias=r.random() < 0.5)
        self.bn = nn.BatchNorm2d(c)
        self.body = nn.Conv2d(c, c, 3, padding=1, groups=c if r.random() < 0.3 else 1,
                              padding_mode=r.choice(["zeros", "reflect"]))
        self.down = nn.Conv2d(c, 2 * c, r.choice([1, 3]), stride=2, bias=False)
        self.fc = nn.Linear(2 * c, r.randint(1, 4))

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        h = F.relu(self.body(h) + h)
        return self.fc(F.adaptive_avg_pool2d(self.down(h), 1).flatten(1))


def _model(seed):
    r = random.Random(seed)
    torch.manual_seed(seed)
    if r.random() < 0.5:
        base, shape = _mlp(r)
    else:
        base, shape = _CNN(r), (r.randint(2, 4), 2, r.randint(3, 7), r.randint(3, 7))
    base = base.double()
    with torch.no_grad():  # BatchNorm statistics that are not the defaults
        base.train()(torch.randn(*shape, dtype=torch.float64))
    return r, base.eval(), shape


def _widened(r, base, backend):
    mode, fuse = r.choice(["isolated", "coupled"]), r.random() < 0.7
    big = base
    for _ in range(r.randint(1, 2)):
        big = xf.expand(big, width=r.choice([0.3, 1, 2, 0.0]), new_classes=r.randint(0, 3),
                        mode=mode, fuse=fuse, backend=backend)
        with torch.no_grad():  # as after training: nothing is zero any more
            for p in big.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.5)
    return big.eval(), mode


@pytest.mark.parametrize("seed", SEEDS)
def test_widened_model_is_its_plain_copy(seed):
    r, base, shape = _model(seed)
    big, mode = _widened(r, base, "torch")
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
    r, base, shape = _model(seed)
    big, _ = _widened(r, base, backend)
    plain = xf.merge(big).eval()  # float64, every gradient formed
    big = big.float().to(DEVICE)
    x64 = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x = x64.detach().float().to(DEVICE).requires_grad_()
    y, y64 = big(x), plain(x64)
    dy = torch.randn_like(y64)
    y.backward(dy.float().to(DEVICE))
    y64.backward(dy)
    tol = 1e-4 if DEVICE.type == "cpu" else 2e-2  # TF32 on the GPU
    for got, want in ((y.detach(), y64.detach()), (x.grad, x64.grad)):
        scale = want.abs().max().clamp_min(1e-6)
        assert ((got.double().cpu() - want).abs().max() / scale).item() < tol
