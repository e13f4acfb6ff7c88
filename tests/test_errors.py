"""Clear errors: the expanded layers name the expected and the given sizes, dtypes and
devices; expand() refuses what it cannot widen exactly, names the node or module, and leaves
the model untouched; set_backend names its options; ops refuse a frozen weight that wants
a gradient."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import expanse_fast as xf
from expanse_fast import ExpansionError


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; avoids OpenMP spinning on a busy machine
    yield
    torch.set_num_threads(n)


def _names_all(msg, *parts):
    missing = [p for p in parts if str(p) not in msg]
    assert not missing, f"message lacks {missing}: {msg}"


# ---- layers -------------------------------------------------------------------------------------
def _linear(mode="isolated"):
    return xf.ExpandedLinear.from_linear(nn.Linear(7, 11), new_in=4, new_out=3, mode=mode)


def _conv():
    return xf.ExpandedConv2d.from_conv(nn.Conv2d(5, 6, 3, padding=1), new_in=2, new_out=3)


def test_linear_wrong_feature_count():
    layer = _linear()  # 11 input features
    assert layer(torch.randn(2, 11)).shape == (2, 14)
    with pytest.raises(ValueError) as err:
        layer(torch.randn(2, 13))
    _names_all(str(err.value), "11 features", "(2, 13)")
    with pytest.raises(ValueError) as err:
        layer(torch.randn(2, 3, 7))  # the base width: a caller that forgot the new inputs
    _names_all(str(err.value), "11", "(2, 3, 7)")


def test_group_widths_are_whole_numbers():
    """A width of 1.5 or True would be truncated to a layer nobody asked for; -1 is no width.
    A refused expand() of a layer leaves it as it was."""
    with pytest.raises(TypeError, match=r"in_groups widths \(\(7, 1\.5\)\) must be an int"):
        xf.ExpandedLinear.from_linear(nn.Linear(7, 11), new_in=1.5, new_out=3)
    with pytest.raises(TypeError, match=r"out_groups widths \(\(6, True\)\) must be an int"):
        xf.ExpandedConv2d.from_conv(nn.Conv2d(5, 6, 3), new_in=0, new_out=True)
    layer = _linear()
    for new_in, new_out, error in ((-1, 2, ValueError), (2, 0.5, TypeError)):
        with pytest.raises(error, match="new_in must be >= 0" if error is ValueError
                           else "new_out must be an int"):
            layer.expand(new_in, new_out)
        assert layer.in_groups == (7, 4) and layer.out_groups == (11, 3)
    bn = xf.ExpandedBatchNorm2d.from_bn(nn.BatchNorm2d(4), 2)
    with pytest.raises(ValueError, match=r"new must be >= 0, got -1"):
        bn.expand(-1)
    assert bn.groups == (4, 2) and bn.running_mean_frozen.shape == (4,)
    with pytest.raises(TypeError, match=r"groups widths \(\(4, 2\.0\)\) must be an int"):
        xf.ExpandedBatchNorm1d((4, 2.0))


def test_linear_mixed_dtypes():
    layer = _linear()
    with pytest.raises(TypeError) as err:
        layer(torch.randn(2, 11, dtype=torch.float64))
    _names_all(str(err.value), "torch.float64", "torch.float32")
    with pytest.raises(TypeError) as err:
        _linear().half()(torch.randn(2, 11))
    _names_all(str(err.value), "torch.float32", "torch.float16")


def test_wrong_device():
    with pytest.raises(ValueError) as err:
        _linear().to("meta")(torch.randn(2, 11))
    _names_all(str(err.value), "cpu", "meta")
    with pytest.raises(ValueError) as err:
        _linear()(torch.randn(2, 11, device="meta"))
    _names_all(str(err.value), "cpu", "meta")
    with pytest.raises(ValueError) as err:
        _conv()(torch.randn(1, 7, 5, 5, device="meta"))
    _names_all(str(err.value), "cpu", "meta")


def test_conv_wrong_rank_and_channels():
    layer = _conv()  # 7 input channels
    assert layer(torch.randn(1, 7, 5, 4)).shape == (1, 9, 5, 4)
    x = torch.randn(7, 5, 4)  # unbatched (C, H, W), as nn.Conv2d takes it
    assert torch.equal(layer(x), layer(x[None])[0])
    with pytest.raises(ValueError) as err:
        layer(torch.randn(6, 5, 4))
    _names_all(str(err.value), "4-D", "3-D", "C = 7", "(6, 5, 4)")
    with pytest.raises(ValueError) as err:
        layer(torch.randn(7, 5))
    _names_all(str(err.value), "4-D", "C = 7", "(7, 5)")
    with pytest.raises(ValueError) as err:
        layer(torch.randn(1, 5, 5, 4))
    _names_all(str(err.value), "C = 7", "(1, 5, 5, 4)")


def test_batchnorm_wrong_channels_and_rank():
    bn2 = xf.ExpandedBatchNorm2d.from_bn(nn.BatchNorm2d(4), new=3)
    assert bn2(torch.randn(2, 7, 3, 3)).shape == (2, 7, 3, 3)
    with pytest.raises(ValueError) as err:
        bn2(torch.randn(2, 6, 3, 3))
    _names_all(str(err.value), "7 channels", "(2, 6, 3, 3)")
    with pytest.raises(ValueError) as err:
        bn2(torch.randn(2, 7))
    _names_all(str(err.value), "4-D", "(2, 7)")
    bn1 = xf.ExpandedBatchNorm1d.from_bn(nn.BatchNorm1d(4), new=2)
    with pytest.raises(ValueError) as err:
        bn1(torch.randn(3, 4))
    _names_all(str(err.value), "6 channels", "(3, 4)")


def test_frozen_weight_requiring_grad_is_refused():
    layer = _linear()
    layer.weight_frozen.requires_grad_(True)
    with pytest.raises(ValueError, match=r"w_frozen requires grad.*train xf.merge\(model\)"):
        layer(torch.randn(2, 11))
    conv = _conv()
    conv.bias_frozen.requires_grad_(True)
    with pytest.raises(ValueError, match=r"b_frozen requires grad"):
        conv(torch.randn(1, 7, 4, 4))
    # the functional form checks too, and accepts the same tensors once frozen again
    lay = xf.Layout((3, 2), (4, 5))
    w_f = torch.randn(4, 3, requires_grad=True)
    w_n = torch.randn(5, 5, requires_grad=True)
    kw = dict(frozen_out_groups=lay.frozen_out_groups, frozen_k_ends=lay.frozen_k_ends)
    with pytest.raises(ValueError, match=r"w_frozen requires grad"):
        xf.ops.expanded_linear(torch.randn(2, 5), w_f, None, w_n, None, **kw)
    y = xf.ops.expanded_linear(torch.randn(2, 5), w_f.detach(), None, w_n, None, **kw)
    assert y.shape == (2, 9)


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("name", ["weight_frozen", "bias_frozen"])
def test_a_batchnorms_frozen_affine_requiring_grad_is_refused(name, folded):
    # it would never train (the frozen channels' map is applied detached): not silently
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(2))
    model(torch.randn(1, 3, 5, 5))
    big = xf.expand(model.eval(), width=0.5, fuse=folded).train()
    assert big[1].frozen_folded == folded
    getattr(big[1], name).requires_grad_(True)
    with pytest.raises(ValueError, match=r"requires grad.*train xf.merge\(model\)"):
        big(torch.randn(2, 3, 5, 5))


def test_functional_forms_check_blocks():
    w_f, w_n = torch.randn(4, 3), torch.randn(5, 5)
    with pytest.raises(ValueError) as err:
        xf.ops.expanded_linear(torch.randn(2, 5), w_f, None, w_n, None,
                               frozen_out_groups=(3,), frozen_k_ends=(3,))
    _names_all(str(err.value), "(3,)", "4 rows")
    with pytest.raises(ValueError, match="one k_end per frozen group"):
        xf.ops.expanded_linear(torch.randn(2, 5), w_f, None, w_n, None,
                               frozen_out_groups=(4,), frozen_k_ends=(3, 5))
    with pytest.raises(ValueError) as err:
        xf.ops.expanded_linear(torch.randn(2, 6), w_f, None, w_n, None,
                               frozen_out_groups=(4,), frozen_k_ends=(3,))
    _names_all(str(err.value), "5 features", "(2, 6)")


LIN = dict(frozen_out_groups=(4,), frozen_k_ends=(3,))


@pytest.mark.parametrize("case,match", [
    ("b_frozen", r"b_frozen must have shape \(4,\) \(one per row of w_frozen\), got \(2,\)"),
    ("b_new", r"b_new must have shape \(5,\) \(one per row of w_new\), got \(4,\)"),
    ("k_end", r"frozen_k_ends \(7,\) must lie in 0..3"),
    ("w_couple", r"w_couple must have shape \(4, 2\) .* got \(4, 1\)"),
    ("w_rank", r"w_new must be 2-D, got shape \(5, 5, 1\)"),
    ("w_new_1d", r"w_new must be 2-D, got shape \(5,\)"),
    ("w_frozen_wider", r"w_frozen reads 6 inputs but w_new only 5"),
])
def test_functional_linear_checks_blocks_against_each_other(case, match):
    """What would otherwise reach aten as an error about its own tensors, named here."""
    x, w_f, w_n = torch.randn(2, 5), torch.randn(4, 3), torch.randn(5, 5)
    args = dict(b_frozen=None, b_new=None, w_couple=None, **LIN)
    if case == "b_frozen":
        args["b_frozen"] = torch.randn(2)
    elif case == "b_new":
        args["b_new"] = torch.randn(4)
    elif case == "k_end":
        args["frozen_k_ends"] = (7,)
    elif case == "w_couple":
        args["w_couple"] = torch.randn(4, 1)
    elif case == "w_new_1d":
        w_n = w_n[0]
    elif case == "w_frozen_wider":
        w_f, args["frozen_k_ends"] = torch.randn(4, 6), (6,)
    else:
        w_n = w_n[..., None]
    with pytest.raises(ValueError, match=match):
        xf.ops.expanded_linear(x, w_f, args.pop("b_frozen"), w_n, args.pop("b_new"),
                               args.pop("w_couple"), **args)


@pytest.mark.parametrize("blocks,match", [
    (dict(w_n=(2,)), r"w_new must be 4-D, got shape \(2,\)"),
    (dict(w_f=(4, 6, 3, 3)), r"w_frozen reads 6 inputs but w_new only 5"),
    (dict(depthwise=True, w_f=(4, 1, 3, 3), w_n=(2, 1, 3, 3), k_end=5),
     r"depthwise conv's 4 frozen filters must be a whole multiple of its frozen channels "
     r"\(frozen_k_ends\[-1\] = 5\)"),
    (dict(depthwise=True, w_f=(4, 2, 3, 3), w_n=(2, 1, 3, 3), k_end=4),
     r"depthwise w_frozen reads one channel a filter \(rows, 1, kh, kw\), got shape "
     r"\(4, 2, 3, 3\)"),
])
def test_functional_conv_checks_blocks_before_reading_them(blocks, match):
    """Blocks of the wrong rank or width are named, not met as an IndexError, a division
    by zero or aten's error about its own tensors."""
    w_f = torch.randn(*blocks.get("w_f", (4, 3, 3, 3)))
    w_n = torch.randn(*blocks.get("w_n", (2, 5, 3, 3)))
    with pytest.raises(ValueError, match=match):
        xf.ops.expanded_conv2d(torch.randn(1, 5, 6, 6), w_f, None, w_n, None,
                               frozen_out_groups=(4,),
                               frozen_k_ends=(blocks.get("k_end", 3),),
                               depthwise=blocks.get("depthwise", False))


@pytest.mark.parametrize("name", ["stride", "padding", "dilation"])
def test_functional_conv_takes_one_element_geometry_as_f_conv2d(name):
    torch.manual_seed(0)
    x, w_f, w_n = torch.randn(2, 5, 9, 9), torch.randn(4, 3, 3, 3), torch.randn(2, 5, 3, 3)
    one = xf.ops.expanded_conv2d(x, w_f, None, w_n, None, **LIN, **{name: (2,)})
    both = xf.ops.expanded_conv2d(x, w_f, None, w_n, None, **LIN, **{name: 2})
    assert one.shape == both.shape and torch.equal(one, both)


def test_a_folded_batchnorm_in_float32_needs_a_half_input():
    """As F.batch_norm: float32 statistics with a float16/bfloat16 input, not float64."""
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    w_f, w_n = torch.randn(2, 3, 3, 3).double(), torch.randn(1, 3, 3, 3).double()
    stats = dict(bn_mean=torch.zeros(2), bn_var=torch.ones(2))
    with pytest.raises(TypeError, match=r"bn_mean is torch.float32; .* the input's dtype "
                                        r"\(torch.float64\), or float32 for a float16 or "
                                        r"bfloat16 input"):
        xf.ops.expanded_conv2d(x, w_f, None, w_n, None, frozen_out_groups=(2,),
                               frozen_k_ends=(3,), **stats)
    y = xf.ops.expanded_conv2d(x.bfloat16(), w_f.bfloat16(), None, w_n.bfloat16(), None,
                               frozen_out_groups=(2,), frozen_k_ends=(3,), **stats)
    assert y.dtype == torch.bfloat16 and y.shape == (1, 3, 3, 3)


@pytest.mark.parametrize("geometry,match", [
    (dict(stride=0), r"stride must be an int >= 1 or a pair of them, got 0"),
    (dict(dilation=(1, 0)), r"dilation must be an int >= 1 .* got \(1, 0\)"),
    (dict(padding=-1), r"padding must be an int >= 0 .* got -1"),
    (dict(padding="same"), r"padding .* got 'same' \(the op takes explicit padding; "
                           r"ExpandedConv2d resolves 'same' and 'valid'\)"),
    (dict(kernel=5), r"w_frozen and w_new must have one kernel size, got \(5, 5\) and "
                     r"\(3, 3\)"),
])
def test_functional_conv_checks_geometry_and_kernels(geometry, match):
    k = geometry.pop("kernel", 3)
    x, w_f, w_n = torch.randn(1, 5, 8, 8), torch.randn(4, 3, k, k), torch.randn(2, 5, 3, 3)
    with pytest.raises(ValueError, match=match):
        xf.ops.expanded_conv2d(x, w_f, None, w_n, None, **LIN, **geometry)


def test_set_backend_names_options():
    before = xf.get_backend()
    with pytest.raises(ValueError) as err:
        xf.set_backend("nope")
    _names_all(str(err.value), "'nope'", "auto", "torch", "triton", "cuda")
    assert xf.get_backend() == before
    with pytest.raises(ValueError):
        with xf.use_backend("TORCH"):
            pass
    assert xf.get_backend() == before
    with xf.use_backend("torch"):
        assert xf.get_backend() == "torch"
    assert xf.get_backend() == before


# ---- expand() refusals --------------------------------------------------------------------------
class Cat(nn.Module):
    def __init__(self, dim=1):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(16, 3)
        self.dim = dim

    def forward(self, x):
        return self.head(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=self.dim))


class ConvCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.cat((self.a(x), self.b(x)), 1))


class Norm(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.fc1, self.fc2, self.kind = nn.Linear(6, 8), nn.Linear(8, 3), kind
        if kind == "module":
            self.ln = nn.LayerNorm(8)
        elif kind == "module, no affine":
            self.ln = nn.LayerNorm(8, elementwise_affine=False)

    def forward(self, x):
        h = self.fc1(x)
        h = F.layer_norm(h, (8,)) if self.kind == "function" else self.ln(h)
        return self.fc2(h)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)


class WithEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.enc, self.fc2 = nn.Linear(6, 6), Encoder(), nn.Linear(6, 3)

    def forward(self, x, tokens):
        return self.fc2(F.relu(self.fc1(x)) + self.enc.emb(tokens))


class Gain(nn.Module):
    """A custom layer with a parameter of its own: fx traces into it (a get_attr node)."""

    def __init__(self, n):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.gain


class WithGain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.post, self.fc2 = nn.Linear(6, 8), Gain(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.post(self.fc1(x)))


class HardView(nn.Module):
    """The classic MNIST net's x.view(-1, 320)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 20, 5)
        self.fc = nn.Linear(320, 10)

    def forward(self, x):
        return self.fc(self.conv(x).view(-1, 320))


class Softmax(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.fc1, self.head, self.how = nn.Linear(6, 8), nn.Linear(8, 4), how

    def forward(self, x):
        y = self.head(F.relu(self.fc1(x)))
        if self.how == "function":
            return F.softmax(y, dim=-1)
        if self.how == "method":
            return y.softmax(1)
        return torch.log_softmax(y, 1)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.relu(self.a(x) + self.b(x)))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


class PooledFeatures(nn.Module):
    """A pool, pad or resize after a Linear: it works along the features."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.fc1 = nn.Linear(6, 8)
        self.post = {"adaptive pool module": nn.AdaptiveAvgPool1d(8),
                     "pad module": nn.ZeroPad2d((1, 0, 0, 0))}.get(how, nn.Identity())
        self.fc2 = nn.Linear(9 if how == "pad module" else 8, 3)

    def forward(self, x):
        h = self.post(self.fc1(x))
        if self.how == "pool function":
            h = F.max_pool1d(h, 1)  # (N, F) read as one unbatched map: pools the features
        return self.fc2(h)


# (model factory, expand kwargs, regexes the message must match)
REFUSALS = {
    "cat dim 1": (Cat, {}, [r"node 'cat'", r"concatenat"]),
    "cat dim -1": (lambda: Cat(-1), {}, [r"node 'cat'"]),
    "conv channel cat": (ConvCat, {}, [r"node 'cat'"]),
    "layernorm module": (lambda: Norm("module"), {}, [r"'ln'", r"LayerNorm"]),
    "layernorm no affine": (lambda: Norm("module, no affine"), {}, [r"'ln'", r"LayerNorm"]),
    "layer_norm function": (lambda: Norm("function"), {}, [r"node 'layer_norm'"]),
    "embedding": (WithEmbedding, {}, [r"'enc\.emb'", r"Embedding"]),
    "parameter via get_attr": (WithGain, {}, [r"post\.gain"]),
    "hard-coded view": (HardView, {}, [r"node 'view'", r"320"]),
    "softmax function": (lambda: Softmax("function"), {"new_classes": 2}, [r"node 'softmax'"]),
    "softmax method": (lambda: Softmax("method"), {"new_classes": 2}, [r"node 'softmax'"]),
    "log_softmax": (lambda: Softmax("log"), {"new_classes": 2}, [r"node 'log_softmax'"]),
    "residual 3 vs 5": (Residual, {"width": {"a": 3, "b": 5}},
                        [r"node 'add'", r"\+3 new", r"\+5 new"]),
    "residual 3 vs 0": (Residual, {"width": {"a": 3}}, [r"node 'add'", r"\+3 new", r"\+0 new"]),
    "grouped conv": (Grouped, {}, [r"'body\.1'", r"groups=2"]),
    "adaptive pool over features": (lambda: PooledFeatures("adaptive pool module"), {},
                                    [r"call_module post", r"AdaptiveAvgPool1d", r"features"]),
    "pad over features": (lambda: PooledFeatures("pad module"), {},
                          [r"call_module post", r"ZeroPad2d", r"features"]),
    "pool function over features": (lambda: PooledFeatures("pool function"), {},
                                    [r"node 'max_pool1d'", r"features"]),
    "unknown width name": (Residual, {"width": {"a": 3, "b": 3, "nope": 1}}, [r"nope"]),
}


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_expand_refuses_and_leaves_model_untouched(case):
    make, kwargs, patterns = REFUSALS[case]
    model = make()
    before = _state(model)
    with pytest.raises(ExpansionError) as err:
        xf.expand(model, **kwargs)
    msg = str(err.value)
    for pat in patterns:
        assert re.search(pat, msg), f"{pat!r} not in: {msg}"
    after = _state(model)
    assert after[1:] == before[1:]
    assert list(after[0]) == list(before[0])
    for k, v in before[0].items():
        assert torch.equal(after[0][k], v), k


class SlicedHead(nn.Module):
    """Logits sliced to the source task's classes: y[:, :3]."""

    def __init__(self):
        super().__init__()
        self.fc1, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.relu(self.fc1(x)))[:, :3]


class SlicedHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x))[..., :8])


@pytest.mark.parametrize("make", [SlicedHead, SlicedHidden], ids=lambda m: m.__name__)
def test_expand_refuses_feature_slice(make):
    model = make()
    before = _state(model)
    with pytest.raises(ExpansionError, match=r"node 'getitem'"):
        xf.expand(model, width=2, new_classes=2)
    assert _state(model)[1:] == before[1:]


def test_batch_slices_of_widened_tensors_are_fine():
    class BatchSlice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(F.relu(self.fc1(x))[1:])

    model = BatchSlice()
    big = xf.expand(model, width=2, new_classes=2)
    x = torch.randn(4, 6)
    with torch.no_grad():
        y = big(x)
        assert y.shape == (3, 5)
        torch.testing.assert_close(y[:, :3], model(x), rtol=1e-6, atol=1e-6)


def _widens_exactly(model):
    """expand(model) by 2 units a layer, its outputs on a (2, 1, 4, 4) batch the model's."""
    big = xf.expand(model, width=2, new_classes=0)
    x = torch.randn(2, 1, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(big(x), model(x), rtol=1e-6, atol=1e-6)
    return big


def test_near_misses_are_accepted():
    """The refusals are specific: the allowed neighbours of each refused pattern widen."""
    # batch concat, flatten-style view, softmax over an unwidened head, equal-width residual
    class Ok(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.a, self.b, self.head = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = self.conv(x)
            h = torch.cat([h, h], dim=0).view(h.size(0) * 2, -1)
            return F.softmax(self.head(F.relu(self.a(h) + self.b(h))), dim=-1)

    big = _widens_exactly(Ok())
    assert big.a.out_groups == (8, 2) and big.head.out_groups == (3, 0)

    # pooling, padding and resizing a conv map (its trailing dimensions are pixels)
    class PooledMap(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.spatial = nn.Sequential(nn.ZeroPad2d(1), nn.MaxPool2d(2),
                                         nn.Upsample(scale_factor=2))
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = F.adaptive_avg_pool2d(F.avg_pool2d(self.spatial(self.conv(x)), 2), 1)
            return self.head(h.flatten(1))

    big = _widens_exactly(PooledMap())
    assert big.conv.out_groups == (4, 2) and big.head.in_groups == (4, 2)


def test_grouped_conv_layer_refused():
    with pytest.raises(ValueError) as err:
        xf.ExpandedConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), new_in=2, new_out=2)
    _names_all(str(err.value), "groups=2", "4 input channels")


def test_expand_argument_errors():
    model = Residual()
    with pytest.raises(ValueError, match=r"mode must be .*'sideways'"):
        xf.expand(model, mode="sideways")
    with pytest.raises(ValueError, match=r"new_classes must be >= 0, got -1"):
        xf.expand(model, new_classes=-1)
    with pytest.raises(TypeError, match=r"width must be"):
        xf.expand(model, width="wide")
    # a negative or fractional count of units is refused, never rounded or clipped to zero
    with pytest.raises(ValueError, match=r"width must be >= 0, got -1"):
        xf.expand(model, width=-1)
    with pytest.raises(ValueError, match=r"width must be a finite fraction >= 0, got nan"):
        xf.expand(model, width=float("nan"))
    with pytest.raises(ValueError, match=r"width\['a'\] must be >= 0, got -2"):
        xf.expand(model, width={"a": -2})
    with pytest.raises(TypeError, match=r"width\['a'\] must be an int, got float 1.5"):
        xf.expand(model, width={"a": 1.5})
    with pytest.raises(TypeError, match=r"new_classes must be an int, got float 2.5"):
        xf.expand(model, new_classes=2.5)
    with pytest.raises(ExpansionError, match=r"head='a\.weight'"):
        xf.expand(model, head="a.weight")


class LogProbs(nn.Module):
    """The classic MNIST example: the model returns log-probabilities for nll_loss."""

    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return F.log_softmax(self.out(F.relu(self.hidden(x))), dim=1)


def test_softmax_over_the_head_names_the_way_out():
    model = LogProbs().eval()
    with pytest.raises(ExpansionError) as err:
        xf.expand(model, width=0.5, new_classes=2)
    _names_all(str(err.value), "'log_softmax'", "head 'out'", "F.cross_entropy",
               "new_classes=0")
    big = xf.expand(model, width=0.5, new_classes=0)  # the way out it names
    x = torch.randn(5, 6)
    assert torch.equal(big(x), model(x))


# ---- layers that compute their own way, lazy layers ------------------------------------------
class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 10 * super().forward(x)


class OwnConvForward(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight.abs(), bias)


class ScaledBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return 2 * super().forward(x)


class QuantizableLinear(nn.Linear):  # a subclass that computes as nn.Linear does
    pass


def _qat_linear():
    torch.backends.quantized.engine = torch.backends.quantized.supported_engines[-1]
    q = torch.ao.quantization.get_default_qat_qconfig()
    return torch.ao.nn.qat.Linear(6, 4, qconfig=q)


@pytest.mark.parametrize("make, widen, overridden", [
    (lambda: ScaledLinear(6, 4), lambda m: xf.ExpandedLinear.from_linear(m, 0, 2),
     "ScaledLinear overrides Linear.forward"),
    (_qat_linear, lambda m: xf.ExpandedLinear.from_linear(m, 0, 2),
     "qat.modules.linear.Linear overrides Linear.forward"),
    (lambda: OwnConvForward(3, 4, 3), lambda m: xf.ExpandedConv2d.from_conv(m, 0, 2),
     "OwnConvForward overrides Conv2d._conv_forward"),
    (lambda: ScaledBatchNorm(4), lambda m: xf.ExpandedBatchNorm2d.from_bn(m, 2),
     "ScaledBatchNorm overrides _BatchNorm.forward"),
], ids=["subclass", "qat", "conv", "batchnorm"])
def test_layers_that_compute_their_own_way_are_refused(make, widen, overridden):
    """A widened layer computes the plain layer's product: what a subclass adds (a scale, a
    fake-quantized weight) would be dropped and the old outputs changed without a word."""
    with pytest.raises(TypeError) as err:
        widen(make())
    _names_all(str(err.value), overridden, "old outputs", "plain")


def test_a_subclass_that_computes_as_the_plain_layer_is_widened():
    lin = QuantizableLinear(6, 4)
    big = xf.ExpandedLinear.from_linear(lin, 0, 2)
    x = torch.randn(3, 6)
    assert torch.equal(big(x)[:, :4], lin(x))


def test_expand_names_a_subclassed_layer_and_leaves_the_model():
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), ScaledLinear(6, 3))
    before = _state(model)
    with pytest.raises(ExpansionError) as err:
        xf.expand(model, width=2, new_classes=1)
    _names_all(str(err.value), "module '2'", "ScaledLinear overrides Linear.forward")
    assert all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("make, widen", [
    (lambda: nn.LazyLinear(4), lambda m: xf.ExpandedLinear.from_linear(m, 0, 2)),
    (lambda: nn.LazyConv2d(4, 3), lambda m: xf.ExpandedConv2d.from_conv(m, 0, 2)),
    (lambda: nn.LazyBatchNorm2d(), lambda m: xf.ExpandedBatchNorm2d.from_bn(m, 2)),
], ids=["linear", "conv", "batchnorm"])
def test_uninitialised_lazy_layers_are_named(make, widen):
    with pytest.raises(TypeError, match=r"not initialised yet .*run one forward pass"):
        widen(make())


def test_expand_names_an_uninitialised_lazy_layer():
    model = nn.Sequential(nn.LazyLinear(6), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(ExpansionError, match=r"module '0': LazyLinear is not initialised yet"):
        xf.expand(model, width=2)
    model(torch.randn(2, 5))  # initialised: an nn.Linear now, widened as any other
    big = xf.expand(model, width=2)
    x = torch.randn(4, 5)
    assert torch.equal(big(x)[:, :3], model(x))


@pytest.mark.parametrize("model, pattern", [
    (nn.Linear(8, 3), r"for a lone Linear use xf\.ExpandedLinear\.from_linear"),
    (nn.Conv2d(3, 4, 3), r"for a lone Conv2d use xf\.ExpandedConv2d\.from_conv"),
    (None, r"expand\(\) widens an nn\.Module, got NoneType"),
    (lambda x: x, r"expand\(\) widens an nn\.Module, got function"),
], ids=["linear", "conv", "none", "function"])
def test_expand_of_what_is_no_model_names_the_way(model, pattern):
    with pytest.raises(TypeError, match=pattern):
        xf.expand(model, width=2)


def test_expand_takes_numpy_fractions_and_refuses_a_non_bool_fuse():
    np = pytest.importorskip("numpy")
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    assert xf.expand(model, width=np.float32(0.25))[0].out_groups == (8, 2)
    with pytest.raises(TypeError, match=r"fuse must be True or False, got str 'no'"):
        xf.expand(model, fuse="no")


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x, scale=1.0):
        return self.fc2(torch.relu(self.fc1(x)) * scale)


def test_a_python_number_argument_broadcasts_with_example_inputs():
    """A number the forward takes beside the tensor: with example_inputs it is known to be a
    scalar (it broadcasts over the features); without, the refusal says to pass them."""
    model = Scaled().eval()
    with pytest.raises(ExpansionError, match=r"'scale', of unknown shape.*pass example_inputs"):
        xf.expand(model, width=2)
    x = torch.randn(4, 6)
    big = xf.expand(model, width=2, example_inputs=(x, 2.0))
    assert torch.equal(big(x, 3.0)[:, :3], model(x, 3.0))


def test_bad_example_inputs_log_nothing_before_the_error(capfd):
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(ExpansionError, match=r"example_inputs: running the model on them "
                                             r"failed at node"):
        xf.expand(model, width=2, example_inputs=torch.randn(1, 7))
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("kwargs, pattern", [
    ({"kernel_size": 2.5}, r"kernel_size must be an int >= 1 or a pair of them, got 2\.5"),
    ({"kernel_size": (2.7, 3)}, r"kernel_size must be .* got \(2\.7, 3\)"),
    ({"kernel_size": 3, "stride": (1.9, 1)}, r"stride must be .* got \(1\.9, 1\)"),
    ({"kernel_size": 3, "dilation": 0}, r"dilation must be an int >= 1"),
    ({"kernel_size": 3, "padding": -1}, r"padding must be an int >= 0"),
    ({"kernel_size": 3, "padding": "full"}, r"padding must be 'same', 'valid'"),
    ({"kernel_size": (3, 3, 3)}, r"kernel_size must be"),
    ({"kernel_size": True}, r"kernel_size must be"),
    ({"kernel_size": 3, "padding": "same", "stride": 2}, r"padding='same' needs stride 1"),
], ids=lambda v: str(v) if isinstance(v, dict) else None)
def test_conv_constructor_refuses_what_is_no_geometry(kwargs, pattern):
    """Floats were truncated (a kernel of 2.7 became 2) and 'same' failed in int()."""
    with pytest.raises(ValueError, match=pattern):
        xf.ExpandedConv2d((4, 2), (3, 2), **kwargs)


def test_conv_constructor_resolves_same_and_valid_as_nn_conv2d():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 7, 9)
    for padding in ("same", "valid"):
        layer = xf.ExpandedConv2d((4, 2), (3, 2), kernel_size=(3, 5), padding=padding,
                                  dilation=(2, 1))
        plain = nn.Conv2d(6, 5, (3, 5), padding=padding, dilation=(2, 1))
        assert layer(x).shape == plain(x).shape
