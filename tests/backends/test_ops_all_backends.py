"""Every usable backend, through the op registry and autograd, against the float64 reference."""
import pytest
import torch

import expanse_fast as xf
from expanse_fast.layout import Layout
from reference import SMOOTH_ACTIVATIONS, backend_dtype_cases, dense64, random_blocks, rel_err

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = backend_dtype_cases(DEVICE)
BACKENDS = list(dict.fromkeys(b for b, _ in CASES))
# On a GPU these run on the device, bfloat16 included: part of the GPU run's `-m gpu` set.
pytestmark = [pytest.mark.gpu] if DEVICE.type == "cuda" else []

LAYOUTS = [
    Layout((7, 3), (5, 4)),                    # primes, one expansion
    Layout((1, 1), (1, 1)),                    # the smallest
    Layout((13, 0), (11, 6)),                  # data input: no new inputs
    Layout((9, 4, 3), (6, 5, 2)),              # three groups
    Layout((9, 4, 3), (6, 5, 2), "coupled"),
    Layout((17, 5), (3, 0)),                   # a head with no new classes
    Layout((70, 18), (65, 17)),                # not multiples of any tile
]
TOL = {torch.float32: 2e-3 if DEVICE.type == "cuda" else 1e-5, torch.float16: 5e-3,
       torch.bfloat16: 2e-2}




def _run_linear(lay, dtype, rows, bias, need_dx_old, backend, activation=None):
    w_f, b_f, w_n, b_n, w_c = random_blocks(lay, dtype=dtype, bias=bias, device=DEVICE)
    x = torch.randn(rows, lay.in_features, dtype=dtype, device=DEVICE, requires_grad=True)
    trainable = [t.requires_grad_() for t in (w_n, b_n, w_c) if t is not None]
    with xf.use_backend(backend):
        y = xf.ops.expanded_linear(x, w_f, b_f, w_n, b_n, w_c,
                                   frozen_out_groups=lay.frozen_out_groups,
                                   frozen_k_ends=lay.frozen_k_ends, need_dx_old=need_dx_old,
                                   activation=activation)
        dy = torch.randn_like(y)
        y.backward(dy)
    W = dense64(lay, w_f, w_n, w_c)
    b = torch.cat([b_f, b_n]).double().cpu() if bias else 0
    x64, dy64 = x.detach().double().cpu(), dy.double().cpu()
    ref_y = x64 @ W.t() + b
    if activation == "relu":
        ref_y = ref_y.clamp_min(0)
        # the mask of the op's own output: a float64 pre-activation near 0 may differ in sign
        dy64 = dy64 * (y.detach().cpu() > 0)
    elif activation:
        z64 = ref_y.requires_grad_()
        ref_y = SMOOTH_ACTIVATIONS[activation](z64)
        dy64 = torch.autograd.grad(ref_y, z64, dy64)[0]
        ref_y = ref_y.detach()
    assert y.shape == ref_y.shape and y.dtype == dtype
    assert rel_err(y, ref_y) < TOL[dtype]
    dW = dy64.t() @ x64
    assert rel_err(w_n.grad, dW[lay.frozen_out:]) < TOL[dtype]
    if bias:
        assert rel_err(b_n.grad, dy64.sum(0)[lay.frozen_out:]) < TOL[dtype]
    if w_c is not None:
        assert rel_err(w_c.grad, dW[: lay.frozen_out, lay.frozen_in:]) < TOL[dtype]
    ref_dx = dy64 @ W
    if not need_dx_old:
        ref_dx[:, : lay.frozen_in] = 0  # nobody reads these: the op leaves zeros
    assert rel_err(x.grad, ref_dx) < TOL[dtype]
    assert w_f.grad is None and (b_f is None or b_f.grad is None)
    assert trainable


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("lay", LAYOUTS, ids=str)
@pytest.mark.parametrize("need_dx_old", [True, False])
def test_linear_matches_float64(backend, dtype, lay, need_dx_old):
    _run_linear(lay, dtype, rows=37, bias=True, need_dx_old=need_dx_old, backend=backend)


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("lay", [LAYOUTS[0], LAYOUTS[2], LAYOUTS[3], LAYOUTS[4], LAYOUTS[6]],
                         ids=str)
@pytest.mark.parametrize("need_dx_old", [True, False])
def test_linear_fused_relu_matches_float64(backend, dtype, lay, need_dx_old):
    _run_linear(lay, dtype, rows=37, bias=True, need_dx_old=need_dx_old, backend=backend,
                activation="relu")


# The smooth activations on fewer layouts (each is one more kernel specialisation to compile
# on the GPU): three groups, coupled, and widths that are no multiple of any tile.  On a GPU
# Triton's fp32/fp16 epilogue is the one the CPU tests check in the interpreter: bf16 only.
SMOOTH_CASES = [(b, d) for b, d in CASES
                if not (DEVICE.type == "cuda" and b == "triton" and d != torch.bfloat16)]


@pytest.mark.parametrize("backend,dtype", SMOOTH_CASES)
@pytest.mark.parametrize("lay", [LAYOUTS[3], LAYOUTS[4], LAYOUTS[6]], ids=str)
@pytest.mark.parametrize("need_dx_old", [True, False])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu"])
def test_linear_fused_smooth_activation_matches_float64(backend, dtype, lay, need_dx_old,
                                                         activation):
    _run_linear(lay, dtype, rows=37, bias=True, need_dx_old=need_dx_old, backend=backend,
                activation=activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [0, 1])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_linear_fused_activation_row_counts(backend, rows, activation):
    _run_linear(Layout((9, 4, 3), (6, 5, 2)), torch.float32, rows, bias=False,
                need_dx_old=False, backend=backend, activation=activation)


def test_linear_refuses_unknown_activation():
    lay = LAYOUTS[0]
    w_f, b_f, w_n, b_n, w_c = random_blocks(lay)
    with pytest.raises(ValueError, match="activation must be None or one of"):
        xf.ops.expanded_linear(torch.randn(2, lay.in_features), w_f, b_f, w_n, b_n, w_c,
                               frozen_out_groups=lay.frozen_out_groups,
                               frozen_k_ends=lay.frozen_k_ends, activation="tanh")


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("rows", [0, 1, 129])
def test_linear_row_counts_no_bias(backend, dtype, rows):
    _run_linear(Layout((9, 4, 3), (6, 5, 2)), dtype, rows, bias=False, need_dx_old=True,
                backend=backend)


CONV_CASES = [
    dict(lay=Layout((3, 2), (4, 3)), k=3, stride=1, padding=1, dilation=1),
    dict(lay=Layout((5, 2, 1), (4, 3, 2)), k=3, stride=2, padding=1, dilation=1),
    dict(lay=Layout((3, 2), (4, 3), "coupled"), k=1, stride=1, padding=0, dilation=1),
    dict(lay=Layout((2, 3), (3, 1)), k=3, stride=1, padding=2, dilation=2),
    dict(lay=Layout((1, 0), (5, 2)), k=3, stride=1, padding=0, dilation=1),
]


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c['lay']}-k{c['k']}s{c['stride']}")
@pytest.mark.parametrize("need_dx_old", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_matches_float64(backend, dtype, case, need_dx_old, channels_last):
    lay, k = case["lay"], case["k"]
    geo = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"])
    w_f, b_f, w_n, b_n, w_c = random_blocks(lay, tail=(k, k), dtype=dtype, device=DEVICE)
    x = torch.randn(2, lay.in_features, 7, 6, dtype=dtype, device=DEVICE)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    for t in (w_n, b_n, w_c):
        if t is not None:
            t.requires_grad_()
    with xf.use_backend(backend):
        y = xf.ops.expanded_conv2d(x, w_f, b_f, w_n, b_n, w_c,
                                   frozen_out_groups=lay.frozen_out_groups,
                                   frozen_k_ends=lay.frozen_k_ends, need_dx_old=need_dx_old, **geo)
        dy = torch.randn_like(y)
        y.backward(dy)
    x64 = x.detach().double().cpu().requires_grad_()
    W = dense64(lay, w_f, w_n, w_c).requires_grad_()
    b = torch.cat([b_f, b_n]).detach().double().cpu().requires_grad_()
    ref = torch.nn.functional.conv2d(x64, W, b, **geo)
    ref.backward(dy.double().cpu())
    tol = TOL[dtype] * (4 if dtype != torch.float32 else 1)
    assert rel_err(y, ref) < tol
    # every backend hands y and dx back in x's memory format, as torch's conv does (where
    # x has one: with one channel it is both)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if x.is_contiguous() != x.is_contiguous(memory_format=torch.channels_last):
        assert y.is_contiguous(memory_format=fmt) and x.grad.is_contiguous(memory_format=fmt)
    assert rel_err(w_n.grad, W.grad[lay.frozen_out:]) < tol
    assert rel_err(b_n.grad, b.grad[lay.frozen_out:]) < tol
    if w_c is not None:
        assert rel_err(w_c.grad, W.grad[: lay.frozen_out, lay.frozen_in:]) < tol
    ref_dx = x64.grad.clone()
    if not need_dx_old:
        ref_dx[:, : lay.frozen_in] = 0
    assert rel_err(x.grad, ref_dx) < tol


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_conv_matches_float64(backend, dtype, mult):
    c_old, c_new = 3, 2
    lay = Layout((c_old, c_new), (c_old * mult, c_new * mult))
    w_f = torch.randn(c_old * mult, 1, 3, 3, dtype=dtype, device=DEVICE)
    w_n = torch.randn(c_new * mult, 1, 3, 3, dtype=dtype, device=DEVICE, requires_grad=True)
    b_f = torch.randn(c_old * mult, dtype=dtype, device=DEVICE)
    b_n = torch.randn(c_new * mult, dtype=dtype, device=DEVICE, requires_grad=True)
    x = torch.randn(2, c_old + c_new, 6, 5, dtype=dtype, device=DEVICE, requires_grad=True)
    with xf.use_backend(backend):
        y = xf.ops.expanded_conv2d(x, w_f, b_f, w_n, b_n, None,
                                   frozen_out_groups=lay.frozen_out_groups,
                                   frozen_k_ends=lay.frozen_k_ends, padding=1, depthwise=True)
        dy = torch.randn_like(y)
        y.backward(dy)
    x64 = x.detach().double().cpu().requires_grad_()
    W = torch.cat([w_f, w_n]).detach().double().cpu().requires_grad_()
    b = torch.cat([b_f, b_n]).detach().double().cpu().requires_grad_()
    ref = torch.nn.functional.conv2d(x64, W, b, padding=1, groups=c_old + c_new)
    ref.backward(dy.double().cpu())
    tol = TOL[dtype] * (4 if dtype != torch.float32 else 1)
    assert rel_err(y, ref) < tol
    assert rel_err(w_n.grad, W.grad[c_old * mult:]) < tol
    assert rel_err(b_n.grad, b.grad[c_old * mult:]) < tol
    assert rel_err(x.grad, x64.grad) < tol


def test_torch_backend_is_always_listed():
    assert "torch" in BACKENDS


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_triton_refuses_float64_by_name(op):
    """The Triton kernels multiply fp32/fp16/bf16: a float64 call is refused, not read as
    another dtype (the interpreter returned garbage before)."""
    if "triton" not in BACKENDS:
        pytest.skip("triton unusable here")
    torch.manual_seed(0)
    if op == "linear":
        layer = xf.ExpandedLinear.from_linear(torch.nn.Linear(5, 3).double(), 2, 1)
        x = torch.randn(4, 7, dtype=torch.float64)
    else:
        layer = xf.ExpandedConv2d.from_conv(torch.nn.Conv2d(3, 4, 3).double(), 2, 1)
        x = torch.randn(1, 5, 6, 6, dtype=torch.float64)
    layer, x = layer.to(DEVICE), x.to(DEVICE)
    layer.backend = "triton"
    with pytest.raises(TypeError, match=rf"{op} on the triton backend: expected dtype float32, "
                                        r"float16, bfloat16, got float64"):
        layer(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_bias_and_statistics_vectors(backend):
    """The functional ops take any 1-D view as a bias or a folded BatchNorm's statistics
    (b[::2]); the Triton kernels read them at unit stride (they read every other value)."""
    torch.manual_seed(0)
    d = dict(device=DEVICE)
    bf, bn = torch.randn(8, **d)[::2], torch.randn(4, **d)[::2]
    x, wf, wn = torch.randn(4, 8, **d), torch.randn(4, 5, **d), torch.randn(2, 8, **d)
    W = torch.zeros(6, 8, **d)
    W[:4, :5], W[4:] = wf, wn
    y = xf.ops.expanded_linear(x, wf, bf, wn, bn, frozen_out_groups=[4], frozen_k_ends=[5],
                               backend=backend)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, W, torch.cat([bf, bn])),
                               rtol=1e-4, atol=1e-4)
    xc, cwf = torch.randn(2, 8, 5, 5, **d), torch.randn(4, 5, 3, 3, **d)
    cwn = torch.randn(2, 8, 3, 3, **d)
    CW = torch.zeros(6, 8, 3, 3, **d)
    CW[:4, :5], CW[4:] = cwf, cwn
    mean, var = torch.randn(8, **d)[::2], (torch.rand(8, **d) + 0.5)[::2]
    kw = dict(frozen_out_groups=[4], frozen_k_ends=[5], padding=1, backend=backend)
    y = xf.ops.expanded_conv2d(xc, cwf, bf, cwn, bn, **kw)
    ref = torch.nn.functional.conv2d(xc, CW, torch.cat([bf, bn]), padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    y = xf.ops.expanded_conv2d(xc, cwf, None, cwn, None, bn_mean=mean, bn_var=var, **kw)
    raw = torch.nn.functional.conv2d(xc, CW, None, padding=1)
    ref = torch.cat([(raw[:, :4] - mean.view(1, -1, 1, 1))
                     / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5), raw[:, 4:]], 1)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_expanded_conv_input_with_stride_0(backend):
    """x.expand(...) (stride 0 along the batch) is a valid input; the torch backend's bit
    check built a probe of that layout and wrote through it."""
    torch.manual_seed(0)
    layer = xf.ExpandedConv2d.from_conv(torch.nn.Conv2d(3, 4, 3, padding=1), 2, 3).to(DEVICE)
    layer.backend = backend
    x = torch.randn(1, 5, 6, 6, device=DEVICE).expand(2, 5, 6, 6)
    torch.testing.assert_close(layer(x), layer(x.contiguous()), rtol=1e-5, atol=1e-5)
