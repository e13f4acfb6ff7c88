"""kernels/launch.py: the autotuner runs until it has chosen; later launches take its choice
directly, and see when that choice no longer stands."""
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner

from expanse_fast.kernels import expanded_linear as L
from expanse_fast.kernels import launch as launch_module
from expanse_fast.kernels.launch import launch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HOOKED = []  # BLOCK of every config pre-hook call


def _hook(nargs):
    HOOKED.append(nargs["BLOCK"])


def _timings():
    """Benchmark times that make the autotuner pick the second config of two."""
    times = iter([2.0, 1.0] * 100)

    def bench(kernel_call, quantiles):
        kernel_call()
        t = next(times)
        return [t] * len(quantiles)
    return bench


def _scale_kernel():
    configs = [triton.Config({"BLOCK": 16}, num_warps=1, pre_hook=_hook),
               triton.Config({"BLOCK": 32}, num_warps=1, pre_hook=_hook)]

    @triton.autotune(configs=configs, key=["n"], do_bench=_timings())
    @triton.jit
    def scale(x_ptr, y_ptr, n, s, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=live) * s, mask=live)
    return scale


@pytest.fixture
def autotuner_calls(monkeypatch):
    """How many times Autotuner.run ran."""
    calls = []
    real = Autotuner.run

    def counted(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Autotuner, "run", counted)
    HOOKED.clear()
    return calls


def _run(kernel, n, s=3.0, dtype=torch.float32):
    x = torch.randn(n, device=DEVICE).to(dtype)
    y = torch.empty_like(x)
    launch(kernel, lambda meta: (triton.cdiv(n, meta["BLOCK"]),), x, y, n, s)
    torch.testing.assert_close(y, x * s)
    return y


def test_second_launch_skips_the_autotuner_and_keeps_its_choice(autotuner_calls):
    kernel = _scale_kernel()
    _run(kernel, 37)
    assert len(autotuner_calls) == 1 and kernel.best_config.kwargs["BLOCK"] == 32
    HOOKED.clear()
    for s in (1.0, -2.0):  # other values, same key
        _run(kernel, 37, s)
    assert len(autotuner_calls) == 1
    assert HOOKED == [32, 32]  # the chosen config's pre-hook still runs on every launch


def test_a_new_key_or_dtype_goes_through_the_autotuner(autotuner_calls):
    kernel = _scale_kernel()
    _run(kernel, 37)
    _run(kernel, 5)  # another n: another key
    _run(kernel, 37, dtype=torch.float16)  # another dtype
    assert len(autotuner_calls) == 3
    _run(kernel, 5)
    _run(kernel, 37, dtype=torch.float16)
    assert len(autotuner_calls) == 3


def test_swapped_configs_and_cleared_cache_are_seen(autotuner_calls):
    """The GPU benchmark times untuned first configs by cutting an autotuner's configs and
    clearing its cache, then restores both: each launch must follow what the autotuner
    would choose at that moment, never a choice recorded before."""
    kernel = _scale_kernel()
    _run(kernel, 37)
    tuned_configs, tuned_cache = kernel.configs, dict(kernel.cache)

    kernel.configs = tuned_configs[:1]  # untuned: the first config alone
    HOOKED.clear()
    _run(kernel, 37)
    _run(kernel, 37)
    assert HOOKED == [16, 16] and len(autotuner_calls) == 2  # (then the fast path)

    kernel.configs = tuned_configs  # restored, with the tuned choice
    kernel.cache.clear()
    kernel.cache.update(tuned_cache)
    HOOKED.clear()
    _run(kernel, 37)
    _run(kernel, 37)
    assert HOOKED == [32, 32] and len(autotuner_calls) == 3

    kernel.cache.clear()  # forgotten: tuned again
    _run(kernel, 37)
    assert len(autotuner_calls) == 4


def test_kernels_without_an_autotuner_launch_as_given():
    @triton.jit
    def fill(y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, offs.to(tl.float32), mask=offs < n)
    y = torch.full((8,), -1.0, device=DEVICE)
    launch(fill, (1,), y, 5, BLOCK=8)
    assert y.tolist() == [0, 1, 2, 3, 4, -1, -1, -1]


def _package_kernels_take_the_fast_path(autotuner_calls, monkeypatch, dtype, rows, old, new):
    monkeypatch.setattr(launch_module, "_CHOSEN", {})  # nothing chosen by earlier tests
    x = torch.randn(rows, old + new, device=DEVICE).to(dtype)
    dy = torch.randn(rows, old + new, device=DEVICE).to(dtype)
    wf = torch.randn(old, old, device=DEVICE).to(dtype)
    wn = torch.randn(new, old + new, device=DEVICE).to(dtype)
    bf, bn = torch.randn(old, device=DEVICE).to(dtype), torch.randn(new, device=DEVICE).to(dtype)

    def fwd_bwd():
        return (L.linear_forward(x, wf, bf, wn, bn, None, [old], [old]),
                *L.grad_weight(dy[:, old:], x, with_colsum=True),
                L.grad_input(dy, wf, wn, None, [old], [old], True))
    first = fwd_bwd()
    calls = len(autotuner_calls)
    assert calls >= 3  # forward, dW, dx
    again = fwd_bwd()
    assert len(autotuner_calls) == calls
    for a, b in zip(again, first):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert {k[0] for k in launch_module._CHOSEN} == set(autotuner_calls)


def test_the_package_kernels_take_the_fast_path(autotuner_calls, monkeypatch):
    """Our key must be the installed Triton's: else every launch would still go through the
    autotuner (correct but slower), and this test says so."""
    _package_kernels_take_the_fast_path(autotuner_calls, monkeypatch, torch.float32, 7, 8, 4)


@pytest.mark.gpu
def test_the_descriptor_kernels_take_the_fast_path_on_the_gpu(autotuner_calls, monkeypatch):
    """The same with the device's own kernels and launches: bfloat16, tensor descriptors on
    an H100/H200, the config's pre-hook setting their boxes on the fast path."""
    _package_kernels_take_the_fast_path(autotuner_calls, monkeypatch, torch.bfloat16, 300,
                                        256, 64)
