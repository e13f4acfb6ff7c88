"""The ``cuda`` backend (compiled csrc/ kernels) against a float64 dense staircase reference.

The GPU tests build the extension on first use and fail (not skip) if it cannot be built.
Weight columns that the staircase never reads are NaN, and outputs are allocated over freed
NaN memory where the caching allocator allows, so a stray read or an unwritten element fails.
"""
import math
import os

import pytest
import torch

from expanse_fast.backends import cuda, torch_ref
from expanse_fast.layout import Layout

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES = list(TOL)

LAYOUTS = {
    "one_group": Layout((37,), (53,)),
    "two_groups": Layout((61, 13), (67, 1)),
    "three_groups": Layout((129, 31, 17), (130, 5, 131)),  # crosses the 128/64 tiles
    "first_layer": Layout((29, 0), (41, 17)),               # data input never grows
    "head_no_new_classes": Layout((37, 11), (10, 0)),
    "empty_frozen_group": Layout((23, 0, 9), (0, 7, 12)),
    "aligned": Layout((128, 64), (256, 64)),                # 16-byte vector copy path
    "coupled_three": Layout((45, 7, 23), (33, 11, 19), "coupled"),
    "coupled_aligned": Layout((64, 32), (96, 32), "coupled"),
    "coupled_no_new_inputs": Layout((19, 0), (8, 5), "coupled"),
    # Enough K for the 4-stage wgmma pipeline to wrap around its stages (64-wide k-tiles).
    "wide_aligned": Layout((264, 136), (200, 72)),
    "wide_coupled": Layout((257, 131), (190, 66), "coupled"),
    # Groups wider than the wgmma kernels' 256-column tiles: two column tiles each, the
    # second partial (forward: output groups; dx: input columns).
    "wide_groups": Layout((300, 263), (301, 257)),
}


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def make_params(layout, dtype, device, bias=True):
    """Weights as stored (layout.py); the never-read staircase zeros are NaN."""
    o_f, i_f, i = layout.frozen_out, layout.frozen_in, layout.in_features
    scale = 1.0 / math.sqrt(max(i, 1))
    w_frozen = torch.randn(o_f, i_f, dtype=torch.float64) * scale
    if layout.mode == "isolated":
        r0 = 0
        for rows, k in zip(layout.frozen_out_groups, layout.frozen_k_ends):
            w_frozen[r0:r0 + rows, k:] = float("nan")
            r0 += rows
    w_new = torch.randn(layout.new_out, i, dtype=torch.float64) * scale
    w_couple = (torch.randn(o_f, layout.new_in, dtype=torch.float64) * scale
                if layout.mode == "coupled" else None)
    b_frozen = torch.randn(o_f, dtype=torch.float64) if bias else None
    b_new = torch.randn(layout.new_out, dtype=torch.float64) if bias else None
    to = (lambda t: None if t is None else t.to(device=device, dtype=dtype))
    return dict(w_frozen=to(w_frozen), b_frozen=to(b_frozen), w_new=to(w_new),
                b_new=to(b_new), w_couple=to(w_couple))


def dense_weight(layout, p):
    """The full (O, I) staircase matrix in float64, built from the mask (not from torch_ref)."""
    w = torch.zeros(layout.out_features, layout.in_features, dtype=torch.float64)
    wf = p["w_frozen"].double().cpu()
    r0 = 0
    for rows, k in zip(layout.frozen_out_groups, layout.frozen_k_ends):
        w[r0:r0 + rows, :k] = wf[r0:r0 + rows, :k]
        r0 += rows
    if p["w_couple"] is not None:
        w[:layout.frozen_out, layout.frozen_in:] = p["w_couple"].double().cpu()
    w[layout.frozen_out:] = p["w_new"].double().cpu()
    return w


def dense_bias(layout, p):
    parts = [p["b_frozen"], p["b_new"]]
    if parts[0] is None:
        return torch.zeros(layout.out_features, dtype=torch.float64)
    return torch.cat([t.double().cpu() for t in parts])


def rel_err(out, ref):
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def assert_matches(out, ref, dtype, what):
    assert out is not None, f"{what}: got None"
    assert tuple(out.shape) == tuple(ref.shape), \
        f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    if ref.numel() == 0:
        return
    if ref.norm() == 0:
        assert torch.equal(out.double().cpu(), ref), f"{what}: expected exact zeros"
        return
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{what}: rel err {err:.3g} >= {TOL[dtype]} ({dtype})"


def poison_allocator(device):
    """Leave NaN-filled freed blocks in both caching-allocator pools (best effort)."""
    for numel in (1 << 18, 1 << 24):  # 1 MiB (small pool), 64 MiB (large pool) of fp32
        torch.full((numel,), float("nan"), device=device)
    torch.cuda.synchronize(device)


def call_forward(layout, p, x):
    return cuda.linear_forward(x, p["w_frozen"], p["b_frozen"], p["w_new"], p["b_new"],
                               p["w_couple"], layout.frozen_out_groups, layout.frozen_k_ends)


def call_backward(layout, p, dy, x, need_dx_new=True, need_dx_old=True, need_dw=True,
                  need_db=True, need_dcouple=True):
    return cuda.linear_backward(dy, x, p["w_frozen"], p["w_new"], p["w_couple"],
                                layout.frozen_out_groups, layout.frozen_k_ends, need_dx_new,
                                need_dx_old, need_dw, need_db, need_dcouple)


def check_backward(layout, p, dy, x, dtype, grads, need_dx_old=True, need=None):
    """Compare (dx, dw, db, dcouple) with float64 dense products; None where not asked."""
    need = need or dict(dx=True, dw=True, db=True, dcouple=True)
    dx, dw, db, dcouple = grads
    w = dense_weight(layout, p)
    x64, dy64 = x.double().cpu(), dy.double().cpu()
    o_f, i_f = layout.frozen_out, layout.frozen_in
    dy_new = dy64[:, o_f:]
    if need["dx"]:
        ref = dy64 @ w
        if not need_dx_old:
            assert torch.equal(dx[:, :i_f].cpu(), torch.zeros_like(dx[:, :i_f].cpu())), \
                "dx_old must be zeros when not asked for"
            ref[:, :i_f] = 0
        assert_matches(dx, ref, dtype, "dx")
    else:
        assert dx is None
    if need["dw"]:
        assert_matches(dw, dy_new.t() @ x64, dtype, "dW_new")
    else:
        assert dw is None
    if need["db"]:
        assert_matches(db, dy_new.sum(0), dtype, "db_new")
    else:
        assert db is None
    if need["dcouple"] and p["w_couple"] is not None:
        assert_matches(dcouple, dy64[:, :o_f].t() @ x64[:, i_f:], dtype, "dW_couple")
    else:
        assert dcouple is None


@pytest.fixture(scope="module")
def dev():
    ok, why = cuda.availability(torch.device("cuda"))
    assert ok, f"cuda backend unavailable on this GPU machine: {why}"
    return torch.device("cuda")


@pytest.fixture(params=["auto", "wmma", "sw128", "k128x2"])
def tile_math(request, monkeypatch):
    """The GEMM kernels' tile math: the default (wgmma on an H100/H200), the portable WMMA
    kernels (EXPANSE_FAST_CUDA_WGMMA=0), and the linear wgmma kernels with 128-byte swizzled
    operand tiles (EXPANSE_FAST_CUDA_SWIZZLE=1) or two stages of 128-wide k-tiles
    (EXPANSE_FAST_CUDA_PIPELINE=k128x2); the launchers read them at every call."""
    for name in ("EXPANSE_FAST_CUDA_WGMMA", "EXPANSE_FAST_CUDA_SWIZZLE",
                 "EXPANSE_FAST_CUDA_PIPELINE"):
        monkeypatch.delenv(name, raising=False)
    if request.param == "wmma":
        monkeypatch.setenv("EXPANSE_FAST_CUDA_WGMMA", "0")
    elif request.param == "sw128":
        monkeypatch.setenv("EXPANSE_FAST_CUDA_SWIZZLE", "1")
    elif request.param == "k128x2":
        monkeypatch.setenv("EXPANSE_FAST_CUDA_PIPELINE", "k128x2")
    return request.param


def skip_same_math(tile_math, dtype, conv=False):
    """The variants run in bf16 only: fp32 is SIMT either way, and fp16 goes through the same
    templates as bf16 (the default-math runs cover both).  The swizzled tiles are the linear
    wgmma kernels' alone: elsewhere (the conv kernels, a GPU without wgmma) that run would
    repeat the default's."""
    if tile_math != "auto" and dtype != torch.bfloat16:
        pytest.skip(f"the {tile_math} variant runs in bf16 (fp32 is SIMT either way)")
    if tile_math in ("sw128", "k128x2") and (conv or
                                             cuda.linear_math(dtype) != f"wgmma-{tile_math}"):
        pytest.skip(f"the {tile_math} variant is the linear wgmma kernels' (an H100/H200's)")


# ---------------------------------------------------------------------------------------
# GPU: forward and every gradient against float64
# ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [0, 1, 7, 257])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_forward_matches_dense(dev, tile_math, name, dtype, rows):
    skip_same_math(tile_math, dtype)
    layout = LAYOUTS[name]
    p = make_params(layout, dtype, dev)
    x = torch.randn(rows, layout.in_features).to(dev, dtype)
    poison_allocator(dev)
    y = call_forward(layout, p, x)
    ref = x.double().cpu() @ dense_weight(layout, p).t() + dense_bias(layout, p)
    assert_matches(y, ref, dtype, "y")


@pytest.mark.gpu
@pytest.mark.parametrize("need_dx_old", [True, False])
@pytest.mark.parametrize("rows", [0, 1, 7, 257])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_backward_matches_dense(dev, tile_math, name, dtype, rows, need_dx_old):
    skip_same_math(tile_math, dtype)
    layout = LAYOUTS[name]
    p = make_params(layout, dtype, dev)
    x = torch.randn(rows, layout.in_features).to(dev, dtype)
    dy = torch.randn(rows, layout.out_features).to(dev, dtype)
    poison_allocator(dev)
    grads = call_backward(layout, p, dy, x, need_dx_old=need_dx_old)
    check_backward(layout, p, dy, x, dtype, grads, need_dx_old)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["three_groups", "coupled_aligned"])
def test_large_batch_split_reduction(dev, tile_math, name, dtype):
    """Many rows, few output tiles: the weight gradient splits its reduction over blocks."""
    skip_same_math(tile_math, dtype)
    layout = LAYOUTS[name]
    rows = 4099  # prime
    p = make_params(layout, dtype, dev)
    x = torch.randn(rows, layout.in_features).to(dev, dtype)
    dy = torch.randn(rows, layout.out_features).to(dev, dtype)
    assert_matches(call_forward(layout, p, x),
                   x.double().cpu() @ dense_weight(layout, p).t() + dense_bias(layout, p),
                   dtype, "y")
    poison_allocator(dev)
    check_backward(layout, p, dy, x, dtype, call_backward(layout, p, dy, x))


NEED_SETS = [
    dict(dx=False, dw=False, db=False, dcouple=False),
    dict(dx=False, dw=True, db=False, dcouple=False),
    dict(dx=False, dw=False, db=True, dcouple=False),   # db alone: its own kernel
    dict(dx=True, dw=False, db=False, dcouple=False),
    dict(dx=False, dw=False, db=False, dcouple=True),
    dict(dx=True, dw=True, db=True, dcouple=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("need", NEED_SETS, ids=lambda n: "+".join(k for k, v in n.items() if v)
                         or "nothing")
@pytest.mark.parametrize("name", ["three_groups", "coupled_three"])
def test_backward_computes_only_what_is_asked(dev, name, need):
    layout, dtype, rows = LAYOUTS[name], torch.float16, 131
    p = make_params(layout, dtype, dev)
    x = torch.randn(rows, layout.in_features).to(dev, dtype)
    dy = torch.randn(rows, layout.out_features).to(dev, dtype)
    poison_allocator(dev)
    grads = call_backward(layout, p, dy, x, need_dx_new=need["dx"], need_dx_old=False,
                          need_dw=need["dw"], need_db=need["db"], need_dcouple=need["dcouple"])
    check_backward(layout, p, dy, x, dtype, grads, need_dx_old=False, need=need)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs_and_no_bias(dev, tile_math, dtype):
    """Row strides that are not the width (column slices, misaligned), a transposed dy."""
    skip_same_math(tile_math, dtype)
    layout = LAYOUTS["coupled_three"]
    rows = 67
    p = make_params(layout, dtype, dev, bias=False)
    x = torch.randn(rows, layout.in_features + 5).to(dev, dtype)[:, 3:3 + layout.in_features]
    dy = torch.randn(layout.out_features, rows).to(dev, dtype).t()  # stride (1, rows)
    poison_allocator(dev)
    y = call_forward(layout, p, x)
    assert_matches(y, x.double().cpu() @ dense_weight(layout, p).t(), dtype, "y")
    check_backward(layout, p, dy, x, dtype, call_backward(layout, p, dy, x))


@pytest.mark.gpu
@pytest.mark.parametrize("pre_extra", [0, 3], ids=["pre_new", "pre_mid_chunk"])
@pytest.mark.parametrize("name", ["aligned", "wide_aligned", "wide_groups"])
def test_fused_activation_and_pre_activation_store(dev, tile_math, name, pre_extra):
    """The forward's epilogue with GELU and the pre-activation store: y and pre rows of 16
    bytes (the aligned layouts: the wgmma kernels' staged tiles leave in whole chunks) or not,
    pre from the first new column or from 3 columns before it (mid-chunk, mid-tile)."""
    dtype = torch.bfloat16
    skip_same_math(tile_math, dtype)
    layout = LAYOUTS[name]
    p = make_params(layout, dtype, dev)
    rows = 257
    x = torch.randn(rows, layout.in_features).to(dev, dtype)
    pre = torch.full((rows, layout.new_out + pre_extra), float("nan"), device=dev, dtype=dtype)
    poison_allocator(dev)
    y = cuda.linear_forward(x, p["w_frozen"], p["b_frozen"], p["w_new"], p["b_new"],
                            p["w_couple"], layout.frozen_out_groups, layout.frozen_k_ends,
                            "gelu", pre)
    z = x.double().cpu() @ dense_weight(layout, p).t() + dense_bias(layout, p)
    assert_matches(y, torch.nn.functional.gelu(z), dtype, "y")
    assert_matches(pre, z[:, layout.out_features - pre.shape[1]:], dtype, "pre")


@pytest.mark.gpu
def test_hopper_multiplies_with_wgmma(dev, monkeypatch):
    """On an H100/H200 the fp16/bf16 linear kernels run wgmma (the sm_90a build took), so the
    tests above cover both tile maths there; the switch turns it off; fp32 stays SIMT."""
    for name in ("EXPANSE_FAST_CUDA_WGMMA", "EXPANSE_FAST_CUDA_SWIZZLE",
                 "EXPANSE_FAST_CUDA_PIPELINE"):
        monkeypatch.delenv(name, raising=False)
    expect = "wgmma" if torch.cuda.get_device_capability(dev) == (9, 0) else "wmma"
    for dtype in (torch.bfloat16, torch.float16):
        assert cuda.linear_math(dtype, dev) == expect, dtype
    assert cuda.linear_math(torch.float32, dev) == "simt"
    for pipeline in ("tma", "k128x2"):  # the experiments: wgmma's only
        monkeypatch.setenv("EXPANSE_FAST_CUDA_PIPELINE", pipeline)
        assert cuda.linear_math(torch.bfloat16, dev) == (f"{expect}-{pipeline}"
                                                         if expect == "wgmma" else expect)
    monkeypatch.setenv("EXPANSE_FAST_CUDA_SWIZZLE", "1")  # (the swizzle wins)
    assert cuda.linear_math(torch.bfloat16, dev) == (expect + "-sw128" if expect == "wgmma"
                                                     else expect)
    monkeypatch.setenv("EXPANSE_FAST_CUDA_WGMMA", "0")
    assert cuda.linear_math(torch.bfloat16, dev) == "wmma"


@pytest.mark.gpu
def test_agrees_with_torch_ref(dev):
    layout = LAYOUTS["three_groups"]
    p = make_params(layout, torch.float32, dev)
    p["w_frozen"] = torch.nan_to_num(p["w_frozen"])  # torch_ref never reads them either
    x = torch.randn(33, layout.in_features, device=dev)
    args = (p["w_frozen"], p["b_frozen"], p["w_new"], p["b_new"], p["w_couple"],
            layout.frozen_out_groups, layout.frozen_k_ends)
    torch.testing.assert_close(cuda.linear_forward(x, *args), torch_ref.linear_forward(x, *args),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_bad_arguments_name_expected_and_given(dev):
    layout = LAYOUTS["two_groups"]
    p = make_params(layout, torch.float16, dev)
    x = torch.randn(5, layout.in_features, device=dev)  # float32 against float16 weights
    with pytest.raises(RuntimeError, match=r"w_frozen must have dtype Float.*got Half"):
        call_forward(layout, p, x)
    x = torch.randn(5, layout.in_features + 1, device=dev, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"w_new must have 75 columns, got shape \[1, 74\]"):
        call_forward(layout, p, x)
    x = torch.randn(5, layout.in_features, device=dev, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"sum to 66 but w_frozen has 67 rows"):
        cuda.linear_forward(x, p["w_frozen"], None, p["w_new"], None, None, [66], [61])
    with pytest.raises(RuntimeError, match=r"expected CUDA tensors, got x on cpu"):
        call_forward(layout, p, x.cpu())


@pytest.mark.gpu
def test_fake_registrations(dev):
    layout = LAYOUTS["coupled_three"]
    p = make_params(layout, torch.float16, dev)
    x = torch.randn(9, layout.in_features, device=dev, dtype=torch.float16)
    args = (x, p["w_frozen"], p["b_frozen"], p["w_new"], p["b_new"], p["w_couple"],
            list(layout.frozen_out_groups), list(layout.frozen_k_ends))
    torch.library.opcheck(torch.ops.expanse_fast_cuda.linear_forward.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    dy = torch.randn(9, layout.out_features, device=dev, dtype=torch.float16)
    bargs = (dy, x, p["w_frozen"], p["w_new"], p["w_couple"], list(layout.frozen_out_groups),
             list(layout.frozen_k_ends), True, False, True, True, True)
    torch.library.opcheck(torch.ops.expanse_fast_cuda.linear_backward.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------
# GPU: conv2d (implicit-GEMM kernels, groups=1) against float64 F.conv2d with the dense
# staircase weight.  Odd sizes everywhere: channel counts that are primes or cross the 64/128
# tiles, pixel counts that are not multiples of a tile, stride, padding, dilation, non-square
# kernels, frozen groups that read nothing, and the coupled layout.
# ---------------------------------------------------------------------------------------
def _geo(n, h, w, k, stride=1, padding=0, dilation=1):
    pair = (lambda v: (v, v) if isinstance(v, int) else tuple(v))  # noqa: E731
    return dict(n=n, h=h, w=w, k=pair(k), stride=pair(stride), padding=pair(padding),
                dilation=pair(dilation))


CONV_CASES = {
    "one_group": (Layout((3,), (5,)), _geo(1, 7, 7, 3, 1, 1)),
    "smallest_1x1": (Layout((1,), (1,)), _geo(1, 1, 1, 1)),
    "two_groups_stride2": (Layout((13, 4), (17, 3)), _geo(2, 11, 9, 3, 2, 1)),
    "three_groups_dilated": (Layout((37, 11, 5), (67, 13, 7)),
                             _geo(3, 9, 10, (3, 2), (1, 2), (2, 0), (2, 1))),
    "first_layer_5x5": (Layout((3, 0), (16, 8)), _geo(2, 13, 13, 5, 2, 2)),
    "frozen_reads_nothing": (Layout((0, 5), (4, 3)), _geo(2, 6, 5, 3, 1, 1)),
    "empty_frozen_group": (Layout((5, 0, 3), (0, 4, 6)), _geo(1, 7, 5, (2, 3), 1, (0, 1))),
    "head_no_new_out": (Layout((9, 4), (6, 0)), _geo(2, 6, 6, 3, (3, 1), (1, 0), (1, 2))),
    "pad_beyond_image": (Layout((2, 1), (1, 1)), _geo(1, 3, 3, 3, 2, (5, 0), (3, 1))),
    "many_pixels": (Layout((16, 8), (32, 16)), _geo(2, 29, 31, 3, 1, 1)),  # split dW
    "coupled_three": (Layout((19, 7, 6), (23, 5, 9), "coupled"), _geo(2, 8, 8, 3, 1, 1)),
    "coupled_1x1_stride2": (Layout((65, 3), (70, 130), "coupled"), _geo(1, 5, 6, 1, 2)),
    "coupled_aligned": (Layout((64, 64), (64, 64), "coupled"), _geo(2, 8, 8, 3, 1, 1)),
    "coupled_even_kernel": (Layout((7, 3), (5, 4), "coupled"), _geo(2, 4, 4, 4, 3, (2, 1))),
}


def make_conv_params(layout, k, dtype, device, bias=True):
    """Conv weights as stored; the staircase channels frozen rows never read are NaN."""
    o_f, i_f, i = layout.frozen_out, layout.frozen_in, layout.in_features
    kh, kw = k
    scale = 1.0 / math.sqrt(max(i * kh * kw, 1))
    w_frozen = torch.randn(o_f, i_f, kh, kw, dtype=torch.float64) * scale
    if layout.mode == "isolated":
        r0 = 0
        for rows, k_end in zip(layout.frozen_out_groups, layout.frozen_k_ends):
            w_frozen[r0:r0 + rows, k_end:] = float("nan")
            r0 += rows
    w_new = torch.randn(layout.new_out, i, kh, kw, dtype=torch.float64) * scale
    w_couple = (torch.randn(o_f, layout.new_in, kh, kw, dtype=torch.float64) * scale
                if layout.mode == "coupled" else None)
    b_frozen = torch.randn(o_f, dtype=torch.float64) if bias else None
    b_new = torch.randn(layout.new_out, dtype=torch.float64) if bias else None
    to = (lambda t: None if t is None else t.to(device=device, dtype=dtype))  # noqa: E731
    return dict(w_frozen=to(w_frozen), b_frozen=to(b_frozen), w_new=to(w_new),
                b_new=to(b_new), w_couple=to(w_couple))


def dense_conv_weight(layout, p):
    """The full (O, I, KH, KW) staircase weight in float64, built from the mask."""
    kh, kw = p["w_new"].shape[2:]
    w = torch.zeros(layout.out_features, layout.in_features, kh, kw, dtype=torch.float64)
    wf = p["w_frozen"].double().cpu()
    r0 = 0
    for rows, k_end in zip(layout.frozen_out_groups, layout.frozen_k_ends):
        w[r0:r0 + rows, :k_end] = wf[r0:r0 + rows, :k_end]
        r0 += rows
    if p["w_couple"] is not None:
        w[:layout.frozen_out, layout.frozen_in:] = p["w_couple"].double().cpu()
    w[layout.frozen_out:] = p["w_new"].double().cpu()
    return w


def _conv_geo_args(geo):
    return geo["stride"], geo["padding"], geo["dilation"]


def conv_reference(layout, p, x, geo, dy=None):
    """(y, dx, dW_full, db_full) in float64 on the CPU (gradients None without dy)."""
    p = {k: None if v is None else v.detach() for k, v in p.items()}  # own graph only
    x64 = x.detach().double().cpu().requires_grad_(dy is not None)
    w64 = dense_conv_weight(layout, p).requires_grad_(dy is not None)
    b64 = dense_bias(layout, p)
    y = torch.nn.functional.conv2d(x64, w64, b64, *_conv_geo_args(geo))
    if dy is None:
        return y.detach(), None, None, None
    y.backward(dy.detach().double().cpu())
    return y.detach(), x64.grad, w64.grad, dy.detach().double().cpu().sum((0, 2, 3))


def conv_input(layout, geo, dtype, device):
    return torch.randn(geo["n"], layout.in_features, geo["h"], geo["w"]).to(device, dtype)


def conv_out_shape(layout, geo):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo["k"], geo["stride"], geo["padding"], \
        geo["dilation"]
    ho = (geo["h"] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (geo["w"] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return (geo["n"], layout.out_features, ho, wo)


def call_conv_forward(layout, p, x, geo):
    return cuda.conv2d_forward(x, p["w_frozen"], p["b_frozen"], p["w_new"], p["b_new"],
                               p["w_couple"], layout.frozen_out_groups, layout.frozen_k_ends,
                               *_conv_geo_args(geo), False)


def call_conv_backward(layout, p, dy, x, geo, need_dx_new=True, need_dx_old=True,
                       need_dw=True, need_db=True, need_dcouple=True):
    return cuda.conv2d_backward(dy, x, p["w_frozen"], p["w_new"], p["w_couple"],
                                layout.frozen_out_groups, layout.frozen_k_ends,
                                *_conv_geo_args(geo), False, need_dx_new, need_dx_old, need_dw,
                                need_db, need_dcouple)


def check_conv_backward(layout, p, dy, x, geo, dtype, grads, need_dx_old=True, need=None):
    need = need or dict(dx=True, dw=True, db=True, dcouple=True)
    dx, dw, db, dcouple = grads
    _, ref_dx, ref_dw, ref_db = conv_reference(layout, p, x, geo, dy)
    o_f, i_f = layout.frozen_out, layout.frozen_in
    if need["dx"]:
        ref = ref_dx.clone()
        if not need_dx_old:
            assert torch.equal(dx[:, :i_f].cpu(), torch.zeros_like(dx[:, :i_f].cpu())), \
                "dx_old must be zeros when not asked for"
            ref[:, :i_f] = 0
        assert_matches(dx, ref, dtype, "dx")
    else:
        assert dx is None
    if need["dw"]:
        assert_matches(dw, ref_dw[o_f:], dtype, "dW_new")
    else:
        assert dw is None
    if need["db"]:
        assert_matches(db, ref_db[o_f:], dtype, "db_new")
    else:
        assert db is None
    if need["dcouple"] and p["w_couple"] is not None:
        assert_matches(dcouple, ref_dw[:o_f, i_f:], dtype, "dW_couple")
    else:
        assert dcouple is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_forward_matches_dense(dev, tile_math, name, dtype):
    skip_same_math(tile_math, dtype, conv=True)
    layout, geo = CONV_CASES[name]
    p = make_conv_params(layout, geo["k"], dtype, dev)
    x = conv_input(layout, geo, dtype, dev)
    poison_allocator(dev)
    y = call_conv_forward(layout, p, x, geo)
    assert tuple(y.shape) == conv_out_shape(layout, geo)
    assert y.is_contiguous()
    assert_matches(y, conv_reference(layout, p, x, geo)[0], dtype, "y")


@pytest.mark.gpu
@pytest.mark.parametrize("need_dx_old", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_backward_matches_dense(dev, tile_math, name, dtype, need_dx_old):
    skip_same_math(tile_math, dtype, conv=True)
    layout, geo = CONV_CASES[name]
    p = make_conv_params(layout, geo["k"], dtype, dev)
    x = conv_input(layout, geo, dtype, dev)
    dy = torch.randn(conv_out_shape(layout, geo)).to(dev, dtype)
    poison_allocator(dev)
    grads = call_conv_backward(layout, p, dy, x, geo, need_dx_old=need_dx_old)
    check_conv_backward(layout, p, dy, x, geo, dtype, grads, need_dx_old)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["three_groups_dilated", "coupled_three"])
def test_conv_strided_operands_and_no_bias(dev, tile_math, name, dtype):
    """x in channels_last (odd channel counts: the op reads an NCHW copy; y comes back
    channels_last), dy a permuted view, a column-sliced x: the last two read through their
    strides."""
    skip_same_math(tile_math, dtype, conv=True)
    layout, geo = CONV_CASES[name]
    p = make_conv_params(layout, geo["k"], dtype, dev, bias=False)
    x = conv_input(layout, geo, dtype, dev).to(memory_format=torch.channels_last)
    n, o, ho, wo = conv_out_shape(layout, geo)
    dy = torch.randn(wo, ho, o, n).to(dev, dtype).permute(3, 2, 1, 0)
    poison_allocator(dev)
    assert_matches(call_conv_forward(layout, p, x, geo), conv_reference(layout, p, x, geo)[0],
                   dtype, "y")
    check_conv_backward(layout, p, dy, x, geo, dtype, call_conv_backward(layout, p, dy, x, geo))
    wide = torch.randn(geo["n"], layout.in_features, geo["h"], geo["w"] + 3).to(dev, dtype)
    xs = wide[..., 2:2 + geo["w"]]  # no dimension contiguous but the last
    assert_matches(call_conv_forward(layout, p, xs, geo), conv_reference(layout, p, xs, geo)[0],
                   dtype, "y (sliced x)")
    check_conv_backward(layout, p, dy, xs, geo, dtype, call_conv_backward(layout, p, dy, xs, geo))


@pytest.mark.gpu
@pytest.mark.parametrize("need", NEED_SETS, ids=lambda n: "+".join(k for k, v in n.items() if v)
                         or "nothing")
@pytest.mark.parametrize("name", ["three_groups_dilated", "coupled_three"])
def test_conv_backward_computes_only_what_is_asked(dev, name, need):
    layout, geo = CONV_CASES[name]
    dtype = torch.float16
    p = make_conv_params(layout, geo["k"], dtype, dev)
    x = conv_input(layout, geo, dtype, dev)
    dy = torch.randn(conv_out_shape(layout, geo)).to(dev, dtype)
    poison_allocator(dev)
    grads = call_conv_backward(layout, p, dy, x, geo, need_dx_new=need["dx"], need_dx_old=False,
                               need_dw=need["dw"], need_db=need["db"],
                               need_dcouple=need["dcouple"])
    check_conv_backward(layout, p, dy, x, geo, torch.float16, grads, need_dx_old=False,
                        need=need)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_large_batch_split_reduction(dev, tile_math, dtype):
    """Thousands of output pixels, few dW tiles: the weight gradient splits over blocks."""
    skip_same_math(tile_math, dtype, conv=True)
    layout = Layout((32, 16), (32, 16), "coupled")
    geo = _geo(4, 24, 23, 3, 1, 1)
    p = make_conv_params(layout, geo["k"], dtype, dev)
    x = conv_input(layout, geo, dtype, dev)
    dy = torch.randn(conv_out_shape(layout, geo)).to(dev, dtype)
    poison_allocator(dev)
    assert_matches(call_conv_forward(layout, p, x, geo), conv_reference(layout, p, x, geo)[0],
                   dtype, "y")
    check_conv_backward(layout, p, dy, x, geo, dtype, call_conv_backward(layout, p, dy, x, geo))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_through_the_op_registry(dev, dtype):
    """xf.ops.expanded_conv2d pinned to the cuda backend: autograd, channels_last input,
    dx_old skipped; frozen tensors get no gradient."""
    import expanse_fast as xf
    layout, geo = CONV_CASES["coupled_three"]
    p = make_conv_params(layout, geo["k"], dtype, dev)
    x = conv_input(layout, geo, dtype, dev).to(memory_format=torch.channels_last)
    x.requires_grad_()
    for name in ("w_new", "b_new", "w_couple"):
        p[name].requires_grad_()
    y = xf.ops.expanded_conv2d(x, p["w_frozen"], p["b_frozen"], p["w_new"], p["b_new"],
                               p["w_couple"], frozen_out_groups=layout.frozen_out_groups,
                               frozen_k_ends=layout.frozen_k_ends, stride=geo["stride"],
                               padding=geo["padding"], dilation=geo["dilation"],
                               need_dx_old=False, backend="cuda")
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_y, ref_dx, ref_dw, ref_db = conv_reference(layout, p, x, geo, dy)
    o_f, i_f = layout.frozen_out, layout.frozen_in
    assert_matches(y, ref_y, dtype, "y")
    ref_dx[:, :i_f] = 0
    assert_matches(x.grad, ref_dx, dtype, "dx")
    assert_matches(p["w_new"].grad, ref_dw[o_f:], dtype, "dW_new")
    assert_matches(p["b_new"].grad, ref_db[o_f:], dtype, "db_new")
    assert_matches(p["w_couple"].grad, ref_dw[:o_f, i_f:], dtype, "dW_couple")
    assert p["w_frozen"].grad is None and p["b_frozen"].grad is None


@pytest.mark.gpu
def test_conv_zero_rows_in_the_raw_op(dev):
    """The op itself (no torch_ref hand-off): empty batch gives empty y, zero dW and db."""
    layout, geo = CONV_CASES["two_groups_stride2"]
    p = make_conv_params(layout, geo["k"], torch.float16, dev)
    x = torch.randn(0, layout.in_features, geo["h"], geo["w"], device=dev, dtype=torch.float16)
    ops = torch.ops.expanse_fast_cuda
    args = (list(layout.frozen_out_groups), list(layout.frozen_k_ends), [2, 2], [1, 1], [1, 1])
    y = ops.conv2d_forward(x, p["w_frozen"], p["b_frozen"], p["w_new"], p["b_new"], None, *args)
    assert tuple(y.shape) == (0,) + conv_out_shape(layout, geo)[1:]
    dy = torch.randn(y.shape, device=dev, dtype=torch.float16)
    poison_allocator(dev)
    dx, dw, db, dc = ops.conv2d_backward(dy, x, p["w_frozen"], p["w_new"], None, *args, True,
                                         True, True, True, True)
    assert dx.shape == x.shape and dc is None
    assert torch.equal(dw.cpu(), torch.zeros_like(dw.cpu()))
    assert torch.equal(db.cpu(), torch.zeros_like(db.cpu()))


@pytest.mark.gpu
def test_conv_agrees_with_torch_ref(dev, monkeypatch):
    # cuDNN may round fp32 convolutions through TF32 (torch's default): 1e-3 off on the H200
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    layout, geo = CONV_CASES["three_groups_dilated"]
    p = make_conv_params(layout, geo["k"], torch.float32, dev)
    p["w_frozen"] = torch.nan_to_num(p["w_frozen"])  # torch_ref never reads them either
    x = conv_input(layout, geo, torch.float32, dev)
    args = (p["w_frozen"], p["b_frozen"], p["w_new"], p["b_new"], p["w_couple"],
            layout.frozen_out_groups, layout.frozen_k_ends, *_conv_geo_args(geo), False)
    torch.testing.assert_close(cuda.conv2d_forward(x, *args), torch_ref.conv2d_forward(x, *args),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_conv_depthwise_and_empty_use_torch_ref(dev):
    x = torch.randn(2, 5, 6, 5, device=dev)
    w_f, w_n = torch.randn(3, 1, 3, 3, device=dev), torch.randn(2, 1, 3, 3, device=dev)
    args = (w_f, None, w_n, None, None, [3], [3], [1, 1], [1, 1], [1, 1], True)
    torch.testing.assert_close(cuda.conv2d_forward(x, *args), torch_ref.conv2d_forward(x, *args))
    layout, geo = CONV_CASES["one_group"]
    p = make_conv_params(layout, geo["k"], torch.float32, dev)
    x0 = torch.randn(0, layout.in_features, geo["h"], geo["w"], device=dev)
    assert call_conv_forward(layout, p, x0, geo).shape[0] == 0


@pytest.mark.gpu
def test_conv_bad_arguments_name_expected_and_given(dev):
    layout, geo = CONV_CASES["two_groups_stride2"]
    p = make_conv_params(layout, geo["k"], torch.float16, dev)
    ops = torch.ops.expanse_fast_cuda
    groups, k_ends = list(layout.frozen_out_groups), list(layout.frozen_k_ends)

    def fwd(x, stride=(1, 1), padding=(0, 0), w_new=p["w_new"]):
        return ops.conv2d_forward(x, p["w_frozen"], None, w_new, None, None, groups, k_ends,
                                  list(stride), list(padding), [1, 1])

    x = torch.randn(2, layout.in_features, 9, 9, device=dev)  # float32 against float16 weights
    with pytest.raises(RuntimeError, match=r"w_new must have dtype Float.*got Half"):
        fwd(x)
    x = x.half()
    with pytest.raises(RuntimeError, match=r"w_new must have 17 input channels"):
        fwd(x, w_new=p["w_new"][:, :16])
    with pytest.raises(RuntimeError, match=r"stride must be >= 1"):
        fwd(x, stride=(0, 1))
    with pytest.raises(RuntimeError, match=r"smaller than the dilated kernel"):
        fwd(x[..., :2, :2])
    with pytest.raises(RuntimeError, match=r"expected CUDA tensors, got x on cpu"):
        fwd(x.cpu())
    with pytest.raises(RuntimeError, match=r"sum to 16 but w_frozen has 17 rows"):
        ops.conv2d_forward(x, p["w_frozen"], None, p["w_new"], None, None, [16], [13], [1, 1],
                           [0, 0], [1, 1])


@pytest.mark.gpu
def test_conv_fake_registrations(dev):
    layout, geo = CONV_CASES["coupled_three"]
    p = make_conv_params(layout, geo["k"], torch.float16, dev)
    p["w_frozen"] = torch.nan_to_num(p["w_frozen"])
    x = conv_input(layout, geo, torch.float16, dev)
    stat = (list(layout.frozen_out_groups), list(layout.frozen_k_ends), [2, 1], [1, 0], [1, 2])
    args = (x, p["w_frozen"], p["b_frozen"], p["w_new"], p["b_new"], p["w_couple"]) + stat
    torch.library.opcheck(torch.ops.expanse_fast_cuda.conv2d_forward.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    y = torch.ops.expanse_fast_cuda.conv2d_forward(*args)
    dy = torch.randn_like(y)
    bargs = (dy, x, p["w_frozen"], p["w_new"], p["w_couple"]) + stat + (True, False, True, True,
                                                                       True)
    torch.library.opcheck(torch.ops.expanse_fast_cuda.conv2d_backward.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------
# CPU: importing never fails, availability explains itself
# ---------------------------------------------------------------------------------------
def test_unavailable_on_cpu_with_reason():
    ok, why = cuda.availability(torch.device("cpu"))
    assert ok is False
    assert isinstance(why, str) and why


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU build of torch")
def test_cpu_torch_says_so():
    ok, why = cuda.availability("cuda")
    assert not ok and "not built with CUDA" in why


def test_toolchain_without_cuda_headers_names_cuda_home(monkeypatch, tmp_path):
    """An nvcc wrapper outside the toolkit makes torch guess a CUDA_HOME with no headers:
    the build is not tried, and the reason names the directory and the fix."""
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    why = cuda._toolchain_missing()
    assert why is not None and f"CUDA_HOME={tmp_path}" in why and "set CUDA_HOME" in why
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime_api.h").write_text("")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    assert cuda._toolchain_missing() is None



def test_library_headers_come_from_torchs_nvidia_wheels_where_the_toolkit_lacks_them(
        monkeypatch, tmp_path):
    """A toolkit with nvcc and the runtime only has no cuSPARSE/cuBLAS headers, which
    ATen's CUDA headers include: the build then adds the include folders of torch's
    nvidia-* wheels that hold them (cu13 wheels: one folder; cu12: one per library), and
    nothing where the toolkit has them all."""
    import importlib.util
    import types
    toolkit, wheels = tmp_path / "cuda", tmp_path / "site" / "nvidia"
    (toolkit / "include").mkdir(parents=True)
    for folder, header in (("cu13", "cusparse.h"), ("cu13", "cublas_v2.h"),
                           ("cusolver", "cusolverDn.h"), ("nccl", "nccl.h")):
        (wheels / folder / "include").mkdir(parents=True, exist_ok=True)
        (wheels / folder / "include" / header).write_text("")
    spec = types.SimpleNamespace(submodule_search_locations=[str(wheels)])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: spec if name == "nvidia" else real_find_spec(name, *a))
    assert cuda._library_include_dirs(str(toolkit)) == [
        str(wheels / "cu13" / "include"), str(wheels / "cusolver" / "include")]
    assert cuda._library_include_dirs(None) == cuda._library_include_dirs(str(toolkit))
    for header in cuda._LIBRARY_HEADERS:
        (toolkit / "include" / header).write_text("")
    assert cuda._library_include_dirs(str(toolkit)) == []

def test_wrappers_match_the_op_schemas_under_fake_tensors():
    """Where the extension loads (a CUDA build of torch; no GPU needed), the Python wrappers
    call its ops with arguments their C++ schemas accept, and the registered fake
    implementations give the shapes, devices and dtypes of every output (None where a
    gradient is not asked for): what torch.compile traces with."""
    if torch.version.cuda is None:
        pytest.skip("needs a CUDA build of torch")
    try:
        cuda.load()
    except RuntimeError as exc:
        pytest.skip(f"the extension does not load here: {exc}")
    from torch._subclasses.fake_tensor import FakeTensorMode
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    with FakeTensorMode():
        x, wf, wn = (torch.empty(37, 24, **bf16), torch.empty(16, 16, **bf16),
                     torch.empty(8, 24, **bf16))
        y = cuda.linear_forward(x, wf, torch.empty(16, **bf16), wn, None, None, [9, 7],
                                [16, 5], "relu")
        assert (tuple(y.shape), y.device.type, y.dtype) == ((37, 24), "cuda", torch.bfloat16)
        grads = cuda.linear_backward(torch.empty(37, 24, **bf16), x, wf, wn, None, [9, 7],
                                     [16, 5], True, False, True, True, False)
        assert [None if g is None else tuple(g.shape) for g in grads] == [
            (37, 24), (8, 24), (8,), None]
        xc = torch.empty(2, 5, 9, 7, device="cuda")
        wfc, wnc = torch.empty(6, 3, 3, 3, device="cuda"), torch.empty(4, 5, 3, 3, device="cuda")
        yc = cuda.conv2d_forward(xc, wfc, None, wnc, None, None, [6], [3], 2, 1, 1, False)
        assert tuple(yc.shape) == (2, 10, 5, 4) and yc.dtype == torch.float32
        gc = cuda.conv2d_backward(torch.empty(2, 10, 5, 4, device="cuda"), xc, wfc, wnc, None,
                                  [6], [3], 2, 1, 1, False, True, True, True, True, False,
                                  frozen_dy_scale=torch.empty(6, device="cuda"))
        assert [None if g is None else tuple(g.shape) for g in gc] == [
            (2, 5, 9, 7), (4, 5, 3, 3), (4,), None]


def test_sources_found():
    """The build compiles every .cu and .cpp of csrc/ (a new kernel file is not forgotten)."""
    files = cuda.source_files()
    names = [f.rsplit("/", 1)[-1] for f in files]
    on_disk = sorted(f for f in os.listdir(cuda.source_dir()) if f.endswith((".cu", ".cpp")))
    assert sorted(names) == on_disk and len(set(names)) == len(names)
    assert "expanded_conv_nhwc.cu" in names and names[0] == "bindings.cpp"
    for f in files:
        with open(f) as fh:
            assert fh.read(100)


def test_conv_depthwise_and_empty_shapes_go_to_torch_ref_on_cpu():
    """The hand-off needs no extension: depthwise and empty convolutions never reach it."""
    x = torch.randn(2, 5, 6, 5)
    w_f, w_n = torch.randn(6, 1, 3, 3), torch.randn(4, 1, 3, 3)
    args = (w_f, None, w_n, None, None, [6], [3], [1, 1], [1, 1], [1, 1], True)
    torch.testing.assert_close(cuda.conv2d_forward(x, *args), torch_ref.conv2d_forward(x, *args))
    dy = torch.randn(2, 10, 6, 5)
    grads = cuda.conv2d_backward(dy, x, w_f, w_n, None, [6], [3], [1, 1], [1, 1], [1, 1], True,
                                 True, True, True, True, False)
    ref = torch_ref.conv2d_backward(dy, x, w_f, w_n, None, [6], [3], [1, 1], [1, 1], [1, 1],
                                    True, True, True, True, True, False)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want)
    empty = torch.randn(0, 3, 4, 4)
    w_f, w_n = torch.randn(2, 2, 3, 3), torch.randn(1, 3, 3, 3)
    y = cuda.conv2d_forward(empty, w_f, None, w_n, None, None, [2], [2], 1, 1, 1, False)
    assert tuple(y.shape) == (0, 3, 4, 4)


def test_conv_argument_pairs():
    assert cuda._conv_pair(2) == [2, 2]
    assert cuda._conv_pair([3]) == [3, 3]
    assert cuda._conv_pair((1, 2)) == [1, 2]
    assert torch_ref.conv_out_size(7, 3, 2, 1, 1) == 4


def test_fake_gradients_keep_the_memory_format_of_x():
    """The backward ops' fakes give dx x's memory format, as the ops do: channels_last for a
    channels_last conv input, contiguous otherwise (linear inputs, NCHW).  (CPU: the fakes'
    helper, without the extension.)"""
    cl = torch.randn(2, 8, 5, 3).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 8, 3, 3)
    dx, dw, db, dcouple = cuda._fake_grads(cl, w, None, True, True, True, True)
    assert dx.shape == cl.shape and dx.is_contiguous(memory_format=torch.channels_last)
    assert not dx.is_contiguous() and dw.shape == w.shape and db.shape == (4,)
    assert dcouple is None
    nchw = cl.contiguous()
    assert cuda._fake_grads(nchw, w, None, True, False, False, False)[0].is_contiguous()
    rows = torch.randn(7, 8)[:, ::2]  # a linear input, not contiguous
    dx = cuda._fake_grads(rows, torch.randn(3, 4), None, True, False, False, False)[0]
    assert dx.shape == rows.shape and dx.is_contiguous()
    assert cuda._fake_grads(rows, torch.randn(3, 4), None, False, False, False, False)[0] is None


def test_turned_off_by_the_environment(monkeypatch):
    """EXPANSE_FAST_CUDA=0 keeps the backend unusable, with that reason, and neither looks for
    a prebuilt extension nor starts a build."""
    monkeypatch.setenv("EXPANSE_FAST_CUDA", "0")
    monkeypatch.setattr(cuda, "_state", {"loaded": False, "error": None, "how": None})
    monkeypatch.setattr(cuda, "_prebuilt_path", lambda: pytest.fail("looked for a prebuilt"))
    monkeypatch.setattr(cuda, "_toolchain_missing", lambda: pytest.fail("prepared a build"))
    for _ in range(2):  # the reason is remembered
        with pytest.raises(RuntimeError, match="turned off by EXPANSE_FAST_CUDA=0"):
            cuda.load()
