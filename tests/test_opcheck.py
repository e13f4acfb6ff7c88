"""The torch.library registry: ``opcheck`` (schema, autograd registration, fake tensors,
AOT dispatch with dynamic shapes) on every custom op with realistic arguments, each op's
values against a float64 dense staircase, and torch.compile(fullgraph=True) of an expanded
model against eager."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import expanse_fast as xf
from expanse_fast.layout import Layout
from reference import SMOOTH_ACTIVATIONS

OPS = torch.ops.expanse_fast
UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
         "test_aot_dispatch_dynamic")  # opcheck's default
STATIC_UTILS = UTILS[:3] + ("test_aot_dispatch_static",)


@pytest.fixture(scope="module", autouse=True)
def _torch_backend_one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; avoids OpenMP spinning on a busy machine
    with xf.use_backend("torch"):
        yield
    torch.set_num_threads(n)


# ---- arguments ----------------------------------------------------------------------------------
def _blocks(lay, tail=(), bias=True, depthwise=False, grad=True, dtype=torch.float32):
    """Random blocks of one layer.  w_frozen is random everywhere, also above the staircase:
    an op that reads a block it must skip then shows up in the values."""
    per = (lambda n: 1) if depthwise else (lambda n: n)
    r = lambda *s, g=False: torch.randn(*s, dtype=dtype).requires_grad_(g and grad)  # noqa
    w_f = r(lay.frozen_out, per(lay.frozen_in), *tail)
    b_f = r(lay.frozen_out) if bias else None
    w_n = r(lay.new_out, per(lay.in_features), *tail, g=True)
    b_n = r(lay.new_out, g=True) if bias else None
    w_c = r(lay.frozen_out, lay.new_in, *tail, g=True) if lay.mode == "coupled" else None
    return w_f, b_f, w_n, b_n, w_c


def _dense(lay, w_f, b_f, w_n, b_n, w_c, depthwise=False):
    """The full staircase weight and bias (float64), differentiable in the trainable blocks."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    w_f, b_f, w_n, b_n, w_c = map(d, (w_f, b_f, w_n, b_n, w_c))
    bias = None if b_n is None else torch.cat([b_f.detach(), b_n])
    if depthwise:
        return torch.cat([w_f.detach(), w_n]), bias
    rows, start = [], 0
    for rows_g, k_end in zip(lay.frozen_out_groups, lay.frozen_k_ends):
        w = w_f[start:start + rows_g].detach().clone()
        w[:, k_end:] = 0  # the staircase: group g reads inputs 0..g only
        if w_c is not None:
            w = torch.cat([w, w_c[start:start + rows_g]], dim=1)
        else:
            w = F.pad(w, (0, 0) * (w.dim() - 2) + (0, lay.new_in))
        rows.append(w)
        start += rows_g
    return torch.cat(rows + [w_n]), bias


def _linear_case(ins, outs, mode, bias, n=5):
    lay = Layout(ins, outs, mode)
    x = torch.randn(n, lay.in_features, requires_grad=True)
    return lay, x, _blocks(lay, bias=bias)


def _conv_case(ins, outs, mode, bias, depthwise=False, hw=(7, 6)):
    lay = Layout(ins, outs, mode)
    x = torch.randn(3, lay.in_features, *hw, requires_grad=True)
    return lay, x, _blocks(lay, (3, 3), bias=bias, depthwise=depthwise)


# (in_groups, out_groups, mode, bias, need_dx_old)
LINEAR = [
    ((5, 3), (7, 2), "isolated", True, True),
    ((5, 3), (7, 2), "isolated", False, False),
    ((4, 0), (6, 3), "isolated", True, False),  # a first layer: data never widens
    ((5, 3, 2), (7, 2, 3), "isolated", True, False),
    ((5, 3, 2), (7, 2, 3), "coupled", False, True),
    ((5, 3, 2), (7, 2, 3), "coupled", True, False),
]
# (in_groups, out_groups, mode, bias, depthwise, stride, padding, dilation, need_dx_old);
# opcheck's dynamic-shape AOT test of a conv costs seconds: it runs on CONV[2] and CONV[3].
CONV = [
    ((3, 2), (4, 3), "isolated", True, False, [1, 1], [1, 1], [1, 1], True),
    ((3, 2, 1), (4, 3, 2), "isolated", False, False, [2, 1], [1, 0], [1, 1], False),
    ((3, 2, 1), (4, 3, 2), "coupled", True, False, [1, 2], [0, 1], [2, 1], True),
    ((3, 2, 1), (6, 4, 2), "isolated", True, True, [1, 1], [1, 1], [1, 1], True),  # depthwise x2
    ((3, 2, 1), (3, 2, 1), "isolated", False, True, [2, 2], [1, 1], [1, 1], False),
]


def _need_flags():
    # (need_dx_new, need_dx_old, need_dw, need_db, need_dcouple)
    return [(True, True, True, True, True), (True, False, True, False, True),
            (False, False, True, True, False)]


# ---- forward ops --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", LINEAR, ids=str)
def test_opcheck_linear(case):
    ins, outs, mode, bias, need_dx_old = case
    lay, x, (w_f, b_f, w_n, b_n, w_c) = _linear_case(ins, outs, mode, bias)
    args = (x, w_f, b_f, w_n, b_n, w_c, list(lay.frozen_out_groups), list(lay.frozen_k_ends),
            need_dx_old)
    torch.library.opcheck(OPS.linear, args)
    # the values: forward and every trainable gradient against the float64 staircase
    y, pre = OPS.linear(*args)
    assert pre.shape == (x.shape[0], 0)  # kept only for GELU / SiLU
    w, b = _dense(lay, w_f, b_f, w_n, b_n, w_c)
    y_ref = F.linear(x.double(), w, b)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    _check_grads(y, y_ref, dy, lay, x, w_n, b_n, w_c, need_dx_old)


def _check_grads(y, y_ref, dy, lay, x, w_n, b_n, w_c, need_dx_old):
    inputs = [t for t in (x, w_n, b_n, w_c) if t is not None]
    got = torch.autograd.grad(y, inputs, dy)
    want = torch.autograd.grad(y_ref, inputs, dy.double())
    if not need_dx_old:  # the old input columns are not computed (zeros)
        assert torch.count_nonzero(got[0][:, :lay.frozen_in]) == 0
        got, want = (got[0][:, lay.frozen_in:],) + got[1:], (want[0][:, lay.frozen_in:],) + want[1:]
    for g, r in zip(got, want):
        assert g.shape == r.shape
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-5, atol=1e-4)


def test_opcheck_linear_zero_rows():
    lay, x, (w_f, b_f, w_n, b_n, w_c) = _linear_case((5, 3, 2), (7, 2, 3), "coupled", True, n=0)
    args = (x, w_f, b_f, w_n, b_n, w_c, list(lay.frozen_out_groups), list(lay.frozen_k_ends),
            True)
    torch.library.opcheck(OPS.linear, args)
    y, pre = OPS.linear(*args)
    assert pre.shape == (x.shape[0], 0)  # kept only for GELU / SiLU
    assert y.shape == (0, 12)
    y.sum().backward()
    assert torch.count_nonzero(w_n.grad) == 0 and w_n.grad.shape == w_n.shape


def _conv_args(case):
    ins, outs, mode, bias, depthwise, stride, padding, dilation, need_dx_old = case
    lay, x, (w_f, b_f, w_n, b_n, w_c) = _conv_case(ins, outs, mode, bias, depthwise)
    args = (x, w_f, b_f, w_n, b_n, w_c, list(lay.frozen_out_groups), list(lay.frozen_k_ends),
            stride, padding, dilation, depthwise, need_dx_old)
    return lay, args


@pytest.mark.parametrize("case", CONV, ids=str)
def test_opcheck_conv2d(case):
    lay, args = _conv_args(case)
    x, w_f, b_f, w_n, b_n, w_c = args[:6]
    stride, padding, dilation, depthwise, need_dx_old = args[8:]
    dynamic = case in (CONV[2], CONV[3])
    torch.library.opcheck(OPS.conv2d, args, test_utils=UTILS if dynamic else STATIC_UTILS)
    y = OPS.conv2d(*args)
    w, b = _dense(lay, w_f, b_f, w_n, b_n, w_c, depthwise)
    y_ref = F.conv2d(x.double(), w, b, stride, padding, dilation,
                     groups=lay.in_features if depthwise else 1)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    _check_grads(y, y_ref, torch.randn_like(y), lay, x, w_n, b_n, w_c, need_dx_old)


# ---- backward ops -------------------------------------------------------------------------------
def _check_backward_outputs(outs, lay, flags, x, w_n, w_c, ref):
    """outs = (dx, dw_new, db_new, dcouple) of a backward op; ref = the float64 gradients
    (dx, dw_new, db_new, dcouple) of the dense staircase."""
    need_dx_new, need_dx_old, need_dw, need_db, need_dc = flags
    wanted = [need_dx_new or need_dx_old, need_dw, need_db, need_dc and w_c is not None]
    for name, got, want, needed in zip(("dx", "dw", "db", "dcouple"), outs, ref, wanted):
        if not needed:
            assert got.shape == (0,), name  # an unneeded gradient travels as an empty tensor
            continue
        if name == "dx" and not need_dx_old:
            assert torch.count_nonzero(got[:, :lay.frozen_in]) == 0
            got, want = got[:, lay.frozen_in:], want[:, lay.frozen_in:]
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-4,
                                   msg=name)


def _ref_grads(y_ref, dy, x, w_n, b_n, w_c):
    leaves = [x, w_n, b_n, w_c]
    live = [t for t in leaves if t is not None]
    g = iter(torch.autograd.grad(y_ref, live, dy.double()))
    return [next(g) if t is not None else None for t in leaves]


def _linear_backward_args(case, flags):
    ins, outs, mode, _, _ = case
    lay, x, (w_f, b_f, w_n, b_n, w_c) = _linear_case(ins, outs, mode, True)
    w, b = _dense(lay, w_f, b_f, w_n, b_n, w_c)
    y_ref = F.linear(x.double(), w, b)
    dy = torch.randn(y_ref.shape)
    ref = _ref_grads(y_ref, dy, x, w_n, b_n, w_c)
    plain = [t.detach() if t is not None else None for t in (x, w_f, w_n, w_c)]
    args = (dy, *plain, list(lay.frozen_out_groups), list(lay.frozen_k_ends), *flags)
    return args, (lay, flags, x, w_n, w_c, ref)


def _conv_backward_args(case, flags):
    lay, args = _conv_args(case)
    x, w_f, b_f, w_n, b_n, w_c = args[:6]
    stride, padding, dilation, depthwise, _ = args[8:]
    assert b_n is not None or not flags[3], "db of a layer without bias"
    w, b = _dense(lay, w_f, b_f, w_n, b_n, w_c, depthwise)
    y_ref = F.conv2d(x.double(), w, b, stride, padding, dilation,
                     groups=lay.in_features if depthwise else 1)
    dy = torch.randn(y_ref.shape)
    ref = _ref_grads(y_ref, dy, x, w_n, b_n, w_c)
    plain = [t.detach() if t is not None else None for t in (x, w_f, w_n, w_c)]
    bargs = (dy, *plain, list(lay.frozen_out_groups), list(lay.frozen_k_ends), stride, padding,
             dilation, depthwise, *flags)
    return bargs, (lay, flags, x, w_n, w_c, ref)


# (need_dx_new, need_dx_old, need_dw, need_db, need_dcouple)
ALL_GRADS = (True, True, True, True, True)
SKIP_OLD = (True, False, True, True, True)  # what expand() asks of an isolated hidden layer
NO_DX = (False, False, True, True, True)    # a first layer, fed by data
NO_BIAS = (True, False, True, False, True)
FLAGS = [ALL_GRADS, SKIP_OLD, NO_DX, NO_BIAS]


@pytest.mark.parametrize("flags", FLAGS, ids=str)
@pytest.mark.parametrize("case", [LINEAR[0], LINEAR[3], LINEAR[4]], ids=str)
def test_linear_backward_values(case, flags):
    args, check = _linear_backward_args(case, flags)
    _check_backward_outputs(OPS.linear_backward(*args), *check)


@pytest.mark.parametrize("flags", FLAGS, ids=str)
@pytest.mark.parametrize("case", [CONV[0], CONV[2], CONV[3]], ids=str)
def test_conv2d_backward_values(case, flags):
    args, check = _conv_backward_args(case, flags)
    _check_backward_outputs(OPS.conv2d_backward(*args), *check)


def _cases(case_flags):
    """Cases whose op returns two or more empty (unneeded) gradients check that those
    outputs do not alias each other (opcheck's test_faketensor)."""
    return [pytest.param(case, flags, id=f"{case}-{flags}") for case, flags in case_flags]


@pytest.mark.parametrize("case, flags", _cases([
    (LINEAR[0], ALL_GRADS), (LINEAR[4], SKIP_OLD), (LINEAR[4], NO_DX), (LINEAR[3], SKIP_OLD),
    (LINEAR[3], NO_DX)]))
def test_opcheck_linear_backward(case, flags):
    args, _ = _linear_backward_args(case, flags)
    torch.library.opcheck(OPS.linear_backward, args)


@pytest.mark.parametrize("case, flags", _cases([
    (CONV[2], ALL_GRADS), (CONV[2], NO_BIAS), (CONV[3], SKIP_OLD), (CONV[4], NO_BIAS)]))
def test_opcheck_conv2d_backward(case, flags):
    args, _ = _conv_backward_args(case, flags)
    torch.library.opcheck(OPS.conv2d_backward, args)


def _channels_last(t):
    if t is None or t.dim() != 4:
        return t
    return t.detach().contiguous(memory_format=torch.channels_last).requires_grad_(
        t.requires_grad)


@pytest.mark.parametrize("case", [CONV[0], CONV[2], CONV[3]], ids=str)
def test_opcheck_conv2d_channels_last(case):
    """A model moved to channels_last: x, dy and the 4-D weights channels_last.  The fake
    implementations must promise the strides the backends return (y, dx: x's format; weight
    gradients contiguous), or a compiled graph's stride checks fail."""
    _, args = _conv_args(case)
    args = tuple(_channels_last(a) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(OPS.conv2d, args, test_utils=STATIC_UTILS)
    y = OPS.conv2d(*args)
    assert y.is_contiguous(memory_format=torch.channels_last)
    bargs, _ = _conv_backward_args(case, ALL_GRADS if case != CONV[3] else SKIP_OLD)
    bargs = tuple(_channels_last(a) if isinstance(a, torch.Tensor) else a for a in bargs)
    torch.library.opcheck(OPS.conv2d_backward, bargs, test_utils=STATIC_UTILS)
    dx = OPS.conv2d_backward(*bargs)[0]
    assert dx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled:UserWarning")
def test_compile_inductor_channels_last_conv_matches_eager():
    """torch.compile (inductor) of an expanded conv in channels_last, forward and backward:
    inductor asserts the strides the fake implementations promised."""
    import torch._inductor.config as inductor_config
    torch._dynamo.reset()
    layer = xf.ExpandedConv2d.from_conv(nn.Conv2d(6, 6, 3, padding=1), 3, 3)
    layer = layer.to(memory_format=torch.channels_last)
    layer.backend = "torch"
    x = torch.randn(2, 9, 5, 5).contiguous(memory_format=torch.channels_last)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    with inductor_config.patch(force_disable_caches=True):  # a cached graph hides a bad fake
        compiled = torch.compile(lambda t: layer(t) * 2, fullgraph=True)
        y_comp = compiled(xc)
        y_comp.square().sum().backward()
    g_comp = [p.grad.clone() for p in (layer.weight_new, layer.bias_new)]
    layer.zero_grad()
    y_eager = layer(xe) * 2
    y_eager.square().sum().backward()
    assert y_comp.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5)
    for a, p in zip(g_comp, (layer.weight_new, layer.bias_new)):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-5)


# ---- a BatchNorm folded into the conv's frozen output channels ---------------------------------
def _frozen_bn(o_f, affine=True):
    return [torch.randn(o_f), torch.rand(o_f) + 0.5,
            torch.rand(o_f) + 0.5 if affine else None, torch.randn(o_f) if affine else None,
            1e-3]


def _bn64(y, bn):
    mean, var, weight, bias, eps = (t.double().view(1, -1, 1, 1) if isinstance(t, torch.Tensor)
                                    else t for t in bn)
    o_f = mean.shape[1]
    z = (y[:, :o_f] - mean) / torch.sqrt(var + eps)
    if weight is not None:
        z = z * weight + bias
    return torch.cat([z, y[:, o_f:]], dim=1)


@pytest.mark.parametrize("case,affine", [(CONV[2], True), (CONV[3], False)], ids=str)
def test_opcheck_conv2d_folded_bn(case, affine):
    lay, args = _conv_args(case)
    x, w_f, b_f, w_n, b_n, w_c = args[:6]
    stride, padding, dilation, depthwise, need_dx_old = args[8:]
    bn = _frozen_bn(lay.frozen_out, affine)
    args = args + tuple(bn)
    torch.library.opcheck(OPS.conv2d, args, test_utils=STATIC_UTILS)
    y = OPS.conv2d(*args)
    w, b = _dense(lay, w_f, b_f, w_n, b_n, w_c, depthwise)
    y_ref = _bn64(F.conv2d(x.double(), w, b, stride, padding, dilation,
                           groups=lay.in_features if depthwise else 1), bn)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    _check_grads(y, y_ref, torch.randn_like(y), lay, x, w_n, b_n, w_c, need_dx_old)


@pytest.mark.parametrize("case, flags", _cases([(CONV[2], ALL_GRADS), (CONV[3], SKIP_OLD)]))
def test_opcheck_conv2d_backward_bn_scale(case, flags):
    args, (lay, _, x, w_n, w_c, _) = _conv_backward_args(case, flags)
    scale = torch.rand(lay.frozen_out) + 0.5
    args = args + (scale,)
    torch.library.opcheck(OPS.conv2d_backward, args)
    # the frozen columns of dy scaled by hand give the same gradients
    dy = args[0].clone()
    dy[:, :lay.frozen_out] *= scale.view(1, -1, 1, 1)
    for got, want in zip(OPS.conv2d_backward(*args), OPS.conv2d_backward(dy, *args[1:-1])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- layers with an empty newest output group (what expand() builds for width={name: n}) ------
def _train_step_matches_dense(layer, x):
    """One forward and backward of ``layer`` against its float64 dense equivalent."""
    x = x.requires_grad_(True)
    y = layer(x)
    dense = layer.to_conv().double()
    x64 = x.detach().double().requires_grad_(True)
    y_ref = dense(x64)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-4)
    o_f = layer.weight_frozen.shape[0]  # the newest rows of the dense weight are the new group
    assert layer.weight_new.grad.shape == layer.weight_new.shape
    tol = dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.weight_new.grad.double(), dense.weight.grad[o_f:], **tol)
    torch.testing.assert_close(layer.bias_new.grad.double(), dense.bias.grad[o_f:], **tol)


def test_conv_with_no_new_outputs_trains():
    # expand(model, width={"conv1": 2}) gives the next conv new inputs but no new outputs
    layer = xf.ExpandedConv2d.from_conv(nn.Conv2d(3, 4, 3), new_in=2, new_out=0)
    _train_step_matches_dense(layer, torch.randn(2, 5, 6, 6))


def test_depthwise_with_no_new_channels_trains():
    # a depthwise conv fed by an unwidened tensor (e.g. the first layer, or width={...})
    layer = xf.ExpandedConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1, groups=4), 0, 0)
    _train_step_matches_dense(layer, torch.randn(2, 4, 5, 5))


def test_conv_train_step_matches_dense():
    """The helper above, on layers that work: it can tell right from wrong."""
    _train_step_matches_dense(
        xf.ExpandedConv2d.from_conv(nn.Conv2d(3, 4, 3), new_in=2, new_out=1),
        torch.randn(2, 5, 6, 6))
    _train_step_matches_dense(
        xf.ExpandedConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1, groups=4), 1, 1),
        torch.randn(2, 5, 5, 5))


def test_linear_with_no_new_outputs_trains():
    layer = xf.ExpandedLinear.from_linear(nn.Linear(3, 4), new_in=2, new_out=0)
    x = torch.randn(2, 5, requires_grad=True)
    y = layer(x)
    ref = F.linear(x.double(), layer.dense_weight().double(), layer.dense_bias().double())
    torch.testing.assert_close(y.double(), ref)
    y.square().sum().backward()
    assert layer.weight_new.grad.shape == (0, 5) and layer.bias_new.grad.shape == (0,)


# ---- torch.compile ------------------------------------------------------------------------------
def _mlp():
    return nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 11), nn.GELU(),
                         nn.Linear(11, 5))


@pytest.mark.parametrize("mode", ["isolated", "coupled"])
def test_compile_fullgraph_matches_eager(mode):
    torch._dynamo.reset()
    base = _mlp()
    big = xf.expand(xf.expand(base, width=3, new_classes=2, mode=mode), width=2,
                    new_classes=1, mode=mode)
    with torch.no_grad():  # non-zero coupling blocks, so they take part in the values
        for p in big.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    compiled = torch.compile(big, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 7)
    y_eager = big(x)
    y_comp = compiled(x)
    params = [p for p in big.parameters() if p.requires_grad]
    assert len(params) == (9 if mode == "coupled" else 6)
    dy = torch.randn_like(y_eager)
    g_eager = torch.autograd.grad(y_eager, params, dy)
    g_comp = torch.autograd.grad(y_comp, params, dy)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # and eager against the float64 merged (dense staircase) model
    merged = xf.merge(big).double()
    y_ref = merged(x.double())
    torch.testing.assert_close(y_eager.double(), y_ref, rtol=1e-5, atol=1e-5)
    # the frozen path keeps the base model's outputs exactly (isolated layout only)
    if mode == "isolated":
        with torch.no_grad():
            torch.testing.assert_close(y_comp[:, :5], base(x), rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


# ---- the fused ReLU ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [LINEAR[0], LINEAR[3], LINEAR[5]], ids=str)
def test_opcheck_linear_fused_relu(case):
    ins, outs, mode, bias, need_dx_old = case
    lay, x, (w_f, b_f, w_n, b_n, w_c) = _linear_case(ins, outs, mode, bias)
    args = (x, w_f, b_f, w_n, b_n, w_c, list(lay.frozen_out_groups), list(lay.frozen_k_ends),
            need_dx_old, "relu")
    torch.library.opcheck(OPS.linear, args)
    y, pre = OPS.linear(*args)
    assert pre.shape == (x.shape[0], 0)  # kept only for GELU / SiLU
    w, b = _dense(lay, w_f, b_f, w_n, b_n, w_c)
    y_ref = F.relu(F.linear(x.double(), w, b))
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    _check_grads(y, y_ref, torch.randn_like(y), lay, x, w_n, b_n, w_c, need_dx_old)


@pytest.mark.parametrize("case, flags", _cases([
    (LINEAR[0], ALL_GRADS), (LINEAR[3], SKIP_OLD), (LINEAR[4], NO_DX)]))
def test_opcheck_linear_backward_fused_relu(case, flags):
    args, _ = _linear_backward_args(case, flags)
    dy, x, w_f, w_n, w_c = args[:5]
    out = torch.randn(dy.shape).clamp_min(0)  # a ReLU output: about half of it zeros
    args = args + (out, "relu")
    torch.library.opcheck(OPS.linear_backward, args)
    # masking dy by hand and running the plain backward gives the same gradients
    fused = OPS.linear_backward(*args)
    masked = OPS.linear_backward(*((dy * (out > 0),) + args[1:-2]))
    for got, want in zip(fused, masked):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)
    need_dx_new, need_dx_old = flags[:2]
    if need_dx_new and not need_dx_old:  # old input columns: zeros, as without the ReLU
        assert torch.count_nonzero(fused[0][:, :w_f.shape[1]]) == 0


# ---- GELU and SiLU: the forward keeps the pre-activation of the columns backward reads ---


@pytest.mark.parametrize("activation", list(SMOOTH_ACTIVATIONS))
@pytest.mark.parametrize("case", [LINEAR[0], LINEAR[3], LINEAR[5]], ids=str)
@pytest.mark.parametrize("columns", ["new", "all"])
def test_opcheck_linear_fused_smooth(case, activation, columns):
    ins, outs, mode, bias, need_dx_old = case
    lay, x, (w_f, b_f, w_n, b_n, w_c) = _linear_case(ins, outs, mode, bias)
    p = lay.new_out if columns == "new" else lay.out_features
    args = (x, w_f, b_f, w_n, b_n, w_c, list(lay.frozen_out_groups), list(lay.frozen_k_ends),
            need_dx_old, activation, p)
    reads_old = need_dx_old or mode == "coupled"
    consistent = columns == "all" or not reads_old
    if consistent:  # (opcheck runs backward, which would refuse the inconsistent cases)
        torch.library.opcheck(OPS.linear, args)
    y, pre = OPS.linear(*args)
    w, b = _dense(lay, w_f, b_f, w_n, b_n, w_c)
    z_ref = F.linear(x.double(), w, b)
    torch.testing.assert_close(y.double(), SMOOTH_ACTIVATIONS[activation](z_ref), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(pre.double(), z_ref[:, lay.out_features - p:], rtol=1e-5,
                               atol=1e-5)
    assert not pre.requires_grad  # a saved intermediate, not a differentiable output
    if consistent:
        _check_grads(y, SMOOTH_ACTIVATIONS[activation](z_ref), torch.randn_like(y), lay, x,
                     w_n, b_n, w_c, need_dx_old)
    else:  # the frozen columns' pre-activation is needed but was not kept: a clear error
        with pytest.raises(RuntimeError, match="saved only columns"):
            y.sum().backward()


@pytest.mark.parametrize("activation", list(SMOOTH_ACTIVATIONS))
@pytest.mark.parametrize("case, flags", _cases([
    (LINEAR[0], ALL_GRADS), (LINEAR[3], SKIP_OLD), (LINEAR[4], NO_DX)]))
def test_opcheck_linear_backward_fused_smooth(case, flags, activation):
    args, _ = _linear_backward_args(case, flags)
    dy = args[0]
    pre = torch.randn(dy.shape)
    args = args + (pre, activation)
    torch.library.opcheck(OPS.linear_backward, args)
    # the activation's gradient by hand, then the plain backward: the same gradients
    z = pre.clone().requires_grad_()
    dz = torch.autograd.grad(SMOOTH_ACTIVATIONS[activation](z), z, dy)[0]
    fused = OPS.linear_backward(*args)
    plain = OPS.linear_backward(*((dz,) + args[1:-2]))
    for got, want in zip(fused, plain):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)
