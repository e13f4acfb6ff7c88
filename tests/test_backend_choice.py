"""What ``backend="auto"`` runs: the rule (Triton forwards for large fp16/bf16 convolutions
on CUDA, the torch backend for every linear layer and every backward), and a model run
through both backends at once against its float64 plain copy and the torch backend alone."""
import copy
import os
import sys

import pytest
import torch

import expanse_fast as xf
from expanse_fast import backend_choice
from models import random_widened
from reference import DEVICE, on_device

BIG = 1 << 36
CUDA = torch.device("cuda")  # a device object only: the rule's inputs, no GPU needed


def _clear_overrides(monkeypatch):
    for op in ("LINEAR", "CONV2D"):
        for suffix in ("", "_FORWARD", "_BACKWARD", "_DX"):
            monkeypatch.delenv(f"EXPANSE_FAST_AUTO_{op}{suffix}", raising=False)


@pytest.fixture
def triton_usable(monkeypatch):
    """Triton usable on every device, whether or not it is here: the rule alone is tested."""
    real = backend_choice._usable
    monkeypatch.setattr(backend_choice, "_usable",
                        lambda name, dev: (True, "") if name == "triton" else real(name, dev))
    _clear_overrides(monkeypatch)


def test_environment_is_read_live_without_exceptions(monkeypatch):
    """The overrides are read on every call (a change shows at once), and reading a name the
    environment lacks raises nothing inside (os.environ.get would raise and catch KeyError
    there, twice per op call)."""
    _clear_overrides(monkeypatch)
    keys = [k for ks in backend_choice._OVERRIDE_KEYS.values() for k in ks]
    assert all(backend_choice._getenv(k) is None for k in keys)
    raised = []

    def tracer(frame, event, arg):
        if event == "exception":
            raised.append(arg[0])
        return tracer
    sys.settrace(tracer)
    try:
        for op in ("linear", "conv2d"):
            for backward in (False, True):
                assert backend_choice._override(op, backward) is None
    finally:
        sys.settrace(None)
    assert not raised
    monkeypatch.setenv("EXPANSE_FAST_AUTO_CONV2D_BACKWARD", "triton")
    monkeypatch.setenv("PATH_OF_SOMETHING_ELSE", "\u00e9t\u00e9")
    for key in keys + ["PATH_OF_SOMETHING_ELSE", "HOME"]:
        assert backend_choice._getenv(key) == os.environ.get(key)
    assert backend_choice._override("conv2d", True) == "triton"
    assert backend_choice._override("conv2d", False) is None
    monkeypatch.delenv("EXPANSE_FAST_AUTO_CONV2D_BACKWARD")
    assert backend_choice._override("conv2d", True) is None


def test_auto_runs_large_half_conv_forwards_in_triton(triton_usable):
    choose = backend_choice._auto_choice
    for dtype in (torch.bfloat16, torch.float16):
        assert choose(CUDA, "conv2d", False, dtype, BIG) == "triton"
        assert choose(CUDA, "conv2d", True, dtype, BIG) == "torch", "backward: cuDNN"
        assert choose(CUDA, "conv2d", False, dtype, BIG - 1) == "torch", "small: host-bound"
        assert choose(CUDA, "linear", False, dtype, BIG) == "torch", "linear: cuBLAS"
    assert choose(CUDA, "conv2d", False, torch.float32, BIG) == "torch"
    assert choose(torch.device("cpu"), "conv2d", False, torch.bfloat16, BIG) == "torch"
    assert choose(CUDA, "conv2d") == "torch", "no size given: torch"


def test_auto_override_holds_both_directions(triton_usable, monkeypatch):
    monkeypatch.setenv("EXPANSE_FAST_AUTO_LINEAR", "triton")
    assert backend_choice._auto_choice(CUDA, "linear", True) == "triton"
    assert backend_choice._auto_choice(CUDA, "conv2d", True) == "torch"
    monkeypatch.setenv("EXPANSE_FAST_AUTO_LINEAR", "torch")
    assert backend_choice._auto_choice(CUDA, "linear", False, torch.bfloat16, BIG) == "torch"


def test_auto_override_of_one_direction(triton_usable, monkeypatch):
    monkeypatch.setenv("EXPANSE_FAST_AUTO_LINEAR_FORWARD", "triton")
    assert backend_choice._auto_choice(CUDA, "linear", False, torch.bfloat16, BIG) == "triton"
    assert backend_choice._auto_choice(CUDA, "linear", True) == "torch"
    monkeypatch.setenv("EXPANSE_FAST_AUTO_LINEAR", "cuda")  # the direction's own wins
    assert backend_choice._auto_choice(CUDA, "linear", False) == "triton"
    assert backend_choice._auto_choice(CUDA, "linear", True) == "cuda"


@pytest.mark.parametrize("key", ["EXPANSE_FAST_AUTO_LINEAR", "EXPANSE_FAST_AUTO_LINEAR_FORWARD",
                                 "EXPANSE_FAST_AUTO_CONV2D_BACKWARD"])
def test_auto_variable_naming_an_unusable_backend_says_so(monkeypatch, key):
    """A variable that steers "auto" to a backend this device cannot run is named in the
    error, with the backend's reason, not left to fail inside the backend."""
    _clear_overrides(monkeypatch)
    if backend_choice.availability("cuda", torch.device("cpu"))[0]:
        pytest.skip("the cuda backend runs on CPU tensors here")
    monkeypatch.setenv(key, "cuda")
    layer = xf.ExpandedLinear.from_linear(torch.nn.Linear(4, 3), 2, 2)
    conv = xf.ExpandedConv2d.from_conv(torch.nn.Conv2d(2, 3, 3), 1, 1)
    x = torch.randn(5, 6, requires_grad=True)
    xc = torch.randn(1, 3, 5, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match=rf"{key}=cuda: backend 'cuda' is not usable on cpu"):
        (conv(xc) if "CONV2D" in key else layer(x)).sum().backward()


@pytest.mark.parametrize("key", ["EXPANSE_FAST_AUTO_LINEAR", "EXPANSE_FAST_AUTO_LINEAR_BACKWARD",
                                 "EXPANSE_FAST_AUTO_CONV2D_DX"])
def test_auto_variable_naming_no_backend_is_refused(monkeypatch, key):
    # A typo must not leave "auto" choosing what the variable meant to pin: the first call
    # that reads it names it and the backends it takes; "auto" and "" mean unset.
    _clear_overrides(monkeypatch)
    layer = xf.ExpandedLinear.from_linear(torch.nn.Linear(4, 3), 2, 2)
    conv = xf.ExpandedConv2d.from_conv(torch.nn.Conv2d(2, 3, 3), 1, 1)
    x = torch.randn(5, 6, requires_grad=True)
    xc = torch.randn(1, 3, 5, 5, requires_grad=True)
    for unset in ("auto", ""):
        monkeypatch.setenv(key, unset)
        layer(x).sum().backward()
        conv(xc).sum().backward()
    monkeypatch.setenv(key, "trtion")
    with pytest.raises(ValueError, match=rf"{key}='trtion' names no backend: set it to one "
                                         r"of torch, triton, cuda, or unset it"):
        layer(x).sum().backward()
        conv(xc).sum().backward()


def test_auto_falls_back_where_triton_is_unusable(monkeypatch):
    monkeypatch.setattr(backend_choice, "_usable", lambda name, dev: (False, "no triton"))
    _clear_overrides(monkeypatch)
    assert backend_choice._auto_choice(CUDA, "linear", False, torch.bfloat16, BIG) == "torch"


def _spy(monkeypatch, calls):
    """Count each backend's forward and backward calls."""
    for name in ("torch", "triton"):
        module = backend_choice.backend_module(name)
        for fn in ("linear_forward", "linear_backward", "conv2d_forward", "conv2d_backward"):
            real = getattr(module, fn)

            def counted(*args, _real=real, _key=(name, fn.split("_")[1]), **kwargs):
                calls[_key] = calls.get(_key, 0) + 1
                return _real(*args, **kwargs)
            monkeypatch.setattr(module, fn, counted)


@pytest.mark.parametrize("seed", on_device([0, 1, 2, 3, 6]))  # 6: a folded BatchNorm
def test_forward_in_triton_backward_in_torch_matches(seed, monkeypatch):
    """With the rule opened to every call here, "auto" runs each forward in Triton and each
    backward in the torch backend; outputs and input gradients hold against the float64
    plain copy, and every parameter gradient and buffer against the torch backend alone."""
    if not backend_choice.availability("triton", DEVICE)[0]:
        pytest.skip("Triton is not usable here")
    monkeypatch.setattr(backend_choice, "_TRITON_FORWARD_OPS", ("linear", "conv2d"))
    monkeypatch.setattr(backend_choice, "_TRITON_FORWARD_DEVICE_TYPES", (DEVICE.type,))
    monkeypatch.setattr(backend_choice, "_TRITON_FORWARD_DTYPES", (torch.float32,))
    monkeypatch.setattr(backend_choice, "_TRITON_FORWARD_MIN_MACS", 0)
    _clear_overrides(monkeypatch)
    big, plain, shape = random_widened(seed, backend="auto")
    twin = copy.deepcopy(big)
    for layer in twin.modules():
        if hasattr(layer, "backend"):
            layer.backend = "torch"
    big, twin = big.float().to(DEVICE), twin.float().to(DEVICE)
    x64 = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    dy = torch.randn_like(plain(x64))
    plain(x64).backward(dy)
    calls = {}
    _spy(monkeypatch, calls)
    x = x64.detach().float().to(DEVICE).requires_grad_()
    y = big(x)
    y.backward(dy.float().to(DEVICE))
    assert any(k[0] == "triton" and k[1] == "forward" for k in calls), calls
    assert not any(k[0] == "triton" and k[1] == "backward" for k in calls), calls
    assert not any(k[0] == "torch" and k[1] == "forward" for k in calls), calls
    tol = dict(rtol=1e-4, atol=1e-4) if DEVICE.type == "cpu" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.double().cpu(), plain(x64).detach(), **tol)
    torch.testing.assert_close(x.grad.double().cpu(), x64.grad, **tol)
    xt = x.detach().clone().requires_grad_()
    twin(xt).backward(dy.float().to(DEVICE))
    for (name, a), b in zip(big.named_parameters(), twin.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, msg=name, **tol)


@pytest.mark.parametrize("need_old", [False, True])
def test_conv_input_gradient_from_another_backend(need_old, monkeypatch):
    """EXPANSE_FAST_AUTO_CONV2D_DX=triton (an experiment the GPU run times): "auto" takes the
    conv's input gradient from the Triton backend and its weight gradients from the torch
    backend, each asked for its part only; the gradients are those of the torch backend."""
    if not backend_choice.availability("triton", DEVICE)[0]:
        pytest.skip("Triton is not usable here")
    import expanse_fast as xf
    from torch import nn
    _clear_overrides(monkeypatch)
    torch.manual_seed(4)
    layer = xf.ExpandedConv2d.from_conv(nn.Conv2d(5, 4, 3, padding=1), 3, 2).to(DEVICE)
    layer.skip_old_input_grad = not need_old
    x = torch.randn(2, 8, 5, 7, device=DEVICE)
    dy = torch.randn(2, 6, 5, 7, device=DEVICE)
    grads = []
    for dx_env in (None, "triton"):
        if dx_env:
            monkeypatch.setenv("EXPANSE_FAST_AUTO_CONV2D_DX", dx_env)
        calls = {}
        _spy(monkeypatch, calls)
        xi = x.clone().requires_grad_()
        with xf.use_backend("auto"):
            layer(xi).backward(dy)
        grads.append((xi.grad, layer.weight_new.grad, layer.bias_new.grad))
        layer.weight_new.grad = layer.bias_new.grad = None
        assert (("triton", "backward") in {k[:2] for k in calls}) == bool(dx_env), calls
    tol = dict(rtol=1e-4, atol=1e-5) if DEVICE.type == "cpu" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads[1][0], grads[0][0], **tol)
    assert torch.equal(grads[1][1], grads[0][1]) and torch.equal(grads[1][2], grads[0][2])
    monkeypatch.setenv("EXPANSE_FAST_AUTO_CONV2D_DX", "triton")
    assert "its input gradient triton (set by the environment)" in " ".join(
        backend_choice.describe_auto(DEVICE))


def test_describe_auto_says_what_runs(triton_usable, monkeypatch):
    """`expanse-fast info` prints these lines: the rule, and overrides as overrides."""
    linear, conv = backend_choice.describe_auto(CUDA)
    assert linear == "linear: forward torch; backward torch"
    assert conv.startswith("conv2d: forward triton for float16/bfloat16 calls of at least 2^36")
    assert conv.endswith("else torch; backward torch")
    assert backend_choice.describe_auto(torch.device("cpu"))[1] == \
        "conv2d: forward torch; backward torch"
    monkeypatch.setenv("EXPANSE_FAST_AUTO_LINEAR_BACKWARD", "triton")
    assert backend_choice.describe_auto(CUDA)[0] == \
        "linear: forward torch; backward triton (set by the environment)"
