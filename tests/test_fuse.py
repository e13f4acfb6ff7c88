"""fuse_activations / expand(fuse=True): a widened Linear computes the ReLU after it; the model
computes exactly what the unfused one does, and the plain models come back with their ReLUs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import expanse_fast as xf
from models import authors_mlp, pretrained


def _pair(base, **kw):
    fused = xf.expand(base, **kw)
    plain = xf.expand(base, fuse=False, **kw)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.square().sum().backward()
    return y.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["isolated", "coupled"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_model_equals_unfused(mode, backend):
    if not xf.backend_choice.availability(backend, "cpu")[0]:
        pytest.skip(f"{backend} unavailable here")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(13, 17), nn.ReLU(), nn.Linear(17, 11), nn.ReLU(inplace=True),
                         nn.Linear(11, 5))
    fused, plain = _pair(base, width=0.3, new_classes=3, mode=mode, backend=backend)
    assert [fused[i].activation for i in (0, 2, 4)] == ["relu", "relu", ""]
    assert isinstance(fused[1], xf.FusedReLU) and isinstance(fused[1], nn.ReLU)
    assert fused[3].inplace and type(plain[3]) is nn.ReLU
    assert list(fused.state_dict()) == list(plain.state_dict())
    x = torch.randn(37, 13)
    y_f, g_f = _grads(fused, x)
    y_p, g_p = _grads(plain, x)
    torch.testing.assert_close(y_f, y_p, rtol=0, atol=0 if backend == "torch" else 1e-6)
    assert g_f.keys() == g_p.keys() and len(g_f) == (9 if mode == "coupled" else 6)
    for name in g_f:
        torch.testing.assert_close(g_f[name], g_p[name], rtol=1e-6, atol=1e-6)


def test_source_model_and_merge_get_their_relus_back():
    torch.manual_seed(1)
    base = pretrained(authors_mlp(), torch.randn(32, 784))
    big = xf.expand(base, width=0.25, new_classes=4)
    assert sum(isinstance(m, xf.FusedReLU) for m in big.modules()) == 2
    x = torch.randn(9, 784)
    src = xf.source_model(big)
    assert [type(m) for m in src] == [type(m) for m in base]
    assert torch.equal(src(x), base(x))
    merged = xf.merge(big).eval()
    assert not any(isinstance(m, xf.FusedReLU) for m in merged.modules())
    torch.testing.assert_close(merged(x), big.eval()(x))


def test_expanding_a_fused_model_again_stays_exact():
    torch.manual_seed(2)
    base = pretrained(authors_mlp(), torch.randn(32, 784))
    once = xf.expand(base, width=0.25, new_classes=4)
    twice = xf.expand(once, width=0.5, new_classes=3)
    assert twice[0].activation == "relu" and isinstance(twice[1], xf.FusedReLU)
    x = torch.randn(9, 784)
    assert torch.equal(xf.source_model(twice, task=0)(x), base(x))
    torch.testing.assert_close(xf.source_model(twice, task=1)(x), xf.source_model(once, 1)(x))


class _SharedReLU(nn.Module):
    """One ReLU module called twice, and a Linear whose output has two users."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 4)
        self.act = nn.ReLU()
        self.d, self.act_d = nn.Linear(4, 4), nn.ReLU()

    def forward(self, x):
        h = self.act(self.b(self.act(self.a(x))))
        z = self.d(self.c(h))
        return self.act_d(z) + z  # d's output is read twice: its ReLU cannot be fused


class _FunctionalReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


@pytest.mark.parametrize("model_cls", [_SharedReLU, _FunctionalReLU])
def test_pairs_that_cannot_fuse_are_left_apart(model_cls):
    torch.manual_seed(3)
    base = model_cls()
    big = xf.expand(base, width=2, new_classes=1)
    assert not any(isinstance(m, xf.FusedReLU) for m in big.modules())
    assert all(getattr(m, "activation", "") == "" for m in big.modules())
    x = torch.randn(8, base.a.in_features)
    assert torch.equal(xf.source_model(big)(x), base(x))


def test_hooked_layer_is_not_fused():
    torch.manual_seed(5)
    base = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    plain = xf.expand(base, fuse=False)
    seen = []
    plain[0].register_forward_hook(lambda m, i, o: seen.append(o))
    assert xf.fuse_activations(plain) == []
    plain(torch.randn(16, 4))
    assert plain[0].activation == "" and type(plain[1]) is nn.ReLU
    assert (seen[0] < 0).any()  # the hook still sees the layer's own output, before the ReLU


def test_fuse_returns_paths_and_is_idempotent():
    base = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    big = xf.expand(base, fuse=False)
    assert xf.fuse_activations(big) == ["1"]
    assert xf.fuse_activations(big) == []
    assert big[0].activation == "relu"


def test_expanded_linear_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        xf.ExpandedLinear((3, 1), (2, 2), activation="tanh")


def test_checkpoint_round_trip_fuses(tmp_path):
    torch.manual_seed(4)
    base = pretrained(authors_mlp(), torch.randn(32, 784))
    big = xf.expand(base, width=0.25, new_classes=4)
    path = str(tmp_path / "e.safetensors")
    xf.save_expansion(big, path)
    loaded = xf.load_expansion(base, path)
    unfused = xf.load_expansion(base, path, fuse=False)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in big.modules()]
    assert not any(isinstance(m, xf.FusedReLU) for m in unfused.modules())
    x = torch.randn(5, 784)
    assert torch.equal(loaded(x), big(x)) and torch.equal(unfused(x), big(x))


# ---- GELU and SiLU -----------------------------------------------------------------------------
def _smooth_mlp():
    return nn.Sequential(nn.Linear(13, 17), nn.GELU(), nn.Linear(17, 11),
                         nn.GELU(approximate="tanh"), nn.Linear(11, 9), nn.SiLU(),
                         nn.Linear(9, 5))


@pytest.mark.parametrize("mode", ["isolated", "coupled"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_gelu_silu_model_equals_unfused(mode, backend):
    if not xf.backend_choice.availability(backend, "cpu")[0]:
        pytest.skip(f"{backend} unavailable here")
    torch.manual_seed(6)
    fused, plain = _pair(_smooth_mlp(), width=0.3, new_classes=3, mode=mode, backend=backend)
    assert [fused[i].activation for i in (0, 2, 4, 6)] == ["gelu", "gelu_tanh", "silu", ""]
    assert [type(fused[i]) for i in (1, 3, 5)] == [xf.FusedGELU, xf.FusedGELU, xf.FusedSiLU]
    assert fused[3].approximate == "tanh" and isinstance(fused[5], nn.SiLU)
    assert list(fused.state_dict()) == list(plain.state_dict())
    x = torch.randn(37, 13)
    y_f, g_f = _grads(fused, x)
    y_p, g_p = _grads(plain, x)
    # the torch backend runs aten's own activation kernels: the very bits of nn.GELU / nn.SiLU
    exact = backend == "torch"
    torch.testing.assert_close(y_f, y_p, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-5)
    assert g_f.keys() == g_p.keys()
    for name in g_f:
        torch.testing.assert_close(g_f[name], g_p[name], rtol=1e-5, atol=1e-5)
    src = xf.source_model(fused)
    assert [type(m) for m in src] == [type(m) for m in _smooth_mlp()]
    assert src[3].approximate == "tanh"


def _saved_bytes(model, x):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sum(saved)


def test_fused_gelu_keeps_only_the_newest_columns_pre_activation():
    # Isolated expand(): backward reads only the newest outputs, so the fused GELU keeps
    # their pre-activation (17 * 0.25 -> 4 of 21 columns) instead of the full-width input
    # nn.GELU keeps; everything else saved is the same.
    torch.manual_seed(7)
    base = nn.Sequential(nn.Linear(13, 17), nn.GELU(), nn.Linear(17, 5))
    fused, plain = _pair(base, width=0.25, new_classes=2)
    n = 64
    x = torch.randn(n, 13)
    hidden = fused[0].out_features
    new = fused[0].out_groups[-1]
    assert (hidden, new) == (21, 4)
    assert _saved_bytes(plain, x) - _saved_bytes(fused, x) == n * (hidden - new) * 4


def test_gelu_with_unknown_approximation_stays_apart():
    class OddGELU(nn.GELU):  # a subclass may compute anything: never fused
        pass

    base = nn.Sequential(nn.Linear(4, 4), OddGELU(), nn.Linear(4, 2))
    big = xf.expand(base, width=1)
    assert big[0].activation == "" and type(big[1]) is OddGELU


def test_checkpoint_round_trip_fuses_gelu(tmp_path):
    torch.manual_seed(8)
    base = _smooth_mlp()
    big = xf.expand(base, width=0.25, new_classes=2)
    path = str(tmp_path / "g.safetensors")
    xf.save_expansion(big, path)
    loaded = xf.load_expansion(base, path)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in big.modules()]
    x = torch.randn(5, 13)
    assert torch.equal(loaded(x), big(x))


@pytest.mark.parametrize("custom_ops", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu", "relu"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_activation_on_a_layer_without_new_outputs(monkeypatch, custom_ops, activation,
                                                         backend):
    """new_out=0: no newest column, so no pre-activation of one is saved; the backward
    still runs (the input's new features get their gradient through the frozen rows only
    when they are read: here nothing reads them, so it is zero)."""
    if not xf.backend_choice.availability(backend, "cpu")[0]:
        pytest.skip(f"{backend} unavailable here")
    monkeypatch.setattr(xf.ops, "USE_EAGER_FUNCTIONS", not custom_ops)
    torch.manual_seed(0)
    dtype = torch.float64 if backend == "torch" else torch.float32  # (triton: no float64)
    lin = nn.Linear(5, 3).to(dtype)
    layer = xf.ExpandedLinear.from_linear(lin, new_in=2, new_out=0)
    layer.activation = activation
    layer.backend = backend
    x = torch.randn(4, 7, dtype=dtype, requires_grad=True)
    layer(x).sum().backward()
    act = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
           "silu": F.silu, "relu": F.relu}[activation]
    x2 = x.detach()[:, :5].clone().requires_grad_()
    act(lin(x2)).sum().backward()
    torch.testing.assert_close(x.grad[:, :5], x2.grad)
    assert torch.equal(x.grad[:, 5:], torch.zeros(4, 2, dtype=dtype))
