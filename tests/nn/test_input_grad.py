"""A widened model skips its old features' gradient only while its input needs none: with
an input that requires grad (saliency, adversarial examples, a trainable module in front),
the input's gradient is the full one, as from the plain model of the same weights."""
import copy
import pickle
import io

import pytest
import torch
from torch import nn

import expanse_fast as xf
from expanse_fast.nn.input_grad import InputGradWatch, skips_old_input_grad
from models import SmallResNet, authors_mlp
from reference import DEVICE, on_device, usable_backends

CASES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(23, 17), nn.ReLU(), nn.Linear(17, 13), nn.GELU(),
                                  nn.Linear(13, 5)), (7, 23)),
    "authors_mlp": (authors_mlp, (3, 784)),
    "resnet": (lambda: SmallResNet(classes=5, width=6), (3, 1, 9, 9)),
}


def _widened(name, seed=0):
    torch.manual_seed(seed)
    make, shape = CASES[name]
    base = make().double().eval()
    big = xf.expand(base, width=0.4, new_classes=3, backend="torch")
    with torch.no_grad():  # as after training the new units
        for p in big.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return base, big.eval(), shape


def _watches(model):
    return [h for h in model._forward_pre_hooks.values() if isinstance(h, InputGradWatch)]


def _layers(model):
    return list(xf.expanded_layers(model).values())


@pytest.mark.parametrize("name", sorted(CASES))
def test_input_gradient_is_the_plain_models(name):
    _, big, shape = _widened(name)
    plain = xf.merge(big).eval()  # the same function in plain layers, every gradient formed
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    big(x).square().sum().backward()
    plain(x_plain).square().sum().backward()
    assert x_plain.grad.abs().max() > 0
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=1e-10, atol=1e-12)
    # the trainable tensors' gradients are the plain model's too (their rows of it)
    for n, p in big.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def _decisions(model, layers, x):
    """Each layer's skip decision in one call of ``model`` on ``x``."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(skips_old_input_grad(m, a[0])))
             for m in layers]
    try:
        model(x).sum().backward() if torch.is_grad_enabled() else model(x)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(layers)
    return seen


@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_old_gradients_are_skipped_while_the_input_needs_none(name):
    _, big, shape = _widened(name)
    layers = _layers(big)
    assert layers and all(m.skip_old_input_grad for m in layers)
    x = torch.randn(*shape, dtype=torch.float64)
    assert all(_decisions(big, layers, x))
    assert not any(_decisions(big, layers, x.clone().requires_grad_()))
    with torch.no_grad():  # no graph: nothing to form
        assert all(_decisions(big, layers, x.clone().requires_grad_()))
    (watch,) = _watches(big)
    assert watch.depth == 0  # every call ended


def test_a_submodule_called_on_its_own_forms_the_input_gradient():
    # the model's note is of its own last call; a submodule called apart from it (saliency
    # through a backbone) must not read that note (it gave a wrong input gradient)
    torch.manual_seed(3)
    net = nn.Sequential(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.GELU()),
                        nn.Linear(4, 3)).double()
    big = xf.expand(net, width=1, new_classes=1)
    with torch.no_grad():
        for p in big.parameters():
            if p.requires_grad:
                p.normal_()
    plain = xf.merge(big)
    big(torch.randn(2, 6, dtype=torch.float64)).sum().backward()  # training: skips
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    got, = torch.autograd.grad(big[0](x).sum(), x)
    want, = torch.autograd.grad(plain[0](x).sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # and on data every layer in it still skips (the submodule is watched too)
    assert all(_decisions(big[0], _layers(big[0]), x.detach()))
    # a layer called on its own decides from its own input
    layer = big[0][2]
    assert _decisions(layer, [layer], torch.randn(2, 6, dtype=torch.float64)) == [True]
    assert _decisions(layer, [layer], torch.randn(2, 6, dtype=torch.float64,
                                                  requires_grad=True)) == [False]


def test_a_call_that_raises_leaves_no_call_open():
    _, big, shape = _widened("mlp")
    with pytest.raises(ValueError):
        big(torch.randn(2, shape[1] + 1, dtype=torch.float64))
    (watch,) = _watches(big)
    assert watch.depth == 0


@pytest.mark.parametrize("reentrant,input_grad", [(False, False), (False, True),
                                                  (True, True)])
def test_checkpointed_blocks_recompute_with_the_same_decision(reentrant, input_grad):
    # a checkpoint inside the model's forward recomputes in backward, outside the model's
    # call: the fused GELU must keep the same pre-activation columns as in the forward
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 4), nn.GELU())
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(checkpoint(self.block, x, use_reentrant=reentrant))

    torch.manual_seed(4)
    big = xf.expand(Net().double(), width=1, new_classes=1)
    twin = copy.deepcopy(big)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=input_grad)
    x2 = x.detach().clone().requires_grad_(input_grad)
    big(x).square().sum().backward()
    twin.head(twin.block(x2)).square().sum().backward()
    for (n, p), q in zip(big.named_parameters(), twin.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=n)
    if input_grad:
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_the_whole_model_checkpointed_forms_the_input_gradient(name, reentrant):
    """A reentrant checkpoint runs its first pass without grad mode, where nothing needs a
    gradient: its recomputation must decide from its input again, not keep that pass's
    choice (which lost the old features' part of the input gradient)."""
    from torch.utils.checkpoint import checkpoint

    _, big, shape = _widened(name)
    plain = xf.merge(big).eval()
    torch.manual_seed(1)
    front = nn.Identity() if len(shape) == 4 else nn.Linear(shape[1], shape[1]).double()
    front_plain = copy.deepcopy(front)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    checkpoint(big, front(x), use_reentrant=reentrant).square().sum().backward()
    plain(front_plain(x_plain)).square().sum().backward()
    assert x_plain.grad.abs().max() > 0
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=1e-10, atol=1e-12)
    for p, q in zip(front.parameters(), front_plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("input_grad", [False, True])
@pytest.mark.parametrize("segment", ["block", "layer"])
def test_recomputation_decides_as_its_forward_after_other_calls(reentrant, input_grad,
                                                                 segment):
    """A checkpointed part after a trainable layer (its input requires grad whatever the
    model's input does), and the model called again on other data before backward: the
    recomputation still decides as its own forward did (a non-reentrant checkpoint would
    refuse a fused GELU's pre-activation of another width; a reentrant one would miss the
    old path's input gradient)."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        checkpointed = True

        def __init__(self):
            super().__init__()
            self.pre = nn.Linear(6, 6)
            self.block = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 4), nn.GELU())
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = self.pre(x)
            if not self.checkpointed:
                return self.head(self.block(h))
            if segment == "block":
                h = checkpoint(self.block, h, use_reentrant=reentrant)
            else:  # one layer recomputed on its own
                h = self.block[1](checkpoint(self.block[0], h, use_reentrant=reentrant))
                h = self.block[3](self.block[2](h))
            return self.head(h)

    torch.manual_seed(4)
    big = xf.expand(Net().double(), width=1, new_classes=1)
    assert big.block[0].activation == "gelu"  # fused: the pre-activation's width matters
    twin = copy.deepcopy(big)
    twin.checkpointed = False
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=input_grad)
    x2 = x.detach().clone().requires_grad_(input_grad)
    y = big(x)
    big(torch.randn(5, 6, dtype=torch.float64, requires_grad=not input_grad))  # another call
    y.square().sum().backward()
    twin(x2).square().sum().backward()
    for (n, p), q in zip(big.named_parameters(), twin.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=n)
    if input_grad:
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)


def test_old_gradients_cost_work_only_when_needed():
    """The skip is real: the backward does fewer multiply-adds without an input gradient."""
    from torch.utils.flop_counter import FlopCounterMode
    _, big, shape = _widened("mlp")
    counts = []
    for needs_grad in (False, True):
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=needs_grad)
        y = big(x).sum()
        with FlopCounterMode(display=False) as counter:
            y.backward()
        counts.append(counter.get_total_flops())
    assert 0 < counts[0] < counts[1]


def test_a_trainable_module_in_front_gets_its_gradient():
    _, big, shape = _widened("mlp")
    torch.manual_seed(5)
    front = nn.Linear(shape[1], shape[1]).double()
    model = nn.Sequential(front, big)
    plain = nn.Sequential(copy.deepcopy(front), xf.merge(big)).eval()
    x = torch.randn(*shape, dtype=torch.float64)
    model(x).square().sum().backward()
    plain(x).square().sum().backward()
    torch.testing.assert_close(front.weight.grad, plain[0].weight.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_a_pre_hook_put_on_the_model_afterwards_gets_its_gradient(name):
    """A forward pre-hook registered on the widened model after expand() (a trainable
    perturbation of its input) ran after the watch, which had seen the input before it: the
    perturbation's gradient was zero.  The watch now forms the old gradient when a pre-hook
    runs after it, and skips it again once the hook is gone."""
    _, big, shape = _widened(name)
    plain = xf.merge(big).eval()
    torch.manual_seed(6)
    x = torch.randn(*shape, dtype=torch.float64)
    grads = []
    for model in (big, plain):
        delta = torch.zeros(shape[1:], dtype=torch.float64, requires_grad=True)
        handle = model.register_forward_pre_hook(lambda m, args: (args[0] + delta,))
        model(x).square().sum().backward()
        handle.remove()
        grads.append(delta.grad)
    assert grads[1].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    layers = _layers(big)
    assert all(_decisions(big, layers, x))  # no hook: skipped again


def test_one_watch_per_model_shared_by_its_layers():
    _, big, shape = _widened("resnet")
    (watch,) = _watches(big)
    assert all(m.input_grad_watch is watch for m in _layers(big))
    again = xf.expand(big, width=0.3, new_classes=2)  # a second expansion replaces it
    (watch2,) = _watches(again)
    assert watch2 is not watch and all(m.input_grad_watch is watch2 for m in _layers(again))
    # copies get their own watch, and plain copies none
    for clone in (copy.deepcopy(big), _pickled(big)):
        (w,) = _watches(clone)
        assert w is not watch and all(m.input_grad_watch is w for m in _layers(clone))
    for plain in (xf.merge(big), xf.source_model(big, 0)):
        assert not _watches(plain) and not _layers(plain)


def _pickled(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_loaded_expansion_watches_its_input(tmp_path):
    base, big, shape = _widened("mlp")
    path = str(tmp_path / "e.safetensors")
    xf.save_expansion(big, path)
    loaded = xf.load_expansion(base, path).eval()
    assert len(_watches(loaded)) == 1
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    loaded(x).sum().backward()
    xf.merge(big).eval()(x_plain).sum().backward()
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", on_device(usable_backends(DEVICE)))
@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_input_gradient_on_every_backend(name, backend):
    """float32 on every usable backend against the float64 plain model of the same
    weights."""
    torch.manual_seed(3)
    make, shape = CASES[name]
    base = make().eval()
    big = xf.expand(base, width=0.4, new_classes=3, backend=backend).to(DEVICE).eval()
    with torch.no_grad():
        for p in big.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    plain = xf.merge(big).double().eval()
    if name == "resnet":
        shape = (2, 1, 5, 5)  # the Triton interpreter takes seconds a convolution on CPU
    x = torch.randn(*shape, device=DEVICE, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    big(x).square().sum().backward()
    plain(x64).square().sum().backward()
    ref = x64.grad
    assert ref.abs().max() > 0
    assert ((x.grad.double() - ref).abs().max() / ref.abs().max()).item() < 5e-3


def test_parts_compile_whole_graphs():
    # a widened layer or a part of the model compiled on its own decides in the graph
    torch.manual_seed(6)
    big = xf.expand(nn.Sequential(nn.Linear(4, 3), nn.GELU(), nn.Linear(3, 2)).double(),
                    width=1, new_classes=1)
    plain = xf.merge(big)
    for part, plain_part, width in ((big[2], plain[2], 4), (big[0:2], plain[0:2], 4)):
        compiled = torch.compile(part, fullgraph=True, backend="aot_eager")
        x = torch.randn(5, width, dtype=torch.float64, requires_grad=True)
        got, = torch.autograd.grad(compiled(x).square().sum(), x)
        want, = torch.autograd.grad(plain_part(x).square().sum(), x)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch._dynamo.reset()


def test_fake_tensors_have_no_storage_key():
    """Every fake tensor's storage reads as address 0 (and warns that it is deprecated): the
    watch must not take two fake inputs of one shape for the same tensor."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    from expanse_fast.nn.input_grad import _storage_key
    real = torch.randn(3, 4)
    assert _storage_key(real) == (real.untyped_storage().data_ptr(), 0, (3, 4))
    with FakeTensorMode():
        a, b = torch.randn(3, 4), torch.randn(3, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _storage_key(a) is None and _storage_key(b) is None


def test_a_note_is_kept_only_while_its_tensor_lives():
    """Notes are keyed by storage address: a later input at a freed input's address is
    another tensor, and must not take that input's note (seen as a lone layer's reentrant
    checkpoint that dropped its old-input gradient)."""
    w = InputGradWatch()
    w.depth, w.needed, w.with_grad = 1, False, True
    storage = torch.randn(3, 4)
    t = storage.view(3, 4)  # another tensor object on the same memory
    w.remember(t)
    assert w.recall(storage, None) is False
    del t
    assert w.recall(storage, None) is None  # its tensor is gone: no note
    w.remember(storage)
    assert pickle.loads(pickle.dumps(w)).notes == {} and copy.deepcopy(w).notes == {}


def test_a_parametrization_of_a_widened_layer_keeps_the_skip():
    """Trainable tensors inside a widened layer (a parametrization of its new weight) are
    its own business: they do not make the old features' gradient needed."""
    from torch.nn.utils import parametrize

    class Scale(nn.Module):
        def forward(self, w):
            return 2 * w

    _, big, shape = _widened("mlp")
    layers = _layers(big)
    parametrize.register_parametrization(layers[-1], "weight_new", Scale())
    x = torch.randn(*shape, dtype=torch.float64)
    assert _decisions(big, layers, x) == [True] * len(layers)
