"""One fwd+bwd of a 1024-wide hidden layer widened by 25% (4096 rows) on the CPU, inside an
expanded model (only the new input features need a gradient), against the peers a user
would otherwise write: a full-width dense layer with a gradient mask, and fine-tuning the
original 1024x1024 layer (both computing their input gradient).

    pytest benchmarks/test_bench_linear_cpu.py --benchmark-only
"""
import pytest
import torch
from torch import nn

import expanse_fast as xf

ROWS, WIDTH, NEW = 4096, 1024, 256
LAYOUT = xf.Layout((WIDTH, NEW), (WIDTH, NEW))
USEFUL = LAYOUT.forward_macs() + LAYOUT.backward_macs(need_input_grad=True)
GROUP = "linear 1024+256, 4096 rows, fwd+bwd"


def _fwd_bwd(layer, x, dy):
    def run():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(dy)
    return run


@pytest.fixture(scope="module")
def threads():
    torch.set_num_threads(max(1, torch.get_num_threads()))


def test_expanded(benchmark, threads):
    torch.manual_seed(0)
    layer = xf.ExpandedLinear.from_linear(nn.Linear(WIDTH, WIDTH), NEW, NEW)
    layer.skip_old_input_grad = True  # inside an expanded model
    x = torch.randn(ROWS, WIDTH + NEW, requires_grad=True)
    dy = torch.randn(ROWS, WIDTH + NEW)
    benchmark.group = GROUP
    benchmark.extra_info.update(role="subject")
    with xf.use_backend("torch"):
        benchmark.pedantic(_fwd_bwd(layer, x, dy), rounds=7, warmup_rounds=2)


def test_masked_dense(benchmark, threads):
    torch.manual_seed(0)
    layer = nn.Linear(WIDTH + NEW, WIDTH + NEW)
    mask = torch.zeros_like(layer.weight)
    mask[WIDTH:] = 1
    bmask = torch.zeros_like(layer.bias)
    bmask[WIDTH:] = 1
    layer.weight.register_hook(lambda g: g * mask)
    layer.bias.register_hook(lambda g: g * bmask)
    x = torch.randn(ROWS, WIDTH + NEW, requires_grad=True)
    dy = torch.randn(ROWS, WIDTH + NEW)
    benchmark.group = GROUP
    benchmark.extra_info.update(role="peer", limit=LAYOUT.dense_macs() / USEFUL)
    benchmark.pedantic(_fwd_bwd(layer, x, dy), rounds=7, warmup_rounds=2)


def test_finetune_original(benchmark, threads):
    torch.manual_seed(0)
    layer = nn.Linear(WIDTH, WIDTH)
    x = torch.randn(ROWS, WIDTH, requires_grad=True)
    dy = torch.randn(ROWS, WIDTH)
    benchmark.group = GROUP
    benchmark.extra_info.update(role="peer", limit=3 * WIDTH * WIDTH / USEFUL)
    benchmark.pedantic(_fwd_bwd(layer, x, dy), rounds=7, warmup_rounds=2)
