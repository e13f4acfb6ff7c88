"""The per-call cost of an expanded layer where the arithmetic is negligible: one fwd+bwd of
a tiny layer (8 rows, 64 features widened by 16) on the CPU, against the same calls on
plain nn.Linear layers.  What it measures is the Python, autograd and aten work each
call issues (checks, views, launches), the part that paces a GPU step of small layers.
Expect ratios below 1 here: the expanded layer issues more of it than nn.Linear does.

    pytest benchmarks/test_bench_host_overhead.py --benchmark-only
"""
import pytest
import torch
from torch import nn

import expanse_fast as xf
from test_bench_linear_cpu import _fwd_bwd

ROWS, WIDTH, NEW = 8, 64, 16
GROUP = "host overhead: linear 64+16, 8 rows, fwd+bwd"


@pytest.fixture(scope="module")
def one_thread():
    # (the arithmetic is tiny: thread hand-offs would only add noise)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _run(benchmark, layer, x, role):
    dy = torch.randn(ROWS, layer(x).shape[1])
    benchmark.group = GROUP
    benchmark.extra_info.update(role=role)
    benchmark.pedantic(_fwd_bwd(layer, x, dy), rounds=30, iterations=50, warmup_rounds=3)


def test_expanded(benchmark, one_thread):
    torch.manual_seed(0)
    layer = xf.ExpandedLinear.from_linear(nn.Linear(WIDTH, WIDTH), NEW, NEW)
    layer.skip_old_input_grad = True  # inside an expanded model
    x = torch.randn(ROWS, WIDTH + NEW, requires_grad=True)
    with xf.use_backend("torch"):
        _run(benchmark, layer, x, "subject")


def test_linear_full_width(benchmark, one_thread):
    torch.manual_seed(0)
    _run(benchmark, nn.Linear(WIDTH + NEW, WIDTH + NEW),
         torch.randn(ROWS, WIDTH + NEW, requires_grad=True), "peer")


def test_linear_original(benchmark, one_thread):
    torch.manual_seed(0)
    _run(benchmark, nn.Linear(WIDTH, WIDTH), torch.randn(ROWS, WIDTH, requires_grad=True),
         "peer")
