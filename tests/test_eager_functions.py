"""The eager twins of the custom ops (a plain autograd.Function outside torch.compile) give
the custom ops' results bit for bit, and torch.compile still sees the custom ops."""
import pytest
import torch
from torch import nn

import expanse_fast as xf
from expanse_fast import ops
from models import SmallResNet, pretrained


def _mlp():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(13, 17), nn.ReLU(), nn.Linear(17, 11), nn.ReLU(),
                         nn.Linear(11, 5))
    return xf.expand(base, width=0.3, new_classes=3), torch.randn(37, 13)


def _cnn():
    torch.manual_seed(1)
    base = pretrained(SmallResNet(), torch.randn(8, 1, 12, 12), steps=2)
    return xf.expand(base, width=0.25, new_classes=2).train(), torch.randn(6, 1, 12, 12)


def _step(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.square().mean().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                        if p.requires_grad}


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_eager_functions_equal_custom_ops(make, monkeypatch):
    model, x = make()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(ops, "USE_EAGER_FUNCTIONS", True)
    y_eager, g_eager = _step(model, x)
    model.load_state_dict(state)  # BatchNorm statistics moved: start from the same state
    monkeypatch.setattr(ops, "USE_EAGER_FUNCTIONS", False)
    y_op, g_op = _step(model, x)
    assert torch.equal(y_eager, y_op)
    assert g_eager.keys() == g_op.keys() and g_eager
    for name in g_eager:
        assert torch.equal(g_eager[name], g_op[name]), name


def test_eager_path_skips_the_custom_op_dispatch():
    model, x = _mlp()
    with torch.profiler.profile() as prof:
        model(x).sum().backward()
    names = {e.name for e in prof.events()}
    assert "expanse_fast::linear" not in names and "expanse_fast::linear_backward" not in names


@pytest.mark.parametrize("activation,pre_columns", [("", 0), ("relu", 0), ("gelu", 4)])
def test_eager_linear_allocates_no_empty_pre_activation(activation, pre_columns, monkeypatch):
    """The custom op returns its pre-activation output always (an op returns tensors); the
    eager twin makes it only when a smooth activation's backward will read it.  (Under a
    dispatch mode the eager calls go through the custom ops: the mode that counts the
    allocations here is kept from sending them there.)"""
    from torch.utils._python_dispatch import TorchDispatchMode
    from expanse_fast import ops
    monkeypatch.setattr(ops, "_dispatch_modes", lambda: 0)

    class Allocs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.new_empty, torch.ops.aten.empty):
                self.shapes.append(tuple(out.shape))
            return out

    layer = xf.ExpandedLinear.from_linear(nn.Linear(6, 5), 3, 4)
    layer.activation = activation
    layer.skip_old_input_grad = True
    x = torch.randn(7, 9)
    with Allocs() as m:
        y = layer(x)
    assert (7, 0) not in m.shapes
    assert ((7, pre_columns) in m.shapes) == bool(pre_columns)
    y.sum().backward()
    assert layer.weight_new.grad is not None


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("how", ["no_grad", "inference_mode", "frozen_model"])
def test_calls_no_gradient_reaches_record_no_graph(make, how, monkeypatch):
    """Without a gradient to form (no_grad, inference_mode, or nothing that requires grad)
    the eager path runs the implementation alone: no autograd.Function, the same bits."""
    model, x = make()
    model.eval()  # (BatchNorm statistics stay put: every call sees the same model)
    with torch.no_grad():
        want = model(x)
    applied = []
    for function in (ops._LinearFunction, ops._Conv2dFunction):
        monkeypatch.setattr(function, "apply", lambda *a, f=function: applied.append(f))
    if how == "frozen_model":
        model.requires_grad_(False)
        got = model(x)
    else:
        with getattr(torch, how)():
            got = model(x)
    assert not applied and got.grad_fn is None and not got.requires_grad
    assert torch.equal(got, want)


def test_a_call_that_needs_a_gradient_records_the_function(monkeypatch):
    model, x = _mlp()
    applied = []
    apply = ops._LinearFunction.apply
    monkeypatch.setattr(ops._LinearFunction, "apply",
                        lambda *a: applied.append(1) or apply(*a))
    model.requires_grad_(False)
    x.requires_grad_(True)  # only the input: its gradient runs through every layer
    model(x).sum().backward()
    assert len(applied) == 3 and x.grad is not None and x.grad.abs().sum() > 0


def test_compiled_model_uses_the_custom_ops_and_matches_eager():
    model, x = _mlp()
    y_eager, g_eager = _step(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.profiler.profile() as prof:
        y_comp, g_comp = _step(compiled, x)
    names = {e.name for e in prof.events()}
    assert "expanse_fast::linear" in names and "expanse_fast::linear_backward" in names
    torch.testing.assert_close(y_comp, y_eager)
    g_comp = {n.removeprefix("_orig_mod."): g for n, g in g_comp.items()}
    assert g_comp.keys() == g_eager.keys()
    for name in g_eager:
        torch.testing.assert_close(g_comp[name], g_eager[name])


@pytest.mark.parametrize("custom_ops", [False, True])
def test_double_backward_is_the_plain_layers(monkeypatch, custom_ops):
    # create_graph=True gives a differentiable gradient (a gradient penalty through the
    # layer), on the eager Function and on the custom op alike (tests/test_double_backward.py
    # checks models and finite differences)
    monkeypatch.setattr(xf.ops, "USE_EAGER_FUNCTIONS", not custom_ops)
    torch.manual_seed(0)
    layer = xf.ExpandedLinear((4, 2), (3, 2), activation="gelu", dtype=torch.float64)
    plain = torch.nn.Sequential(layer.to_linear(), torch.nn.GELU())
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    want, = torch.autograd.grad(plain(x).square().sum(), x, create_graph=True)
    torch.testing.assert_close(g, want)
    got_w, = torch.autograd.grad(g.square().sum(), layer.weight_new)
    want_w, = torch.autograd.grad(want.square().sum(), plain[0].weight)
    torch.testing.assert_close(got_w, want_w[3:])
