"""The folded BatchNorm's frozen statistics padded for the newest channels
(expanse_fast/backends/padded_stats.py): the values of a fill-and-cat per tensor, read anew
every call (an in-place change of the frozen statistics shows at once), in three ops."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from expanse_fast.backends import padded_stats, torch_ref

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _reference(stats, n_new):
    # the newest channels' stand-ins: mean 0, var 1, weight 1, bias 0
    return tuple(None if t is None else torch.cat([t, t.new_full((n_new,), v)])
                 for t, v in zip(stats, (0.0, 1.0, 1.0, 0.0)))


def _stats(o_f, dtype, weight=True, bias=True):
    g = torch.Generator().manual_seed(o_f)
    make = lambda: torch.randn(o_f, generator=g).to(dtype)  # noqa: E731
    return (make(), make().abs() + 0.5, make() if weight else None, make() if bias else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("o_f,n_new", [(1, 1), (7, 3), (16, 5), (13, 64)])
@pytest.mark.parametrize("affine", [(True, True), (False, False), (True, False), (False, True)])
def test_values_dtypes_and_missing_affine(dtype, o_f, n_new, affine):
    stats = _stats(o_f, dtype, *affine)
    got = padded_stats.pad(stats, n_new)
    for g, want in zip(got, _reference(stats, n_new)):
        if want is None:
            assert g is None
            continue
        assert g.dtype == dtype and g.shape == (o_f + n_new,) and g.is_contiguous()
        assert torch.equal(g, want)


def test_frozen_statistics_are_read_every_call():
    stats = _stats(6, torch.float32)
    first = [t.clone() for t in padded_stats.pad(stats, 2)]
    with torch.no_grad():
        stats[0].add_(1.0)  # an in-place change (say, a checkpoint load)
        stats[3].mul_(-2.0)
    second = padded_stats.pad(stats, 2)
    assert torch.equal(second[0][:6], first[0][:6] + 1.0)
    assert torch.equal(second[3][:6], first[3][:6] * -2.0)
    assert torch.equal(second[1], first[1]) and torch.equal(second[2], first[2])
    # the outputs are fresh tensors: writing one changes nothing later calls see
    second[1].fill_(123.0)
    assert torch.equal(padded_stats.pad(stats, 2)[1], first[1])


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_three_ops_per_call_once_the_stand_ins_exist():
    stats = _stats(9, torch.float32)
    padded_stats.pad(stats, 4)  # makes the stand-in block of this kind
    with _Ops() as log:
        padded_stats.pad(stats, 4)
    assert sorted(log.ops) == ["cat", "stack", "unbind"]


def test_folded_bn_keeps_the_unfused_bits_and_raw_newest_channels():
    torch.manual_seed(0)
    o_f, n_new = 12, 5
    y = torch.randn(3, o_f + n_new, 6, 7)
    mean, var, weight, bias = _stats(o_f, torch.float32)
    out = torch_ref.frozen_batch_norm(y, (mean, var, weight, bias, 1e-5))
    m, v, w, b = _reference((mean, var, weight, bias), n_new)
    unfused = torch.nn.functional.batch_norm(y, m, v, w, b, False, 0.0, 1e-5)
    assert torch.equal(out[:, :o_f].view(torch.int32), unfused[:, :o_f].view(torch.int32))
    assert torch.equal(out[:, o_f:], y[:, o_f:])
