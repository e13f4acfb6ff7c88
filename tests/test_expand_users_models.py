"""expand() on models as users write them: a layer kept under two names, a forward that
stores what it computes on its modules, subclasses of the plain layers that compute as they
do, a module in front unfrozen after expand().  Each is widened as the plain model would be,
and the original is left as it was."""
import collections
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import expanse_fast as xf


class _AliasedHead(nn.Module):
    """The head kept as an attribute and inside the Sequential that calls it."""

    def __init__(self, alias_first: bool):
        super().__init__()
        head = nn.Linear(16, 3)
        if alias_first:
            self.fc = head
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), head)
        if not alias_first:
            self.classifier = head

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("alias_first", [True, False])
def test_a_layer_under_two_names_is_widened_under_both(alias_first, tmp_path):
    torch.manual_seed(0)
    base = _AliasedHead(alias_first).eval()
    big = xf.expand(base, width=0.5, new_classes=2).eval()
    alias = big.fc if alias_first else big.classifier
    assert alias is big.net[2] and isinstance(alias, xf.ExpandedLinear)
    x = torch.randn(4, 8)
    y = big(x)
    assert y.shape == (4, 5) and torch.equal(y[:, :3], base(x))
    y.sum().backward()
    assert alias.weight_new.grad is not None and alias.weight_new.grad.abs().max() > 0
    trainable, total = xf.print_trainable_parameters(big)
    assert total == sum(p.numel() for p in big.parameters())  # (each tensor once)
    source = xf.source_model(big)
    assert (source.fc if alias_first else source.classifier) is source.net[2]
    assert isinstance(source.net[2], nn.Linear) and torch.equal(source(x), base(x))
    assert set(source.state_dict()) == set(base.state_dict())
    path = str(tmp_path / "a.safetensors")
    xf.save_expansion(big, path)
    loaded = xf.load_expansion(base, path).eval()
    assert (loaded.fc if alias_first else loaded.classifier) is loaded.net[2]
    with torch.no_grad():
        assert torch.equal(loaded(x), big(x))


class _KeepsFeatures(nn.Module):
    """A forward that stores its penultimate features and counts its calls."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)
        self.features = None
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = F.relu(self.a(x))
        self.features = h.detach()
        return self.head(h)


def test_what_a_traced_forward_stores_is_put_back():
    """expand() traces the forward with proxies: what it stores must not stay behind, on
    the original or on the copy (proxies cannot be pickled)."""
    torch.manual_seed(0)
    base = _KeepsFeatures()
    x = torch.randn(4, 8)
    base(x)
    kept = base.features
    big = xf.expand(base, width=0.25, new_classes=2)
    assert base.calls == 1 and base.features is kept
    assert big.calls == 1 and torch.equal(big.features, kept)
    torch.save(base, io.BytesIO())
    torch.save(big, io.BytesIO())
    big(x)
    assert big.calls == 2 and big.features.shape == (4, 20)


class _InitLinear(nn.Linear):
    """A subclass with its own initialisation only: it computes as nn.Linear."""

    def reset_parameters(self):
        nn.init.xavier_uniform_(self.weight)
        nn.init.zeros_(self.bias)


class _PlainConv(nn.Conv2d):
    """A subclass that adds nothing: it computes as nn.Conv2d."""


class _PlainBatchNorm(nn.BatchNorm2d):
    """A subclass that adds nothing: it computes as nn.BatchNorm2d."""


def test_subclasses_that_compute_as_the_plain_layer_are_widened():
    torch.manual_seed(0)
    mlp = nn.Sequential(_InitLinear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    cnn = nn.Sequential(_PlainConv(3, 8, 3), _PlainBatchNorm(8), nn.ReLU(),
                        nn.Conv2d(8, 4, 3)).eval()
    cnn.train()
    cnn(torch.randn(4, 3, 8, 8))  # running statistics that are not the defaults
    cnn.eval()
    for base, x, old in ((mlp, torch.randn(3, 8), 3), (cnn, torch.randn(2, 3, 8, 8), 4)):
        big = xf.expand(base, width=0.25, new_classes=2).eval()
        assert all(isinstance(m, (xf.ExpandedLinear, xf.ExpandedConv2d,
                                  xf.ExpandedBatchNorm2d)) or not list(m.parameters())
                   for m in big.children())
        with torch.no_grad():
            assert torch.equal(big(x)[:, :old], base(x))
            assert torch.equal(xf.source_model(big).eval()(x), base(x))


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.a = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens):
        return self.head(F.relu(self.a(self.embed(tokens))))


def _embedding_grads(big):
    """The embedding's gradient in ``big`` and in the plain model of the same weights."""
    plain = xf.merge(big)
    plain.embed.weight.requires_grad_(True)
    tokens = torch.randint(0, 10, (6,))
    for model in (big, plain):
        model(tokens).square().sum().backward()
    assert plain.embed.weight.grad.abs().max() > 0
    return big.embed.weight.grad, plain.embed.weight.grad


@pytest.mark.parametrize("how", ["unfrozen", "put in after expand()"])
def test_a_module_in_front_made_trainable_gets_its_full_gradient(how):
    """Token inputs never require grad: an embedding unfrozen after expand(), or a fresh one
    put in its place, needs the old features' gradient all the same, as the plain model of
    the same weights gives it."""
    torch.manual_seed(0)
    big = xf.expand(_Tokens(), width=0.5, new_classes=2)
    if how == "unfrozen":
        big.embed.weight.requires_grad_(True)
    else:
        big.embed = nn.Embedding(10, 8)
    torch.testing.assert_close(*_embedding_grads(big))
    tokens = torch.randint(0, 10, (6,))
    # frozen again: the old features' gradient is skipped again
    big.embed.weight.requires_grad_(False)
    watch = big._forward_pre_hooks[next(iter(big._forward_pre_hooks))]
    big(tokens)
    assert watch.needed is False


class _TwoOutputs(nn.Module):
    """Two layers' outputs returned: always (logits and a projection), or the first in
    training only (an auxiliary head, GoogLeNet's way)."""

    def __init__(self, first: str, second: str, first_in_training_only: bool = False):
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.first, self.second, self.training_only = first, second, first_in_training_only
        setattr(self, first, nn.Linear(16, 10))
        setattr(self, second, nn.Linear(16, 4))

    def forward(self, x):
        h = F.relu(self.body(x))
        if self.training_only and not self.training:
            return getattr(self, self.second)(h)
        return getattr(self, self.first)(h), getattr(self, self.second)(h)


def test_several_returned_layers_warn_which_takes_the_new_classes():
    """Which returned layer is the classifier only the user knows: the last one called
    takes the new classes, with a warning that names the choice and the way to make it."""
    torch.manual_seed(0)
    base = _TwoOutputs("cls", "proj").eval()
    with pytest.warns(UserWarning, match=r"several layers \('cls', 'proj'\); 'proj', the last "
                                         r"one called, takes the 5 new classes.*head=") as seen:
        big = xf.expand(base, width=0.25, new_classes=5)
    assert {w.filename for w in seen} == {__file__}  # the user's call, not the package
    # an auxiliary head returned in training only: the other mode's plan, deeper inside
    # the package, warns, and points at the user's call too
    with pytest.warns(UserWarning, match=r"several layers \('aux', 'cls'\)") as seen:
        xf.expand(_TwoOutputs("aux", "cls", True).eval(), width=0.25, new_classes=5)
    assert {w.filename for w in seen} == {__file__}
    assert big.proj.out_groups == (4, 5)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        big = xf.expand(base, width=0.25, new_classes=5, head="cls")
    assert big.cls.out_groups == (10, 5) and big.proj.out_groups == (4, 1)
    x = torch.randn(3, 8)
    with torch.no_grad():
        (logits, emb), (want, want_emb) = big(x), base(x)
    assert torch.equal(logits[:, :10], want) and torch.equal(emb[:, :4], want_emb)


def test_a_layer_alone_under_a_reentrant_checkpoint_forms_the_old_gradient():
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    big = xf.expand(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                  nn.Linear(8, 3)), width=0.5, new_classes=2)
    big(torch.randn(2, 5))  # a model call first: its note must not decide the layer's
    layer = big[2]
    h0 = torch.randn(4, 12)

    def input_grad(f):
        h = h0.clone().requires_grad_()
        f(h).square().sum().backward()
        return h.grad
    eager = input_grad(layer)
    assert eager[:, :8].abs().max() > 0
    torch.testing.assert_close(input_grad(lambda t: checkpoint(layer, t, use_reentrant=True)),
                               eager)


class _AppendsFeatures(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.kind = kind
        self.store = {"list": [], "dict": {}, "ordered": collections.OrderedDict(),
                      "default": collections.defaultdict(list), "deque": collections.deque(),
                      "nested": {"feats": []}}[kind]

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if self.kind in ("list", "deque"):
            self.store.append(h)
        elif self.kind == "default":
            self.store["h"].append(h)
        elif self.kind == "nested":
            self.store["feats"].append(h)
        else:
            self.store["h"] = h
        return self.fc2(h)


@pytest.mark.parametrize("kind", ["list", "dict", "ordered", "default", "deque", "nested"])
def test_containers_a_traced_forward_fills_are_put_back(kind):
    base = _AppendsFeatures(kind)
    empty = copy.deepcopy(base.store)
    big = xf.expand(base, width=0.5, new_classes=2)
    for model in (base, big):
        assert type(model.store) is type(empty) and model.store == empty
        pickle.dumps(model)


class _WithConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x + torch.ones(4))))


@pytest.mark.parametrize("examples", [None, (torch.randn(2, 4),)])
def test_a_tensor_constant_of_the_forward_is_named_and_not_left_on_the_model(examples):
    """fx keeps a constant the forward creates as an attribute of the traced root: it goes
    with the graph (the shapes pass runs it), not onto the user's model; expand() names it."""
    base = _WithConstant()
    with pytest.raises(xf.ExpansionError, match=r"node '_tensor_constant0' \(get_attr "
                                                r"_tensor_constant0\)"):
        xf.expand(base, width=0.5, new_classes=2, example_inputs=examples)
    assert not hasattr(base, "_tensor_constant0")


class _ConvWithChild(nn.Conv2d):
    """A plain-computing conv subclass that also holds the BatchNorm after it."""


class _HoldsItsNorm(nn.Module):
    def __init__(self):
        super().__init__()
        conv = _ConvWithChild(3, 8, 3, padding=1)
        conv.norm = nn.BatchNorm2d(8)
        self.c, self.bn, self.fc = conv, conv.norm, nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.c(x))).mean((2, 3)))


def test_a_layer_named_inside_a_widened_layer_is_widened_under_its_other_name():
    torch.manual_seed(0)
    base = _HoldsItsNorm().eval()
    big = xf.expand(base, width=0.5, new_classes=2).eval()
    assert isinstance(big.c, xf.ExpandedConv2d) and isinstance(big.bn, xf.ExpandedBatchNorm2d)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(big(x)[:, :4], base(x))
