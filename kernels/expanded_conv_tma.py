"""The expanded conv kernels with tensor-descriptor (TMA) loads, for Hopper GPUs: forward,
weight gradient and input gradient.

The forward computes what ``expanded_conv._conv_fwd_kernel`` computes, for a convolution
of channels_last activations (what the launcher hands the kernels by default, NCHW input
included).  A tile's rows are not a run of flattened pixels but a box of output pixels,
IMG images x BH rows x BW columns; at stride 1, for kernel tap (r, s), the input pixels it
reads form the same box shifted by (r * dil - pad, s * dil - pad), so each operand tile is
one bulk copy of x (N, H, W, C) into shared memory: no per-element addresses or masks, and
what lies outside the image (the padding) or past the batch reads as zeros.  At stride s
(H and W multiples of s) x is read as (N, H / s, s, W / s, s * C): the tap's phase becomes
a coordinate and the box stays one copy (``_x_box``).  The weights are read as
(O, KH * KW * Cin) matrices, the taps one after the other along a row.

* The product runs transposed (y^T = w x^T), with x's box as the second operand: there its
  reshape to (pixels, channels) stays a view of shared memory, and both operands go from
  their bulk copies straight to wgmma.  (As the first operand, Triton 3.6 loads it into
  registers.)
* No old unit ever multiplies a newer input: full channel tiles run in one flat loop over
  (tap, tile), one software pipeline, and stop at the group's k_end; where k_end is not a
  multiple of BLOCK_K, each tap's partial tile is loaded whole and its channels at or past k_end are
  zeroed in both operands before the product (so a NaN in a staircase's zero block, in a
  newer input or in the next tap's weights stays out).
* The coupled layout's block (frozen rows reading [I_f, C)) is a third loop, with its own
  partial tiles.
* Bias and the folded BatchNorm of the frozen channels are the pointer kernel's.  The
  stores take y's strides: into channels_last, vectors of channels; into NCHW (the
  caller's layout, no copy back), vectors of a box row's pixels.
* Output-channel tiles are the fastest-varying program index, so the few programs that
  read one pixel box's x run together and share it through L2 (x is far larger than L2 at
  the ResNet shapes; the weights fit).

The box (IMG, BH, BW) of a BLOCK_M is chosen per problem (``box_for``): the one that covers
N x Ho x Wo with the fewest wasted rows (56 x 56, batch 64: 2 x 8 x 8, none; the flattened
pixel rows of the pointer kernel never waste any, a box may).  Descriptors need 16-byte
aligned bases and strides and a unit channel stride; fp32 and other GPUs take the pointer
kernel, and the switches (``EXPANSE_FAST_TMA``) and the fallback after a failed launch are
those of ``expanded_linear_tma``.

The weight gradient (``_conv_wgrad_tma_kernel``, the work of ``_conv_wgrad_kernel``)
reduces over boxes of output pixels the same way: per tap, dy's box and the forward's x box
are two bulk copies (strided too, through the same phase view).  On NCHW input at stride 1
(``_conv_wgrad_nchw_tma_kernel``) it reads the caller's x in place, through the flat
(N, C, H * W) view, each tap a shift of dy's tile.  The input gradient
(``_conv_dx_tma_kernel``) takes boxes of input pixels and dy's box shifted against the tap.
Where dx_old is asked (a coupled layer, or an input that needs its gradient), the old
channels get tiles of their own, in bands cut at every k_end, which read the frozen rows of
every group whose k_end lies past the tile, from the bulk copies to wgmma (a staircase
whose k_ends decrease, or a k_end off the 16-byte grid, keeps the pointer kernel).
At stride s a box holds one phase of the input (every s-th row and column from an offset),
which only every s-th tap reaches, from a dy box shifted by whole pixels: no phase view of
dy is needed, so H and W need not be multiples of s (dilation 1 along a strided dimension,
else the pointer kernel).  A folded BatchNorm's scale of the frozen dy columns is moved
onto the rows of w_couple and w_frozen by the launcher: dy's tiles never pass through
registers.
"""
from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from . import expanded_conv as base
from . import expanded_linear_tma as lt

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), with 128-byte (BLOCK_K = 64) channel rows, the
# width the 128-byte swizzle of the operand tiles wants.  The product is transposed, so a
# warpgroup's wgmma covers 64 output channels by up to 256 pixels: 256 x 64 suits the
# common 64-channel widening (a 128-wide channel tile there multiplies half zeros), and
# 256 x 128 moves the fewest bytes per multiply over the frozen channels (245 registers,
# no spills; 256 x 64 on 4 warps spills).
_TILES = [(128, 128, 64, 8, 3), (256, 64, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
          (128, 128, 32, 8, 4), (256, 128, 64, 8, 3)]
_INTERPRET_TILE = (16, 16, 16, 1, 1)


def _boxes(block_m):
    """Every (IMG, BH, BW) of powers of two whose product is ``block_m``."""
    p = block_m.bit_length() - 1
    return [(1 << a, 1 << b, 1 << (p - a - b)) for a in range(p + 1) for b in range(p + 1 - a)]


def box_for(block_m, n, ho, wo):
    """(IMG, BH, BW) covering n images of ho x wo output pixels with the fewest padded
    rows; ties go to fewer images (neighbouring taps then share more of x), then wider
    rows."""
    def cost(box):
        img, bh, bw = box
        covered = (-(-n // img) * img) * (-(-ho // bh) * bh) * (-(-wo // bw) * bw)
        return covered, img, -bw
    return min(_boxes(block_m), key=cost)


def _configs(tiles, pixels, hook):
    """Every tile with every box of its ``pixels`` block ("BLOCK_M" or "BLOCK_K"); with
    ``pixels`` None, the tiles alone (flat runs of pixels, no box)."""
    tiles = [_INTERPRET_TILE] if base._INTERPRET else (tiles if base._AUTOTUNE else tiles[:1])
    out = []
    for bm, bn, bk, warps, stages in tiles:
        kw = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        boxes = [dict(IMG=i, BH=h, BW=w) for i, h, w in _boxes(kw[pixels])] if pixels else [{}]
        for box in boxes:
            out.append(triton.Config(dict(kw, **box), num_warps=warps, num_stages=stages,
                                     pre_hook=hook))
    return out


def _box_hook(**descs):
    """A config pre-hook: each named descriptor's box, the pixel box then a tile width."""
    def hook(nargs):
        for name, width in descs.items():
            nargs[name].block_shape = [nargs["IMG"], nargs["BH"], nargs["BW"], nargs[width]]
    return hook


def _fwd_hook(nargs):
    # 5-D: the stride's phase between rows and columns
    nargs["x_desc"].block_shape = [nargs["IMG"], nargs["BH"], 1, nargs["BW"], nargs["BLOCK_K"]]
    for name in ("wf_desc", "wn_desc", "wc_desc"):
        nargs[name].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _pruner(caps_by, pixels, dims=("N", "Ho", "Wo"), desc="x_desc", boxes=True):
    """Per tile, the one box that suits the problem (``box_for`` of its ``pixels`` block over
    the image ``dims``); tiles that do not fit shared memory, or are far larger than the
    problem (``caps_by``: block -> the argument that bounds it; the pixel block by the pixel
    count, the product of ``dims``), go.  ``desc``: a descriptor of the operands' dtype.
    ``boxes=False``: configs of flat pixel runs, no box to choose."""
    def prune(configs, named_args, **kwargs):
        sizes = [named_args[k] for k in dims]
        x = named_args[desc].base
        elt, budget = x.element_size(), lt.base.smem_budget(x.device)
        caps = {blk: max(64, triton.next_power_of_2(named_args[arg]))
                for blk, arg in caps_by.items()}
        caps[pixels] = max(64, triton.next_power_of_2(math.prod(sizes)))

        def boxed(c):  # (flat pixel runs, boxes=False: no box to choose)
            kw = c.kwargs
            return not boxes or (kw["IMG"], kw["BH"], kw["BW"]) == box_for(kw[pixels], *sizes)

        keep = [c for c in configs if boxed(c)
                and all(c.kwargs[k] <= cap for k, cap in caps.items())
                and c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"])
                * c.kwargs["BLOCK_K"] * elt <= budget]
        last = configs[-1].kwargs
        keep = keep or [c for c in configs if boxed(c) and all(
            c.kwargs[k] == last[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))]
        return keep if base._AUTOTUNE else keep[:1]
    return prune


@triton.jit
def _x_box(desc, n0, h0, w0, rs, c, C, KW: tl.constexpr, dil_h, dil_w, pad_h, pad_w,
           ST_H: tl.constexpr, ST_W: tl.constexpr):
    """x's box for tap rs of the output box at image n0, row h0, column w0: channels c.. .
    ``desc`` covers x as (N, H / ST_H, ST_H, W / ST_W, ST_W * C): output row ho reads input
    row ho * ST_H + r * dil - pad = (ho + dh) * ST_H + ph, so the stride's phase (ph, pw) is a
    coordinate and the box's rows and columns stay consecutive.  (Offsets are taken
    non-negative before the floor division.)"""
    vh = rs // KW * dil_h - pad_h + ST_H * 4096
    vw = rs % KW * dil_w - pad_w + ST_W * 4096
    return desc.load([n0, h0 + vh // ST_H - 4096, vh % ST_H, w0 + vw // ST_W - 4096,
                      vw % ST_W * C + c])


def _interpreted_bench(kernel_call, quantiles):
    """Under the interpreter nothing is timed: the one pruned config runs (Triton 3.6 would
    otherwise ask for a GPU driver's timer even then)."""
    return [0.0] * len(quantiles)


@triton.autotune(configs=_configs(_TILES, "BLOCK_M", _fwd_hook),
                 key=["N", "Ho", "Wo", "O", "C", "G", "KH", "KW", "ST_H", "ST_W", "HAS_COUPLE"],
                 prune_configs_by={"early_config_prune": _pruner({"BLOCK_N": "O"}, "BLOCK_M")},
                 do_bench=_interpreted_bench if base._INTERPRET else None)
@triton.jit
def _conv_fwd_tma_kernel(
        x_desc, wf_desc, wn_desc, wc_desc, bf_ptr, bn_ptr, y_ptr, groups_ptr,
        nm_ptr, nv_ptr, nw_ptr, nb_ptr, norm_eps,
        N, O, C, Ho, Wo, G, O_f, I_f,
        syn, syc, syh, syw, pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr, ST_H: tl.constexpr, ST_W: tl.constexpr,
        HAS_BF: tl.constexpr, HAS_BN: tl.constexpr,
        HAS_COUPLE: tl.constexpr, NORM: tl.constexpr, NORM_W: tl.constexpr,
        NORM_B: tl.constexpr, OUT_VEC: tl.constexpr, PIX_VEC: tl.constexpr,
        PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        IMG: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    tl.static_assert(IMG * BH * BW == BLOCK_M and BLOCK_N % OUT_VEC == 0)
    pid = tl.program_id(0)
    n_tiles_n = base._channel_tiles(groups_ptr, G, BLOCK_N)
    pid_n = pid % n_tiles_n  # output-channel tiles fastest: one box's x shared through L2
    pid_m = pid // n_tiles_n
    o_start, o_end, k_end, grp = base._locate_tile(pid_n, groups_ptr, G, BLOCK_N)
    o_start = o_start // OUT_VEC * OUT_VEC  # (as in the pointer kernel: vector stores)
    is_new = grp == G - 1
    tiles_h = (Ho + BH - 1) // BH
    tiles_w = (Wo + BW - 1) // BW
    n0 = pid_m // (tiles_h * tiles_w) * IMG
    hw = pid_m % (tiles_h * tiles_w)
    h0 = hw // tiles_w * BH  # the output box's first row and column
    w0 = hw % tiles_w * BW
    row_new = o_start - O_f  # the tile's first row of w_new (newest group only)

    # The product runs transposed, y^T = w x^T: the weight tile is the first operand, x's
    # box the second.  As the second operand, the box's reshape to (pixels, channels) stays
    # a view of shared memory, so both operands go from their bulk copies straight to wgmma
    # (as the first, it went through registers).
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # Full channel tiles up to k_end, (tap, tile) flattened.  Two loops, one of them empty,
    # rather than a branch: frozen rows read w_frozen, the newest rows w_new.  A weight row
    # holds the taps one after the other (columns rs * Cin + c): a full tile never crosses
    # into the next tap.
    n_k = k_end // BLOCK_K
    n_div = tl.maximum(n_k, 1)
    for i in range(0, tl.where(is_new, 0, KH * KW * n_k)):
        rs = i // n_div
        c = (i % n_div) * BLOCK_K
        a = _x_box(x_desc, n0, h0, w0, rs, c, C, KW, dil_h, dil_w, pad_h, pad_w, ST_H, ST_W)
        b = wf_desc.load([o_start, rs * I_f + c])
        acc = tl.dot(b, a.reshape(BLOCK_M, BLOCK_K).T, acc, input_precision=PREC)
    for i in range(0, tl.where(is_new, KH * KW * n_k, 0)):
        rs = i // n_div
        c = (i % n_div) * BLOCK_K
        a = _x_box(x_desc, n0, h0, w0, rs, c, C, KW, dil_h, dil_w, pad_h, pad_w, ST_H, ST_W)
        b = wn_desc.load([row_new, rs * C + c])
        acc = tl.dot(b, a.reshape(BLOCK_M, BLOCK_K).T, acc, input_precision=PREC)
    # Each tap's partial channel tile where k_end is not a multiple of BLOCK_K, its
    # channels at or past k_end zeroed in both operands (the weight tile's run on into the
    # next tap's columns).
    c_tail = n_k * BLOCK_K
    live = (c_tail + tl.arange(0, BLOCK_K)) < k_end
    for rs in range(0, tl.where(c_tail < k_end, KH * KW, 0)):
        a = _x_box(x_desc, n0, h0, w0, rs, c_tail, C, KW, dil_h, dil_w, pad_h, pad_w,
                   ST_H, ST_W)
        if is_new:
            b = wn_desc.load([row_new, rs * C + c_tail])
        else:
            b = wf_desc.load([o_start, rs * I_f + c_tail])
        a = tl.where(live[None, :], a.reshape(BLOCK_M, BLOCK_K), 0.0).to(a.dtype)
        b = tl.where(live[None, :], b, 0.0).to(b.dtype)
        acc = tl.dot(b, a.T, acc, input_precision=PREC)
    if HAS_COUPLE:
        # Coupled layout: frozen rows also read the newest channels [I_f, C) through
        # w_couple (columns rs * i_new + c): full tiles, then each tap's partial one.
        i_new = C - I_f
        n_c = i_new // BLOCK_K
        n_cdiv = tl.maximum(n_c, 1)
        for i in range(0, tl.where(is_new, 0, KH * KW * n_c)):
            rs = i // n_cdiv
            c = (i % n_cdiv) * BLOCK_K
            a = _x_box(x_desc, n0, h0, w0, rs, I_f + c, C, KW, dil_h, dil_w, pad_h, pad_w,
                       ST_H, ST_W)
            b = wc_desc.load([o_start, rs * i_new + c])
            acc = tl.dot(b, a.reshape(BLOCK_M, BLOCK_K).T, acc, input_precision=PREC)
        c_tail = n_c * BLOCK_K
        live = (c_tail + tl.arange(0, BLOCK_K)) < i_new
        for rs in range(0, tl.where(is_new | (c_tail >= i_new), 0, KH * KW)):
            a = _x_box(x_desc, n0, h0, w0, rs, I_f + c_tail, C, KW, dil_h, dil_w, pad_h,
                       pad_w, ST_H, ST_W)
            b = wc_desc.load([o_start, rs * i_new + c_tail])
            a = tl.where(live[None, :], a.reshape(BLOCK_M, BLOCK_K), 0.0).to(a.dtype)
            b = tl.where(live[None, :], b, 0.0).to(b.dtype)
            acc = tl.dot(b, a.T, acc, input_precision=PREC)
    acc = tl.trans(acc)

    rel_n = tl.arange(0, BLOCK_N)
    offs_o = o_start + rel_n
    n_mask = offs_o // OUT_VEC < o_end // OUT_VEC  # = offs_o < o_end
    acc = base._bias_and_norm(acc, offs_o, n_mask, is_new, O_f, bf_ptr, bn_ptr, nm_ptr,
                              nv_ptr, nw_ptr, nb_ptr, norm_eps, HAS_BF, HAS_BN, NORM, NORM_W,
                              NORM_B)
    # row j of the tile is pixel (j // BW) % BH, j % BW of image j // (BH * BW) of the box
    j = tl.arange(0, BLOCK_M)
    img = n0 + j // (BH * BW)
    ho = h0 + (j // BW) % BH
    wo = w0 + j % BW
    # An NCHW y (syw = 1) is stored in vectors of PIX_VEC pixels along W: Wo and the other
    # strides are multiples of it (the launcher checks), which the masks and addresses say
    # to the compiler (x // V * V); otherwise PIX_VEC = 1.
    PV: tl.constexpr = PIX_VEC if PIX_VEC <= BW else BW
    # wo // PV, written so that the compiler sees it constant over runs of PV pixels
    m_mask = (img < N) & (ho < Ho) & (w0 // PV + (j // PV) % (BW // PV) < Wo // PV)
    y_row = (img.to(tl.int64) * (syn // PIX_VEC * PIX_VEC) + ho * (syh // PIX_VEC * PIX_VEC)
             + wo * syw)
    tl.store(y_ptr + y_row[:, None] + offs_o[None, :] * (syc // PIX_VEC * PIX_VEC),
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _taps_by_channel(w):
    """(O, Cin, KH, KW) weight, channels innermost in memory -> the (O, KH * KW * Cin) view
    the descriptors read (no copy): row o holds tap (r, s)'s channels at (r * KW + s) * Cin."""
    o, c, kh, kw = w.shape
    return w.permute(0, 2, 3, 1).reshape(o, kh * kw * c)


def _phases(x, stride):
    """x (N, C, H, W) channels_last as the 5-D (N, H / sh, sh, W / sw, sw * C) view the
    forward's descriptors read (the stride's phase a coordinate); None where there is none:
    H or W not a multiple of the stride, or strided x not densely channels_last."""
    n, c, h, w = x.shape
    sh, sw = stride
    x4 = x.permute(0, 2, 3, 1)
    if (sh, sw) == (1, 1):
        return x4.unsqueeze(2)
    if h % sh or w % sw or not x.is_contiguous(memory_format=torch.channels_last):
        return None
    return x4.reshape(n, h // sh, sh, w // sw, sw * c)


def _pixel_vector(t):
    """How many pixels along W a kernel may store as one vector into ``t`` (N, C, H, W):
    for unit W stride (NCHW), the largest of 16, 8, 1 dividing W and the other strides."""
    if t.stride(3) != 1:
        return 1
    return base.multiple_of_all([t.shape[3], t.stride(0), t.stride(1), t.stride(2)])


def usable(x, w_frozen, w_new, w_couple, stride, depthwise) -> bool:
    """Whether the forward of these operands (after the launcher's layout copies) can run
    through descriptors."""
    if depthwise or not lt.enabled_for(x) or not lt.aligned(x, x.shape[1], w_frozen.shape[1]):
        return False
    x5 = _phases(x, tuple(stride))
    if x5 is None or not lt._describable(x5, rank=5):
        return False
    if w_frozen.shape[0] == 0 or w_frozen.shape[1] == 0:
        return False  # (no frozen rows or inputs: nothing for the frozen descriptors)
    ws = [w_frozen, w_new] + ([w_couple] if w_couple is not None else [])
    if any(w.dim() != 4 or w.stride(1) != 1 for w in ws):
        return False
    return all(lt._describable(_taps_by_channel(w)) for w in ws)


def forward(x, w_frozen, w_new, w_couple, bf, bn, y, groups, widths, norm_ptrs, norm_flags,
            geo, has_bf, has_bn, out_vec, prec) -> bool:
    """The forward through descriptors into ``y``; False when it cannot run here."""
    n, c, _, _ = x.shape
    _, o, ho, wo = y.shape
    o_f, i_f = w_frozen.shape[0], w_frozen.shape[1]
    kh, kw = w_new.shape[2], w_new.shape[3]
    has_couple = w_couple is not None
    st = (geo[0], geo[1])
    x5 = _phases(x, st)
    wf, wn = _taps_by_channel(w_frozen), _taps_by_channel(w_new)
    wc = _taps_by_channel(w_couple) if has_couple else wn

    def grid(meta):
        tiles_n = sum(triton.cdiv(g, meta["BLOCK_N"]) for g in widths)
        box = meta["IMG"] * meta["BH"] * meta["BW"]
        tiles_m = (triton.cdiv(n, meta["IMG"]) * triton.cdiv(ho, meta["BH"])
                   * triton.cdiv(wo, meta["BW"]))
        assert box == meta["BLOCK_M"]
        return (tiles_m * tiles_n,)

    return lt._launch(
        "conv forward", _conv_fwd_tma_kernel, grid,
        (x5, wf, wn, wc),
        bf, bn, y, groups, *norm_ptrs, n, o, c, ho, wo, len(widths), o_f, i_f,
        *y.stride(), geo[2], geo[3], geo[4], geo[5],
        KH=kh, KW=kw, ST_H=st[0], ST_W=st[1], HAS_BF=has_bf, HAS_BN=has_bn,
        HAS_COUPLE=has_couple, **norm_flags, OUT_VEC=out_vec,
        PIX_VEC=_pixel_vector(y), PREC=prec)


# ---------------------------------------------------------------------------------------
# Weight gradient: dW[o, c, r, s] = sum over output pixels p of dy[p, o] * x[p + tap, c]
# ---------------------------------------------------------------------------------------
# (BLOCK_M output channels o, BLOCK_N input channels c, BLOCK_K pixels: the reduction)
_WGRAD_TILES = [(64, 128, 64, 4, 3), (64, 64, 64, 4, 4), (128, 128, 64, 8, 3),
                (64, 256, 64, 8, 3)]


def _wgrad_hook(nargs):
    _box_hook(dy_desc="BLOCK_M")(nargs)
    # 5-D, as the forward's: the stride's phase between rows and columns
    nargs["x_desc"].block_shape = [nargs["IMG"], nargs["BH"], 1, nargs["BW"], nargs["BLOCK_N"]]


@triton.jit
def _wgrad_program(n_steps, SPLIT, KH: tl.constexpr, KW: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A dW program's tile: (first output channel, first input channel, tap, split, and
    the split's steps [lo, hi) of the n_steps pixel steps)."""
    rs = tl.program_id(1) % (KH * KW)
    split = tl.program_id(2)
    per_split = (n_steps + SPLIT - 1) // SPLIT
    lo = split * per_split
    return (tl.program_id(0) * BLOCK_M, tl.program_id(1) // (KH * KW) * BLOCK_N, rs, split,
            lo, tl.minimum(lo + per_split, n_steps))


@triton.jit
def _wgrad_store(acc, dbacc, o0, c0, dw_ptr, db_ptr, scale_ptr, O, C, split, rs,
                 KH: tl.constexpr, KW: tl.constexpr, HAS_DB: tl.constexpr,
                 SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_o = o0 + tl.arange(0, BLOCK_M)
    offs_c = c0 + tl.arange(0, BLOCK_N)
    base._store_wgrad(acc, dbacc, offs_o, offs_c, offs_o < O, offs_c < C, dw_ptr, db_ptr,
                      scale_ptr, O, C, split, rs, KH, KW, HAS_DB, SCALE)


@triton.autotune(configs=_configs(_WGRAD_TILES, "BLOCK_K", _wgrad_hook),
                 key=["O", "C", "N", "Ho", "Wo", "KH", "KW", "ST_H", "ST_W", "SPLIT"],
                 prune_configs_by={"early_config_prune": _pruner(
                     {"BLOCK_M": "O", "BLOCK_N": "C"}, "BLOCK_K")},
                 do_bench=_interpreted_bench if base._INTERPRET else None)
@triton.jit
def _conv_wgrad_tma_kernel(
        dy_desc, x_desc, dw_ptr, db_ptr, scale_ptr, O, C, N, Ho, Wo, XC, X_C0,
        pad_h, pad_w, dil_h, dil_w, KH: tl.constexpr, KW: tl.constexpr, ST_H: tl.constexpr,
        ST_W: tl.constexpr, SPLIT, HAS_DB: tl.constexpr, SCALE: tl.constexpr,
        PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, IMG: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """One (o tile, c tile, tap) of dW, summed over one split of the pixel boxes.  For tap
    (r, s) the x box is the forward's (``_x_box``: at stride 1 the dy box shifted by
    (r * dil - pad, s * dil - pad)): both are bulk copies, out-of-image pixels (padding, the
    boxes' overhang, past the batch) read zeros.  x's channels [C0, C0 + C) lie at X_C0 of
    each phase's XC; at stride > 1 a tile running past them reads the next channels into
    columns of dW that are never stored (each column of the product is its own).  dy's box
    is the first operand (the smaller tile: into registers, transposed), x's the second
    (its reshape a view of shared memory)."""
    tl.static_assert(IMG * BH * BW == BLOCK_K)
    tiles_h = (Ho + BH - 1) // BH
    tiles_w = (Wo + BW - 1) // BW
    o0, c0, rs, split, b_lo, b_hi = _wgrad_program(
        (N + IMG - 1) // IMG * tiles_h * tiles_w, SPLIT, KH, KW, BLOCK_M, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dbacc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for b in range(b_lo, b_hi):
        n0 = b // (tiles_h * tiles_w) * IMG
        hw = b % (tiles_h * tiles_w)
        h0 = hw // tiles_w * BH
        w0 = hw % tiles_w * BW
        g = dy_desc.load([n0, h0, w0, o0]).reshape(BLOCK_K, BLOCK_M)
        a = _x_box(x_desc, n0, h0, w0, rs, X_C0 + c0, XC, KW, dil_h, dil_w, pad_h, pad_w,
                   ST_H, ST_W).reshape(BLOCK_K, BLOCK_N)
        acc = tl.dot(g.T, a, acc, input_precision=PREC)
        if HAS_DB:
            dbacc += tl.sum(g.to(tl.float32), axis=0)
    _wgrad_store(acc, dbacc, o0, c0, dw_ptr, db_ptr, scale_ptr, O, C, split, rs, KH, KW,
                 HAS_DB, SCALE, BLOCK_M, BLOCK_N)


def _channels(t, c0, width):
    """Channels [c0, c0 + width) of a (N, C, H, W) tensor as the (N, H, W, width) view the
    descriptors read."""
    return t.permute(0, 2, 3, 1)[..., c0:c0 + width]


def _wgrad_x(x, x_c0, c, stride):
    """(x5, XC, X_C0): x's channels [x_c0, x_c0 + c) as dW's 5-D descriptor reads them, or
    None.  At stride 1 the slice itself (past it, zeros); at stride s all of x's channels in
    the forward's phase view, the slice starting at x_c0 of each phase."""
    if tuple(stride) == (1, 1):
        return _channels(x, x_c0, c).unsqueeze(2), c, 0
    x5 = _phases(x, tuple(stride))
    return None if x5 is None else (x5, x.shape[1], x_c0)


def wgrad_usable(dy, x, dy_c0, o, x_c0, c, stride) -> bool:
    if o == 0 or c == 0 or not lt.enabled_for(x) or not lt.aligned(x, x.shape[1], x_c0):
        return False
    xv = _wgrad_x(x, x_c0, c, stride)
    return (xv is not None and lt._describable(_channels(dy, dy_c0, o), rank=4)
            and lt._describable(xv[0], rank=5))


def wgrad(dy, x, dw, db, scale, dy_c0, o, x_c0, c, geo, split, need_db) -> bool:
    """dW (and db) partial sums through descriptors into ``dw``, ``db``; False when it
    cannot run here."""
    n, _, ho, wo = dy.shape
    kh, kw = dw.shape[3], dw.shape[4]
    x5, xc, xc0 = _wgrad_x(x, x_c0, c, geo[:2])
    grid = lambda meta: (triton.cdiv(o, meta["BLOCK_M"]),
                         triton.cdiv(c, meta["BLOCK_N"]) * kh * kw, split)
    return lt._launch(
        "conv dW", _conv_wgrad_tma_kernel, grid,
        (_channels(dy, dy_c0, o), x5),
        dw, db, dw if scale is None else scale, o, c, n, ho, wo, xc, xc0, *geo[2:],
        KH=kh, KW=kw, ST_H=geo[0], ST_W=geo[1], SPLIT=split, HAS_DB=need_db,
        SCALE=scale is not None, PREC=base._prec(x.dtype))


# NCHW x read in place: at stride 1 with W_out = W, input pixel q (flattened over H x W) is
# read for tap (r, s) by output pixel q - ((r * dil - pad) * W + (s * dil - pad)): one
# shift along the flat views, put on dy's tile, whose innermost dimension is the channels
# (a descriptor's innermost coordinate must stay 16-byte aligned).  x's tile is then one
# bulk copy of the caller's NCHW x (N, C, H * W) at an aligned pixel, no channels_last copy
# first.  Rows of the image run on into each other along the flat views: a pixel q whose
# output column q % W - (s * dil - pad) leaves [0, W) would pair with the neighbouring
# row's output, so its dy row is zeroed in registers (dy's tile goes through them anyway).
# Rows above or below the images fall outside the flat views and read zeros.  The tiles
# are _WGRAD_TILES'.


def _wgrad_nchw_hook(nargs):
    nargs["dy_desc"].block_shape = [1, nargs["BLOCK_K"], nargs["BLOCK_M"]]
    nargs["x_desc"].block_shape = [1, nargs["BLOCK_N"], nargs["BLOCK_K"]]


@triton.autotune(configs=_configs(_WGRAD_TILES, None, _wgrad_nchw_hook),
                 key=["O", "C", "N", "P", "P_OUT", "W", "KH", "KW", "SPLIT"],
                 prune_configs_by={"early_config_prune": _pruner(
                     {"BLOCK_M": "O", "BLOCK_N": "C"}, "BLOCK_K", ("N", "P"), boxes=False)},
                 do_bench=_interpreted_bench if base._INTERPRET else None)
@triton.jit
def _conv_wgrad_nchw_tma_kernel(
        dy_desc, x_desc, dw_ptr, db_ptr, scale_ptr, O, C, N, P, P_OUT, W, pad_h, pad_w,
        dil_h, dil_w, KH: tl.constexpr, KW: tl.constexpr, SPLIT, HAS_DB: tl.constexpr,
        SCALE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``_conv_wgrad_tma_kernel`` for an NCHW x at stride 1 with W_out = W: x (N, C, P)
    flattened (P = H * W), dy (N, P_OUT, O) channels_last flattened (P_OUT = H_out * W);
    BLOCK_K input pixels a step.  db is summed by tap 0's programs from dy's tiles unmasked:
    their dy rows run pad_h * W + pad_w ahead of x's pixels, so with HAS_DB the pixel steps
    start that far before pixel 0 (x reads zeros there) and run on until they have covered
    every output pixel."""
    lead = pad_h * W + pad_w  # how far tap 0's dy rows run ahead of x's pixels
    t_lo = (lead + BLOCK_K - 1) // BLOCK_K if HAS_DB else 0
    tiles_p = t_lo + (tl.maximum(P, P_OUT - lead) + BLOCK_K - 1) // BLOCK_K
    o0, c0, rs, split, b_lo, b_hi = _wgrad_program(N * tiles_p, SPLIT, KH, KW, BLOCK_M,
                                                   BLOCK_N)
    dh = rs // KW * dil_h - pad_h
    dw = rs % KW * dil_w - pad_w
    j = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dbacc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for b in range(b_lo, b_hi):
        n = b // tiles_p
        q0 = (b % tiles_p - t_lo) * BLOCK_K
        g = dy_desc.load([n, q0 - dh * W - dw, o0]).reshape(BLOCK_K, BLOCK_M)
        a = x_desc.load([n, c0, q0]).reshape(BLOCK_N, BLOCK_K)
        col = (q0 + j) % W - dw  # the output column that reads input pixel q0 + j
        gm = tl.where(((col >= 0) & (col < W))[:, None], g, 0.0).to(g.dtype)
        acc = tl.dot(gm.T, a.T, acc, input_precision=PREC)
        if HAS_DB:
            dbacc += tl.sum(g.to(tl.float32), axis=0)
    _wgrad_store(acc, dbacc, o0, c0, dw_ptr, db_ptr, scale_ptr, O, C, split, rs, KH, KW,
                 HAS_DB, SCALE, BLOCK_M, BLOCK_N)


def _flat_nchw(x, x_c0, c):
    """Channels [x_c0, x_c0 + c) of an NCHW x as the (N, c, H * W) view, or None where H and
    W do not merge (not NCHW-contiguous along them)."""
    n, _, h, w = x.shape
    if x.stride(3) != 1 or x.stride(2) != w:
        return None
    return x[:, x_c0:x_c0 + c].flatten(2)


def _flat_pixels(dy, dy_c0, o):
    """dy's columns [dy_c0, dy_c0 + o) as (N, H * W, o), channels_last flattened; None where
    the pixels do not merge."""
    v = _channels(dy, dy_c0, o)
    n, h, w, _ = v.shape
    if v.stride(1) != w * v.stride(2):
        return None
    return v.flatten(1, 2)


def wgrad_reads_nchw(x, ho, wo, geo) -> bool:
    """Whether dW (and dW_couple) can read this NCHW x in place (no channels_last copy):
    stride 1, as wide out as in, H * W a multiple of 8 (the view's 16-byte strides)."""
    if x.is_contiguous(memory_format=torch.channels_last) or not lt.enabled_for(x):
        return False
    if tuple(geo[:2]) != (1, 1) or wo != x.shape[3]:
        return False
    xv = _flat_nchw(x, 0, x.shape[1])
    return xv is not None and lt._describable(xv, rank=3)


def wgrad_nchw_usable(dy, x, dy_c0, o, x_c0, c, ho, wo, geo) -> bool:
    if o == 0 or c == 0 or not wgrad_reads_nchw(x, ho, wo, geo):
        return False
    dv, xv = _flat_pixels(dy, dy_c0, o), _flat_nchw(x, x_c0, c)
    return (dv is not None and lt._describable(dv, rank=3)
            and lt._describable(xv, rank=3))


def wgrad_nchw(dy, x, dw, db, scale, dy_c0, o, x_c0, c, geo, split, need_db) -> bool:
    """``wgrad`` for an NCHW x read in place (``wgrad_nchw_usable``)."""
    n, _, ho, wo = dy.shape
    kh, kw = dw.shape[3], dw.shape[4]
    grid = lambda meta: (triton.cdiv(o, meta["BLOCK_M"]),
                         triton.cdiv(c, meta["BLOCK_N"]) * kh * kw, split)
    return lt._launch(
        "conv dW (NCHW x)", _conv_wgrad_nchw_tma_kernel, grid,
        (_flat_pixels(dy, dy_c0, o), _flat_nchw(x, x_c0, c)),
        dw, db, dw if scale is None else scale, o, c, n, x.shape[2] * x.shape[3], ho * wo,
        wo, *geo[2:],
        KH=kh, KW=kw, SPLIT=split, HAS_DB=need_db, SCALE=scale is not None,
        PREC=base._prec(x.dtype))


# ---------------------------------------------------------------------------------------
# Input gradient: dx[p, c] = sum over taps and dy's columns o of
# dy[(p + pad - tap) / stride, o] * w[o, c, tap]; the old channels [0, I_f) only if asked
# ---------------------------------------------------------------------------------------
# (BLOCK_M input pixels, BLOCK_N input channels, BLOCK_K dy columns: the reduction)
_DX_TILES = [(128, 64, 64, 4, 4), (256, 64, 64, 8, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4)]


def _dx_hook(nargs):
    _box_hook(dy_desc="BLOCK_K", dyo_desc="BLOCK_K")(nargs)
    for name in ("wn_desc", "wc_desc", "wf_desc"):
        nargs[name].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_N"]]


@triton.jit
def _dx_tap_operands(i, n_o, n_t, row0, dy_desc, w_desc, n0, q0h, q0w, ph, pw, r0, t0,
                     w_cols, c0, pad_h, pad_w, dil_h, dil_w, KW: tl.constexpr,
                     ST_H: tl.constexpr, ST_W: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step i of a flat loop over (tap of the phase, row tile): dy's box shifted against
    the tap, at columns o0.., and the weight rows o0.. at the tap's columns (w_cols channels
    a tap, from channel c0); (dy box, weight tile, o0)."""
    r = r0 + i // n_o // n_t * ST_H
    t = t0 + i // n_o % n_t * ST_W
    o0 = row0 + (i % n_o) * BLOCK_K
    g = dy_desc.load([n0, q0h + (ph + pad_h - r * dil_h) // ST_H,
                      q0w + (pw + pad_w - t * dil_w) // ST_W, o0])
    return g, w_desc.load([o0, (r * KW + t) * w_cols + c0]), o0


@triton.jit
def _dx_taps(acc, dy_desc, w_desc, row0, n_rows, n_taps, n_t, n0, q0h, q0w, ph, pw, r0, t0,
             w_cols, c0, pad_h, pad_w, dil_h, dil_w, KW: tl.constexpr, ST_H: tl.constexpr,
             ST_W: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """acc (channels x pixels) += the product of the weight rows [row0, row0 + n_rows)
    with dy's columns at the same rows, over the phase's n_taps taps: one flat loop, one
    software pipeline, both operands from their bulk copies to wgmma (dy and weight rows
    past the tensors read zeros)."""
    n_o = (n_rows + BLOCK_K - 1) // BLOCK_K
    for i in range(0, n_taps * n_o):
        g, w, _ = _dx_tap_operands(i, n_o, n_t, row0, dy_desc, w_desc, n0, q0h, q0w, ph, pw,
                                   r0, t0, w_cols, c0, pad_h, pad_w, dil_h, dil_w, KW, ST_H,
                                   ST_W, BLOCK_K)
        acc = tl.dot(w.T, g.reshape(BLOCK_M, BLOCK_K).T, acc, input_precision=PREC)
    return acc


@triton.autotune(configs=_configs(_DX_TILES, "BLOCK_M", _dx_hook),
                 key=["N", "H", "W", "C", "O_N", "O_F", "G_F", "KH", "KW", "ST_H", "ST_W",
                      "HAS_COUPLE", "HAS_OLD"],
                 prune_configs_by={"early_config_prune": _pruner(
                     {"BLOCK_N": "C", "BLOCK_K": "O_N"}, "BLOCK_M", ("N", "HQ", "WQ"),
                     "dy_desc")},
                 do_bench=_interpreted_bench if base._INTERPRET else None)
@triton.jit
def _conv_dx_tma_kernel(
        dy_desc, dyo_desc, wn_desc, wc_desc, wf_desc, dx_ptr, groups_ptr, bands_ptr, N, H, W,
        HQ, WQ, C, O_N, O_F, I_F, G_F, NB, dx_c0, sxn, sxc, sxh, sxw, pad_h, pad_w, dil_h,
        dil_w,
        KH: tl.constexpr, KW: tl.constexpr, ST_H: tl.constexpr, ST_W: tl.constexpr,
        HAS_COUPLE: tl.constexpr, HAS_OLD: tl.constexpr, PIX_VEC: tl.constexpr,
        BAND_VEC: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IMG: tl.constexpr, BH: tl.constexpr,
        BW: tl.constexpr):
    """A box of input pixels by BLOCK_N channels, channel c stored at dx's column c - dx_c0:
    the new inputs [I_f, C), and with HAS_OLD the old ones [0, I_f) too, in tiles of their
    own, so no tile mixes the two.

    At stride s the box's pixels are one phase (ph, pw) of the input, rows q * s + ph of the
    HQ = ceil(H / s) (columns alike): only the taps r = ph + pad (mod s) reach them
    (dilation 1 where the stride is not), each from dy's box shifted by (ph + pad - r) / s, a
    whole number.  At stride 1 every tap, shifted by pad - r * dil.  Whatever lies outside
    dy reads zeros (the taps that miss it); a phase no tap reaches stores zeros.  Transposed
    as the forward, dx^T = w^T dy^T.  A channel tile that runs past its part (I_f or C)
    reads the next tap's weights into rows that are never stored.

    Which rows each tile reads: the newest (w_new) always; for a new tile the coupling
    block's frozen rows (w_couple); for an old tile the frozen rows of every group whose
    k_end lies past the tile's first channel (the staircase, k_ends nondecreasing), all
    straight from the bulk copies to wgmma.  The old channels are tiled in the NB bands of
    ``bands_ptr``, cut at every k_end, so such a group reaches all of the tile's stored
    channels: its zero block (a NaN stored there, or 0 * a NaN of its dy) only meets
    channels that are not stored.  Band ends, I_f and C are multiples of BAND_VEC: the
    channel mask is one over whole vectors (see expanded_conv's vector bounds)."""
    tl.static_assert(IMG * BH * BW == BLOCK_M)
    pid = tl.program_id(0)
    n_old = lt.base._band_tiles(bands_ptr, NB, BLOCK_N) if HAS_OLD else 0
    n_tiles_c = n_old + (C - I_F + BLOCK_N - 1) // BLOCK_N
    pid_c = pid % n_tiles_c  # channel tiles fastest: one box's dy shared through L2
    phase = pid // n_tiles_c % (ST_H * ST_W)
    pid_m = pid // n_tiles_c // (ST_H * ST_W)
    ph = phase // ST_W
    pw = phase % ST_W
    tiles_h = (HQ + BH - 1) // BH
    tiles_w = (WQ + BW - 1) // BW
    n0 = pid_m // (tiles_h * tiles_w) * IMG
    hw = pid_m % (tiles_h * tiles_w)
    q0h = hw // tiles_w * BH
    q0w = hw % tiles_w * BW
    is_old = pid_c < n_old
    if HAS_OLD:
        old0, old_end = lt.base._band_tile(pid_c, bands_ptr, NB, BLOCK_N, BAND_VEC)
        c0 = tl.where(is_old, old0, I_F + (pid_c - n_old) * BLOCK_N)
        c_end = tl.where(is_old, old_end, C)
    else:
        c0 = I_F + pid_c * BLOCK_N
        c_end = C
    # the phase's taps: r0, r0 + ST_H, ... below KH (every tap at stride 1)
    r0 = (ph + pad_h) % ST_H
    t0 = (pw + pad_w) % ST_W
    n_t = (KW - t0 + ST_W - 1) // ST_W
    n_taps = (KH - r0 + ST_H - 1) // ST_H * n_t

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc = _dx_taps(acc, dy_desc, wn_desc, 0, O_N, n_taps, n_t, n0, q0h, q0w, ph, pw, r0, t0,
                   C, c0, pad_h, pad_w, dil_h, dil_w, KW, ST_H, ST_W, PREC, BLOCK_M, BLOCK_K)
    if HAS_COUPLE:  # every frozen row reads the newest channels through w_couple
        acc = _dx_taps(acc, dyo_desc, wc_desc, 0, tl.where(is_old, 0, O_F), n_taps, n_t, n0,
                       q0h, q0w, ph, pw, r0, t0, C - I_F, c0 - I_F, pad_h, pad_w, dil_h,
                       dil_w, KW, ST_H, ST_W, PREC, BLOCK_M, BLOCK_K)
    if HAS_OLD:
        # rows [0, o_lo): k_end <= c0, they never reach the tile; [o_lo, O_F): past it
        o_lo = tl.where(is_old, 0, O_F)  # (a new tile: no frozen rows here)
        row0 = pid * 0
        for grp in range(G_F):
            row0 += tl.load(groups_ptr + grp)
            o_lo = tl.where(tl.load(groups_ptr + G_F + grp) <= c0, tl.maximum(o_lo, row0),
                            o_lo)
        acc = _dx_taps(acc, dyo_desc, wf_desc, o_lo, O_F - o_lo, n_taps, n_t, n0, q0h, q0w,
                       ph, pw, r0, t0, I_F, c0, pad_h, pad_w, dil_h, dil_w, KW, ST_H, ST_W,
                       PREC, BLOCK_M, BLOCK_K)
    acc = tl.trans(acc)

    j = tl.arange(0, BLOCK_M)
    img = n0 + j // (BH * BW)
    hi = (q0h + (j // BW) % BH) * ST_H + ph
    wi = (q0w + j % BW) * ST_W + pw
    if ST_W == 1:  # an NCHW dx is stored in vectors of PV pixels (as the forward's y)
        PV: tl.constexpr = PIX_VEC if PIX_VEC <= BW else BW
        w_ok = q0w // PV + (j // PV) % (BW // PV) < W // PV
    else:
        w_ok = wi < W
    p_mask = (img < N) & (hi < H) & w_ok
    cc = c0 + tl.arange(0, BLOCK_N)
    dx_row = (img.to(tl.int64) * (sxn // PIX_VEC * PIX_VEC) + hi * (sxh // PIX_VEC * PIX_VEC)
              + wi * sxw)
    tl.store(dx_ptr + dx_row[:, None] + (cc - dx_c0)[None, :] * (sxc // PIX_VEC * PIX_VEC),
             acc.to(dx_ptr.dtype.element_ty),
             mask=p_mask[:, None] & (cc // BAND_VEC < c_end // BAND_VEC)[None, :])


def dx_usable(dy, w_new, w_couple, w_frozen, o_f, dy_new_c0, frozen_k_ends, geo,
              need_dx_old, *, i_f, frozen_out_groups=(), bands=()) -> bool:
    """Whether dx can run through descriptors: along a strided dimension at dilation 1; with
    dx_old, frozen groups whose k_ends never decrease (a staircase), and every channel a
    descriptor load starts at a whole 16-byte unit (``bands``: the old channels' band ends,
    expanded_linear.band_ends; dy's frozen channels from each group's first row on).
    ``w_frozen``: None without dx_old or frozen rows."""
    if w_new.shape[0] == 0 or not lt.enabled_for(dy) or not lt.aligned(dy, w_new.shape[1], i_f):
        return False
    if any(st != 1 and dil != 1 for st, dil in zip(geo[:2], geo[4:6])):
        return False
    if need_dx_old and not (lt.nondecreasing(frozen_k_ends) and lt.aligned(
            dy, *bands, *itertools.accumulate(frozen_out_groups))):
        return False
    ws = [w for w in (w_new, w_couple, w_frozen) if w is not None]
    if any(w.dim() != 4 or w.stride(1) != 1 for w in ws):
        return False
    if not all(lt._describable(_taps_by_channel(w)) for w in ws):
        return False
    dys = [_channels(dy, dy_new_c0, w_new.shape[0])]
    if (w_couple is not None or need_dx_old) and o_f:
        dys.append(_channels(dy, 0, o_f))
    return all(lt._describable(d, rank=4) for d in dys)


def grad_input(dy, w_new, w_couple, w_frozen, o_f, i_f, groups, n_groups, dx, dy_new_c0,
               c_lo, dx_c0, geo, prec, bands=()) -> bool:
    """dx[:, c_lo:] (channel c at dx's column c - dx_c0) through descriptors; False when it
    cannot run here.  ``c_lo`` = 0 asks for the old channels: the frozen rows ``w_frozen``
    (None if there are none), ``groups`` the launcher's table of their widths and k_ends,
    ``bands`` the ends of the bands their tiles are cut in (expanded_linear.band_ends).
    ``w_couple`` and ``w_frozen`` already carry a folded BatchNorm's scale of their rows."""
    n, c, h, wd = dx.shape[0], w_new.shape[1], dx.shape[2], dx.shape[3]
    o_n, kh, kw = w_new.shape[0], w_new.shape[2], w_new.shape[3]
    st_h, st_w = geo[0], geo[1]
    hq, wq = triton.cdiv(h, st_h), triton.cdiv(wd, st_w)  # a phase's rows and columns
    couple = w_couple is not None
    has_old = c_lo < i_f
    dy_new = _channels(dy, dy_new_c0, o_n)
    dy_old = _channels(dy, 0, o_f) if (couple or has_old) and o_f else dy_new
    wn = _taps_by_channel(w_new)
    wf = _taps_by_channel(w_frozen) if has_old and w_frozen is not None else wn

    def grid(meta):
        boxes = (triton.cdiv(n, meta["IMG"]) * triton.cdiv(hq, meta["BH"])
                 * triton.cdiv(wq, meta["BW"]))
        tiles = triton.cdiv(c - i_f, meta["BLOCK_N"]) + (
            lt.base.band_tiles(bands, meta["BLOCK_N"]) if has_old else 0)
        return (boxes * st_h * st_w * tiles,)

    return lt._launch(
        "conv dx", _conv_dx_tma_kernel, grid,
        (dy_new, dy_old, wn, _taps_by_channel(w_couple) if couple else wn, wf),
        dx, groups, lt.base.band_table(bands, dx.device) if has_old else groups,  # (unread)
        n, h, wd, hq, wq, c, o_n, o_f, i_f, n_groups, len(bands), dx_c0, *dx.stride(),
        *geo[2:], KH=kh, KW=kw, ST_H=st_h, ST_W=st_w, HAS_COUPLE=couple, HAS_OLD=has_old,
        PIX_VEC=_pixel_vector(dx) if st_w == 1 else 1,
        BAND_VEC=base.multiple_of_all(tuple(bands) + (c, i_f)), PREC=prec)
