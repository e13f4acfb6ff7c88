"""Triton expanded-Conv2d kernels against a float64 dense staircase reference.

The reference is torch's float64 conv2d on the dense weight assembled from the blocks, and
float64 autograd for every gradient.  The frozen weight's columns past each group's k_end
hold NaN: a kernel that loads (or multiplies) them poisons its output and the test fails.
On a CPU the kernels run in the Triton interpreter, so the shapes are tiny.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from expanse_fast.kernels import expanded_conv as ec

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _exact_fp32():
    # fp32 kernels follow cuDNN's TF32 switch; the float64 comparison wants IEEE fp32.
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


def test_fp32_precision_follows_cudnns_tf32_switch(monkeypatch):
    """The kernels round fp32 to TF32 exactly when torch's own convolutions may (which is why
    the GPU tests turn the switch off); 16-bit inputs are unaffected."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert ec._prec(torch.float32) == "tf32"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert ec._prec(torch.float32) == "ieee"
    assert ec._prec(torch.bfloat16) == ec._prec(torch.float16) == "tf32"


def _k_ends(in_groups, coupled):
    i_f = sum(in_groups[:-1])
    if coupled:
        return tuple(i_f for _ in in_groups[:-1])
    return tuple(sum(in_groups[: g + 1]) for g in range(len(in_groups) - 1))


def _make(in_groups, out_groups, k, coupled, bias, dtype, batch=2, hw=(5, 7),
          channels_last=False, depthwise_mult=0):
    """Random blocks (rounded to dtype), NaN in the never-read frozen columns."""
    kh, kw = (k, k) if isinstance(k, int) else k
    i_f, c = sum(in_groups[:-1]), sum(in_groups)
    o_f, o_n = sum(out_groups[:-1]), out_groups[-1]
    k_ends = _k_ends(in_groups, coupled)
    if depthwise_mult:
        o_f, o_n = i_f * depthwise_mult, in_groups[-1] * depthwise_mult
        frozen_out = tuple(g * depthwise_mult for g in in_groups[:-1])
        k_ends = _k_ends(in_groups, False)
        w_frozen = torch.randn(o_f, 1, kh, kw, dtype=dtype)
        w_new = torch.randn(o_n, 1, kh, kw, dtype=dtype)
        w_couple = None
    else:
        frozen_out = tuple(out_groups[:-1])
        w_frozen = torch.randn(o_f, i_f, kh, kw, dtype=dtype)
        row = 0
        for rows, ke in zip(frozen_out, k_ends):
            w_frozen[row:row + rows, ke:] = float("nan")
            row += rows
        w_new = torch.randn(o_n, c, kh, kw, dtype=dtype)
        w_couple = torch.randn(o_f, c - i_f, kh, kw, dtype=dtype) if coupled else None
    b_frozen = torch.randn(o_f, dtype=dtype) if bias else None
    b_new = torch.randn(o_n, dtype=dtype) if bias else None
    x = torch.randn(batch, c, *hw, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return dict(x=x, w_frozen=w_frozen, b_frozen=b_frozen, w_new=w_new, b_new=b_new,
                w_couple=w_couple, frozen_out_groups=frozen_out, frozen_k_ends=k_ends)


def _reference(t, conv, depthwise, dy):
    """float64 forward and gradients (dx, dw_new, db_new, dcouple) of the dense layer."""
    d = {k: (v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v)
         for k, v in t.items()}
    wf = torch.nan_to_num(d["w_frozen"].detach(), nan=0.0)  # NaNs sit where the staircase is 0
    if depthwise:
        w = torch.cat([wf, d["w_new"]])
        groups = d["x"].shape[1]
    else:
        i_f = wf.shape[1]
        frozen = torch.zeros(wf.shape[0], d["x"].shape[1], *wf.shape[2:], dtype=torch.float64)
        frozen[:, :i_f] = wf
        if d["w_couple"] is not None:
            frozen = frozen + F.pad(d["w_couple"], (0, 0, 0, 0, i_f, 0))
        w = torch.cat([frozen, d["w_new"]])
        groups = 1
    b = None
    if d["b_new"] is not None:
        b = torch.cat([d["b_frozen"].detach(), d["b_new"]])
    y = F.conv2d(d["x"], w, b, conv["stride"], conv["padding"], conv["dilation"], groups)
    grads = torch.autograd.grad(
        y, [d[k] for k in ("x", "w_new", "b_new", "w_couple") if d[k] is not None],
        dy.double(), allow_unused=True)
    grads = iter(grads)
    out = [next(grads) if d[k] is not None else None for k in ("x", "w_new", "b_new", "w_couple")]
    return y.detach(), out


def _close(got, ref, dtype, what):
    assert got is not None, what
    assert got.dtype == dtype, (what, got.dtype)
    assert tuple(got.shape) == tuple(ref.shape), (what, got.shape, ref.shape)
    got = got.detach().cpu().double()
    scale = ref.abs().max().item() if ref.numel() else 1.0
    err = (got - ref).abs().max().item() if ref.numel() else 0.0
    assert math.isfinite(err) and err <= TOL[dtype] * max(scale, 1.0), (what, err, scale)


def _to_dev(t):
    return {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}


def _layer_args(dev):
    """What the backward takes of a case besides dy: x, the weights and the staircase."""
    return {k: dev[k] for k in ("x", "w_frozen", "w_new", "w_couple", "frozen_out_groups",
                                "frozen_k_ends")}


def _run(t, conv, depthwise, dtype, need_dx_old, channels_last=False):
    dev = _to_dev(t)
    y = ec.expanded_conv2d_forward(**dev, **conv, depthwise=depthwise)
    dy = torch.randn(y.shape, dtype=dtype)
    y_ref, (dx_r, dw_r, db_r, dc_r) = _reference(t, conv, depthwise, dy)
    _close(y, y_ref, dtype, "y")
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()

    _check_backward(t, dev, conv, depthwise, dtype, need_dx_old, channels_last, dy,
                    (dx_r, dw_r, db_r, dc_r))


def _check_backward(t, dev, conv, depthwise, dtype, need_dx_old, channels_last, dy, refs,
                    **extra):
    """The backward kernels on ``dy`` against the float64 gradients ``refs`` (dx, dW_new,
    db_new, dW_couple; None where the layer has none); ``extra`` goes to the backward."""
    dx_r, dw_r, db_r, dc_r = refs
    c_old = t["frozen_k_ends"][-1] if depthwise and t["frozen_k_ends"] else \
        (0 if depthwise else t["w_frozen"].shape[1])
    if not need_dx_old:
        dx_r = dx_r.clone()
        dx_r[:, :c_old] = 0  # nobody reads the old channels' gradient: zeros
    dy_dev = dy.to(DEV)
    if channels_last:
        dy_dev = dy_dev.contiguous(memory_format=torch.channels_last)
    args = _layer_args(dev)
    dx, dw, db, dc = ec.expanded_conv2d_backward(
        dy_dev, **args, **conv, depthwise=depthwise, need_dx_new=True, need_dx_old=need_dx_old,
        need_dw=True, need_db=db_r is not None, need_dcouple=dc_r is not None, **extra)
    _close(dx, dx_r, dtype, "dx")
    assert dx.is_contiguous(memory_format=torch.channels_last if channels_last else
                            torch.contiguous_format)  # the caller's layout, always
    _close(dw, dw_r, dtype, "dw_new")
    if db_r is None:
        assert db is None
    else:
        _close(db, db_r, dtype, "db_new")
    if dc_r is None:
        assert dc is None
    else:
        _close(dc, dc_r, dtype, "dcouple")


def _conv(stride=1, padding=0, dilation=1):
    p = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    return dict(stride=p(stride), padding=p(padding), dilation=p(dilation))


# (in_groups, out_groups, kernel, coupled, bias, dtype, conv, need_dx_old, channels_last, batch)
CASES = {
    "3groups_3x3_pad1_bias": ((2, 3, 2), (2, 3, 2), 3, False, True, torch.float32,
                              _conv(padding=1), True, False, 2),
    "3groups_coupled_stride2": ((3, 2, 2), (2, 1, 3), 3, True, False, torch.float32,
                                _conv(stride=2, padding=1), False, False, 2),
    "2groups_dil2_fp16_cl": ((3, 2), (5, 2), 3, False, True, torch.float16,
                             _conv(padding=2, dilation=2), True, True, 1),
    "2groups_coupled_1x1_stride2_fp16": ((3, 2), (5, 2), 1, True, True, torch.float16,
                                         _conv(stride=2), True, False, 2),
    "2groups_1x1_cl_no_dx_old": ((3, 2), (2, 3), 1, False, False, torch.float32,
                                 _conv(), False, True, 2),
    "asym_kernel_stride_dil": ((2, 3), (3, 2), (3, 2), False, True, torch.float32,
                               _conv(stride=(2, 1), padding=(0, 1), dilation=(1, 2)), True,
                               False, 1),
    # wider than one tile: several channel tiles per group and several K chunks
    "wide_1x1": ((17, 3), (18, 2), 1, False, True, torch.float16, _conv(), True, False, 1),
    # first layer: the input never grows (i_new = 0), plus an empty middle group
    "first_layer_empty_groups": ((3, 0, 0), (2, 0, 3), 3, False, True, torch.float32,
                                 _conv(padding=1), True, False, 1),
    # a head that adds no units (o_new = 0)
    "no_new_outputs": ((3, 2), (4, 0), 1, True, True, torch.float32, _conv(), True, False, 1),
    "empty_batch": ((3, 2), (2, 3), 3, False, True, torch.float32, _conv(padding=1), True,
                    False, 0),
    # channel bounds that are multiples of 8 and 16: the forward's masks and output addresses
    # then cover whole vectors (CH_VEC, OUT_VEC > 1), with partial channel tiles, a frozen
    # group that stops inside a tile, and channels_last x with an NCHW-stored weight
    "vector_bounds_8_cl": ((8, 16, 8), (16, 8, 8), 3, False, True, torch.float16,
                           _conv(padding=1), True, True, 1),
    "vector_bounds_16_coupled": ((16, 16), (16, 16), 3, True, True, torch.float32,
                                 _conv(stride=2, padding=1), False, False, 1),
}


def test_vector_bound_takes_any_iterable():
    from expanse_fast.kernels.vector_bounds import multiple_of_all
    assert multiple_of_all([32, 16, 48]) == 16
    assert multiple_of_all(iter([0, 8, 24])) == 8  # an iterator is read once only
    assert multiple_of_all((16, 4)) == 1


# NCHW x runs both ways: copied to channels_last (the default) and read in place.
@pytest.mark.parametrize("name,nchw_mode", [
    (name, mode) for name in CASES for mode in ec.NCHW_MODES
    if mode == "channels_last" or not CASES[name][8]])
def test_conv(name, nchw_mode, monkeypatch):
    monkeypatch.setattr(ec, "NCHW_MODE", nchw_mode)
    ig, og, k, coupled, bias, dtype, conv, old, cl, batch = CASES[name]
    t = _make(ig, og, k, coupled, bias, dtype, batch=batch, channels_last=cl)
    _run(t, conv, False, dtype, old, channels_last=cl)


def _spy_on_gathers(monkeypatch):
    """Record the layout of every activation the implicit-GEMM kernels are handed."""
    seen = []
    real = ec._for_gathers

    def spy(t, c0=0):
        out, at = real(t, c0)
        seen.append((out.is_contiguous(memory_format=torch.channels_last), out.shape[1]))
        return out, at
    monkeypatch.setattr(ec, "_for_gathers", spy)
    return seen


@pytest.mark.parametrize("nchw_mode", ec.NCHW_MODES)
@pytest.mark.parametrize("x_cl,dy_cl", [(False, True), (True, False), (False, False)])
def test_mixed_layouts_and_what_the_kernels_read(nchw_mode, x_cl, dy_cl, monkeypatch):
    """x and dy in different layouts: the kernels read channels_last copies unless told
    "direct"; y and dx come back in x's layout, the caller's tensors untouched."""
    monkeypatch.setattr(ec, "NCHW_MODE", nchw_mode)
    seen = _spy_on_gathers(monkeypatch)
    t = _make((8, 3), (5, 4), 3, True, True, torch.float32, batch=2, channels_last=x_cl)
    conv = _conv(stride=2, padding=1)
    dev = _to_dev(t)
    x_before = dev["x"].clone()
    y = ec.expanded_conv2d_forward(**dev, **conv, depthwise=False)
    dy = torch.randn(y.shape)
    y_ref, refs = _reference(t, conv, False, dy)
    _close(y, y_ref, torch.float32, "y")
    assert y.is_contiguous(memory_format=torch.channels_last if x_cl else
                           torch.contiguous_format)
    dy_dev = dy.to(DEV).contiguous(memory_format=torch.channels_last if dy_cl else
                                   torch.contiguous_format)
    dy_before = dy_dev.clone()
    args = _layer_args(dev)
    dx, dw, db, dc = ec.expanded_conv2d_backward(
        dy_dev, **args, **conv, depthwise=False, need_dx_new=True, need_dx_old=True,
        need_dw=True, need_db=True, need_dcouple=True)
    for got, ref, what in zip((dx, dw, db, dc), refs, ("dx", "dw", "db", "dcouple")):
        _close(got, ref, torch.float32, what)
    assert dx.is_contiguous(memory_format=torch.channels_last if x_cl else
                            torch.contiguous_format)
    # forward: x; backward: dy (every column: the coupling reads the frozen ones), x
    cl_read = [True] * 3 if nchw_mode == "channels_last" else [x_cl, dy_cl, x_cl]
    assert seen == list(zip(cl_read, (11, 9, 11)))
    assert torch.equal(dev["x"], x_before) and torch.equal(dy_dev, dy_before)
    assert dev["x"].is_contiguous(memory_format=torch.channels_last) == x_cl


def _forward_and_poisoned_dy(t, conv, n_frozen):
    """The forward of case ``t`` on the device, then a random dy whose first ``n_frozen``
    (frozen) columns are NaN, and the float64 gradients (dx, dW_new, db_new, dcouple) of
    the clean dy: (device tensors, dy, gradients)."""
    dev = _to_dev(t)
    y = ec.expanded_conv2d_forward(**dev, **conv, depthwise=False)
    dy = torch.randn(y.shape, dtype=t["x"].dtype)
    _, refs = _reference(t, conv, False, dy)
    dy[:, :n_frozen] = float("nan")
    return dev, dy, refs


@pytest.mark.parametrize("nchw_mode", ec.NCHW_MODES)
@pytest.mark.parametrize("need_dw", [True, False])
def test_unread_dy_columns_are_neither_copied_nor_read(nchw_mode, need_dw, monkeypatch):
    """No dx_old, no coupling: the frozen columns of an NCHW dy (NaN here) are never read,
    and only the trainable ones are copied; without dW, x is not copied at all."""
    monkeypatch.setattr(ec, "NCHW_MODE", nchw_mode)
    seen = _spy_on_gathers(monkeypatch)
    t = _make((5, 3, 3), (2, 3, 4), 3, False, True, torch.float32, batch=2)
    conv = _conv(padding=1)
    dev, dy, (dx_r, dw_r, db_r, _) = _forward_and_poisoned_dy(t, conv, 5)
    dx_r[:, :8] = 0
    seen.clear()
    args = _layer_args(dev)
    dx, dw, db, _ = ec.expanded_conv2d_backward(
        dy.to(DEV), **args, **conv, depthwise=False, need_dx_new=True, need_dx_old=False,
        need_dw=need_dw, need_db=need_dw, need_dcouple=False)
    _close(dx, dx_r, torch.float32, "dx")
    assert dx.is_contiguous()
    if need_dw:
        _close(dw, dw_r, torch.float32, "dw_new")
        _close(db, db_r, torch.float32, "db_new")
    copied = nchw_mode == "channels_last"
    assert seen == [(copied, 4 if copied else 9)] + [(copied, 11)] * need_dw


@pytest.mark.parametrize("nchw_mode", ec.NCHW_MODES)
def test_coupled_layer_asked_for_dw_only_reads_no_frozen_dy(nchw_mode, monkeypatch):
    """A coupling block reads the frozen dy columns for dx and dcouple only: asked for dW
    and db alone, the backward copies (and reads) the trainable columns only."""
    monkeypatch.setattr(ec, "NCHW_MODE", nchw_mode)
    seen = _spy_on_gathers(monkeypatch)
    t = _make((5, 3), (6, 4), 3, True, True, torch.float32, batch=2)
    conv = _conv(padding=1)
    dev, dy, (_, dw_r, db_r, _) = _forward_and_poisoned_dy(t, conv, 6)
    seen.clear()
    args = _layer_args(dev)
    dx, dw, db, dc = ec.expanded_conv2d_backward(
        dy.to(DEV), **args, **conv, depthwise=False, need_dx_new=False, need_dx_old=False,
        need_dw=True, need_db=True, need_dcouple=False)
    assert dx is None and dc is None
    _close(dw, dw_r, torch.float32, "dw_new")
    _close(db, db_r, torch.float32, "db_new")
    copied = nchw_mode == "channels_last"
    assert seen == [(copied, 4 if copied else 10), (copied, 8)]


def test_a_channel_sliced_view_is_read_right():
    """x a view (every other channel of a wider tensor): neither layout, any mode works."""
    t = _make((3, 2), (2, 3), 3, False, True, torch.float32, batch=2)
    wide = torch.randn(2, 10, 5, 7)
    wide[:, ::2] = t["x"]
    t["x"] = wide[:, ::2]
    assert not t["x"].is_contiguous()
    _run(t, _conv(padding=1), False, torch.float32, True)


def test_unknown_nchw_mode_is_named(monkeypatch):
    monkeypatch.setattr(ec, "NCHW_MODE", "nhwc")
    t = _make((3, 2), (2, 3), 1, False, False, torch.float32, batch=1)
    with pytest.raises(ValueError, match="EXPANSE_FAST_CONV_NCHW='nhwc'"):
        ec.expanded_conv2d_forward(**t, **_conv(), depthwise=False)


DW_CASES = {
    "mult1_3x3_pad1_bias": ((3, 2), 1, torch.float32, _conv(padding=1), True, True, False),
    "mult2_stride2_dil2_fp16_cl": ((3, 2), 2, torch.float16,
                                   _conv(stride=2, padding=2, dilation=2), False, False, True),
    "mult2_3groups_asym": ((2, 1, 2), 2, torch.float32,
                           _conv(stride=(1, 2), padding=(1, 0)), True, False, False),
}


@pytest.mark.parametrize("name", list(DW_CASES))
def test_depthwise(name):
    ig, mult, dtype, conv, bias, old, cl = DW_CASES[name]
    # depthwise: every frozen channel is one block (k_end = C_f)
    t = _make(ig, ig, 3, False, bias, dtype, batch=2, channels_last=cl, depthwise_mult=mult)
    _run(t, conv, True, dtype, old, channels_last=cl)


@pytest.mark.parametrize("name,depthwise,nchw_mode", [
    ("3groups_coupled_stride2", False, "channels_last"),  # NCHW x copied: dx via a buffer
    ("3groups_coupled_stride2", False, "direct"),
    ("2groups_1x1_cl_no_dx_old", False, "channels_last"),
    ("mult2_3groups_asym", True, "channels_last"),
])
def test_dx_zeros_from_a_whole_fill(name, depthwise, nchw_mode, monkeypatch):
    """The GPU's way to zero dx's old channels (all of dx, then the kernel writes over the
    rest), forced here: the same gradients, and the whole of dx was filled."""
    monkeypatch.setattr(ec, "NCHW_MODE", nchw_mode)
    fills = []
    monkeypatch.setattr(ec, "_zeros_whole", lambda dx: fills.append(dx.shape) or True)
    if depthwise:
        ig, mult, dtype, conv, bias, _, cl = DW_CASES[name]
        t = _make(ig, ig, 3, False, bias, dtype, batch=2, channels_last=cl,
                  depthwise_mult=mult)
    else:
        ig, og, k, coupled, bias, dtype, conv, _, cl, batch = CASES[name]
        t = _make(ig, og, k, coupled, bias, dtype, batch=batch, channels_last=cl)
    _run(t, conv, depthwise, dtype, need_dx_old=False, channels_last=cl)
    assert fills, "the old channels were zeroed some other way"


def test_only_requested_gradients():
    """Flags off -> None; need_dx_new alone leaves the old channels zero."""
    t = _make((3, 2), (2, 3), 1, True, True, torch.float32, batch=1)
    dev = _to_dev(t)
    conv = _conv()
    y = ec.expanded_conv2d_forward(**dev, **conv, depthwise=False)
    dy = torch.randn(y.shape)
    _, (dx_r, _, _, _) = _reference(t, conv, False, dy)
    args = _layer_args(dev)
    got = ec.expanded_conv2d_backward(dy.to(DEV), **args, **conv, depthwise=False,
                                      need_dx_new=False, need_dx_old=False, need_dw=False,
                                      need_db=False, need_dcouple=False)
    assert got == (None, None, None, None)
    dx, dw, db, dc = ec.expanded_conv2d_backward(
        dy.to(DEV), **args, **conv, depthwise=False, need_dx_new=True, need_dx_old=False,
        need_dw=False, need_db=True, need_dcouple=False)
    assert dw is None and dc is None and db is not None
    dx_r[:, :3] = 0
    _close(dx, dx_r, torch.float32, "dx")


def test_rejects_bad_shapes():
    t = _make((3, 2), (2, 3), 3, False, False, torch.float32, batch=1)
    t["frozen_out_groups"] = (3,)  # does not sum to w_frozen's 2 rows
    with pytest.raises(ValueError):
        ec.expanded_conv2d_forward(**t, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                                   depthwise=False)


# ---------------------------------------------------------------------------------------
# GPU only: bfloat16 (tl.dot on bf16 is wrong under the interpreter) and a real shape
# ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name,nchw_mode", [
    ("3groups_coupled_stride2", "channels_last"), ("3groups_coupled_stride2", "direct"),
    ("2groups_dil2_fp16_cl", "channels_last"), ("wide_1x1", "channels_last")])
def test_conv_bf16(name, nchw_mode, monkeypatch):
    monkeypatch.setattr(ec, "NCHW_MODE", nchw_mode)
    ig, og, k, coupled, bias, _, conv, old, cl, batch = CASES[name]
    t = _make(ig, og, k, coupled, bias, torch.bfloat16, batch=batch, channels_last=cl)
    _run(t, conv, False, torch.bfloat16, old, channels_last=cl)


@pytest.mark.gpu
def test_depthwise_bf16():
    t = _make((3, 2), (3, 2), 3, False, True, torch.bfloat16, batch=2, depthwise_mult=2)
    _run(t, _conv(stride=2, padding=1), True, torch.bfloat16, True)


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("coupled", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_resnet_shape_vs_torch_ref(coupled, dtype):
    """batch 8, 256 -> 320 channels (256 pretrained + 64 new), 28x28, 3x3 pad 1."""
    _check_resnet_shape(coupled, dtype, need_dx_old=True)


@pytest.mark.gpu
@pytest.mark.parametrize("nchw_mode", ec.NCHW_MODES)
def test_resnet_shape_nchw_without_old_gradients(nchw_mode, monkeypatch):
    """The run's NCHW case: no dx_old, no coupling, so only dy's trainable columns are copied
    (channels_last mode) or read (direct), and dx's new channels come back through a buffer
    of their own."""
    monkeypatch.setattr(ec, "NCHW_MODE", nchw_mode)
    _check_resnet_shape(False, torch.bfloat16, need_dx_old=False)


def _check_resnet_shape(coupled, dtype, need_dx_old, hw=(28, 28), channels_last=False,
                        conv=None):
    from expanse_fast.backends import torch_ref

    t = _make((256, 64), (256, 64), 3, coupled, True, dtype, batch=8, hw=hw,
              channels_last=channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t["w_frozen"] = torch.nan_to_num(t["w_frozen"], nan=0.0)
    dev = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
    conv = conv or _conv(padding=1)
    # the reference runs in fp32 on the same 16-bit values (more exact than either)
    ref32 = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in dev.items()}
    y = ec.expanded_conv2d_forward(**dev, **conv, depthwise=False)
    y_ref = torch_ref.conv2d_forward(**ref32, **conv, depthwise=False)
    assert _rel(y, y_ref) < 1e-2
    assert y.is_contiguous(memory_format=fmt)  # x's layout
    dy = torch.randn_like(y)
    keys = ("x", "w_frozen", "w_new", "w_couple", "frozen_out_groups", "frozen_k_ends")
    flags = dict(need_dx_new=True, need_dx_old=need_dx_old, need_dw=True, need_db=True,
                 need_dcouple=coupled)
    got = ec.expanded_conv2d_backward(dy, **{k: dev[k] for k in keys}, **conv,
                                      depthwise=False, **flags)
    ref = torch_ref.conv2d_backward(dy.float(), **{k: ref32[k] for k in keys}, **conv,
                                    depthwise=False, **flags)
    for name, g, r in zip(("dx", "dw", "db", "dcouple"), got, ref):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == dtype and _rel(g, r) < 1e-2, (name, _rel(g, r))
    assert got[0].is_contiguous(memory_format=fmt)  # x's layout
    if not need_dx_old:
        assert torch.count_nonzero(got[0][:, :t["w_frozen"].shape[1]]) == 0


# ---------------------------------------------------------------------------------------
# A folded eval-mode BatchNorm of the frozen channels: epilogue and dy scale
# ---------------------------------------------------------------------------------------
NORM_EPS = 1e-3


def _norm(o_f, dtype, affine=True):
    mean = torch.randn(o_f, dtype=dtype)
    var = torch.rand(o_f, dtype=dtype) + 0.5
    weight = torch.rand(o_f, dtype=dtype) + 0.5 if affine else None
    bias = torch.randn(o_f, dtype=dtype) if affine else None
    return mean, var, weight, bias, NORM_EPS


def _run_norm(t, conv, depthwise, dtype, need_dx_old, norm, channels_last=False):
    """The kernels with ``norm`` folded in, against float64 conv-then-BatchNorm: the
    forward's frozen channels through the BatchNorm, and every gradient of it (the raw
    conv's gradients of dy whose frozen columns are scaled by weight / sqrt(var + eps))."""
    mean, var, weight, bias, eps = norm
    o_f = mean.shape[0]
    dev = _to_dev(t)
    norm_dev = tuple(v.to(DEV) if isinstance(v, torch.Tensor) else v for v in norm)
    y = ec.expanded_conv2d_forward(**dev, **conv, depthwise=depthwise, norm=norm_dev)
    dy = torch.randn(y.shape, dtype=dtype)
    scale = 1 / torch.sqrt(var.double() + eps)
    if weight is not None:
        scale = scale * weight.double()
    dy64 = dy.double()
    dy64[:, :o_f] *= scale.view(1, -1, 1, 1)
    y_ref, (dx_r, dw_r, db_r, dc_r) = _reference(t, conv, depthwise, dy64)
    shift = -mean.double() * scale
    if bias is not None:
        shift = shift + bias.double()
    y_ref[:, :o_f] = y_ref[:, :o_f] * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    _close(y, y_ref, dtype, "y")
    _check_backward(t, dev, conv, depthwise, dtype, need_dx_old, channels_last, dy,
                    (dx_r, dw_r, db_r, dc_r), norm_scale=scale.to(dtype).to(DEV))


NORM_CASES = {
    # 17 frozen channels in 3 groups: channel tiles of 16 end inside groups and past them
    "3groups_17_frozen_pad1": ((2, 3, 2), (9, 8, 3), 3, False, True, torch.float32,
                               _conv(padding=1), True, False),
    "3groups_coupled_stride2_fp16": ((3, 2, 2), (2, 1, 3), 3, True, False, torch.float16,
                                     _conv(stride=2, padding=1), True, False),
    "coupled_1x1_no_dx_old_cl": ((3, 2), (5, 2), 1, True, True, torch.float32, _conv(),
                                 False, True),
    "1_frozen_1_new": ((1, 1), (1, 1), 3, False, True, torch.float16, _conv(padding=1), True,
                       False),
}


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("name", list(NORM_CASES))
def test_conv_folded_norm(name, affine):
    ig, og, k, coupled, bias, dtype, conv, old, cl = NORM_CASES[name]
    t = _make(ig, og, k, coupled, bias, dtype, batch=2, channels_last=cl)
    _run_norm(t, conv, False, dtype, old, _norm(sum(og[:-1]), dtype, affine), channels_last=cl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("need_dx_old", [True, False])
def test_depthwise_folded_norm(dtype, need_dx_old):
    # 3 + 2 channels, multiplier 3: 9 frozen filters, a tile of 16 holds both kinds
    t = _make((1, 2, 2), (1, 2, 2), 3, False, True, dtype, batch=2, depthwise_mult=3)
    _run_norm(t, _conv(stride=(1, 2), padding=1), True, dtype, need_dx_old, _norm(9, dtype))


def test_unread_norm_scale_is_never_loaded():
    """Isolated, no dx_old: a NaN scale changes nothing (the frozen dy is not read)."""
    for depthwise in (False, True):
        t = _make((3, 2), (3, 2), 3, False, True, torch.float32, batch=1,
                  depthwise_mult=1 if depthwise else 0)
        dev = _to_dev(t)
        args = _layer_args(dev)
        o_f = t["w_frozen"].shape[0]
        dy = torch.randn(1, o_f + t["w_new"].shape[0], 5, 7, device=DEV)
        flags = dict(need_dx_new=True, need_dx_old=False, need_dw=True, need_db=True,
                     need_dcouple=False)
        got = ec.expanded_conv2d_backward(dy, **args, **_conv(padding=1), depthwise=depthwise,
                                          **flags, norm_scale=torch.full((o_f,), float("nan"),
                                                                         device=DEV))
        want = ec.expanded_conv2d_backward(dy, **args, **_conv(padding=1), depthwise=depthwise,
                                           **flags)
        for name, a, b in zip(("dx", "dw", "db"), got, want):
            assert torch.equal(a, b), (depthwise, name)


def test_norm_of_a_layer_without_frozen_rows_is_ignored():
    t = _make((3, 0), (0, 4), 1, False, True, torch.float32, batch=1)
    dev = _to_dev(t)
    empty = torch.empty(0, device=DEV)
    y = ec.expanded_conv2d_forward(**dev, **_conv(), depthwise=False,
                                   norm=(empty, empty, None, None, 1e-5))
    assert torch.equal(y, ec.expanded_conv2d_forward(**dev, **_conv(), depthwise=False))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["3groups_17_frozen_pad1", "3groups_coupled_stride2_fp16"])
def test_conv_folded_norm_bf16(name):
    ig, og, k, coupled, bias, _, conv, old, cl = NORM_CASES[name]
    t = _make(ig, og, k, coupled, bias, torch.bfloat16, batch=2, channels_last=cl)
    _run_norm(t, conv, False, torch.bfloat16, old, _norm(sum(og[:-1]), torch.bfloat16),
              channels_last=cl)


@pytest.mark.gpu
def test_depthwise_folded_norm_bf16():
    t = _make((1, 2, 2), (1, 2, 2), 3, False, True, torch.bfloat16, batch=2, depthwise_mult=3)
    _run_norm(t, _conv(padding=1), True, torch.bfloat16, True, _norm(9, torch.bfloat16))
