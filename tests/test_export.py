"""A widened model goes through the graph capturers users deploy with: ``torch.export`` and
``torch.jit.trace`` record it (eval mode, the torch backend on CPU) and the recorded
program computes what the model computes; FakeTensors run it (shape and memory tools)."""
import warnings

import pytest
import torch
from torch import nn

import expanse_fast as xf
from models import SmallResNet, authors_mlp

MODELS = {
    "mlp": (authors_mlp, (3, 784)),
    "resnet": (lambda: SmallResNet(classes=5, width=6), (2, 1, 9, 9)),
    # a fused GELU keeps pre-activation columns for autograd: a trace must not depend on
    # the grad mode (torch.jit.trace checks it under no_grad)
    "gelu_mlp": (lambda: nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.Linear(32, 5)),
                 (4, 10)),
}


def _widened(name):
    torch.manual_seed(0)
    make, shape = MODELS[name]
    base = make().eval()
    big = xf.expand(base, width=0.3, new_classes=2, backend="torch").eval()
    return base, big, torch.randn(*shape)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_jit_trace_records_the_widened_model(name):
    base, big, x = _widened(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarning; torch 2.13 deprecates jit.trace
        traced = torch.jit.trace(big, x)  # its own check reruns the trace on x: must agree
    x2 = torch.randn_like(x)
    with torch.no_grad():
        torch.testing.assert_close(traced(x2), big(x2), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(traced(x2)[:, :5], base(x2), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torch_export_records_the_widened_model(name):
    base, big, x = _widened(name)
    program = torch.export.export(big, (x,))
    x2 = torch.randn_like(x)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x2), big(x2), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(program.module()(x2)[:, :5], base(x2), rtol=1e-6,
                                   atol=1e-6)


@pytest.mark.parametrize("capture", ["trace", "export"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_recorded_model_forms_the_input_gradient_it_was_not_recorded_with(name, capture):
    """A recorded graph keeps the choices made while recording; recorded on an input that
    needs no gradient, it still forms the full input gradient (saliency, a trainable module
    in front) when a later input needs one."""
    _, big, x = _widened(name)
    if capture == "trace":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            recorded = torch.jit.trace(big, x)
    else:
        recorded = torch.export.export(big, (x,)).module()
    plain = xf.merge(big).eval()
    x1 = torch.randn_like(x).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    recorded(x1).square().sum().backward()
    plain(x2).square().sum().backward()
    assert x2.grad.abs().max() > 0
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("capture", ["trace", "export"])
def test_a_recorded_fused_gelu_layer_keeps_the_columns_a_gradient_reads(capture):
    torch.manual_seed(0)
    layer = xf.ExpandedLinear((5, 2), (4, 3), activation="gelu")
    x = torch.randn(3, 7)
    if capture == "trace":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            recorded = torch.jit.trace(layer, (x,))
    else:
        recorded = torch.export.export(layer, (x,)).module()
    x1 = torch.randn(3, 7, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    recorded(x1).sum().backward()
    layer(x2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_trace_of_a_plain_copy_needs_nothing_of_the_package():
    """source_model gives plain modules back: its trace holds no expanse_fast op."""
    base, big, x = _widened("resnet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarning; torch 2.13 deprecates jit.trace
        traced = torch.jit.trace(xf.source_model(big, 0).eval(), x)
    assert "expanse_fast" not in str(traced.graph)
    assert isinstance(xf.source_model(big, 0).fc, nn.Linear)
    with torch.no_grad():
        assert torch.equal(traced(x), base(x))


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fake_tensors_run_the_widened_model(name, train):
    # shape and memory tools run a model on FakeTensors: no values, so no bit check may
    # read them (it raised DataDependentOutputException)
    from torch._subclasses.fake_tensor import FakeTensorMode

    from expanse_fast.backends import torch_ref
    _, big, x = _widened(name)
    big.train(train)
    torch_ref._STRIDED_EXACT.clear()  # no shape known yet: the first calls check
    torch_ref._JOINT_EXACT.clear()
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = big(torch.empty(x.shape))
        if train:
            y.sum().backward()
    want = big(x)
    assert y.shape == want.shape and y.dtype == want.dtype


@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_jit_script_names_the_module_and_what_to_use_instead(name):
    """torch.jit.script cannot compile an expanded layer (its ops run from Python): the error
    names the layer's type and the capturers that work, the model is left as it was, and
    the plain copy from merge() scripts and computes the same outputs."""
    _, big, x = _widened(name)
    before = list(big.named_modules())
    state = {k: v.clone() for k, v in big.state_dict().items()}
    kinds = "ExpandedLinear" if name == "mlp" else "Expanded(Conv2d|BatchNorm2d|Linear)"
    with pytest.raises(TypeError, match=rf"torch.jit.script cannot compile {kinds}: .* "
                                        r"torch.jit.trace.*torch.export.export.*xf.merge"):
        torch.jit.script(big)
    after = list(big.named_modules())
    assert [(n, id(m)) for n, m in after] == [(n, id(m)) for n, m in before]
    assert all(torch.equal(v, big.state_dict()[k]) for k, v in state.items())
    scripted = torch.jit.script(xf.merge(big).eval())
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), big(x), rtol=1e-5, atol=1e-5)
