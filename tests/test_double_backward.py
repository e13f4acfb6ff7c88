"""Second derivatives through widened models (create_graph=True): gradient penalties,
Hessian-vector products, second-order meta-gradients.  The layers' backward then runs the
composite's vjp (expanse_fast/composite.py), through the eager autograd.Function and through
the custom ops alike; checked by finite differences (gradgradcheck) and against the plain
copy and torch.func, in float64."""
import pytest
import torch
from torch import nn
from torch.autograd import gradgradcheck
from torch.func import functional_call, grad

import expanse_fast as xf
from expanse_fast import ops
from models import SmallResNet, random_widened
from reference import DEVICE, assert_close_on_device, on_device, usable_backends


def _randomised(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return model


def _layer_case(kind):
    torch.manual_seed(1)
    f64 = dict(dtype=torch.float64)
    if kind == "linear-gelu-coupled":
        layer = xf.ExpandedLinear((4, 3, 2), (3, 2, 2), mode="coupled", activation="gelu", **f64)
        return layer, torch.randn(5, 9, **f64)
    if kind == "linear-silu-isolated":
        layer = xf.ExpandedLinear((4, 3), (3, 2), activation="silu", **f64)
        return layer, torch.randn(3, 7, **f64)
    if kind == "conv-coupled":
        layer = xf.ExpandedConv2d((2, 1), (2, 2), 3, padding=1, mode="coupled", **f64)
        return layer, torch.randn(2, 3, 4, 3, **f64)
    if kind == "conv-depthwise":
        layer = xf.ExpandedConv2d((2, 1), (2, 1), 3, padding=1, depthwise=True, **f64)
        return layer, torch.randn(2, 3, 4, 4, **f64)
    if kind == "mlp-batchnorm-training":  # the BatchNorm's frozen channels apart from its newest
        base = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.SiLU(), nn.Linear(5, 2))
        return xf.expand(base.double().eval(), width=0.6, new_classes=1).train(), \
            torch.randn(6, 4, **f64)
    if kind.startswith("resnet-unfolded"):  # a folded BatchNorm refuses (test below)
        big = xf.expand(SmallResNet(width=2).double().eval(), width=0.5, new_classes=1,
                        fuse=False)
        big.train(kind.endswith("training"))
        return big, torch.randn(2, 1, 4, 4, **f64)
    raise ValueError(kind)


KINDS = ["linear-gelu-coupled", "linear-silu-isolated", "conv-coupled", "conv-depthwise",
         "mlp-batchnorm-training", "resnet-unfolded-eval", "resnet-unfolded-training"]


@pytest.mark.parametrize("custom_ops", [False, True], ids=["eager", "custom-ops"])
@pytest.mark.parametrize("kind", KINDS)
def test_second_derivatives_are_the_finite_differences(kind, custom_ops, monkeypatch):
    monkeypatch.setattr(ops, "USE_EAGER_FUNCTIONS", not custom_ops)
    model, x = _layer_case(kind)
    _randomised(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [model.get_parameter(n).detach().clone().requires_grad_() for n in names]

    def f(x, *p):
        return functional_call(model, dict(zip(names, p)), (x,))

    assert gradgradcheck(f, (x.requires_grad_(), *params), eps=1e-6, atol=1e-5, rtol=1e-4)


SEEDS = range(16)


def _folded(model) -> bool:
    return any(getattr(m, "frozen_folded", False) for m in model.modules())


def _unfolded(model):
    """``model`` with its BatchNorms apart from their convs (a folded one refuses a second
    derivative: test below)."""
    for conv in model.modules():
        if isinstance(conv, xf.ExpandedConv2d):
            conv.unfold_batchnorm()
    assert not _folded(model)
    return model


@pytest.mark.parametrize("custom_ops", [False, True], ids=["eager", "custom-ops"])
@pytest.mark.parametrize("seed", SEEDS)
def test_penalty_and_hvp_of_random_models(seed, custom_ops, monkeypatch):
    monkeypatch.setattr(ops, "USE_EAGER_FUNCTIONS", not custom_ops)
    big, _, shape = random_widened(seed)
    big = _unfolded(big)
    plain = xf.merge(big).eval()
    x = torch.randn(*shape, dtype=torch.float64)

    def input_grad(m, x):  # d/dx of a scalar of the outputs, kept differentiable
        return torch.autograd.grad(m(x).sin().sum(), x, create_graph=True)[0]

    # a Hessian-vector product in the input, against the plain copy
    v = torch.randn_like(x)
    hvps = []
    for m in (big, plain):
        xx = x.clone().requires_grad_()
        hvps.append(torch.autograd.grad((input_grad(m, xx) * v).sum(), xx)[0])
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-9, atol=1e-10)

    # a gradient penalty's gradient in the trainable tensors, against torch.func
    params = {n: p for n, p in big.named_parameters() if p.requires_grad}
    penalty = input_grad(big, x.clone().requires_grad_()).square().sum()
    got = torch.autograd.grad(penalty, list(params.values()), allow_unused=True)
    want = grad(lambda p: grad(lambda xi: functional_call(big, p, (xi,)).sin().sum())(x)
                .square().sum())({n: p.detach() for n, p in params.items()})
    for (name, w), g in zip(want.items(), got):
        torch.testing.assert_close(torch.zeros_like(w) if g is None else g, w, rtol=1e-9,
                                   atol=1e-10, msg=name)


@pytest.mark.parametrize("training", [False, True])
def test_a_folded_batchnorm_refuses_a_second_derivative(training):
    big = xf.expand(SmallResNet(width=2).double(), width=0.5, new_classes=1).train(training)
    assert _folded(big)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    loss = big(x).square().sum()
    with pytest.raises(RuntimeError, match=r"folded into the conv .* fuse=False"):
        torch.autograd.grad(loss, x, create_graph=True)
    torch.autograd.grad(loss, x)  # a first derivative still works (the graph is kept)


# the kernels' forward with the composite's second derivative, on the device, in float32
# (on a GPU these carry the gpu mark and run in benchmarks/gpu/run.sh)
@pytest.mark.parametrize("backend,seed", on_device(
    [(b, seed) for b in usable_backends(DEVICE) for seed in (0, 1)]))  # a CNN, an MLP
def test_each_backend_hvp(backend, seed):
    big, _, shape = random_widened(seed, backend)
    big = _unfolded(big)
    plain = xf.merge(big).eval()  # float64, on the CPU
    big = big.float().to(DEVICE)
    x64, v64 = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    hvps = []
    for m, x, v in ((big, x64.float().to(DEVICE), v64.float().to(DEVICE)), (plain, x64, v64)):
        x = x.requires_grad_()
        g, = torch.autograd.grad(m(x).sin().sum(), x, create_graph=True)
        hvps.append(torch.autograd.grad((g * v).sum(), x)[0].double().cpu())
    assert_close_on_device(*hvps)
