"""The conv forward with tensor-descriptor (TMA) loads, against the float64 reference.

On a CPU the descriptor kernel runs in the Triton interpreter (``EXPANSE_FAST_TMA`` forced
on, fp32 and fp16); bf16 and the ResNet shape run in the GPU-marked tests.  The cases'
channel counts are multiples of 8 (16-byte rows, as descriptors need) but not of the
tiles, and the frozen columns past each group's k_end hold NaN, as in
test_expanded_conv_kernels.
"""
import itertools

import pytest
import torch

from expanse_fast.kernels import expanded_conv as ec
from expanse_fast.kernels import expanded_conv_tma as ect
from expanse_fast.kernels import expanded_linear_tma as lt
from test_expanded_conv_kernels import (DEV, _check_resnet_shape, _close, _conv,
                                        _forward_and_poisoned_dy, _layer_args, _make, _norm,
                                        _reference, _run, _run_norm, _to_dev)
from test_expanded_conv_kernels import _exact_fp32  # noqa: F401 -- autouse: IEEE fp32


@pytest.fixture
def tma_launches(monkeypatch):
    """Force the descriptor kernels (the interpreter too); record each conv launch as
    (kernel, whether it ran)."""
    if lt.TensorDescriptor is None:
        pytest.skip(f"this Triton has no tensor descriptors: {lt._IMPORT_ERROR}")
    monkeypatch.setattr(lt, "MODE", "1")
    monkeypatch.setattr(lt, "disabled_reason", None)
    launches = []

    def spy(name, real):
        def run(*args, **kwargs):
            launches.append((name, real(*args, **kwargs)))
            return launches[-1][1]
        return run
    for name in ("forward", "wgrad", "wgrad_nchw", "grad_input"):
        monkeypatch.setattr(ect, name, spy(name, getattr(ect, name)))
    return launches


def _expected(coupled, dx_old=True, conv=None, hw=(5, 5), kernel=3, channels_last=True):
    """The descriptor launches of a forward and a backward asking for every gradient: the
    forward and dW where the stride divides H and W (x's phase view), dx along a strided
    dimension at dilation 1 only.  dW reads an NCHW x in place at stride 1 where the output
    is as wide as the input and H * W is a multiple of 8 (``wgrad_nchw``)."""
    conv = conv or _conv()
    divides = all(size % st == 0 for size, st in zip(hw, conv["stride"]))
    dx = all(st == 1 or dil == 1 for st, dil in zip(conv["stride"], conv["dilation"]))
    kw = kernel if isinstance(kernel, int) else kernel[1]
    pad_w, dil_w = (v if isinstance(v, int) else v[1] for v in (conv["padding"],
                                                                  conv["dilation"]))
    flat = (not channels_last and conv["stride"] in (1, (1, 1))
            and 2 * pad_w == dil_w * (kw - 1) and hw[0] * hw[1] % 8 == 0)
    wgrad = "wgrad_nchw" if flat else "wgrad"
    return ([("forward", True)] * divides + [(wgrad, True)] * (divides * (1 + coupled))
            + [("grad_input", True)] * dx)


# (in_groups, out_groups, kernel, coupled, bias, conv, batch, (H, W), channels_last)
CASES = {
    # an odd batch and pixel boxes that overhang the image on both sides
    "pad1_odd_batch": ((16, 8), (16, 8), 3, False, True, _conv(padding=1), 3, (5, 7), True),
    # group 0 stops at channel 8, inside the first channel tile: its partial tile is
    # loaded whole and must drop the NaN columns past k_end
    "3groups_tail_dil2": ((8, 8, 16), (8, 16, 8), 3, False, True,
                          _conv(padding=2, dilation=2), 2, (6, 5), True),
    "coupled_1x3": ((16, 8), (8, 16), (1, 3), True, False, _conv(padding=(0, 1)), 1, (4, 9),
                    True),
    "1x1_7x7": ((24, 16), (16, 24), 1, False, True, _conv(), 3, (7, 7), True),
    # 24 coupled channels: a full tile and a partial one per tap, in the coupling block too
    "coupled_24_new": ((16, 24), (8, 16), 3, True, True, _conv(padding=1), 2, (5, 6), True),
    # NCHW input: the launcher's channels_last copy goes through the descriptors, y and dx
    # are stored in NCHW in place (W = 7: one pixel a store; W = 24: vectors of 8 pixels,
    # boxes 16 wide, the second half of the second box past W)
    "nchw_input": ((16, 8), (24, 8), 3, False, True, _conv(padding=1), 2, (5, 7), False),
    "nchw_w24": ((16, 8), (16, 8), 3, True, True, _conv(padding=1), 1, (1, 24), False),
    # NCHW, stride 1, as wide out as in, H * W a multiple of 8: dW reads x in place through
    # its flat (N, C, H * W) view, each tap one shift; the pixels whose tap column leaves
    # the row (W = 6: a third of them at the edges) must not read the neighbouring row
    "nchw_flat_pad1": ((16, 8), (16, 8), 3, False, True, _conv(padding=1), 3, (4, 6), False),
    "nchw_flat_dil2_coupled": ((16, 8), (8, 16), 3, True, True, _conv(padding=2, dilation=2),
                               2, (5, 8), False),
    # fewer output rows than input rows (no padding along H): the shift still holds
    "nchw_flat_3x1": ((8, 16), (16, 8), (3, 1), False, True, _conv(), 2, (5, 8), False),
    "nchw_flat_1x1": ((16, 8), (8, 8), 1, True, False, _conv(), 1, (3, 8), False),
    # W_out < W (no padding): the flat shift does not hold, x is copied as before
    "nchw_narrower_out": ((16, 8), (16, 8), 3, False, True, _conv(), 2, (4, 8), False),
    # NCHW at stride 2: dx goes through a channels_last buffer of the new channels
    "nchw_stride2": ((16, 8), (16, 8), 3, False, True, _conv(stride=2, padding=1), 1, (6, 8),
                     False),
    # strided: x read as (N, H/s, s, W/s, s*C), the stride's phase a coordinate; the
    # frozen rows' partial tiles (group 0 stops at 8) run into newer channels and the
    # next phase's, and must zero them
    "stride2_pad1": ((16, 8), (16, 8), 3, False, True, _conv(stride=2, padding=1), 3, (6, 8),
                     True),
    "3groups_stride2_tail": ((8, 8, 16), (8, 16, 8), 3, False, True,
                             _conv(stride=2, padding=1), 2, (6, 4), True),
    "coupled_1x1_stride2": ((16, 24), (8, 16), 1, True, True, _conv(stride=2), 2, (4, 6), True),
    "stride_2x1_dil": ((16, 8), (16, 8), 3, False, True,
                       _conv(stride=(2, 1), padding=(1, 2), dilation=(1, 2)), 1, (6, 7), True),
    # dx at stride 3, 5x5: the three row phases take 1, 2 and 2 taps, the column phases
    # likewise; a 5-row box overhangs the phase grid
    "stride3_5x5": ((16, 8), (16, 8), 5, False, True, _conv(stride=3, padding=2), 2, (9, 6),
                    True),
    # H, W odd: the forward and dW keep the pointer kernels, dx (no phase view of x
    # needed) does not; with 1x1 taps the odd rows and columns get no tap: zeros
    "1x1_stride2_odd": ((16, 8), (8, 16), 1, True, True, _conv(stride=2), 3, (5, 7), True),
    "stride2_odd_coupled": ((16, 24), (16, 8), 3, True, False, _conv(stride=2, padding=1), 1,
                            (7, 5), True),
    # three frozen groups (k_ends 8, 16, 24): on the GPU's 64-wide channel tiles dx_old cuts
    # two of them inside one tile (the interpreter's 16-wide tiles, one)
    "4groups_staircase": ((8, 8, 8, 8), (8, 8, 8, 16), 3, False, True, _conv(padding=1), 2,
                          (5, 6), True),
    # dilation 2 along a strided dimension: dx keeps the pointer kernel
    "stride2_dil2": ((16, 8), (16, 8), 3, False, True, _conv(stride=2, padding=2, dilation=2),
                     2, (6, 6), True),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_forward_matches_float64(tma_launches, name, dtype):
    ig, og, k, coupled, bias, conv, batch, hw, cl = CASES[name]
    t = _make(ig, og, k, coupled, bias, dtype, batch=batch, hw=hw, channels_last=cl)
    _run(t, conv, False, dtype, need_dx_old=True, channels_last=cl)
    assert tma_launches == _expected(coupled, conv=conv, hw=hw, kernel=k, channels_last=cl)
    assert lt.disabled_reason is None


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backward_without_dx_old_matches_float64(tma_launches, name, dtype):
    """dx of the new channels through descriptors too (the taps that miss dy read zeros; at
    stride s one program per phase of the input and its taps), into dx itself or, for NCHW
    input, a channels_last buffer of the new channels."""
    ig, og, k, coupled, bias, conv, batch, hw, cl = CASES[name]
    t = _make(ig, og, k, coupled, bias, dtype, batch=batch, hw=hw, channels_last=cl)
    _run(t, conv, False, dtype, need_dx_old=False, channels_last=cl)
    assert tma_launches == _expected(coupled, dx_old=False, conv=conv, hw=hw, kernel=k,
                                     channels_last=cl)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "nchw"])
def test_coupled_folded_norm_without_dx_old(tma_launches, affine, channels_last):
    """The folded BatchNorm's scale of dy's frozen columns, which the coupling block reads
    for dx, rides on w_couple's rows into the descriptor dx kernel; dW_couple's rows are
    scaled in its store (NCHW: by the dW kernel that reads x in place)."""
    hw = (5, 5) if channels_last else (4, 6)  # (H * W a multiple of 8 for the flat view)
    t = _make((16, 8), (16, 8), 3, True, True, torch.float16, batch=2, hw=hw,
              channels_last=channels_last)
    conv = _conv(padding=1)
    _run_norm(t, conv, False, torch.float16, False, _norm(16, torch.float16, affine),
              channels_last=channels_last)
    assert tma_launches == _expected(True, dx_old=False, conv=conv, hw=hw,
                                     channels_last=channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_wgrad_reads_the_trainable_dy_columns_only(tma_launches, dtype):
    """No dx_old, no coupling: dW's descriptor starts at dy's first trainable column of the
    caller's channels_last dy (no copy); NaN in the frozen columns stays out."""
    t = _make((16, 8), (16, 8), 3, False, True, dtype, batch=3, hw=(5, 6),
              channels_last=True)
    conv = _conv(padding=1)
    dev, dy, (dx_r, dw_r, db_r, _) = _forward_and_poisoned_dy(t, conv, 16)
    dx_r[:, :16] = 0
    dx, dw, db, _ = ec.expanded_conv2d_backward(
        dy.to(DEV).contiguous(memory_format=torch.channels_last), **_layer_args(dev), **conv,
        depthwise=False, need_dx_new=True, need_dx_old=False, need_dw=True, need_db=True,
        need_dcouple=False)
    assert tma_launches == _expected(False, dx_old=False)
    for got, ref, what in ((dx, dx_r, "dx"), (dw, dw_r, "dw"), (db, db_r, "db")):
        _close(got, ref, dtype, what)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
# (the later groups do read the inf channels: inf - inf in their sums is expected there)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_first_group_never_reads_later_inputs(tma_launches, dtype, stride):
    """inf in every input channel past group 0's k_end: its outputs stay those of the
    pretrained layer, though its partial channel tile is loaded whole (at stride 2 it runs
    on into the next phase's channels too)."""
    t = _make((8, 8, 16), (8, 16, 8), 3, False, True, dtype, batch=2, hw=(6, 6),
              channels_last=True)
    k0, rows0 = t["frozen_k_ends"][0], t["frozen_out_groups"][0]
    clean = t["x"].clone()
    t["x"][:, k0:] = float("inf")
    conv = _conv(stride=stride, padding=1)
    y = ec.expanded_conv2d_forward(**_to_dev(t), **conv, depthwise=False)
    assert tma_launches == [("forward", True)]
    clean[:, k0:] = 0
    y_ref, _ = _reference(dict(t, x=clean), conv, False,
                          torch.zeros(y.shape, dtype=torch.float64))
    _close(y[:, :rows0], y_ref[:, :rows0], dtype, "group 0's y")


@pytest.mark.parametrize("affine", [True, False])
def test_folded_norm(tma_launches, affine):
    t = _make((16, 8), (16, 8), 3, False, True, torch.float16, batch=2, channels_last=True)
    _run_norm(t, _conv(padding=1), False, torch.float16, True,
              _norm(16, torch.float16, affine), channels_last=True)
    assert tma_launches == _expected(False)


@pytest.mark.parametrize("why", ["stride2_odd_size", "depthwise", "nchw_direct",
                                 "channels_not_x8", "no_frozen_rows", "taps_off_16_bytes"])
def test_pointer_kernel_where_descriptors_do_not_fit(tma_launches, monkeypatch, why):
    conv, dw, dtype, k = _conv(padding=1), 0, torch.float16, 3
    ig, og = (16, 8), (16, 8)
    if why == "stride2_odd_size":  # 5 x 7: no (H / 2, 2, W / 2, 2 C) view
        conv = _conv(stride=2, padding=1)
    elif why == "depthwise":
        dw = 2
    elif why == "nchw_direct":
        monkeypatch.setattr(ec, "NCHW_MODE", "direct")
    elif why == "channels_not_x8":
        ig, og = (12, 6), (12, 6)  # rows of 36 bytes
    elif why == "taps_off_16_bytes":
        # 2x2 over 4 frozen channels: the weight rows are 32 bytes, but tap 1 of w_frozen
        # starts at byte 8 of a row, and dx's new channels at channel 4
        ig, og, k = (4, 4), (8, 8), 2
    else:
        ig, og = (16, 8), (0, 8)
    t = _make(ig, og, k, False, True, dtype, batch=2, channels_last=why != "nchw_direct",
              depthwise_mult=dw)
    _run(t, conv, bool(dw), dtype, need_dx_old=True, channels_last=why != "nchw_direct")
    # (without frozen rows the forward has nothing for its frozen descriptors; dW and dx
    # have theirs; dx needs no phase view of x; dW reads every channel of x from 0, and
    # its taps lie along the pixels, not the channels)
    assert tma_launches == {"no_frozen_rows": [("wgrad", True), ("grad_input", True)],
                            "stride2_odd_size": [("grad_input", True)],
                            "taps_off_16_bytes": [("wgrad", True)]}.get(why, [])
    assert lt.disabled_reason is None  # refused up front, not by a failed launch


@pytest.mark.parametrize("coupled", [False, True])
def test_dx_old_with_two_groups_cut_inside_one_channel_tile(tma_launches, monkeypatch, coupled):
    """32-channel tiles (the interpreter's default is 16) over three frozen groups with
    k_ends 8, 16 and 24: the old channels are tiled in bands [0, 8), [8, 16), [16, 24),
    [24, 32), each tile reading the rows of the groups past it; NaN past each k_end stays
    out."""
    import triton
    kern = ect._conv_dx_tma_kernel
    configs = [triton.Config(dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, IMG=i, BH=h, BW=w),
                             num_warps=1, num_stages=1, pre_hook=ect._dx_hook)
               for i, h, w in ect._boxes(16)]
    monkeypatch.setattr(kern, "configs", configs)
    monkeypatch.setattr(kern, "cache", {})
    t = _make((8, 8, 8, 8), (8, 8, 8, 8), 3, coupled, True, torch.float16, batch=2,
              hw=(4, 6), channels_last=True)
    if not coupled:  # (coupled: every frozen group reads all old inputs)
        assert t["frozen_k_ends"] == (8, 16, 24)
    _run(t, _conv(padding=1), False, torch.float16, need_dx_old=True, channels_last=True)
    assert tma_launches[-1] == ("grad_input", True)
    assert {c.kwargs["BLOCK_N"] for c in kern.cache.values()} == {32}


def _dx_group_by_group(t, dy, conv):
    """Float64 dx summed group by group over the channels each reads (the frozen groups'
    [0, k_end), the coupling block's new channels, the newest rows' all): a NaN or Inf in a
    group's dy reaches those channels only."""
    x, dy = t["x"].double(), dy.double()
    geo = (conv["stride"], conv["padding"], conv["dilation"])
    dx = torch.zeros(x.shape, dtype=torch.float64)
    wf = torch.nan_to_num(t["w_frozen"].double(), nan=0.0)
    i_f, row = wf.shape[1], 0
    for rows, k in zip(t["frozen_out_groups"], t["frozen_k_ends"]):
        dx[:, :k] += torch.nn.grad.conv2d_input((x.shape[0], k, *x.shape[2:]),
                                                wf[row:row + rows, :k], dy[:, row:row + rows],
                                                *geo)
        row += rows
    if t["w_couple"] is not None:
        dx[:, i_f:] += torch.nn.grad.conv2d_input(
            (x.shape[0], x.shape[1] - i_f, *x.shape[2:]), t["w_couple"].double(), dy[:, :row],
            *geo)
    return dx + torch.nn.grad.conv2d_input(x.shape, t["w_new"].double(), dy[:, row:], *geo)


@pytest.mark.parametrize("kernel", ["tma", "pointer"])
@pytest.mark.parametrize("groups,coupled", [(((8, 8), (8, 8)), False),
                                            (((8, 8, 16), (8, 16, 8)), False),
                                            (((8, 8, 16), (8, 16, 8)), True)],
                         ids=["2g", "3g", "3g-coupled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dx_keeps_a_groups_nan_out_of_channels_it_does_not_read(tma_launches, monkeypatch,
                                                                 kernel, groups, coupled,
                                                                 dtype):
    # A NaN and an Inf in the first group's dy (a diverged old task) belong in dx's channels
    # that group reads, [0, k_end_0) (and the new ones through a coupling block), and
    # nowhere else.  The channels are tiled in bands cut at each k_end (and at I_f); a tile
    # across k_end_0 (a 16-channel tile over groups of 8) once multiplied that dy by the
    # zeroed weights, and an old tile near I_f by the coupling block's masked columns.
    # (The coupled staircase is the kernels' API: expand() couples with every k_end = I_f.)
    if kernel == "pointer":
        monkeypatch.setattr(lt, "MODE", "0")
    t = _make(*groups, 3, False, False, dtype, batch=2, hw=(4, 5), channels_last=True)
    if coupled:
        t["w_couple"] = torch.randn(sum(groups[1][:-1]), groups[0][-1], 3, 3, dtype=dtype)
    conv = _conv(padding=1)
    dev = _to_dev(t)
    dy = torch.randn(2, sum(groups[1]), 4, 5, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    dy[0, 0, 1, 2] = float("nan")
    dy[1, groups[1][0] - 1, 3, 4] = float("inf")
    dx = ec.expanded_conv2d_backward(dy.to(DEV), **_layer_args(dev), **conv, depthwise=False,
                                     need_dx_new=True, need_dx_old=True, need_dw=False,
                                     need_db=False, need_dcouple=False)[0]
    assert tma_launches == ([("grad_input", True)] if kernel == "tma" else [])
    ref, k0 = _dx_group_by_group(t, dy, conv), t["frozen_k_ends"][0]
    assert not ref[:, k0:t["w_frozen"].shape[1]].isnan().any() and ref[0, :k0].isnan().any()
    fin = dx.isfinite().cpu()
    assert torch.equal(fin, ref.isfinite()), \
        f"non-finite dx at {(fin != ref.isfinite()).nonzero()[:4].tolist()}"
    _close(torch.where(fin, dx.cpu(), 0), torch.where(fin, ref, 0), dtype, "dx where finite")


def test_dx_old_with_group_rows_off_16_bytes_keeps_the_pointer_kernel(tma_launches):
    # dx_old reads dy's frozen channels from each group's first row on: row 3 of an fp16 dy
    # is 6 bytes in, where no descriptor load may start (the interpreter asserts it, and the
    # failed launch would switch every descriptor kernel off).  Refused up front instead.
    t = _make((8, 8, 8), (3, 5, 8), 3, False, True, torch.float16, batch=2, hw=(4, 5),
              channels_last=True)
    _run(t, _conv(padding=1), False, torch.float16, need_dx_old=True, channels_last=True)
    assert ("grad_input", True) not in tma_launches and ("grad_input", False) not in \
        tma_launches
    assert lt.disabled_reason is None


@pytest.mark.parametrize("stride", [1, 2])
def test_nchw_results_are_written_in_place(tma_launches, monkeypatch, stride):
    """NCHW input: the descriptor kernels store y, and dx at stride 1, straight into the
    caller's NCHW tensors (no channels_last result copied back); dx at stride 2 into a
    channels_last buffer of the new channels."""
    seen = {}

    def spy(name, real, pos):
        def run(*args, **kwargs):
            seen[name] = args[pos]
            return real(*args, **kwargs)
        return run
    monkeypatch.setattr(ect, "forward", spy("y", ect.forward, 6))
    monkeypatch.setattr(ect, "grad_input", spy("dx", ect.grad_input, 8))
    t = _make((16, 8), (16, 8), 3, False, True, torch.float16, batch=2, hw=(4, 8))
    _run(t, _conv(stride=stride, padding=1), False, torch.float16, need_dx_old=False)
    assert seen["y"].is_contiguous() and seen["y"].shape[1] == 24
    if stride == 1:
        assert seen["dx"].is_contiguous() and seen["dx"].shape[1] == 24
    else:
        assert seen["dx"].shape[1] == 8
        assert seen["dx"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("stride", [1, 2])
def test_nchw_y_through_the_transpose(tma_launches, monkeypatch, stride):
    """EXPANSE_FAST_CONV_NCHW_Y=transpose (the GPU run's A/B row beside the in-place store):
    the descriptor kernel writes y channels_last, which the tiled transpose hands back as
    NCHW; y and every gradient as exact as the default's (_run), dx at stride 2 copied back
    into the caller's NCHW dx by the transpose too."""
    monkeypatch.setenv("EXPANSE_FAST_CONV_NCHW_Y", "transpose")
    seen, real = {}, ect.forward

    def spy(*args, **kwargs):
        seen["y"] = args[6]
        return real(*args, **kwargs)
    monkeypatch.setattr(ect, "forward", spy)
    t = _make((16, 8), (16, 8), 3, False, True, torch.float16, batch=2, hw=(4, 8))
    _run(t, _conv(stride=stride, padding=1), False, torch.float16, need_dx_old=False)
    y = seen["y"]
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    monkeypatch.setenv("EXPANSE_FAST_CONV_NCHW_Y", "nhwc")
    with pytest.raises(ValueError, match="EXPANSE_FAST_CONV_NCHW_Y='nhwc'"):
        ec.expanded_conv2d_forward(**_to_dev(t), **_conv(stride=stride, padding=1),
                                   depthwise=False)


@pytest.mark.parametrize("coupled", [False, True])
def test_nchw_wgrad_reads_the_callers_x(tma_launches, monkeypatch, coupled):
    """NCHW x at stride 1, as wide out as in: dW (and dW_couple) read the caller's x itself,
    no channels_last copy of it is made; the padding's rows and columns and the flat view's
    row ends read zeros (W = 8, 3x3, pad 1)."""
    seen = []

    def spy(real):
        def run(*args, **kwargs):
            seen.append(args[1])
            return real(*args, **kwargs)
        return run
    monkeypatch.setattr(ect, "wgrad_nchw", spy(ect.wgrad_nchw))
    t = _make((16, 8), (16, 8), 3, coupled, True, torch.float16, batch=2, hw=(3, 8))
    x = t["x"].to(DEV)
    copied = []
    real_copy = ec._for_gathers
    monkeypatch.setattr(ec, "_for_gathers", lambda v, c0=0: copied.append(
        v.data_ptr() == x.data_ptr()) or real_copy(v, c0))
    _run(dict(t, x=x), _conv(padding=1), False, torch.float16, need_dx_old=False)
    assert len(seen) == 1 + coupled and all(v.data_ptr() == x.data_ptr() for v in seen)
    assert copied.count(True) == 1  # the forward's copy of x only (then dy's columns)


def test_dx_old_of_a_staircase_that_steps_down_keeps_the_pointer_kernel():
    """The descriptor dx cuts the frozen rows at k_end assuming the staircase's k_ends never
    decrease (rows sorted by reach); otherwise the pointer kernel's per-group loop runs."""
    t = _make((16, 8), (16, 8), 3, False, True, torch.float16, batch=1, channels_last=True)
    dy = torch.zeros(1, 24, 5, 5, dtype=torch.float16).contiguous(
        memory_format=torch.channels_last)
    w_new = t["w_new"].contiguous(memory_format=torch.channels_last)
    w_frozen = torch.zeros(16, 16, 3, 3, dtype=torch.float16).contiguous(
        memory_format=torch.channels_last)
    args = (dy, w_new, None, w_frozen, 16, 16)  # (o_f, dy_new_c0)
    geo = (1, 1, 1, 1, 1, 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lt, "MODE", "1")
        mp.setattr(lt, "disabled_reason", None)
        assert ect.dx_usable(*args, (8, 16), geo, True, i_f=16)
        assert not ect.dx_usable(*args, (16, 8), geo, True, i_f=16)
        assert ect.dx_usable(*args, (16, 8), geo, False, i_f=16)  # (no dx_old: no cut)


def test_failure_switches_to_the_pointer_kernel(tma_launches, monkeypatch):
    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("no descriptors on this Triton")
            return launch

    monkeypatch.setattr(ect, "_conv_fwd_tma_kernel", Broken())
    t = _make((16, 8), (16, 8), 3, False, True, torch.float32, batch=2, channels_last=True)
    with pytest.warns(RuntimeWarning, match="TMA kernels are off"):
        _run(t, _conv(padding=1), False, torch.float32, need_dx_old=True, channels_last=True)
    # the backward's dW kernel is off too, and the linear kernels' descriptors
    assert tma_launches == [("forward", False)] and "no descriptors" in lt.disabled_reason
    x = t["x"].to(DEV)
    assert not lt.enabled_for(x)
    assert not ect.usable(x, t["w_frozen"], t["w_new"], None, (1, 1), False)


@pytest.mark.parametrize("n,ho,wo", [(64, 56, 56), (64, 28, 28), (64, 7, 7), (3, 5, 7),
                                     (1, 1, 1), (2, 13, 3)])
@pytest.mark.parametrize("block_m", [16, 64, 128, 256])
def test_box_covers_the_output_with_the_least_waste(block_m, n, ho, wo):
    def covered(box):
        img, bh, bw = box
        return (-(-n // img) * img) * (-(-ho // bh) * bh) * (-(-wo // bw) * bw)

    box = ect.box_for(block_m, n, ho, wo)
    assert box[0] * box[1] * box[2] == block_m
    every = [(a, b, block_m // (a * b)) for a, b in itertools.product(
        [1 << i for i in range(9)], repeat=2) if block_m % (a * b) == 0]
    assert covered(box) == min(covered(b) for b in every)
    if (n, ho, wo) == (64, 56, 56):  # the run's shape: no wasted row at all
        assert covered(box) == n * ho * wo and box == {128: (2, 8, 8), 256: (4, 8, 8)}.get(
            block_m, box)


@pytest.mark.gpu
# three cases, each its own compile (the GPU run's test stage has a deadline); the ResNet
# shape below and test_expanded_conv_kernels' bf16 cases take this kernel too on sm_90
@pytest.mark.parametrize("name", ["3groups_tail_dil2", "coupled_1x3", "4groups_staircase"])
def test_gpu_bf16(tma_launches, name):
    ig, og, k, coupled, bias, conv, batch, hw, cl = CASES[name]
    t = _make(ig, og, k, coupled, bias, torch.bfloat16, batch=batch, hw=hw, channels_last=cl)
    _run(t, conv, False, torch.bfloat16, need_dx_old=True, channels_last=cl)
    assert tma_launches == _expected(coupled)


@pytest.mark.gpu
def test_gpu_resnet_shape_bf16(tma_launches, monkeypatch):
    """The run's layer (256 + 64 channels, 3x3, 56 x 56, 25% widening) as users get it
    (EXPANSE_FAST_TMA unset), forward and the backward of a hidden layer (no dx_old): every
    kernel runs through descriptors, and matches fp32 torch."""
    monkeypatch.setattr(lt, "MODE", "auto")
    _check_resnet_shape(False, torch.bfloat16, need_dx_old=False, hw=(56, 56),
                        channels_last=True)
    assert tma_launches == _expected(False, dx_old=False)


@pytest.mark.gpu
def test_gpu_resnet_shape_nchw_bf16(tma_launches, monkeypatch):
    """The run's layer on NCHW input, as users get it: y and dx stored in NCHW in place, dW
    reading the caller's NCHW x through its flat view (no channels_last copy of x)."""
    monkeypatch.setattr(lt, "MODE", "auto")
    conv = _conv(padding=1)  # _check_resnet_shape's own default: "same" 3x3
    _check_resnet_shape(False, torch.bfloat16, need_dx_old=False, hw=(56, 56),
                        channels_last=False, conv=conv)
    assert tma_launches == _expected(False, dx_old=False, conv=conv, hw=(56, 56),
                                     channels_last=False)


@pytest.mark.gpu
def test_gpu_resnet_downsampling_bf16(tma_launches, monkeypatch):
    """A ResNet stage's first 3x3 (stride 2, 56 x 56 -> 28 x 28) as users get it: the
    forward and dW through x's phase view, dx one program per input phase."""
    monkeypatch.setattr(lt, "MODE", "auto")
    conv = _conv(stride=2, padding=1)
    _check_resnet_shape(False, torch.bfloat16, need_dx_old=False, hw=(56, 56),
                        channels_last=True, conv=conv)
    assert tma_launches == _expected(False, dx_old=False, conv=conv, hw=(56, 56))
