"""Expanded BatchNorm: frozen channels come out bit-identical to the pretrained BatchNorm, the
newest channels train like a plain BatchNorm, and ``skip_old_input_grad`` leaves the frozen
channels out of autograd (their input gradient reads zeros) without touching any gradient of
a trainable tensor."""
import copy

import pytest
import torch
from torch import nn

import expanse_fast as xf
from reference import assert_same_training_state


def _trained_bn(cls, n, affine=True, momentum=0.1, dtype=torch.float32):
    bn = cls(n, affine=affine, momentum=momentum).to(dtype)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    return bn.eval()


def _reference(layer, x, groups):
    """Float64 reference of one training-mode forward: eval BN on the frozen channels, a
    plain training BN (own statistics) on the newest ones."""
    n_f = sum(groups[:-1])
    bn_old = layer.to_bn(task=len(groups) - 2).double().eval()
    plain = type(bn_old)(groups[-1], eps=layer.eps, momentum=layer.momentum,
                         affine=layer.affine).double().train()
    with torch.no_grad():
        plain.running_mean.copy_(layer.running_mean_new)
        plain.running_var.copy_(layer.running_var_new)
        if layer.affine:
            plain.weight.copy_(layer.weight_new)
            plain.bias.copy_(layer.bias_new)
    xd = x.detach().double().requires_grad_(True)
    y = torch.cat([bn_old(xd[:, :n_f]), plain(xd[:, n_f:])], dim=1)
    return xd, y, plain


CASES = [
    # (class, input shape, groups)
    (xf.ExpandedBatchNorm2d, (6, None, 5, 7), (12, 4)),
    (xf.ExpandedBatchNorm2d, (4, None, 3, 3), (5, 3, 2)),  # after a second expansion
    (xf.ExpandedBatchNorm1d, (9, None), (150, 106)),
    (xf.ExpandedBatchNorm1d, (5, None, 6), (7, 3)),
]


def _layer(cls, groups, affine=True, momentum=0.1):
    plain = nn.BatchNorm2d if cls is xf.ExpandedBatchNorm2d else nn.BatchNorm1d
    layer = cls.from_bn(_trained_bn(plain, groups[0], affine, momentum), groups[1])
    for g in groups[2:]:
        with torch.no_grad():
            layer.running_mean_new.uniform_(-1, 1)
            layer.running_var_new.uniform_(0.5, 2)
        layer.expand(g)
    with torch.no_grad():
        if affine:
            layer.weight_new.uniform_(0.5, 1.5)
            layer.bias_new.uniform_(-1, 1)
    return layer


def _input(shape, groups, **kw):
    shape = list(shape)
    shape[1] = sum(groups)
    return (torch.randn(*shape, **kw) * 2 + 0.5)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("cls,shape,groups", CASES)
def test_training_step_matches_float64_reference(cls, shape, groups, affine, skip):
    torch.manual_seed(0)
    layer = _layer(cls, groups, affine).train()
    layer.skip_old_input_grad = skip
    ref_layer = copy.deepcopy(layer)
    x = _input(shape, groups).requires_grad_(True)
    y = layer(x)
    xd, y_ref, plain = _reference(ref_layer, x, groups)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy.double())
    n_f = sum(groups[:-1])
    # gradients of the newest channels' input and affine: as a plain BatchNorm's
    torch.testing.assert_close(x.grad[:, n_f:].double(), xd.grad[:, n_f:], rtol=1e-4, atol=1e-5)
    if affine:
        torch.testing.assert_close(layer.weight_new.grad.double(), plain.weight.grad,
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.bias_new.grad.double(), plain.bias.grad,
                                   rtol=1e-4, atol=1e-4)
    # the frozen channels' input gradient: exact by default, zeros when skipped
    if skip:
        assert torch.count_nonzero(x.grad[:, :n_f]) == 0
    else:
        torch.testing.assert_close(x.grad[:, :n_f].double(), xd.grad[:, :n_f], rtol=1e-5,
                                   atol=1e-6)
    # running statistics: the newest move as a plain BatchNorm's, the frozen never
    torch.testing.assert_close(layer.running_mean_new.double(), plain.running_mean)
    torch.testing.assert_close(layer.running_var_new.double(), plain.running_var)
    assert int(layer.num_batches_tracked_new) == 1
    for name in ("running_mean_frozen", "running_var_frozen"):
        assert torch.equal(getattr(layer, name), getattr(ref_layer, name))
    assert layer.weight_frozen is None or layer.weight_frozen.grad is None


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("cls,shape,groups", CASES)
def test_frozen_channels_bit_identical_to_the_pretrained_bn(cls, shape, groups, train):
    torch.manual_seed(1)
    layer = _layer(cls, groups).train(train)
    layer.skip_old_input_grad = True
    old = layer.to_bn(task=len(groups) - 2).eval()
    n_f = sum(groups[:-1])
    x = _input(shape, groups)
    with torch.no_grad():
        y = layer(x)
    # the pretrained layer saw a contiguous input of the frozen width
    assert torch.equal(y[:, :n_f], old(x[:, :n_f].contiguous()))
    if train:  # also with autograd on
        y2 = layer(x.clone().requires_grad_(True))
        assert torch.equal(y2[:, :n_f], old(x[:, :n_f].contiguous()))


def test_eval_mode_gradients():
    """Eval mode (every channel a fixed affine map): the new affine still learns."""
    torch.manual_seed(2)
    layer = _layer(xf.ExpandedBatchNorm2d, (6, 3)).eval()
    layer.skip_old_input_grad = True
    x = _input((4, None, 3, 5), (6, 3)).double().requires_grad_(True)
    layer = layer.double()
    y = layer(x)
    ref = layer.to_bn().eval()
    assert torch.equal(y.detach(), ref(x.detach()))
    dy = torch.randn_like(y)
    y.backward(dy)
    scale = layer.weight_new.detach() / torch.sqrt(layer.running_var_new + layer.eps)
    xn = (x.detach()[:, 6:] - layer.running_mean_new.view(1, -1, 1, 1)) \
        / torch.sqrt(layer.running_var_new + layer.eps).view(1, -1, 1, 1)
    torch.testing.assert_close(layer.bias_new.grad, dy[:, 6:].sum((0, 2, 3)))
    torch.testing.assert_close(layer.weight_new.grad, (dy[:, 6:] * xn).sum((0, 2, 3)))
    torch.testing.assert_close(x.grad[:, 6:], dy[:, 6:] * scale.view(1, -1, 1, 1))


def test_momentum_none_and_odd_layouts():
    torch.manual_seed(3)
    layer = _layer(xf.ExpandedBatchNorm2d, (5, 3), momentum=None).train()
    layer.skip_old_input_grad = True
    x = _input((4, None, 6, 6), (5, 3))
    old = layer.to_bn(task=0).eval()
    # channels_last, a non-contiguous input, and a gradient with zero strides
    cl = torch.channels_last
    for xi in (x.contiguous(memory_format=cl), x.transpose(2, 3)):
        xi = xi.detach().requires_grad_(True)
        y = layer(xi)
        y.sum().backward()
        assert torch.count_nonzero(xi.grad[:, :5]) == 0
        torch.testing.assert_close(xi.grad[:, 5:], torch.zeros_like(xi.grad[:, 5:]),
                                   atol=1e-5, rtol=0)  # d(sum of a normalised channel) = 0
        x_old = xi.detach()[:, :5]
        if xi.is_contiguous(memory_format=cl):  # the pretrained layer ran channels_last too
            assert torch.equal(y[:, :5].detach(), old(x_old.contiguous(memory_format=cl)))
        else:
            torch.testing.assert_close(y[:, :5].detach(), old(x_old))
    assert int(layer.num_batches_tracked_new) == 2


def test_only_frozen_or_only_new_channels():
    torch.manual_seed(4)
    only_old = _layer(xf.ExpandedBatchNorm2d, (4, 0)).train()
    only_old.skip_old_input_grad = True
    x = _input((3, None, 2, 2), (4, 0)).requires_grad_(True)
    y = only_old(x)
    assert torch.equal(y.detach(), only_old.to_bn().eval()(x.detach()))
    y.sum().backward()  # still differentiable
    only_new = xf.ExpandedBatchNorm2d((0, 4)).train()
    only_new.skip_old_input_grad = True
    y = only_new(x)
    torch.testing.assert_close(y, nn.functional.batch_norm(x, None, None, training=True))


@pytest.mark.parametrize("mode", ["isolated", "coupled"])
def test_expand_sets_the_flag_in_the_isolated_layout(mode):
    from models import SmallResNet, pretrained
    base = pretrained(SmallResNet(), torch.randn(8, 1, 10, 10))
    big = xf.expand(base, width=0.25, new_classes=2, mode=mode)
    bns = [m for m in big.modules() if isinstance(m, xf.ExpandedBatchNorm2d)]
    assert bns and all(m.skip_old_input_grad == (mode == "isolated") for m in bns)


def test_isolated_model_gradients_unchanged_by_the_skip():
    """Inside an isolated expanded model, skipping changes no trainable gradient."""
    from models import SmallResNet, pretrained
    torch.manual_seed(5)
    base = pretrained(SmallResNet(), torch.randn(8, 1, 10, 10))
    big = xf.expand(base, width=0.25, new_classes=2).train()
    full = copy.deepcopy(big)
    for m in full.modules():
        if hasattr(m, "skip_old_input_grad"):
            m.skip_old_input_grad = False
    x, y = torch.randn(6, 1, 10, 10), torch.randint(0, 7, (6,))
    for model in (big, full):
        nn.functional.cross_entropy(model(x), y).backward()
    assert_same_training_state(big, full, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_matches_eager():
    from models import SmallResNet, pretrained
    torch.manual_seed(6)
    torch._dynamo.reset()
    base = pretrained(SmallResNet(), torch.randn(8, 1, 10, 10))
    big = xf.expand(base, width=0.25, new_classes=2, backend="torch").train()
    twin = copy.deepcopy(big)
    x = torch.randn(6, 1, 10, 10)
    y_eager = big(x)
    y_comp = torch.compile(twin, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-6, atol=1e-6)
    y_eager.square().sum().backward()
    y_comp.square().sum().backward()
    # the compiled twin's gradients and running statistics, against eager
    assert_same_training_state(twin, big, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
