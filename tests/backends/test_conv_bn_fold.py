"""The conv2d op with a folded eval-mode BatchNorm on its frozen output channels, on every
usable backend, through the op registry and autograd, against a float64 reference of
conv-then-eval-BatchNorm; the torch backend also bit for bit against the unfused conv ->
BatchNorm; and backward reads the frozen columns of dy only where it needs them."""
import pytest
import torch
import torch.nn.functional as F

import expanse_fast as xf
from expanse_fast.backends import torch_ref
from expanse_fast.layout import Layout
from reference import backend_dtype_cases, dense64, random_blocks, rel_err

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = backend_dtype_cases(DEVICE)
BACKENDS = list(dict.fromkeys(b for b, _ in CASES))
pytestmark = [pytest.mark.gpu] if DEVICE.type == "cuda" else []
EPS = 1e-3
# cuDNN's weight and input gradients may sum in any order (atomics): bit for bit on CPU only
EXACT_GRADS = DEVICE.type == "cpu"
TOL = {torch.float32: 2e-3 if DEVICE.type == "cuda" else 1e-5, torch.float16: 2e-2,
       torch.bfloat16: 8e-2}


# (layout, kernel, stride, padding, batch, affine, depthwise multiplier or 0)
CONV = {
    "primes_3x3": (Layout((3, 2), (5, 3)), 3, 1, 1, 2, True, 0),
    "smallest_1x1_batch1": (Layout((1, 1), (1, 1)), 1, 1, 0, 1, True, 0),
    "three_groups_stride2": (Layout((5, 2, 1), (4, 3, 2)), 3, 2, 1, 2, True, 0),
    "coupled_1x1_no_affine": (Layout((3, 2), (4, 3), "coupled"), 1, 1, 0, 2, False, 0),
    # 17 frozen channels: more than one channel tile, not a multiple of any
    "data_input_17_frozen": (Layout((2, 0), (17, 3)), 3, 1, 0, 1, True, 0),
    "coupled_three_groups": (Layout((2, 2, 1), (3, 2, 2), "coupled"), 3, 1, 1, 1, True, 0),
    "depthwise_x2": (Layout((3, 2), (6, 4)), 3, 1, 1, 2, True, 2),
}


def _bn(o_f, dtype, affine, device=DEVICE):
    """A trained-looking BatchNorm of the frozen channels (frozen: no gradient)."""
    g = dict(dtype=dtype, device=device)
    mean = torch.randn(o_f, **g)
    var = torch.rand(o_f, **g) + 0.5
    weight = torch.rand(o_f, **g) + 0.5 if affine else None
    bias = torch.randn(o_f, **g) if affine else None
    return dict(bn_mean=mean, bn_var=var, bn_weight=weight, bn_bias=bias, bn_eps=EPS)


def _blocks(lay, k, dtype, mult):
    if not mult:
        return random_blocks(lay, tail=(k, k), dtype=dtype, device=DEVICE)
    g = dict(dtype=dtype, device=DEVICE)
    return (torch.randn(lay.frozen_out, 1, k, k, **g), torch.randn(lay.frozen_out, **g),
            torch.randn(lay.new_out, 1, k, k, **g), torch.randn(lay.new_out, **g), None)


def _dense(lay, w_f, w_n, w_c, mult):
    if mult:
        return torch.cat([w_f, w_n]).detach().double().cpu()
    return dense64(lay, w_f, w_n, w_c)


def _bn64(y, o_f, bn):
    """float64 eval-mode BatchNorm of the first o_f channels of y."""
    d = lambda t: t.double().cpu().view(1, -1, 1, 1)  # noqa: E731
    z = (y[:, :o_f] - d(bn["bn_mean"])) / torch.sqrt(d(bn["bn_var"]) + EPS)
    if bn["bn_weight"] is not None:
        z = z * d(bn["bn_weight"]) + d(bn["bn_bias"])
    return torch.cat([z, y[:, o_f:]], dim=1)


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("name", list(CONV))
@pytest.mark.parametrize("need_dx_old", [True, False])
def test_folded_conv_matches_float64(backend, dtype, name, need_dx_old):
    lay, k, stride, padding, batch, affine, mult = CONV[name]
    w_f, b_f, w_n, b_n, w_c = _blocks(lay, k, dtype, mult)
    bn = _bn(lay.frozen_out, dtype, affine)
    x = torch.randn(batch, lay.in_features, 7, 6, dtype=dtype, device=DEVICE,
                    requires_grad=True)
    trainable = [t.requires_grad_() for t in (w_n, b_n, w_c) if t is not None]
    with xf.use_backend(backend):
        y = xf.ops.expanded_conv2d(x, w_f, b_f, w_n, b_n, w_c,
                                   frozen_out_groups=lay.frozen_out_groups,
                                   frozen_k_ends=lay.frozen_k_ends, stride=stride,
                                   padding=padding, depthwise=bool(mult),
                                   need_dx_old=need_dx_old, **bn)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [x] + trainable, dy)
    x64 = x.detach().double().cpu().requires_grad_()
    W = _dense(lay, w_f, w_n, w_c, mult).requires_grad_()
    b = torch.cat([b_f, b_n]).detach().double().cpu()
    ref = _bn64(F.conv2d(x64, W, b, stride, padding, groups=lay.in_features if mult else 1),
                lay.frozen_out, bn)
    ref_dx, ref_dW = torch.autograd.grad(ref, [x64, W], dy.double().cpu())
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == ref.shape
    assert rel_err(y, ref) < tol
    if not need_dx_old:
        ref_dx[:, : (lay.in_groups[0] if mult else lay.frozen_in)] = 0  # not formed: zeros
    assert rel_err(grads[0], ref_dx) < tol
    assert rel_err(grads[1], ref_dW[lay.frozen_out:]) < tol
    ref_db = dy.double().cpu().sum((0, 2, 3))[lay.frozen_out:]
    assert rel_err(grads[2], ref_db) < tol
    if w_c is not None:
        assert rel_err(grads[3], ref_dW[: lay.frozen_out, lay.frozen_in:]) < tol


# ---- the torch backend keeps the unfused conv -> BatchNorm's bits ----------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["primes_3x3", "three_groups_stride2", "coupled_1x1_no_affine",
                                  "data_input_17_frozen", "depthwise_x2"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("joint", [True, False], ids=["joint_allowed", "apart"])
def test_torch_backend_frozen_channels_bit_identical_to_unfused(dtype, name, channels_last, joint,
                                                                monkeypatch):
    """``apart``: every frozen block and the newest rows convolved apart, as on a GPU (where
    the joint convolution's bit check cannot run); a single frozen block then takes its
    BatchNorm alone, before the concatenation."""
    if not joint:
        monkeypatch.setattr(torch_ref, "_joint_rows", lambda *a, **k: None)
    lay, k, stride, padding, batch, affine, mult = CONV[name]
    w_f, b_f, w_n, b_n, w_c = _blocks(lay, k, dtype, mult)
    bn = _bn(lay.frozen_out, dtype, affine)
    x = torch.randn(3, lay.in_features, 9, 5, dtype=dtype, device=DEVICE)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    for t in (w_n, b_n, w_c):
        if t is not None:
            t.requires_grad_()
    geo = dict(frozen_out_groups=lay.frozen_out_groups, frozen_k_ends=lay.frozen_k_ends,
               stride=stride, padding=padding, depthwise=bool(mult), need_dx_old=True,
               backend="torch")
    folded = xf.ops.expanded_conv2d(x, w_f, b_f, w_n, b_n, w_c, **geo, **bn)
    raw = xf.ops.expanded_conv2d(x, w_f, b_f, w_n, b_n, w_c, **geo)
    # What the unfused ExpandedBatchNorm2d computes for its frozen channels: one eval-mode
    # F.batch_norm over the conv's whole output (its newest channels' statistics are its
    # own; they do not touch the frozen channels' values).
    o_n = lay.new_out
    other = lambda t, v: None if t is None else torch.cat([t, t.new_full((o_n,), v)])  # noqa
    unfused = F.batch_norm(raw, other(bn["bn_mean"], 0.3), other(bn["bn_var"], 1.1),
                           other(bn["bn_weight"], 0.9), other(bn["bn_bias"], 0.2), False, 0.0,
                           EPS)
    o_f = lay.frozen_out
    assert torch.equal(folded[:, :o_f], unfused[:, :o_f])
    assert torch.equal(folded[:, o_f:], raw[:, o_f:])  # the newest channels stay raw
    # backward: the same gradients as the unfused pair, bit for bit (the unfused
    # BatchNorm hands the conv dy * weight / sqrt(var + eps) on its frozen channels)
    dy = torch.randn_like(folded)
    scale = torch.rsqrt(bn["bn_var"] + EPS)
    if bn["bn_weight"] is not None:
        scale = scale * bn["bn_weight"]
    dy_unfused = dy.clone()
    dy_unfused[:, :o_f] = dy[:, :o_f] * scale.view(1, -1, 1, 1)
    inputs = [t for t in (x, w_n, b_n, w_c) if t is not None]
    for a, b in zip(torch.autograd.grad(folded, inputs, dy),
                    torch.autograd.grad(raw, inputs, dy_unfused)):
        if EXACT_GRADS:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name,alone", [("primes_3x3", True), ("coupled_1x1_no_affine", True),
                                        ("depthwise_x2", True), ("data_input_17_frozen", True),
                                        ("three_groups_stride2", False)])
def test_apart_single_frozen_block_takes_its_batchnorm_alone(name, alone, monkeypatch):
    """Convolved apart (the GPU's path), one frozen block is a tensor of its own: the eval
    BatchNorm runs on its O_f channels only, with no stand-in statistics for the newest
    ones.  Two frozen blocks still go through the padded statistics over the whole output."""
    monkeypatch.setattr(torch_ref, "_joint_rows", lambda *a, **k: None)
    padded = []
    real_pad = torch_ref.padded_stats.pad
    monkeypatch.setattr(torch_ref.padded_stats, "pad",
                        lambda *a: padded.append(1) or real_pad(*a))
    lay, k, stride, padding, batch, affine, mult = CONV[name]
    w_f, b_f, w_n, b_n, w_c = _blocks(lay, k, torch.float32, mult)
    bn = _bn(lay.frozen_out, torch.float32, affine)
    x = torch.randn(batch, lay.in_features, 7, 6, device=DEVICE)
    norm_widths = []
    real_bn = F.batch_norm
    monkeypatch.setattr(F, "batch_norm",
                        lambda t, *a, **kw: norm_widths.append(t.shape[1]) or real_bn(t, *a, **kw))
    y = torch_ref.conv2d_forward(x, w_f, b_f, w_n, b_n, w_c, lay.frozen_out_groups,
                                 lay.frozen_k_ends, stride, padding, 1, bool(mult),
                                 frozen_bn=tuple(bn.values()))
    if alone:
        assert norm_widths == [lay.frozen_out] and not padded
    else:
        assert norm_widths == [lay.out_features] and padded
    raw = torch_ref.conv2d_forward(x, w_f, b_f, w_n, b_n, w_c, lay.frozen_out_groups,
                                   lay.frozen_k_ends, stride, padding, 1, bool(mult))
    o_f = lay.frozen_out
    want = real_bn(raw[:, :o_f].contiguous(), *tuple(bn.values())[:4], False, 0.0, EPS)
    assert torch.equal(y[:, :o_f], want)
    assert torch.equal(y[:, o_f:], raw[:, o_f:])


# ---- the frozen columns of dy: read (and scaled) only where backward needs them ------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["three_groups_stride2", "depthwise_x2"])
def test_unread_frozen_dy_is_never_touched(backend, name, monkeypatch):
    """An isolated layer that does not need dx_old: NaN in the frozen columns of dy and a
    folded BatchNorm change nothing, and no scale is even formed."""
    lay, k, stride, padding, batch, affine, mult = CONV[name]
    w_f, b_f, w_n, b_n, w_c = _blocks(lay, k, torch.float32, mult)
    bn = _bn(lay.frozen_out, torch.float32, affine)
    x = torch.randn(batch, lay.in_features, 7, 6, device=DEVICE, requires_grad=True)
    w_n.requires_grad_()
    b_n.requires_grad_()
    geo = dict(frozen_out_groups=lay.frozen_out_groups, frozen_k_ends=lay.frozen_k_ends,
               stride=stride, padding=padding, depthwise=bool(mult), need_dx_old=False,
               backend=backend)
    calls = []
    real_scale = torch_ref.bn_scale
    monkeypatch.setattr(torch_ref, "bn_scale", lambda *a: calls.append(a) or real_scale(*a))
    folded = xf.ops.expanded_conv2d(x, w_f, b_f, w_n, b_n, None, **geo, **bn)
    raw = xf.ops.expanded_conv2d(x, w_f, b_f, w_n, b_n, None, **geo)
    dy = torch.randn_like(folded)
    dy_nan = dy.clone()
    dy_nan[:, :lay.frozen_out] = float("nan")
    if backend == "torch":  # the torch backend does not even slice them
        monkeypatch.setattr(torch_ref, "frozen_dy", lambda *a: pytest.fail("frozen dy read"))
    got = torch.autograd.grad(folded, [x, w_n, b_n], dy_nan)
    want = torch.autograd.grad(raw, [x, w_n, b_n], dy)
    assert not calls
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_op_scales_only_the_frozen_columns(backend):
    """conv2d_backward with bn_scale equals conv2d_backward of dy whose frozen columns were
    multiplied by it, for every gradient that reads them."""
    lay, k, stride, padding, _, _, _ = CONV["coupled_three_groups"]
    w_f, _, w_n, _, w_c = _blocks(lay, k, torch.float32, 0)
    x = torch.randn(2, lay.in_features, 6, 5, device=DEVICE)
    dy = torch.randn(2, lay.out_features, 6, 5, device=DEVICE)
    scale = torch.rand(lay.frozen_out, device=DEVICE) + 0.5
    dy_scaled = dy.clone()
    dy_scaled[:, :lay.frozen_out] *= scale.view(1, -1, 1, 1)
    args = (x, w_f, w_n, w_c, list(lay.frozen_out_groups), list(lay.frozen_k_ends),
            [stride] * 2, [padding] * 2, [1, 1], False, True, True, True, True, True)
    op = torch.ops.expanse_fast.conv2d_backward
    got = op(dy, *args, scale, backend)
    want = op(dy_scaled, *args, None, backend)
    plain = op(dy, *args, None, backend)
    for name, a, b, c in zip(("dx", "dw", "db", "dcouple"), got, want, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
        if name in ("dx", "dcouple"):  # these read the frozen columns: the scale shows
            assert not torch.allclose(a, c, rtol=1e-3, atol=1e-3), name
        elif EXACT_GRADS or backend == "triton":  # these read the newest columns only
            assert torch.equal(a, c), name


# ---- argument checks ----------------------------------------------------------------------
def _args():
    """CPU arguments of a folded conv (the argument checks are the same on every device)."""
    lay = Layout((3, 2), (4, 3))
    w_f, b_f, w_n, b_n, w_c = random_blocks(lay, tail=(1, 1))
    x = torch.randn(1, 5, 3, 3)
    kw = dict(frozen_out_groups=lay.frozen_out_groups, frozen_k_ends=lay.frozen_k_ends)
    return (x, w_f, b_f, w_n, b_n, w_c), kw, _bn(4, torch.float32, True, device="cpu")


@pytest.mark.parametrize("edit,error,match", [
    (lambda bn: bn.update(bn_var=None), ValueError, "needs bn_var"),
    (lambda bn: bn.update(bn_mean=None), ValueError, "need bn_mean"),
    (lambda bn: bn.update(bn_bias=torch.zeros(3)), ValueError, "one value per frozen"),
    (lambda bn: bn.update(bn_weight=torch.ones(4, 1)), ValueError, "one value per frozen"),
    (lambda bn: bn.update(bn_weight=torch.ones(4, requires_grad=True)), ValueError,
     "requires grad"),
    (lambda bn: bn.update(bn_var=torch.ones(4, dtype=torch.float64)), TypeError, "dtype"),
    (lambda bn: bn.update(bn_eps=-1.0), ValueError, "bn_eps"),
])
def test_refuses_bad_bn_arguments(edit, error, match):
    args, kw, bn = _args()
    edit(bn)
    with pytest.raises(error, match=match):
        xf.ops.expanded_conv2d(*args, **kw, **bn)


def test_half_input_takes_float32_statistics():
    """As F.batch_norm does: a float16 conv with a float32 BatchNorm."""
    args, kw, bn = _args()
    args = tuple(None if t is None else t.half() for t in args)
    y = xf.ops.expanded_conv2d(*args, **kw, **bn, backend="torch")
    ref = _bn64(F.conv2d(args[0].double(), dense64(Layout((3, 2), (4, 3)), args[1], args[3],
                                                     None),
                         torch.cat([args[2], args[4]]).double()), 4, bn)
    assert y.dtype == torch.float16 and rel_err(y, ref) < 5e-3
