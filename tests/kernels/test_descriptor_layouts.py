"""Seeded random layouts through the kernels with tensor descriptors forced on (the
interpreter too): whatever a layout is, the results match float64 and no descriptor launch
fails.  A launch that fails switches every descriptor kernel off for the process, so a
layout that ``usable`` lets through but a descriptor cannot address (a tile starting off 16
bytes along the innermost dimension, say) costs every later layer its fast path; this is
where such a layout shows up."""
import random

import pytest
import torch

from expanse_fast.backends import triton as triton_backend
from expanse_fast.kernels import expanded_linear_tma as lt
from test_expanded_conv_kernels import _conv, _make, _run
from test_expanded_conv_kernels import _exact_fp32  # noqa: F401 -- autouse: IEEE fp32
from test_expanded_linear_kernels import Case, assert_close

pytestmark = pytest.mark.skipif(lt.TensorDescriptor is None,
                                reason="this Triton has no tensor descriptors")


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setattr(lt, "MODE", "1")
    monkeypatch.setattr(lt, "disabled_reason", None)


def _linear_layout(rng):
    groups = rng.choice([2, 3, 4])
    ins = tuple(rng.choice([0, 2, 4, 8, 12, 16, 24, 40]) for _ in range(groups - 1))
    outs = tuple(rng.choice([0, 4, 8, 12, 16, 24]) for _ in range(groups - 1))
    return (ins + (rng.choice([4, 8, 12, 16]),), outs + (rng.choice([4, 8, 16]),),
            rng.choice(["isolated", "coupled"]), rng.choice([1, 7, 37]), rng.random() < 0.5)


def _check_linear(seed, dtype):
    ins, outs, mode, rows, dx_old = _linear_layout(random.Random(seed))
    c = Case(ins, outs, mode=mode, n=rows, dtype=dtype)
    assert_close(triton_backend.linear_forward(c.x, *c.blocks()), c.ref_forward(), dtype, "y")
    got = c.backward(triton_backend, need_dx_old=dx_old)
    for g, ref, what in zip(got, c.ref_backward(dx_old), ("dx", "dw", "db", "dcouple")):
        if ref is not None:
            assert_close(g, ref, dtype, what)
    assert lt.disabled_reason is None, (ins, outs, mode)


@pytest.mark.parametrize("seed", range(12))
def test_random_linear_layouts(forced, seed):
    _check_linear(seed, torch.float16)


def _conv_layout(rng):
    groups = rng.choice([2, 3])
    ins = tuple(rng.choice([2, 4, 8, 12, 16]) for _ in range(groups))
    outs = tuple(rng.choice([4, 8, 12, 16]) for _ in range(groups))
    kh, kw = rng.choice([(1, 1), (2, 2), (3, 3), (1, 3), (2, 1)])
    conv = _conv(stride=rng.choice([1, 1, 2]),
                 padding=(rng.randint(0, kh // 2 + 1), rng.randint(0, kw // 2 + 1)),
                 dilation=rng.choice([1, 2]))
    return (ins, outs, (kh, kw), conv, rng.random() < 0.3, rng.random() < 0.6,
            (rng.randint(kh * 2 + 1, 8), rng.choice([5, 6, 8])), rng.random() < 0.5)


def _check_conv(seed, dtype):
    ins, outs, kernel, conv, coupled, channels_last, hw, dx_old = _conv_layout(
        random.Random(seed))
    t = _make(ins, outs, kernel, coupled, True, dtype, batch=2, hw=hw,
              channels_last=channels_last)
    _run(t, conv, False, dtype, need_dx_old=dx_old, channels_last=channels_last)
    assert lt.disabled_reason is None, (ins, outs, kernel, conv, channels_last)


@pytest.mark.parametrize("seed", range(10))
def test_random_conv_layouts(forced, seed):
    _check_conv(seed, torch.float16)


# On the GPU: a few of the same layouts in bf16 through the hardware's bulk copies, whose
# zero fill past a tensor's edge and alignment rules the interpreter only models.
@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(3))
def test_gpu_random_linear_layouts_bf16(forced, seed):
    _check_linear(seed, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(3))
def test_gpu_random_conv_layouts_bf16(forced, seed):
    _check_conv(seed, torch.bfloat16)
