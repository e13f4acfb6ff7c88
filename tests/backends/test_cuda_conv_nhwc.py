"""The cuda backend's channels_last conv kernels (csrc/expanded_conv_nhwc.cu) on a GPU.

A channels_last x in fp16/bf16 whose channel counts (I, I_f, every k_end) are multiples of 8
goes to the NHWC implicit GEMM forward on the linear kernels' cp.async pipeline, with wgmma
where the build has it (an H100/H200), else (or with EXPANSE_FAST_CUDA_WGMMA=0) with the
portable WMMA math; with a channels_last dy, to the NHWC weight gradients
(db fused) as well, and to the NHWC input gradient where the row counts (o_T, every frozen
group's) are multiples of 8 too.  Everything else goes to the NCHW kernels, on NCHW copies.
Either way y and dx come back channels_last and match the expanded layer in float64.  The
weight channels a frozen group never reads are NaN (make_conv_params), so a read past k_end
fails.
"""
import re

import pytest
import torch

from expanse_fast.backends import cuda
from expanse_fast.layout import Layout

from test_cuda_backend import (_geo, assert_matches, call_conv_backward, call_conv_forward,
                               check_conv_backward, conv_out_shape, conv_reference,
                               make_conv_params, poison_allocator)

pytestmark = pytest.mark.gpu

# Channel counts the NHWC kernel takes.  Its tile is 128 pixels x 128 output channels x 64 of
# the reduction (taps x channels, channel innermost), 64 output channels for a narrow group:
# 72 and 40 channels give k-tiles that cross taps, 130 rows three narrow column tiles,
# 29 x 31 x 2 pixels many row tiles.
NHWC_CASES = {
    "3x3_coupled": (Layout((16, 8), (24, 5), "coupled"), _geo(2, 7, 5, 3, 1, 1)),
    "3x3_groups_many_pixels": (Layout((40, 16, 16), (2, 130, 5), "coupled"),
                               _geo(2, 29, 31, 3, 1, 1)),
    "strided_dilated_3x2": (Layout((8, 8, 8), (3, 4, 7)), _geo(2, 11, 9, (3, 2), 2, (2, 1), 2)),
    "1x1_stride2": (Layout((64, 64), (128, 64), "coupled"), _geo(2, 14, 14, 1, 2)),
    "single_pixel_first_layer": (Layout((0, 8), (4, 9)), _geo(1, 1, 1, 3, 1, 1)),
    "empty_prefix_group_5x3": (Layout((0, 8, 8), (3, 2, 1)), _geo(2, 4, 6, (5, 3), (1, 2), (2, 1))),
    "resnet_like": (Layout((256, 64), (256, 64)), _geo(2, 14, 14, 3, 1, 1)),
}


# Row counts the NHWC input gradient takes (multiples of 8): two bands of old channels (k_end 8
# inside I_f = 16) under a stride that skips input pixels (its dx runs by stride phases, each
# over the taps that reach it), 136 + 16 frozen rows (k-tiles across taps), a ResNet-like
# stage.
DX_CASES = {
    "3x3_coupled": (Layout((16, 8), (24, 8), "coupled"), _geo(2, 7, 5, 3, 1, 1)),
    "strided_dilated_bands": (Layout((8, 8, 8), (8, 16, 8)),
                              _geo(2, 11, 9, (3, 2), 2, (2, 1), 2)),
    "many_pixels_groups": (Layout((40, 16, 16), (16, 136, 24), "coupled"),
                           _geo(2, 29, 31, 3, 1, 1)),
    "1x1_stride2": NHWC_CASES["1x1_stride2"],
    "resnet_like": NHWC_CASES["resnet_like"],
    # a ResNet downsample's 3 x 3 at stride 2 on odd sizes: stride phases of 4, 2, 2, 1 taps
    "3x3_stride2": (Layout((16, 8), (24, 8), "coupled"), _geo(2, 13, 11, 3, 2, 1)),
}


@pytest.fixture
def dev(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    device = torch.device("cuda")
    ok, why = cuda.availability(device)
    assert ok, f"cuda backend unavailable on this GPU machine: {why}"
    for name in ("EXPANSE_FAST_CUDA_WGMMA", "EXPANSE_FAST_CUDA_CONV_NHWC",
                 "EXPANSE_FAST_CUDA_CONV_NARROW"):
        monkeypatch.delenv(name, raising=False)
    return device


def kernels_of(fn):
    """(result, names of the CUDA kernels fn launched)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    return out, {e.name for e in prof.events()}


def uses_nhwc(names):
    return any("conv_nhwc_fwd_kernel" in n for n in names)


def channels_last_input(layout, geo, dtype, device):
    x = torch.randn(geo["n"], layout.in_features, geo["h"], geo["w"])
    return x.to(device, dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(NHWC_CASES))
def test_nhwc_forward_matches_dense(dev, name, dtype):
    layout, geo = NHWC_CASES[name]
    p = make_conv_params(layout, geo["k"], dtype, dev)
    x = channels_last_input(layout, geo, dtype, dev)
    poison_allocator(dev)
    y, names = kernels_of(lambda: call_conv_forward(layout, p, x, geo))
    assert tuple(y.shape) == conv_out_shape(layout, geo)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_matches(y, conv_reference(layout, p, x, geo)[0], dtype, "y")
    assert uses_nhwc(names), sorted(names)


@pytest.mark.parametrize("name", ["3x3_groups_many_pixels", "strided_dilated_3x2"])
def test_nhwc_folded_batchnorm_and_no_bias(dev, name):
    """The frozen channels' eval-mode BatchNorm in the epilogue (after the conv), no biases."""
    dtype = torch.bfloat16
    layout, geo = NHWC_CASES[name]
    p = make_conv_params(layout, geo["k"], dtype, dev, bias=False)
    x = channels_last_input(layout, geo, dtype, dev)
    o_f = layout.frozen_out
    mean, var = torch.randn(o_f, device=dev), torch.rand(o_f, device=dev) + 0.5
    weight, bias = torch.randn(o_f, device=dev), torch.randn(o_f, device=dev)
    y = cuda.conv2d_forward(x, p["w_frozen"], None, p["w_new"], None, p["w_couple"],
                            layout.frozen_out_groups, layout.frozen_k_ends, geo["stride"],
                            geo["padding"], geo["dilation"], False,
                            frozen_bn=(mean, var, weight, bias, 1e-5))
    ref = conv_reference(layout, p, x, geo)[0]
    scale = weight.double().cpu() / torch.sqrt(var.double().cpu() + 1e-5)
    ref[:, :o_f] = ((ref[:, :o_f] - mean.double().cpu().view(1, -1, 1, 1))
                    * scale.view(1, -1, 1, 1) + bias.double().cpu().view(1, -1, 1, 1))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_matches(y, ref, dtype, "y (folded BatchNorm)")


def test_nhwc_off_and_unaligned_channels_take_the_nchw_kernels(dev, monkeypatch):
    """EXPANSE_FAST_CUDA_CONV_NHWC=0, and channel counts that are not multiples of 8: the
    NCHW kernels (on an NCHW copy of x), the same values, y still channels_last."""
    dtype = torch.bfloat16
    layout, geo = NHWC_CASES["3x3_coupled"]
    p = make_conv_params(layout, geo["k"], dtype, dev)
    x = channels_last_input(layout, geo, dtype, dev)
    y_default = call_conv_forward(layout, p, x, geo)
    monkeypatch.setenv("EXPANSE_FAST_CUDA_CONV_NHWC", "0")
    y_off, names = kernels_of(lambda: call_conv_forward(layout, p, x, geo))
    assert not uses_nhwc(names), sorted(names)
    assert y_off.is_contiguous(memory_format=torch.channels_last)
    ref = conv_reference(layout, p, x, geo)[0]
    assert_matches(y_off, ref, dtype, "y (NCHW kernels)")
    assert_matches(y_default, ref, dtype, "y (default)")
    monkeypatch.delenv("EXPANSE_FAST_CUDA_CONV_NHWC")
    odd, geo = Layout((12, 4), (9, 3)), _geo(2, 6, 5, 3, 1, 1)  # 12 frozen input channels
    p = make_conv_params(odd, geo["k"], dtype, dev)
    x = channels_last_input(odd, geo, dtype, dev)
    y, names = kernels_of(lambda: call_conv_forward(odd, p, x, geo))
    assert not uses_nhwc(names), sorted(names)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_matches(y, conv_reference(odd, p, x, geo)[0], dtype, "y (12 frozen channels)")


def test_nhwc_fake_registration_keeps_the_memory_format(dev):
    """The op's fake gives y x's memory format, as the real op does on both paths."""
    layout, geo = NHWC_CASES["3x3_coupled"]
    p = make_conv_params(layout, geo["k"], torch.bfloat16, dev)
    p["w_frozen"] = torch.nan_to_num(p["w_frozen"])
    x = channels_last_input(layout, geo, torch.bfloat16, dev)
    args = (x, p["w_frozen"], p["b_frozen"], p["w_new"], p["b_new"], p["w_couple"],
            list(layout.frozen_out_groups), list(layout.frozen_k_ends), [1, 1], [1, 1], [1, 1])
    torch.library.opcheck(torch.ops.expanse_fast_cuda.conv2d_forward.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def channels_last_case(cases, name, dtype, device):
    """(layout, geo, params, x, dy) of a case: channels_last x and dy of random values."""
    layout, geo = cases[name]
    p = make_conv_params(layout, geo["k"], dtype, device)
    x = channels_last_input(layout, geo, dtype, device)
    dy = torch.randn(conv_out_shape(layout, geo)).to(device, dtype)
    return layout, geo, p, x, dy.contiguous(memory_format=torch.channels_last)


def uses_nhwc_dx(names):
    return any("conv_nhwc_dx_kernel" in n for n in names)


@pytest.mark.parametrize("need_dx_old", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(DX_CASES))
def test_nhwc_backward_matches_dense(dev, name, dtype, need_dx_old):
    """Every gradient of a channels_last layer from the NHWC kernels: dx (dx_old zeros when
    not asked for), dW with db fused, dW_couple; dx channels_last."""
    layout, geo, p, x, dy = channels_last_case(DX_CASES, name, dtype, dev)
    poison_allocator(dev)
    grads, names = kernels_of(lambda: call_conv_backward(layout, p, dy, x, geo,
                                                         need_dx_old=need_dx_old))
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    check_conv_backward(layout, p, dy, x, geo, dtype, grads, need_dx_old)
    assert uses_nhwc_dx(names) and uses_nhwc_dw(names), sorted(names)


def uses_nhwc_dw(names):
    return any("conv_nhwc_dw_kernel" in n for n in names)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(NHWC_CASES))
def test_nhwc_weight_gradients_match_dense(dev, name, dtype):
    """dW_new with db fused, and dW_couple, from channels_last dy and x (any row counts; the
    pixels split over blocks where the output tiles are few), returned (rows, channels, KH,
    KW) contiguous; no dx asked for."""
    layout, geo, p, x, dy = channels_last_case(NHWC_CASES, name, dtype, dev)
    poison_allocator(dev)
    need = dict(dx=False, dw=True, db=True, dcouple=True)
    grads, names = kernels_of(lambda: call_conv_backward(layout, p, dy, x, geo,
                                                         need_dx_new=False, need_dx_old=False))
    for g in grads[1:]:
        assert g is None or g.is_contiguous()
    check_conv_backward(layout, p, dy, x, geo, dtype, grads, need=need)
    assert uses_nhwc_dw(names), sorted(names)


def test_nhwc_dx_off_and_unaligned_rows_take_the_nchw_kernel(dev, monkeypatch):
    """EXPANSE_FAST_CUDA_CONV_NHWC=0, and 5 new rows: the NCHW input gradient (on an NCHW copy
    of dy), the same values, dx still in x's memory format."""
    dtype = torch.bfloat16
    layout, geo = DX_CASES["3x3_coupled"]
    p = make_conv_params(layout, geo["k"], dtype, dev)
    x = channels_last_input(layout, geo, dtype, dev)
    dy = torch.randn(conv_out_shape(layout, geo)).to(dev, dtype)
    dy_cl = dy.contiguous(memory_format=torch.channels_last)
    monkeypatch.setenv("EXPANSE_FAST_CUDA_CONV_NHWC", "0")
    grads, names = kernels_of(lambda: call_conv_backward(layout, p, dy_cl, x, geo))
    assert not uses_nhwc_dx(names), sorted(names)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    check_conv_backward(layout, p, dy_cl, x, geo, dtype, grads)
    monkeypatch.delenv("EXPANSE_FAST_CUDA_CONV_NHWC")
    odd, geo = NHWC_CASES["3x3_coupled"]  # 5 new rows
    p = make_conv_params(odd, geo["k"], dtype, dev)
    x = channels_last_input(odd, geo, dtype, dev)
    dy = torch.randn(conv_out_shape(odd, geo)).to(dev, dtype)
    dy = dy.contiguous(memory_format=torch.channels_last)
    grads, names = kernels_of(lambda: call_conv_backward(odd, p, dy, x, geo))
    assert not uses_nhwc_dx(names), sorted(names)
    check_conv_backward(odd, p, dy, x, geo, dtype, grads)


def test_nhwc_backward_fake_registration_keeps_the_memory_format(dev):
    layout, geo = DX_CASES["3x3_coupled"]
    p = make_conv_params(layout, geo["k"], torch.bfloat16, dev)
    p["w_frozen"] = torch.nan_to_num(p["w_frozen"])
    x = channels_last_input(layout, geo, torch.bfloat16, dev)
    dy = torch.randn(conv_out_shape(layout, geo)).to(dev, torch.bfloat16)
    dy = dy.contiguous(memory_format=torch.channels_last)
    args = (dy, x, p["w_frozen"], p["w_new"], p["w_couple"], list(layout.frozen_out_groups),
            list(layout.frozen_k_ends), [1, 1], [1, 1], [1, 1], True, True, True, True, True)
    torch.library.opcheck(torch.ops.expanse_fast_cuda.conv2d_backward.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("name", ["3x3_coupled", "resnet_like"])
def test_nchw_operands_take_the_nhwc_kernels_through_copies(dev, name):
    """NCHW x and dy (and an NCHW dy beside a channels_last x) whose counts qualify: the NHWC
    kernels run on channels_last copies, and y and dx come back in x's memory format."""
    dtype = torch.bfloat16
    layout, geo = DX_CASES[name]
    p = make_conv_params(layout, geo["k"], dtype, dev)
    x = torch.randn(geo["n"], layout.in_features, geo["h"], geo["w"]).to(dev, dtype)
    dy = torch.randn(conv_out_shape(layout, geo)).to(dev, dtype)
    y, names = kernels_of(lambda: call_conv_forward(layout, p, x, geo))
    assert y.is_contiguous() and uses_nhwc(names), sorted(names)
    assert_matches(y, conv_reference(layout, p, x, geo)[0], dtype, "y (NCHW x)")
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        grads, names = kernels_of(lambda: call_conv_backward(layout, p, dy, xx, geo))
        assert uses_nhwc_dx(names) and uses_nhwc_dw(names), sorted(names)
        assert grads[0].is_contiguous(memory_format=(torch.channels_last if xx is not x
                                                     else torch.contiguous_format))
        check_conv_backward(layout, p, dy, xx, geo, dtype, grads)


def offset_copy(t):
    """t in storage that starts one element past an allocation: no longer 16-byte aligned."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("name", ["1x1_stride2", "3x3_coupled"])
def test_nhwc_kernels_take_weights_that_start_anywhere(dev, name):
    """Weights whose storage starts off 16 bytes (a 1 x 1 kernel's permuted weight is a view of
    it): the NHWC kernels read an aligned copy, and every result matches."""
    dtype = torch.bfloat16
    layout, geo = DX_CASES[name]
    p = make_conv_params(layout, geo["k"], dtype, dev)
    p = {k: None if v is None else (offset_copy(v) if k.startswith("w_") else v)
         for k, v in p.items()}
    assert all(v.data_ptr() % 16 for k, v in p.items() if k.startswith("w_") and v is not None)
    x = channels_last_input(layout, geo, dtype, dev)
    dy = torch.randn(conv_out_shape(layout, geo)).to(dev, dtype)
    dy = dy.contiguous(memory_format=torch.channels_last)
    y = call_conv_forward(layout, p, x, geo)
    assert_matches(y, conv_reference(layout, p, x, geo)[0], dtype, "y (offset weights)")
    check_conv_backward(layout, p, dy, x, geo, dtype, call_conv_backward(layout, p, dy, x, geo))


def nhwc_tiles(names):
    """{(kernel, BM, BN)} of the NHWC kernels launched, read off their WgmmaMath<T, swizzle,
    BK, stages, BN, BM> template arguments."""
    tiles = set()
    for n in names:
        m = re.search(r"(conv_nhwc_(?:fwd|dx|dw)_kernel)<.*?WgmmaMath<[^<>]*?(\d+),\s*(\d+)\s*>",
                      n)
        if m:
            tiles.add((m.group(1), int(m.group(3)), int(m.group(2))))
    return tiles


# The tiles each product takes (BM x BN).  ResNet-like (256 frozen + 64 new channels, 3x3):
# the frozen rows on 128 x 128 tiles, the 64 new rows on 128 x 64 (a wide tile would leave
# half idle); dx of the new channels only on 128 x 64; dW_new (64 rows x 9 * 320 columns) on
# 64 x 256.  1x1_stride2: dW_new (64 x 128) and dW_couple (128 x 64) stay on 128 x 128, where
# the 64 x 256 tile would leave as much idle.
TILE_CASES = {
    "resnet_like": {("conv_nhwc_fwd_kernel", 128, 128), ("conv_nhwc_fwd_kernel", 128, 64),
                    ("conv_nhwc_dx_kernel", 128, 64), ("conv_nhwc_dw_kernel", 64, 256)},
    "1x1_stride2": {("conv_nhwc_fwd_kernel", 128, 128), ("conv_nhwc_fwd_kernel", 128, 64),
                    ("conv_nhwc_dx_kernel", 128, 64), ("conv_nhwc_dw_kernel", 128, 128)},
}


@pytest.mark.parametrize("narrow", [True, False], ids=["default", "narrow_off"])
@pytest.mark.parametrize("name", list(TILE_CASES))
def test_nhwc_kernels_take_narrow_tiles_where_wide_ones_idle(dev, monkeypatch, name, narrow):
    """Which tiles the forward, dx (without dx_old) and the weight gradients launch on, and
    that their results match; EXPANSE_FAST_CUDA_CONV_NARROW=0: 128 x 128 tiles only."""
    dtype = torch.bfloat16
    if not narrow:
        monkeypatch.setenv("EXPANSE_FAST_CUDA_CONV_NARROW", "0")
    if not cuda.linear_math(dtype, dev).startswith("wgmma"):
        pytest.skip("the narrow tiles are the wgmma math's (an H100/H200)")
    layout, geo, p, x, dy = channels_last_case(DX_CASES, name, dtype, dev)
    y, fwd_names = kernels_of(lambda: call_conv_forward(layout, p, x, geo))
    assert_matches(y, conv_reference(layout, p, x, geo)[0], dtype, "y")
    grads, bwd_names = kernels_of(lambda: call_conv_backward(layout, p, dy, x, geo,
                                                             need_dx_old=False))
    check_conv_backward(layout, p, dy, x, geo, dtype, grads, need_dx_old=False)
    want = TILE_CASES[name] if narrow else {(k, 128, 128) for k, _, _ in TILE_CASES[name]}
    assert nhwc_tiles(fwd_names | bwd_names) == want, sorted(fwd_names | bwd_names)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", ["3x3_groups_many_pixels", "strided_dilated_3x2", "resnet_like",
                                  "1x1_stride2", "3x3_stride2"])
def test_nhwc_portable_math_matches_dense(dev, monkeypatch, name, dtype):
    """EXPANSE_FAST_CUDA_WGMMA=0 (what a GPU without wgmma runs): the three NHWC products on
    the WMMA math (fp16/bf16, one 128 x 128 tile for every segment) or the SIMT math (fp32,
    on every GPU), against float64."""
    monkeypatch.setenv("EXPANSE_FAST_CUDA_WGMMA", "0")
    layout, geo, p, x, dy = channels_last_case(NHWC_CASES | DX_CASES, name, dtype, dev)
    poison_allocator(dev)
    y, fwd_names = kernels_of(lambda: call_conv_forward(layout, p, x, geo))
    math = "SimtMath" if dtype == torch.float32 else "WmmaMath"
    assert_matches(y, conv_reference(layout, p, x, geo)[0], dtype, f"y ({math})")
    rows_ok = name in DX_CASES  # (the NHWC dx takes row counts that are multiples of 8)
    grads, bwd_names = kernels_of(lambda: call_conv_backward(layout, p, dy, x, geo))
    check_conv_backward(layout, p, dy, x, geo, dtype, grads)
    names = fwd_names | bwd_names
    nhwc = [n for n in names if "conv_nhwc_" in n]
    assert nhwc and all(math in n for n in nhwc), sorted(names)
    assert uses_nhwc(names) and uses_nhwc_dw(names) and uses_nhwc_dx(names) == rows_ok, \
        sorted(names)


def test_nchw_fp32_stays_on_the_nchw_kernels(dev):
    """An NCHW fp32 layer is not copied to channels_last (both kernel families multiply fp32
    with FMA): the NCHW kernels, the same values; channels_last fp32 takes the NHWC ones."""
    dtype = torch.float32
    layout, geo = DX_CASES["3x3_coupled"]
    p = make_conv_params(layout, geo["k"], dtype, dev)
    x = torch.randn(geo["n"], layout.in_features, geo["h"], geo["w"]).to(dev, dtype)
    dy = torch.randn(conv_out_shape(layout, geo)).to(dev, dtype)
    y, names = kernels_of(lambda: call_conv_forward(layout, p, x, geo))
    assert y.is_contiguous() and not uses_nhwc(names), sorted(names)
    assert_matches(y, conv_reference(layout, p, x, geo)[0], dtype, "y (NCHW fp32)")
    grads, names = kernels_of(lambda: call_conv_backward(layout, p, dy, x, geo))
    assert not uses_nhwc_dx(names) and not uses_nhwc_dw(names), sorted(names)
    check_conv_backward(layout, p, dy, x, geo, dtype, grads)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y, names = kernels_of(lambda: call_conv_forward(layout, p, x_cl, geo))
    assert uses_nhwc(names), sorted(names)
    assert_matches(y, conv_reference(layout, p, x_cl, geo)[0], dtype, "y (channels_last fp32)")
