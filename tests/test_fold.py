"""fold_batchnorms / expand(fuse=True): an expanded conv applies the frozen channels of the
BatchNorm after it, and the BatchNorm normalises only its newest channels.  The folded
model computes what the unfolded one does (bit for bit on the torch backend), its frozen
running statistics never move, and the plain models, checkpoints and re-expansions come
out as without the fold."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import expanse_fast as xf
from expanse_fast import backend_choice
from models import SmallResNet, pretrained
from reference import assert_same_training_state

X = torch.randn(6, 1, 10, 10)
Y = torch.randint(0, 7, (6,))


def _base(seed=0):
    torch.manual_seed(seed)
    return pretrained(SmallResNet(), torch.randn(8, 1, 10, 10))


def _pair(base, **kw):
    """(folded, unfolded) expansions of ``base`` holding the same tensors."""
    folded = xf.expand(base, **kw)
    plain = xf.expand(base, fuse=False, **kw)
    plain.load_state_dict(folded.state_dict())
    return folded, plain


def _folded_bns(model):
    return [n for n, m in model.named_modules() if getattr(m, "frozen_folded", False)]


def _same(a, b):
    """Bit for bit, or no gradient on both sides (an empty BatchNorm affine is unused)."""
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _frozen_buffers(model):
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("_frozen")}


def _steps(model, steps=3, lr=0.1):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    outs = []
    for _ in range(steps):
        opt.zero_grad()
        y = model(X)
        F.cross_entropy(y, Y % y.shape[1]).backward()
        outs.append((y.detach(), {n: None if p.grad is None else p.grad.clone()
                                  for n, p in model.named_parameters() if p.requires_grad}))
        opt.step()
    return outs


ALL_BNS = ["bn", "layer1.bn1", "layer1.bn2", "layer2.bn1", "layer2.bn2", "layer2.shortcut.1"]


@pytest.mark.parametrize("mode", ["isolated", "coupled"])
@pytest.mark.parametrize("path", ["cpu", "gpu_like"])
def test_torch_backend_folded_equals_unfolded_bit_for_bit(mode, path, monkeypatch):
    """``gpu_like``: the branch the torch backend takes on a GPU, here on the CPU: every
    conv convolved apart (so each frozen block takes its BatchNorm alone)."""
    if path == "gpu_like":
        from expanse_fast.backends import torch_ref
        monkeypatch.setattr(torch_ref, "_joint_rows", lambda *a, **k: None)
    base = _base()
    folded, plain = _pair(base, width=0.25, new_classes=2, mode=mode, backend="torch")
    assert _folded_bns(folded) == ALL_BNS and _folded_bns(plain) == []
    assert list(folded.state_dict()) == list(plain.state_dict())
    frozen = _frozen_buffers(folded)
    for (y_f, g_f), (y_p, g_p) in zip(_steps(folded), _steps(plain)):
        assert torch.equal(y_f, y_p)
        assert g_f.keys() == g_p.keys() and len(g_f) > 15
        for name in g_f:
            assert _same(g_f[name], g_p[name]), name
    # frozen running statistics (and affine) never move; the newest moved alike
    for n, b in _frozen_buffers(folded).items():
        assert torch.equal(b, frozen[n]), n
    for (n, a), b in zip(folded.named_buffers(), plain.buffers()):
        assert torch.equal(a, b), n
    for train in (True, False):  # and one more step in each mode (eval: the newest
        folded.train(train)      # channels' affine still learns, on running statistics)
        plain.train(train)
        for m in (folded, plain):
            m.zero_grad()
            m(X).square().sum().backward()
        assert torch.equal(folded(X), plain(X))
        for (n, a), b in zip(folded.named_parameters(), plain.parameters()):
            if train or mode == "isolated":
                assert _same(a.grad, b.grad), n
            elif a.grad is not None:
                # coupled eval: the unfused BatchNorm's eval backward scales the frozen dy
                # inside aten (its rounding); the fold as its training path does
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_triton_backend_folded_equals_unfolded():
    if not backend_choice.availability("triton", "cpu")[0]:
        pytest.skip("triton unavailable here")
    torch.manual_seed(1)
    base = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 5, 3),
                         nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 2 * 2, 4))
    base = pretrained(base, torch.randn(4, 1, 6, 6))
    folded, plain = _pair(base, width=2, new_classes=1, backend="triton")
    assert _folded_bns(folded) == ["1", "4"]
    x = torch.randn(3, 1, 6, 6)
    for train in (True, False):
        folded.train(train)
        plain.train(train)
        y_f, y_p = folded(x), plain(x)
        torch.testing.assert_close(y_f, y_p, rtol=1e-5, atol=1e-5)
        y_f.square().sum().backward()
        y_p.square().sum().backward()
    assert_same_training_state(folded, plain, rtol=1e-4, atol=1e-5)


def test_batchnorm_writes_its_newest_channels_in_place():
    base = _base(2)
    folded = xf.expand(base, width=0.25, new_classes=2).train()
    conv, bn = folded.stem, folded.bn
    assert conv.folded_batchnorm is bn and "folds" not in repr(bn)
    assert "applies the frozen channels" in repr(conv) and "folded into the conv" in repr(bn)
    y = conv(X)
    raw = y.detach().clone()
    out = bn(y)
    assert out.data_ptr() == y.data_ptr()  # no full-width copy
    n_f = bn.groups[0]
    assert torch.equal(out[:, :n_f].detach(), raw[:, :n_f])  # frozen: passed through
    assert not torch.equal(out[:, n_f:].detach(), raw[:, n_f:])


def test_fold_returns_paths_and_is_idempotent():
    big = xf.expand(_base(3), width=0.25, new_classes=2, fuse=False)
    assert xf.fold_batchnorms(big) == ALL_BNS
    assert xf.fold_batchnorms(big) == []
    with pytest.raises(ValueError, match="already folded"):
        big.stem.fold_batchnorm(big.bn)


# ---- what is left apart ------------------------------------------------------------------------
class _TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        z = self.conv2(self.bn(y) + y)  # conv's output is read twice: it must stay raw
        return self.bn2(z)


class _SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.head(self.bn(self.conv1(x)) + self.bn(self.conv2(x)))


class _SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        h = self.stem(x)  # one conv module on two branches, each into its own BatchNorm
        return self.head(self.bn1(self.conv(h)) + self.bn2(self.conv(h * 2)))


def _check_left_apart(base, x, folded_expected):
    base = pretrained(base, x)
    big = xf.expand(base, width=2, backend="torch")
    assert _folded_bns(big) == folded_expected
    plain = xf.expand(base, width=2, backend="torch", fuse=False)
    plain.load_state_dict(big.state_dict())
    big.train()
    plain.train()
    assert torch.equal(big(x), plain(x))
    assert torch.equal(xf.source_model(big).eval()(x), base.eval()(x))


def test_conv_output_with_other_users_is_left_apart():
    torch.manual_seed(4)
    _check_left_apart(_TwoUsers(), torch.randn(4, 2, 5, 5), ["bn2"])


def test_shared_batchnorm_is_left_apart():
    torch.manual_seed(5)
    _check_left_apart(_SharedBN(), torch.randn(4, 2, 5, 5), [])


def test_shared_conv_is_left_apart():
    torch.manual_seed(6)
    _check_left_apart(_SharedConv(), torch.randn(4, 3, 5, 5), [])


@pytest.mark.parametrize("where", ["conv_hook", "conv_pre_hook", "bn_hook", "bn_pre_hook"])
def test_hooked_modules_are_left_apart(where):
    big = xf.expand(_base(7), width=0.25, new_classes=2, fuse=False)
    seen = []
    module = big.stem if where.startswith("conv") else big.bn
    if where.endswith("pre_hook"):
        module.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach().clone()))
    else:
        module.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    assert "bn" not in xf.fold_batchnorms(big)
    assert big.stem.folded_batchnorm is None and not big.bn.frozen_folded
    big.eval()(X)
    if where == "bn_pre_hook":  # the BatchNorm's input: the conv's raw output
        assert torch.equal(seen[0], big.stem(X).detach())


def _hook(where, seen):
    """A hook of kind ``where`` that records what it sees (and a regulariser's term)."""
    if where == "forward":
        return lambda m, i, o: seen.append(o)
    if where == "pre":
        return lambda m, i: seen.append(i[0])
    return lambda m, gi, go: seen.append(go[0])


@pytest.mark.parametrize("where", ["forward", "pre", "backward"])
@pytest.mark.parametrize("on", ["conv", "bn", "global"])
def test_hooks_put_on_a_folded_pair_afterwards_see_the_unfolded_pair(where, on):
    """A hook added after the fold (Grad-CAM's backward hook, an activation store or
    regulariser) saw the folded pair: a conv output whose new channels the BatchNorm then
    overwrote in place, and a backward hook failed ('a view ... modified inplace').  Such
    calls now run unfolded, as fuse=False computes them; without hooks the fold is back."""
    folded, plain = _pair(_base(9), width=0.25, new_classes=2)
    seen_f, seen_p = [], []
    handles = []
    for model, seen in ((folded, seen_f), (plain, seen_p)):
        module = {"conv": model.stem, "bn": model.bn, "global": None}[on]
        hook = _hook(where, seen)
        if on == "global":
            register = {"forward": nn.modules.module.register_module_forward_hook,
                        "pre": nn.modules.module.register_module_forward_pre_hook,
                        "backward": nn.modules.module.register_module_full_backward_hook}
            handles.append(register[where](hook))
        else:
            register = {"forward": module.register_forward_hook,
                        "pre": module.register_forward_pre_hook,
                        "backward": module.register_full_backward_hook}
            handles.append(register[where](hook))
        try:
            model.train()
            y = model(X)
            if where == "forward" and on != "global":
                y = y + 1e-3 * seen[0].square().mean()  # a regulariser on what it stored
            y.square().sum().backward()
        finally:
            handles.pop().remove()
    assert folded.stem.folded_batchnorm is folded.bn  # still folded: the calls ran unfolded
    assert len(seen_f) == len(seen_p) > 0
    for a, b in zip(seen_f, seen_p):
        assert torch.equal(a.detach(), b.detach())
    for (n, p), (_, q) in zip(folded.named_parameters(), plain.named_parameters()):
        assert _same(p.grad, q.grad), n


@pytest.mark.parametrize("where", ["bn_pre_hook", "conv_hook"])
def test_a_hook_that_removes_itself_between_the_pair_does_not_split_it(where):
    """A capture-once hook that removes itself after the conv's call and before the
    BatchNorm's: each module asked for hooks at its own call, the conv ran unfolded and the
    BatchNorm folded, and the old channels were never normalised (0.18 off)."""
    folded, plain = _pair(_base(9), width=0.25, new_classes=2)
    folded.eval(), plain.eval()
    seen = []
    module = folded.bn if where == "bn_pre_hook" else folded.stem

    def once(*args):
        seen.append(1)
        handle.remove()
    handle = (module.register_forward_pre_hook(once) if where == "bn_pre_hook"
              else module.register_forward_hook(once))
    with torch.no_grad():
        assert torch.equal(folded(X), plain(X))
        assert seen == [1]
        assert torch.equal(folded(X), plain(X))  # folded again, no hook left


def test_the_fold_is_back_once_the_hook_is_gone(monkeypatch):
    from expanse_fast.nn import norm
    folded = xf.expand(_base(9), width=0.25, new_classes=2).train()
    calls = []
    real = norm._ExpandedBatchNorm._newest_only
    monkeypatch.setattr(norm._ExpandedBatchNorm, "_newest_only",
                        lambda self, x: calls.append(1) or real(self, x))
    handle = folded.stem.register_forward_hook(lambda m, i, o: None)
    folded(X)
    unfolded_calls = len(calls)
    handle.remove()
    folded(X)
    assert len(calls) == unfolded_calls + len(_folded_bns(folded))
    assert unfolded_calls == len(_folded_bns(folded)) - 1  # only the hooked pair unfolded


def test_group_mismatch_is_left_apart_and_refused():
    torch.manual_seed(8)
    conv = xf.ExpandedConv2d.from_conv(nn.Conv2d(2, 4, 3, padding=1), 0, 2)  # out (4, 2)
    bn = xf.ExpandedBatchNorm2d.from_bn(nn.BatchNorm2d(3).eval(), 3)         # (3, 3)
    model = nn.Sequential(conv, bn).eval()
    x = torch.randn(2, 2, 4, 4)
    y = model(x)
    assert xf.fold_batchnorms(model) == []
    assert torch.equal(model(x), y)
    with pytest.raises(ValueError, match="channel groups"):
        conv.fold_batchnorm(bn)
    with pytest.raises(TypeError, match="ExpandedBatchNorm2d"):
        conv.fold_batchnorm(nn.BatchNorm2d(6))


def test_expanding_a_folded_layer_alone_is_refused_at_call_time():
    big = xf.expand(_base(9), width=0.25, new_classes=2)
    big.stem.expand(0, 3)  # the BatchNorm after it was not expanded
    with pytest.raises(RuntimeError, match="expanded without the other"):
        big.stem(X)


# ---- re-expansion, plain models, checkpoints, dtype -------------------------------------------
def test_expanding_a_folded_model_again_stays_exact():
    base = _base(10)
    once = xf.expand(base, width=0.25, new_classes=2, backend="torch")
    _steps(once, steps=2)
    twice, twice_plain = _pair(once, width=0.5, new_classes=3, backend="torch")
    assert _folded_bns(twice) == ALL_BNS
    assert len(twice.bn.groups) == 3 and twice.bn.groups == twice.stem.out_groups
    _steps(twice, steps=2)
    _steps(twice_plain, steps=2)
    for m in (twice, twice_plain):
        m.eval()
    with torch.no_grad():
        assert torch.equal(twice(X), twice_plain(X))
        assert torch.equal(xf.source_model(twice, task=0).eval()(X), base.eval()(X))
        torch.testing.assert_close(xf.source_model(twice, task=1).eval()(X),
                                   xf.source_model(once, task=1).eval()(X), rtol=0, atol=0)


def test_source_model_and_merge_are_plain():
    base = _base(11)
    big = xf.expand(base, width=0.25, new_classes=2)
    _steps(big, steps=2)
    big.eval()
    for plain in (xf.source_model(big), xf.merge(big)):
        assert not any(isinstance(m, (xf.ExpandedConv2d, xf.ExpandedBatchNorm2d))
                       for m in plain.modules())
        assert [type(m) for m in plain.modules()] == [type(m) for m in base.modules()]
    assert torch.equal(xf.source_model(big).eval()(X), base.eval()(X))
    with torch.no_grad():
        torch.testing.assert_close(xf.merge(big).eval()(X), big(X), rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip_refolds(tmp_path):
    base = _base(12)
    big = xf.expand(base, width=0.25, new_classes=2, backend="torch")
    _steps(big, steps=2)
    path_f, path_p = str(tmp_path / "folded.safetensors"), str(tmp_path / "plain.safetensors")
    xf.save_expansion(big, path_f)
    unfolded = copy.deepcopy(big)
    for m in unfolded.modules():
        if isinstance(m, xf.ExpandedConv2d):
            m.unfold_batchnorm()
    assert _folded_bns(unfolded) == []
    xf.save_expansion(unfolded, path_p)
    from safetensors.torch import load_file
    from safetensors import safe_open
    a, b = load_file(path_f), load_file(path_p)  # the fold is not state: the same contents
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(path_f, framework="pt") as f, safe_open(path_p, framework="pt") as g:
        assert f.metadata() == g.metadata()
    loaded = xf.load_expansion(base, path_f)
    loaded_plain = xf.load_expansion(base, path_f, fuse=False)
    assert _folded_bns(loaded) == ALL_BNS and _folded_bns(loaded_plain) == []
    for m in (big, loaded, loaded_plain):
        m.eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), big(X)) and torch.equal(loaded_plain(X), big(X))


def test_to_dtype_and_changed_statistics_are_followed():
    """The folded map is read from the BatchNorm at each call: after .double() and after a
    load_state_dict that changes frozen statistics, folded and unfolded still agree."""
    base = _base(13)
    folded, plain = _pair(base, width=0.25, new_classes=2, backend="torch")
    folded, plain = folded.double().eval(), plain.double().eval()
    x = X.double()
    with torch.no_grad():
        assert torch.equal(folded(x), plain(x))
        state = {k: v.clone() for k, v in folded.state_dict().items()}
        state["layer1.bn1.running_mean_frozen"] += 0.5
        state["layer1.bn1.weight_frozen"] *= 2
        before = folded(x)
        folded.load_state_dict(state)
        plain.load_state_dict(state)
        assert torch.equal(folded(x), plain(x)) and not torch.equal(folded(x), before)


def test_batchnorm_without_new_channels_passes_everything_through():
    """A conv that gets no new filters (width names only the others): its BatchNorm is all
    frozen, folded whole."""
    torch.manual_seed(14)
    base = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3),
                         nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 3))
    base = pretrained(base, torch.randn(4, 1, 10, 10))
    folded, plain = _pair(base, width={"3": 2}, new_classes=1, backend="torch")
    assert folded[1].groups == (4, 0) and _folded_bns(folded) == ["1", "4"]
    for (y_f, g_f), (y_p, g_p) in zip(_steps(folded, 2), _steps(plain, 2)):
        assert torch.equal(y_f, y_p)
        for name in g_f:
            assert _same(g_f[name], g_p[name]), name


def test_compile_fullgraph_folded_matches_unfolded_eager():
    torch._dynamo.reset()
    folded, plain = _pair(_base(15), width=0.25, new_classes=2, backend="torch")
    assert _folded_bns(folded) == ALL_BNS
    compiled = torch.compile(folded.train(), fullgraph=True, backend="aot_eager")
    y_c, y_p = compiled(X), plain.train()(X)
    torch.testing.assert_close(y_c, y_p, rtol=1e-6, atol=1e-6)
    y_c.square().sum().backward()
    y_p.square().sum().backward()
    assert_same_training_state(folded, plain, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
