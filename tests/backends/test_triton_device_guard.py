"""The triton backend's ops run under their tensors' CUDA device: Triton launches on the
current device, so a layer on another GPU than the current one (a model split across GPUs,
a thread that never set its device) would hand that GPU's pointers to a kernel on the
current one.  No second GPU here: the guard's decisions, with torch.cuda's device calls
recorded."""
import contextlib
import types

import pytest
import torch

from expanse_fast.backends import triton as triton_backend


@pytest.fixture
def devices(monkeypatch):
    """torch.cuda's current device (0) and the device scopes entered, recorded."""
    entered = []

    @contextlib.contextmanager
    def scope(device):
        entered.append(device)
        yield
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", scope)
    return entered


def _tensor_on(index):
    return types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", index))


def _op(seen):
    @triton_backend._on_its_device
    def op(t, a, b=None):
        """the op's docstring"""
        seen.append((a, b))
        return "result"
    return op


def test_an_op_on_another_gpu_runs_under_that_gpu(devices):
    seen = []
    op = _op(seen)
    assert op(_tensor_on(1), 2, b=3) == "result"
    assert devices == [torch.device("cuda", 1)] and seen == [(2, 3)]
    assert op.__doc__ == "the op's docstring"  # (functools.wraps)


def test_an_op_on_the_current_gpu_or_the_cpu_enters_no_scope(devices):
    seen = []
    op = _op(seen)
    assert op(_tensor_on(0), 1) == "result"
    assert op(torch.zeros(2), 1) == "result"
    assert devices == [] and seen == [(1, None), (1, None)]


@pytest.mark.parametrize("name", ["linear_forward", "linear_backward", "conv2d_forward",
                                  "conv2d_backward"])
def test_every_op_is_guarded(name):
    assert getattr(triton_backend, name).__wrapped__.__name__ == name
