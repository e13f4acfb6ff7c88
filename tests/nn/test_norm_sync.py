"""norm_sync.synced_batch_norm in a one-rank gloo group, against a float64 batch norm.

The two-rank behaviour (statistics over both ranks' slices, gradients across ranks) is
checked in tests/train/test_distributed.py; here: the arithmetic, odd shapes, half inputs,
the running statistics' update and the refusal of a single value per channel.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import expanse_fast as xf
from expanse_fast.nn.norm_sync import group_size, synced_batch_norm
from expanse_fast.train import distributed as xd


@pytest.fixture
def one_rank_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def _reference(x, w, b, eps):
    """float64 training-mode batch norm, and the running-statistics targets."""
    x64 = x.double()
    dims = [0] + list(range(2, x.dim()))
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    mean = x64.mean(dims)
    var = x64.var(dims, unbiased=False)
    y = (x64 - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    y = y * w.double().view(shape) + b.double().view(shape)
    n = x.numel() // x.shape[1]
    return y, mean, var * n / (n - 1)


@pytest.mark.parametrize("shape", [(2, 1), (5, 3, 7), (3, 4, 5, 2), (1, 13, 3, 3), (7, 2, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_float64_batch_norm(one_rank_group, shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    c = shape[1]
    x = (torch.randn(shape, generator=g) * 3 + 5).to(dtype).requires_grad_()
    w = torch.rand(c, generator=g).add_(0.5).requires_grad_()
    b = torch.randn(c, generator=g).requires_grad_()
    rm, rv = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = synced_batch_norm(x, rm, rv, w, b, 0.3, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    want, mean, unbiased = _reference(x.detach(), w.detach(), b.detach(), 1e-5)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(rm.double(), 0.7 * rm0.double() + 0.3 * mean, rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(rv.double(), 0.7 * rv0.double() + 0.3 * unbiased, rtol=1e-5,
                               atol=1e-5)
    # gradients against autograd through the float64 reference
    dy = torch.randn(shape, generator=g).to(dtype)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    x64 = x.detach().double().requires_grad_()
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = F.batch_norm(x64, None, None, w64, b64, True, 0.0, 1e-5)
    rx, rw, rb = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    torch.testing.assert_close(gx.double(), rx, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-4 * shape[0] * 10)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-4, atol=1e-4)


def test_one_value_per_channel_is_refused(one_rank_group):
    x = torch.randn(1, 3, 1, 1)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        synced_batch_norm(x, rm, rv, None, None, 0.1, 1e-5)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_layer_syncs_only_in_a_group_of_several_ranks(one_rank_group):
    """sync_batchnorm marks every expanded BatchNorm (and unmarks with enabled=False); in a
    group of one rank the layer keeps aten's batch norm, bit for bit."""
    assert group_size(None) == 1
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3))
    big = xf.expand(net, width=2, mode="isolated")
    twin = xf.expand(net, width=2, mode="isolated")
    twin.load_state_dict(big.state_dict())
    bns = [m for m in big.modules() if isinstance(m, xf.nn.ExpandedBatchNorm2d)]
    assert len(bns) == 2
    assert xd.sync_batchnorm(big) is big
    assert all(m.sync_batch_stats and m.sync_group is None for m in bns)
    assert "synced" in repr(big)
    x = torch.randn(4, 2, 6, 6)
    big.train(), twin.train()
    assert torch.equal(big(x), twin(x))
    xd.sync_batchnorm(big, enabled=False)
    assert not any(m.sync_batch_stats for m in bns)
