"""torch.func transforms over widened models: per-sample gradients (vmap over grad), input
Jacobians (jacrev, and jacobian(vectorize=True) over the eager layers), Hessians, forward
mode (jvp, and dual tensors outside torch.func) and vmap itself.  Inside a transform the
layers run the composite ops (expanse_fast/composite.py); each result is held to what the
eager kernels or the plain copy (``merge``) give, in float64."""
import copy
import random

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

import expanse_fast as xf
from expanse_fast import composite
from models import SmallResNet, random_model, random_widened, widen_at_random
from reference import DEVICE, assert_close_on_device, on_device, usable_backends

SEEDS = range(16)
TOL = dict(rtol=1e-9, atol=1e-10)


def _trainable(model):
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _per_sample_grads_by_loop(model, x, dy):
    """What per-sample gradients are: one eager backward (the kernels) per sample."""
    out = {n: [] for n in _trainable(model)}
    params = dict(model.named_parameters())
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        (model(x[i:i + 1]) * dy[i:i + 1]).sum().backward()
        for n in out:
            g = params[n].grad
            out[n].append(torch.zeros_like(params[n]) if g is None else g.clone())
    return {n: torch.stack(gs) for n, gs in out.items()}


@pytest.mark.parametrize("seed", SEEDS)
def test_per_sample_gradients_are_the_eager_ones(seed):
    big, _, shape = random_widened(seed)
    x = torch.randn(*shape, dtype=torch.float64)
    dy = torch.randn_like(big(x))

    def loss(params, xi, dyi):
        return (functional_call(big, params, (xi[None],)) * dyi[None]).sum()

    got = vmap(grad(loss), in_dims=(None, 0, 0))(_trainable(big), x, dy)
    want = _per_sample_grads_by_loop(big, x, dy)
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)


@pytest.mark.parametrize("seed", SEEDS)
def test_input_jacobian_and_jvp_are_the_plain_copys(seed):
    big, plain, shape = random_widened(seed)
    x = torch.randn(*shape, dtype=torch.float64)
    # the old path counts here: the input's gradient runs through the frozen layers too
    torch.testing.assert_close(jacrev(big)(x), jacrev(plain)(x), **TOL)
    v = torch.randn_like(x)
    (y, ty), (y_plain, ty_plain) = jvp(big, (x,), (v,)), jvp(plain, (x,), (v,))
    torch.testing.assert_close(y, y_plain, **TOL)
    torch.testing.assert_close(ty, ty_plain, **TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_batched_backward_of_the_eager_layers(seed):
    # jacobian(vectorize=True) runs the eager layers' own backward on batched gradients
    # (is_grads_batched, torch's older vmap); the forward ran the kernels
    big, plain, shape = random_widened(seed)
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.functional.jacobian(big, x, vectorize=True),
                               torch.autograd.functional.jacobian(plain, x), **TOL)
    y = big(x.requires_grad_())
    dys = torch.randn((3,) + y.shape, dtype=torch.float64)
    got = torch.autograd.grad(y, list(_trainable_params(big)), dys, retain_graph=True,
                              is_grads_batched=True, allow_unused=True)
    for k, dy in enumerate(dys):
        want = torch.autograd.grad(y, list(_trainable_params(big)), dy, retain_graph=True,
                                   allow_unused=True)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if w is not None:
                torch.testing.assert_close(g[k], w, **TOL)


def _trainable_params(model):
    return (p for p in model.parameters() if p.requires_grad)


def test_hessian_of_a_smooth_model():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 3), nn.SiLU(),
                         nn.Linear(3, 2)).double()
    big = xf.expand(base, width=1, new_classes=1)
    with torch.no_grad():
        for p in _trainable_params(big):
            p.normal_()
    plain = xf.merge(big)
    x = torch.randn(5, dtype=torch.float64)
    f = lambda m: (lambda v: m(v[None]).square().sum())  # noqa: E731
    torch.testing.assert_close(torch.func.hessian(f(big))(x), torch.func.hessian(f(plain))(x),
                               **TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_vmap_over_samples_is_the_batch(seed):
    big, _, shape = random_widened(seed)
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(vmap(big)(x[:, None])[:, 0], big(x), **TOL)


@pytest.mark.parametrize("mode", ["isolated", "coupled"])
@pytest.mark.parametrize("kind", ["linear", "conv", "depthwise"])
def test_frozen_blocks_get_their_gradients_when_asked(kind, mode):
    # torch.func differentiates what it is given: every block of the staircase, frozen
    # ones included, gets the plain layer's gradient over the places it holds
    torch.manual_seed(0)
    if kind == "linear":
        layer = xf.ExpandedLinear((5, 3, 2), (4, 3, 2), mode=mode, dtype=torch.float64)
        x = torch.randn(7, 10, dtype=torch.float64)
    else:
        groups = (3, 2, 2) if kind == "depthwise" else (3, 2, 1)
        layer = xf.ExpandedConv2d(groups, (3, 2, 2) if kind == "depthwise" else (4, 3, 2), 3,
                                  padding=1, mode="isolated" if kind == "depthwise" else mode,
                                  depthwise=kind == "depthwise", dtype=torch.float64)
        x = torch.randn(2, sum(groups), 5, 4, dtype=torch.float64)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    params = {n: p.detach() for n, p in layer.named_parameters()}
    dy = torch.randn_like(layer(x))
    grads = grad(lambda p: (functional_call(layer, p, (x,)) * dy).sum())(params)

    plain = layer.to_linear() if kind == "linear" else layer.to_conv()
    (plain(x) * dy).sum().backward()
    dense = plain.weight.grad
    o_f, i_f = layer.weight_frozen.shape[:2]
    torch.testing.assert_close(grads["weight_new"], dense[o_f:], **TOL)
    if layer.weight_couple is not None:
        torch.testing.assert_close(grads["weight_couple"], dense[:o_f, i_f:], **TOL)
    read = torch.zeros_like(layer.weight_frozen, dtype=torch.bool)  # the staircase's
    r0 = 0                                                           # frozen blocks
    for rows, k_end in zip(layer.layout.frozen_out_groups, layer.layout.frozen_k_ends):
        read[r0:r0 + rows, :k_end] = True
        r0 += rows
    if kind == "depthwise":  # one filter per channel: every frozen filter is read
        read[:] = True
    torch.testing.assert_close(grads["weight_frozen"],
                               torch.where(read, dense[:o_f, :i_f], 0.0), **TOL)
    torch.testing.assert_close(grads["bias_frozen"], plain.bias.grad[:o_f], **TOL)
    torch.testing.assert_close(grads["bias_new"], plain.bias.grad[o_f:], **TOL)


def test_a_folded_resnet_in_eval_mode():
    torch.manual_seed(0)
    base = SmallResNet().double().eval()
    big = xf.expand(base, width=0.5, new_classes=2).eval()
    assert any(getattr(m, "frozen_folded", False) for m in big.modules())  # expand folds
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(jacrev(big)(x), jacrev(xf.merge(big).eval())(x), **TOL)
    dy = torch.randn_like(big(x))
    got = vmap(grad(lambda p, xi, d: (functional_call(big, p, (xi[None],)) * d).sum()),
               in_dims=(None, 0, 0))(_trainable(big), x, dy)
    want = _per_sample_grads_by_loop(big, x, dy)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)


def test_training_mode_batchnorm_says_to_call_eval():
    big = xf.expand(SmallResNet().double(), width=0.5, new_classes=2).train()
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"training mode .* call model.eval\(\)"):
        grad(lambda p: functional_call(big, p, (x,)).sum())(_trainable(big))


def test_the_composite_runs_only_inside_a_transform(monkeypatch):
    calls = []
    real = composite.linear
    monkeypatch.setattr(composite, "linear", lambda *a: calls.append(1) or real(*a))
    big = xf.expand(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), width=1,
                    new_classes=1)
    x = torch.randn(5, 4)
    big(x).sum().backward()
    assert not calls  # eager: the kernels (the autograd.Function)
    grad(lambda p: functional_call(big, p, (x,)).sum())(_trainable(big))
    assert len(calls) == 2


# The kernels' forward with the batched backward, and the transforms on the device, in
# float32 (on a GPU these carry the gpu mark and run in benchmarks/gpu/run.sh).
BACKEND_CASES = on_device([(b, seed) for b in usable_backends(DEVICE)
                           for seed in (0, 1)])  # a CNN, an MLP


@pytest.mark.parametrize("backend,seed", BACKEND_CASES)
def test_each_backend_under_transforms(backend, seed):
    big, plain, shape = random_widened(seed, backend)  # plain: float64, on the CPU
    big = big.float().to(DEVICE)
    x64 = torch.randn(*shape, dtype=torch.float64)
    x = x64.float().to(DEVICE)
    want = torch.autograd.functional.jacobian(plain, x64)
    for got in (torch.autograd.functional.jacobian(big, x, vectorize=True), jacrev(big)(x)):
        assert_close_on_device(got, want)


@pytest.mark.parametrize("seed", SEEDS)
def test_dual_tensors_are_the_plain_copys(seed):
    # forward-mode AD outside torch.func: torch.autograd.forward_ad's dual tensors
    import torch.autograd.forward_ad as fwAD
    big, plain, shape = random_widened(seed)
    x, v = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    tangents = []
    for m in (big, plain):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(m(fwAD.make_dual(x, v))).tangent)
    torch.testing.assert_close(tangents[0], tangents[1], **TOL)


@pytest.mark.parametrize("seed", range(6))
def test_an_ensemble_by_vmap_over_stacked_weights(seed):
    # model ensembling (torch.func.stack_module_state): every weight, frozen ones included,
    # carries the batch dimension
    _, base, shape = random_model(seed)  # three widenings alike, their weights apart:
    models = [widen_at_random(random.Random(seed), base, "torch")[0] for _ in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(*shape, dtype=torch.float64)
    got = vmap(lambda p, b: functional_call(skeleton, (p, b), (x,)))(params, buffers)
    with torch.no_grad():
        want = torch.stack([m(x) for m in models])
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("fuse", [False, True], ids=["apart", "folded"])
def test_a_batchnorms_frozen_affine_gets_its_gradient_when_asked(fuse):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()
    with torch.no_grad():
        base.train()(torch.randn(5, 2, 4, 4, dtype=torch.float64))  # statistics, not defaults
        for p in base[1].parameters():
            p.normal_()
    big = xf.expand(base.eval(), width=0.7, new_classes=1, fuse=fuse).eval()
    assert big[1].frozen_folded == fuse
    with torch.no_grad():
        for p in _trainable_params(big):
            p.normal_()
    plain = xf.merge(big).eval()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    params = {n: p.detach() for n, p in big.named_parameters()}  # frozen ones too
    got = grad(lambda p: functional_call(big, p, (x,)).square().sum())(params)
    plain(x).square().sum().backward()
    bn = plain[1]
    for name, want in (("weight_frozen", bn.weight.grad[:3]), ("bias_frozen", bn.bias.grad[:3]),
                       ("weight_new", bn.weight.grad[3:]), ("bias_new", bn.bias.grad[3:])):
        torch.testing.assert_close(got["1." + name], want, **TOL, msg=name)
