"""Triton kernels for the expanded (staircase) Conv2d: implicit GEMM, NCHW semantics.

Shapes (the same as ``expanse_fast.backends.torch_ref``): x (N, C, H, W) with
C = I_f + i_new; w_frozen (O_f, I_f, kh, kw), w_new (o_new, C, kh, kw), w_couple
(O_f, i_new, kh, kw) or None.  Frozen output group g reads input channels
[0, frozen_k_ends[g]) only: its weight columns past that are never loaded.

Implicit GEMM: rows are output pixels (M = N*Ho*Wo), columns output channels, and the
reduction runs over (kernel tap, input channel); an output-channel tile never crosses a
group, so its channel loop simply stops at its group's k_end.  x, dy and the weights are
addressed through their strides, so any layout (or view) works; by default (NCHW_MODE) an
x or dy that is not channels_last is copied to channels_last first, where the gathers are
16-byte ones.  The output and dx take x's memory format (channels_last if x is
channels_last, else NCHW contiguous), as torch's own conv does.

Kernels: forward (all groups, bias fused, one launch), weight gradient of the trainable
rows (+ bias gradient, split over pixels for parallelism), input gradient (implicit GEMM of
dy with the flipped weights; taps whose output position is not integral are masked), and
direct depthwise forward / backward kernels.  All accumulate in fp32.  On Hopper, convs of
16-byte aligned channels_last fp16/bf16 activations take the tensor-descriptor (TMA)
versions in ``expanded_conv_tma``: the forward and dW (any stride that divides H and W),
and dx (dilation 1 along a strided dimension; with dx_old, a staircase of nondecreasing
k_ends).  dW also reads an NCHW x in place there (stride 1, as wide out as in, H * W a
multiple of 8): the backward then copies no x to channels_last.

A folded eval-mode BatchNorm of the frozen output channels (``norm`` = mean, var, weight,
bias, eps) runs in the forward kernels' epilogue, on the fp32 accumulator of the frozen
tiles: ``acc * alpha + beta`` with aten's ``alpha = weight / sqrt(var + eps)``,
``beta = bias - mean * alpha``.  Backward takes ``alpha`` (``norm_scale``) and applies it
to the frozen columns of dy where a kernel reads them: the dy tiles of the input gradient's
frozen rows, and the finished dcouple rows.
"""
from __future__ import annotations

import functools
import itertools
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from . import expanded_linear as base
from . import transpose
from .launch import launch
from .vector_bounds import multiple_of_all

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# EXPANSE_FAST_AUTOTUNE=0: first config only (quick GPU test runs, no tuning compiles).
_AUTOTUNE = os.environ.get("EXPANSE_FAST_AUTOTUNE", "1") != "0"
# How the implicit-GEMM kernels take activations whose channels are not innermost (NCHW),
# EXPANSE_FAST_CONV_NCHW.  Their gathers then step H*W elements from one channel to the
# next: 2-byte loads that cp.async cannot pipeline, where channels_last gives 16-byte ones.
#   "channels_last" (default): copy x and dy to channels_last, run the fast gathers, and
#       hand y and dx back in x's layout (one activation copy each way, as cuDNN's NCHW
#       paths do; the descriptor kernels store y, and dx at stride 1, in NCHW directly,
#       and their dW reads NCHW x in place where it can: expanded_conv_tma.wgrad_nchw).
#   "direct": read NCHW through its strides in place, no copies.
# The GPU run times both on NCHW input.  Depthwise kernels gather per channel: never copied.
NCHW_MODES = ("channels_last", "direct")
NCHW_MODE = os.environ.get("EXPANSE_FAST_CONV_NCHW", "channels_last")
# Triton 3.8 (torch 2.14's) fails to compile the pipelined forward's whole-vector channel
# mask for sm_90 (TritonGPUCoalesceAsyncCopy: "PassManager::run failed", every config;
# 3.9 compiles it).  There the forward masks channel by channel: 2-byte loads, slower,
# but it runs.
_FWD_VECTOR_MASK = not triton.__version__.startswith("3.8.")


def _configs(tiles, small):
    """Autotune configs: Hopper-sized tiles on a GPU, one small tile in the interpreter."""
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    if _INTERPRET:
        return [triton.Config(dict(zip(names, small)), num_warps=1, num_stages=1)]
    return [triton.Config(dict(zip(names, t[:3])), num_warps=t[3], num_stages=t[4])
            for t in (tiles if _AUTOTUNE else tiles[:1])]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
# The implicit-GEMM kernels' keys hold the activations' channel strides (1: channels_last),
# so NCHW read in place (NCHW_MODE "direct") gets tiles of its own.  256 x 64: as many
# FLOPs per byte loaded as 128 x 128, for the common 64-channel widening, where a 128-wide
# tile over the new group (or over dx's new channels) would multiply half zeros.
_GEMM_TILES = [
    (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 128, 64, 8, 3),
    (256, 64, 32, 8, 3), (256, 64, 64, 8, 3),
]
_WGRAD_TILES = [(64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 128, 64, 4, 3),
                (128, 128, 32, 8, 3)]
_DW_TILES = [(64, 32, 1, 4, 2), (128, 32, 1, 4, 2), (32, 64, 1, 4, 2), (128, 64, 1, 8, 2)]


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr):
    # fp32 inputs: "ieee" (exact) or "tf32"; 16-bit inputs ignore the choice.
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _locate_tile(pid_n, groups_ptr, G, BLOCK_N: tl.constexpr):
    """Output-channel tile index -> (first channel, group end, group k_end, group index).

    groups_ptr holds G widths then G k_ends; the last group is the trainable one.  Tiles
    are numbered group by group so that no tile crosses a group boundary."""
    zero = pid_n * 0
    o_start = zero
    o_end = zero
    k_end = zero
    grp = zero
    tiles = zero
    off = zero
    for g in range(G):
        width = tl.load(groups_ptr + g)
        ke = tl.load(groups_ptr + G + g)
        nt = (width + BLOCK_N - 1) // BLOCK_N
        here = (pid_n >= tiles) & (pid_n < tiles + nt)
        o_start = tl.where(here, off + (pid_n - tiles) * BLOCK_N, o_start)
        o_end = tl.where(here, off + width, o_end)
        k_end = tl.where(here, ke, k_end)
        grp = tl.where(here, g, grp)
        tiles += nt
        off += width
    return o_start, o_end, k_end, grp


@triton.jit
def _channel_tiles(groups_ptr, G, BLOCK_N: tl.constexpr):
    """How many output-channel tiles the groups of the table make (none crosses a group)."""
    tiles = G * 0
    for g in range(G):
        tiles += (tl.load(groups_ptr + g) + BLOCK_N - 1) // BLOCK_N
    return tiles


@triton.jit
def _norm_epilogue(acc, offs_o, frozen, nm_ptr, nv_ptr, nw_ptr, nb_ptr, norm_eps,
                   NORM_W: tl.constexpr, NORM_B: tl.constexpr):
    """Eval-mode BatchNorm of the columns where ``frozen`` (aten's arithmetic, in fp32);
    the other columns of ``acc`` unchanged."""
    mean = tl.load(nm_ptr + offs_o, mask=frozen, other=0.0).to(tl.float32)
    var = tl.load(nv_ptr + offs_o, mask=frozen, other=1.0).to(tl.float32)
    alpha = 1.0 / tl.sqrt_rn(var + norm_eps)
    if NORM_W:
        alpha = alpha * tl.load(nw_ptr + offs_o, mask=frozen, other=1.0).to(tl.float32)
    beta = 0.0 - mean * alpha
    if NORM_B:
        beta = tl.load(nb_ptr + offs_o, mask=frozen, other=0.0).to(tl.float32) - mean * alpha
    return tl.where(frozen[None, :], acc * alpha[None, :] + beta[None, :], acc)


@triton.jit
def _bias_and_norm(acc, offs_o, n_mask, is_new, O_f, bf_ptr, bn_ptr, nm_ptr, nv_ptr, nw_ptr,
                   nb_ptr, norm_eps, HAS_BF: tl.constexpr, HAS_BN: tl.constexpr,
                   NORM: tl.constexpr, NORM_W: tl.constexpr, NORM_B: tl.constexpr):
    """The forward epilogue on the fp32 (pixels, channels) tile: each group's bias, and a
    folded BatchNorm on frozen tiles (a tile never crosses a group)."""
    if HAS_BF:
        acc += tl.load(bf_ptr + offs_o, mask=n_mask & (offs_o < O_f),
                       other=0.0).to(tl.float32)[None, :]
    if HAS_BN:
        acc += tl.load(bn_ptr + (offs_o - O_f), mask=n_mask & (offs_o >= O_f),
                       other=0.0).to(tl.float32)[None, :]
    if NORM:
        if not is_new:
            acc = _norm_epilogue(acc, offs_o, n_mask, nm_ptr, nv_ptr, nw_ptr, nb_ptr, norm_eps,
                                 NORM_W, NORM_B)
    return acc


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------
@triton.jit
def _fwd_segment(acc, x_ptr, x_base, hi0, wi0, m_mask, H, W, sxc, sxh, sxw,
                 w_ptr, rel_n, n_mask, swo, swc, swr, sws, c_lo, c_hi,
                 dil_h, dil_w, KH: tl.constexpr, KW: tl.constexpr,
                 BLOCK_K: tl.constexpr, CH_VEC: tl.constexpr, PREC: tl.constexpr):
    """acc += x[:, c_lo:c_hi] (im2col) @ w[:, 0:c_hi-c_lo]^T over all kernel taps.

    One flat loop over (tap, BLOCK_K channel tile), so that it is one software pipeline.
    c_hi comes from the group table at run time; CH_VEC (a multiple of every channel bound,
    checked by the launcher) lets the channel mask cover whole 16-byte vectors, so that the
    loads stay vector loads (a mask the compiler cannot prove aligned makes them 2-byte ones).
    """
    offs_k = tl.arange(0, BLOCK_K)
    n_tiles = tl.cdiv(c_hi - c_lo, BLOCK_K)
    for t in range(0, KH * KW * n_tiles):
        rs = t // n_tiles
        r = rs // KW
        s = rs % KW
        hi = hi0 + r * dil_h
        wi = wi0 + s * dil_w
        ok = m_mask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        c = c_lo + (t % n_tiles) * BLOCK_K + offs_k
        c_ok = c // CH_VEC < c_hi // CH_VEC  # = c < c_hi, constant over CH_VEC channels
        a = tl.load(x_ptr + (x_base + hi * sxh + wi * sxw)[:, None] + c[None, :] * sxc,
                    mask=ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(w_ptr + (rel_n * swo + r * swr + s * sws)[None, :]
                    + (c - c_lo)[:, None] * swc, mask=c_ok[:, None] & n_mask[None, :],
                    other=0.0)
        acc = _mma(a, b, acc, PREC)
    return acc


@triton.autotune(configs=_configs(_GEMM_TILES, (32, 16, 16)),
                 key=["M", "O", "C", "G", "KH", "KW", "HAS_COUPLE", "sxc"])
@triton.jit
def _conv_fwd_kernel(
        x_ptr, wf_ptr, wn_ptr, wc_ptr, bf_ptr, bn_ptr, y_ptr, groups_ptr,
        nm_ptr, nv_ptr, nw_ptr, nb_ptr, norm_eps,
        M, O, C, H, W, Ho, Wo, G, O_f, I_f,
        sxn, sxc, sxh, sxw, sfo, sfc, sfr, sfs, sno, snc, snr, sns, sco, scc, scr, scs,
        syn, syc, syh, syw, st_h, st_w, pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr, HAS_BF: tl.constexpr, HAS_BN: tl.constexpr,
        HAS_COUPLE: tl.constexpr, NORM: tl.constexpr, NORM_W: tl.constexpr,
        NORM_B: tl.constexpr, CH_VEC: tl.constexpr, OUT_VEC: tl.constexpr,
        PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr):
    tl.static_assert(BLOCK_N % OUT_VEC == 0 and BLOCK_K % CH_VEC == 0)
    # output-channel tiles fastest: the programs that read one row tile's x run together
    # and share it through L2 (x is far larger than L2 at the ResNet shapes; weights fit)
    pid = tl.program_id(0)
    n_tiles_n = _channel_tiles(groups_ptr, G, BLOCK_N)
    pid_n = pid % n_tiles_n
    pid_m = pid // n_tiles_n
    o_start, o_end, k_end, grp = _locate_tile(pid_n, groups_ptr, G, BLOCK_N)
    # Every group boundary is a multiple of OUT_VEC (the launcher checks): said so, the
    # output channel mask and addresses cover whole vectors, and the stores stay vector
    # stores (2-byte ones need a register per element and address: spills).
    o_start = o_start // OUT_VEC * OUT_VEC

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    n_img = offs_m // (Ho * Wo)
    pix = offs_m % (Ho * Wo)
    ho = pix // Wo
    wo = pix % Wo
    hi0 = ho * st_h - pad_h
    wi0 = wo * st_w - pad_w
    x_base = n_img.to(tl.int64) * sxn

    rel_n = tl.arange(0, BLOCK_N)
    offs_o = o_start + rel_n
    n_mask = offs_o // OUT_VEC < o_end // OUT_VEC  # = offs_o < o_end

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Trainable rows read every input channel, frozen rows channels [0, k_end): one segment
    # either way, its weight picked by the tile's group (one inlined loop, not two).
    if grp == G - 1:
        w_seg = wn_ptr + (o_start - O_f) * sno
        swo, swc, swr, sws = sno, snc, snr, sns
    else:
        w_seg = wf_ptr + o_start * sfo
        swo, swc, swr, sws = sfo, sfc, sfr, sfs
    acc = _fwd_segment(acc, x_ptr, x_base, hi0, wi0, m_mask, H, W, sxc, sxh, sxw,
                       w_seg, rel_n, n_mask, swo, swc, swr, sws, 0, k_end,
                       dil_h, dil_w, KH, KW, BLOCK_K, CH_VEC, PREC)
    if HAS_COUPLE:  # coupled layout: old rows also read the newest channels
        acc = _fwd_segment(acc, x_ptr, x_base, hi0, wi0, m_mask, H, W, sxc, sxh, sxw,
                           wc_ptr + o_start * sco, rel_n, n_mask, sco, scc, scr, scs,
                           I_f, tl.where(grp == G - 1, I_f, C), dil_h, dil_w, KH, KW,
                           BLOCK_K, CH_VEC, PREC)

    acc = _bias_and_norm(acc, offs_o, n_mask, grp == G - 1, O_f, bf_ptr, bn_ptr, nm_ptr,
                         nv_ptr, nw_ptr, nb_ptr, norm_eps, HAS_BF, HAS_BN, NORM, NORM_W,
                         NORM_B)
    y_row = n_img.to(tl.int64) * syn + ho * syh + wo * syw
    tl.store(y_ptr + y_row[:, None] + offs_o[None, :] * syc,
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ---------------------------------------------------------------------------------------
# Weight gradient: dW[o, c, r, s] = sum_pixels dy[:, dy_c0 + o] * im2col(x)[:, x_c0 + c]
# ---------------------------------------------------------------------------------------
@triton.autotune(configs=_configs(_WGRAD_TILES, (16, 16, 32)),
                 key=["O", "C", "M", "KH", "KW", "SPLIT", "sdc", "sxc"])
@triton.jit
def _conv_wgrad_kernel(
        dy_ptr, x_ptr, dw_ptr, db_ptr, scale_ptr,
        O, C, M, H, W, Ho, Wo, dy_c0, x_c0, chunk,
        sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw,
        st_h, st_w, pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr, SPLIT, HAS_DB: tl.constexpr,
        SCALE: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # BLOCK_M: output channels o, BLOCK_N: input channels c, BLOCK_K: pixels (reduction).
    pid_o = tl.program_id(0)
    pid_c = tl.program_id(1) // (KH * KW)
    rs = tl.program_id(1) % (KH * KW)
    split = tl.program_id(2)
    r = rs // KW
    s = rs % KW

    offs_o = pid_o * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    o_mask = offs_o < O
    c_mask = offs_c < C
    offs_p = tl.arange(0, BLOCK_K)
    m_lo = split * chunk
    m_hi = tl.minimum(m_lo + chunk, M)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dbacc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_K):
        m = m0 + offs_p
        m_ok = m < m_hi
        n_img = (m // (Ho * Wo)).to(tl.int64)
        pix = m % (Ho * Wo)
        ho = pix // Wo
        wo = pix % Wo
        hi = ho * st_h - pad_h + r * dil_h
        wi = wo * st_w - pad_w + s * dil_w
        x_ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        g = tl.load(dy_ptr + (n_img * sdn + ho * sdh + wo * sdw)[None, :]
                    + (dy_c0 + offs_o)[:, None] * sdc,
                    mask=o_mask[:, None] & m_ok[None, :], other=0.0)
        a = tl.load(x_ptr + (n_img * sxn + hi * sxh + wi * sxw)[:, None]
                    + (x_c0 + offs_c)[None, :] * sxc,
                    mask=x_ok[:, None] & c_mask[None, :], other=0.0)
        acc = _mma(g, a, acc, PREC)
        if HAS_DB:
            dbacc += tl.sum(g.to(tl.float32), axis=1)

    _store_wgrad(acc, dbacc, offs_o, offs_c, o_mask, c_mask, dw_ptr, db_ptr, scale_ptr, O, C,
                 split, rs, KH, KW, HAS_DB, SCALE)


@triton.jit
def _store_wgrad(acc, dbacc, offs_o, offs_c, o_mask, c_mask, dw_ptr, db_ptr, scale_ptr, O, C,
                 split, rs, KH: tl.constexpr, KW: tl.constexpr, HAS_DB: tl.constexpr,
                 SCALE: tl.constexpr):
    """A split's partial sums of tap rs: dw (SPLIT, O, C, KH, KW) and db (SPLIT, O), reduced
    by the launcher; with SCALE the dy rows were to be multiplied by a per-row factor (a
    folded BatchNorm): the row sums are."""
    if SCALE:
        acc = acc * tl.load(scale_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)[:, None]
    dw_off = split * O * C * KH * KW + (offs_o[:, None] * C + offs_c[None, :]) * (KH * KW) + rs
    tl.store(dw_ptr + dw_off, acc, mask=o_mask[:, None] & c_mask[None, :])
    if HAS_DB:
        if tl.program_id(1) == 0:  # one program per row tile writes the bias gradient
            tl.store(db_ptr + split * O + offs_o, dbacc, mask=o_mask)


# ---------------------------------------------------------------------------------------
# Input gradient: dx[p, c] = sum_{o, r, s} dy[out(p, r, s), o] * w[o, c, r, s]
# ---------------------------------------------------------------------------------------
@triton.jit
def _dx_rows(acc, dy_ptr, dy_row, p_ok, sdc, dy_c0, row_lo, row_hi, w_ptr, swo, swc,
             w_col, col_mask, scale_ptr, SCALE: tl.constexpr, BLOCK_K: tl.constexpr,
             ROW_VEC: tl.constexpr, PREC: tl.constexpr):
    """acc += dy[:, dy_c0 + rows] @ w[rows, w_col] for rows in [row_lo, row_hi); with
    ``SCALE`` the dy columns are first multiplied by ``scale[rows]`` (a folded BatchNorm).
    row_lo, row_hi and dy_c0 are multiples of ROW_VEC (the launcher checks): the row mask
    covers whole vectors of dy's channels."""
    offs_k = tl.arange(0, BLOCK_K)
    for o0 in range(row_lo, row_hi, BLOCK_K):
        o = o0 + offs_k
        o_ok = o // ROW_VEC < row_hi // ROW_VEC  # = o < row_hi
        g = tl.load(dy_ptr + dy_row[:, None] + (dy_c0 + o)[None, :] * sdc,
                    mask=p_ok[:, None] & o_ok[None, :], other=0.0)
        if SCALE:
            s = tl.load(scale_ptr + o, mask=o_ok, other=0.0).to(tl.float32)
            g = (g.to(tl.float32) * s[None, :]).to(dy_ptr.dtype.element_ty)
        w = tl.load(w_ptr + o[:, None] * swo + w_col[None, :] * swc,
                    mask=o_ok[:, None] & col_mask[None, :], other=0.0)
        acc = _mma(g, w, acc, PREC)
    return acc


@triton.autotune(configs=_configs(_GEMM_TILES, (32, 16, 16)),
                 key=["P", "C", "O_f", "O_n", "G_f", "KH", "KW", "NEED_OLD", "HAS_COUPLE",
                      "sdc"])
@triton.jit
def _conv_dx_kernel(
        dy_ptr, wf_ptr, wn_ptr, wc_ptr, dx_ptr, groups_ptr, bands_ptr, scale_ptr,
        P, C, H, W, Ho, Wo, G_f, O_f, O_n, I_f, NB, c_lo, dy_new_c0, dx_col0,
        sdn, sdc, sdh, sdw, sfo, sfc, sfr, sfs, sno, snc, snr, sns, sco, scc, scr, scs,
        sxn, sxc, sxh, sxw, st_h, st_w, pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr, NEED_OLD: tl.constexpr,
        HAS_COUPLE: tl.constexpr, NORM: tl.constexpr, CH_VEC: tl.constexpr,
        ROW_VEC: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tl.static_assert(BLOCK_N % CH_VEC == 0 and BLOCK_K % ROW_VEC == 0)
    # rows: input pixels (P = N*H*W); columns: input channels [c_lo, C), stored from column
    # dx_col0 of dx on; dy's trainable columns start at dy_new_c0.  Channel bounds
    # (C, I_f, c_lo, every k_end) are multiples of CH_VEC, dy channel bounds (every group
    # boundary, O_f, O_n) of ROW_VEC: masks over whole vectors (see _fwd_segment).
    # With NEED_OLD (c_lo = 0) the channels are tiled in the NB bands of bands_ptr, cut at
    # every k_end and at I_f: a frozen group reaches all of a tile's stored channels or none,
    # so no tile adds its dy times the zeroed weights (0 * NaN) to a channel it never reads.
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_p = pid_p * BLOCK_M + tl.arange(0, BLOCK_M)
    p_mask = offs_p < P
    n_img = (offs_p // (H * W)).to(tl.int64)
    pix = offs_p % (H * W)
    hi = pix // W
    wi = pix % W
    if NEED_OLD:
        c_first, c_end = base._band_tile(pid_c, bands_ptr, NB, BLOCK_N, CH_VEC)
        offs_c = c_first + tl.arange(0, BLOCK_N)
        c_mask = offs_c // CH_VEC < c_end // CH_VEC
    else:
        c_first = c_lo + pid_c * BLOCK_N
        offs_c = c_first + tl.arange(0, BLOCK_N)
        c_mask = offs_c < C

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for rs in range(KH * KW):
        r = rs // KW
        s = rs % KW
        th = hi + pad_h - r * dil_h
        tw = wi + pad_w - s * dil_w
        ho = th // st_h
        wo = tw // st_w
        # the tap (r, s) hit this input pixel only if the output position is integral
        ok = p_mask & (th >= 0) & (tw >= 0) & (th % st_h == 0) & (tw % st_w == 0) \
            & (ho < Ho) & (wo < Wo)
        dy_row = n_img * sdn + ho * sdh + wo * sdw
        # trainable rows read every channel
        acc = _dx_rows(acc, dy_ptr, dy_row, ok, sdc, dy_new_c0, 0, O_n,
                       wn_ptr + r * snr + s * sns, sno, snc, offs_c, c_mask, scale_ptr, False,
                       BLOCK_K, ROW_VEC, PREC)
        if NEED_OLD:  # frozen group g reaches channels [0, k_end_g) only
            row0 = pid_c * 0
            for g in range(G_f):
                width = tl.load(groups_ptr + g)
                ke = tl.load(groups_ptr + G_f + g)
                if ke > c_first:
                    acc = _dx_rows(acc, dy_ptr, dy_row, ok, sdc, 0, row0, row0 + width,
                                   wf_ptr + r * sfr + s * sfs, sfo, sfc, offs_c,
                                   c_mask & (offs_c // CH_VEC < ke // CH_VEC), scale_ptr,
                                   NORM, BLOCK_K, ROW_VEC, PREC)
                row0 += width
        if HAS_COUPLE:  # coupling block: all frozen rows read the newest channels
            if c_first >= I_f:  # (a tile never crosses I_f: an old one reads none)
                acc = _dx_rows(acc, dy_ptr, dy_row, ok, sdc, 0, 0, O_f,
                               wc_ptr + r * scr + s * scs, sco, scc, offs_c - I_f,
                               c_mask & (offs_c >= I_f), scale_ptr, NORM, BLOCK_K, ROW_VEC,
                               PREC)

    dx_row = n_img * sxn + hi * sxh + wi * sxw
    # dx's column of channel c_first + j is dx_col0 + pid_c * BLOCK_N + j (c_lo = 0 with
    # NEED_OLD: dx_col0 + c_first + j): one offset, so the compiler sees the store columns
    # as aligned as dx_col0 is
    if NEED_OLD:
        dx_cols = dx_col0 + c_first + tl.arange(0, BLOCK_N)
    else:
        dx_cols = dx_col0 + pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(dx_ptr + dx_row[:, None] + dx_cols[None, :] * sxc,
             acc.to(dx_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


# ---------------------------------------------------------------------------------------
# Depthwise: output channel oc reads input channel oc // MULT; direct kernels, no GEMM.
# Channels below O_f use w_frozen, the rest w_new (oc - O_f).
# ---------------------------------------------------------------------------------------
@triton.jit
def _dw_weight(wf_ptr, wn_ptr, oc, oc_mask, O_f, sfo, sno, off_f, off_n):
    wf = tl.load(wf_ptr + oc * sfo + off_f, mask=oc_mask & (oc < O_f), other=0.0)
    wn = tl.load(wn_ptr + (oc - O_f) * sno + off_n, mask=oc_mask & (oc >= O_f), other=0.0)
    return wf.to(tl.float32) + wn.to(tl.float32)


@triton.autotune(configs=_configs(_DW_TILES, (32, 16, 1)), key=["M", "O", "KH", "KW"])
@triton.jit
def _dw_fwd_kernel(
        x_ptr, wf_ptr, wn_ptr, bf_ptr, bn_ptr, y_ptr, nm_ptr, nv_ptr, nw_ptr, nb_ptr, norm_eps,
        M, O, MULT, H, W, Ho, Wo, O_f,
        sxn, sxc, sxh, sxw, sfo, sfr, sfs, sno, snr, sns, syn, syc, syh, syw,
        st_h, st_w, pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr, HAS_BF: tl.constexpr, HAS_BN: tl.constexpr,
        NORM: tl.constexpr, NORM_W: tl.constexpr, NORM_B: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    oc = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    oc_mask = oc < O
    n_img = (offs_m // (Ho * Wo)).to(tl.int64)
    pix = offs_m % (Ho * Wo)
    ho = pix // Wo
    wo = pix % Wo
    x_chan = (oc // MULT) * sxc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for rs in range(KH * KW):
        r = rs // KW
        s = rs % KW
        hi = ho * st_h - pad_h + r * dil_h
        wi = wo * st_w - pad_w + s * dil_w
        ok = m_mask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        xv = tl.load(x_ptr + (n_img * sxn + hi * sxh + wi * sxw)[:, None] + x_chan[None, :],
                     mask=ok[:, None] & oc_mask[None, :], other=0.0)
        wv = _dw_weight(wf_ptr, wn_ptr, oc, oc_mask, O_f, sfo, sno,
                        r * sfr + s * sfs, r * snr + s * sns)
        acc += xv.to(tl.float32) * wv[None, :]
    if HAS_BF:
        acc += tl.load(bf_ptr + oc, mask=oc_mask & (oc < O_f), other=0.0).to(tl.float32)[None, :]
    if HAS_BN:
        acc += tl.load(bn_ptr + (oc - O_f), mask=oc_mask & (oc >= O_f),
                       other=0.0).to(tl.float32)[None, :]
    if NORM:  # folded BatchNorm of the frozen channels (a tile may hold both kinds)
        acc = _norm_epilogue(acc, oc, oc_mask & (oc < O_f), nm_ptr, nv_ptr, nw_ptr, nb_ptr,
                             norm_eps, NORM_W, NORM_B)
    y_row = n_img * syn + ho * syh + wo * syw
    tl.store(y_ptr + y_row[:, None] + oc[None, :] * syc, acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & oc_mask[None, :])


@triton.autotune(configs=_configs(_DW_TILES, (32, 16, 1)), key=["M", "O", "KH", "KW", "SPLIT"])
@triton.jit
def _dw_wgrad_kernel(
        dy_ptr, x_ptr, dw_ptr, db_ptr,
        M, O, MULT, H, W, Ho, Wo, O_f, chunk,
        sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw,
        st_h, st_w, pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr, SPLIT, HAS_DB: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # one program: BLOCK_N trainable filters, one tap (r, s), one pixel split.
    rel = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rs = tl.program_id(1)
    split = tl.program_id(2)
    r = rs // KW
    s = rs % KW
    c_mask = rel < O
    oc = O_f + rel
    x_chan = (oc // MULT) * sxc
    m_lo = split * chunk
    m_hi = tl.minimum(m_lo + chunk, M)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dbacc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < m_hi
        n_img = (m // (Ho * Wo)).to(tl.int64)
        pix = m % (Ho * Wo)
        ho = pix // Wo
        wo = pix % Wo
        hi = ho * st_h - pad_h + r * dil_h
        wi = wo * st_w - pad_w + s * dil_w
        ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        g = tl.load(dy_ptr + (n_img * sdn + ho * sdh + wo * sdw)[:, None] + (oc * sdc)[None, :],
                    mask=m_ok[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + (n_img * sxn + hi * sxh + wi * sxw)[:, None] + x_chan[None, :],
                     mask=ok[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(g * xv, axis=0)
        if HAS_DB:
            dbacc += tl.sum(g, axis=0)
    tl.store(dw_ptr + (split * O + rel) * (KH * KW) + rs, acc, mask=c_mask)
    if HAS_DB:
        if rs == 0:
            tl.store(db_ptr + split * O + rel, dbacc, mask=c_mask)


@triton.autotune(configs=_configs(_DW_TILES, (32, 16, 1)), key=["P", "C", "MULT", "KH", "KW"])
@triton.jit
def _dw_dx_kernel(
        dy_ptr, wf_ptr, wn_ptr, dx_ptr, scale_ptr,
        P, C, c_lo, MULT, H, W, Ho, Wo, O_f,
        sdn, sdc, sdh, sdw, sfo, sfr, sfs, sno, snr, sns, sxn, sxc, sxh, sxw,
        st_h, st_w, pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr, NORM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_p = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = c_lo + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    p_mask = offs_p < P
    c_mask = c < C
    n_img = (offs_p // (H * W)).to(tl.int64)
    pix = offs_p % (H * W)
    hi = pix // W
    wi = pix % W
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for rs in range(KH * KW):
        r = rs // KW
        s = rs % KW
        th = hi + pad_h - r * dil_h
        tw = wi + pad_w - s * dil_w
        ho = th // st_h
        wo = tw // st_w
        ok = p_mask & (th >= 0) & (tw >= 0) & (th % st_h == 0) & (tw % st_w == 0) \
            & (ho < Ho) & (wo < Wo)
        dy_row = n_img * sdn + ho * sdh + wo * sdw
        for j in range(MULT):
            oc = c * MULT + j
            g = tl.load(dy_ptr + dy_row[:, None] + (oc * sdc)[None, :],
                        mask=ok[:, None] & c_mask[None, :], other=0.0)
            wv = _dw_weight(wf_ptr, wn_ptr, oc, c_mask, O_f, sfo, sno,
                            r * sfr + s * sfs, r * snr + s * sns)
            if NORM:  # dy of a frozen channel times its folded BatchNorm's scale
                wv = wv * tl.load(scale_ptr + oc, mask=c_mask & (oc < O_f),
                                  other=1.0).to(tl.float32)
            acc += g.to(tl.float32) * wv[None, :]
    dx_row = n_img * sxn + hi * sxh + wi * sxw
    tl.store(dx_ptr + dx_row[:, None] + c[None, :] * sxc, acc.to(dx_ptr.dtype.element_ty),
             mask=p_mask[:, None] & c_mask[None, :])


# ---------------------------------------------------------------------------------------
# Launchers (same arguments as torch_ref.conv2d_forward / conv2d_backward)
# ---------------------------------------------------------------------------------------
_GROUPS_CACHE: dict = {}


def _groups_tensor(widths, k_ends, device):
    """int32 [widths..., k_ends...] on the device, cached (it is tiny and reused each step)."""
    key = (tuple(widths), tuple(k_ends), str(device))
    t = _GROUPS_CACHE.get(key)
    if t is None:
        # a trailing 0 keeps it non-empty when there are no groups
        t = torch.tensor(list(widths) + list(k_ends) + [0], dtype=torch.int32, device=device)
        _GROUPS_CACHE[key] = t
    return t


def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _out_size(h, k, st, pad, dil):
    return (h + 2 * pad - dil * (k - 1) - 1) // st + 1


def _memory_format(x):
    # the package's rule (backends/torch_ref.conv_memory_format); kernels/ imports nothing of it
    cl = torch.channels_last
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=cl):
        return cl
    return torch.contiguous_format


NCHW_Y_MODES = ("direct", "transpose")


def _nchw_y_mode() -> str:
    """EXPANSE_FAST_CONV_NCHW_Y: how the descriptor forward hands an NCHW caller its y
    (read at each call: the GPU run times both in one process)."""
    mode = os.environ.get("EXPANSE_FAST_CONV_NCHW_Y", "direct")
    if mode not in NCHW_Y_MODES:
        raise ValueError(f"EXPANSE_FAST_CONV_NCHW_Y={mode!r}: expected one of {NCHW_Y_MODES}")
    return mode


def _check_nchw_mode():
    if NCHW_MODE not in NCHW_MODES:
        raise ValueError(f"EXPANSE_FAST_CONV_NCHW={NCHW_MODE!r}: expected one of {NCHW_MODES}")


def _copied_for_gathers(t):
    """Whether the implicit-GEMM kernels read a channels_last copy of ``t`` (NCHW_MODE)."""
    return NCHW_MODE == "channels_last" and not t.is_contiguous(memory_format=torch.channels_last)


def _for_gathers(t, c0=0):
    """(t', c0'): channels c0.. of ``t`` as the implicit-GEMM kernels read them, at channel
    c0' of t': t itself, or a channels_last copy of those channels only (c0' = 0)."""
    if not _copied_for_gathers(t):
        return t, c0
    return transpose.to_channels_last(t[:, c0:]), 0  # (a tiled transpose: transpose.py)


def _prec(dtype):
    # fp32 follows torch's cuDNN switch (TF32 on by default, as in torch's own conv);
    # 16-bit inputs get the default ("tf32"), which they ignore.
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def _channels_inner(w):
    """The weight (or None) with its input channels innermost (channels_last), as the forward
    and input-gradient kernels read weight tiles along them: 16-byte loads instead of 2-byte
    ones.  A copy of the weight (small next to the activations) unless it is laid out so
    already, as in a model moved to channels_last."""
    if w is None or w.dim() != 4 or w.stride(1) == 1 or w.numel() == 0:
        return w
    return w.contiguous(memory_format=torch.channels_last)


def _rows_scaled(w, scale):
    """w (O, C, kh, kw) with row o times scale[o] (a folded BatchNorm's factor of dy's
    column o, moved onto the weight a kernel multiplies it with), in w's layout."""
    if scale is None:
        return w
    fmt = torch.channels_last if w.stride(1) == 1 else torch.contiguous_format
    return (w * scale.to(w.dtype).view(-1, 1, 1, 1)).contiguous(memory_format=fmt)


def _or(t, dummy):
    """Never hand an empty or missing tensor to a kernel: a dummy it will not read."""
    return t if t is not None and t.numel() else dummy


@functools.lru_cache(maxsize=None)
def _n_sm(device):
    # the interpreter pretends to 4 SMs, so small tests still split the pixel sum
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _split_for(tiles, m, device):
    """Pixel splits so the weight-gradient grid fills the GPU (>= 64 pixels a split)."""
    want = -(-2 * _n_sm(device) // max(tiles, 1))
    return max(1, min(want, -(-m // 64), 64))


def _check(x, w_frozen, w_new, w_couple, frozen_out_groups, frozen_k_ends, depthwise):
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if len(frozen_out_groups) != len(frozen_k_ends):
        raise ValueError("frozen_out_groups and frozen_k_ends must have the same length")
    if sum(frozen_out_groups) != w_frozen.shape[0]:
        raise ValueError(f"frozen_out_groups {tuple(frozen_out_groups)} do not sum to "
                         f"w_frozen rows {w_frozen.shape[0]}")
    if w_frozen.shape[2:] != w_new.shape[2:]:
        raise ValueError("w_frozen and w_new must have the same kernel size")
    if depthwise:
        if w_frozen.shape[1] != 1 or w_new.shape[1] != 1:
            raise ValueError("depthwise weights must be (channels * multiplier, 1, kh, kw)")
        if w_couple is not None:
            raise ValueError("depthwise convolutions have no coupling block")
        return
    if w_new.shape[1] != x.shape[1]:
        raise ValueError(f"w_new reads {w_new.shape[1]} channels, x has {x.shape[1]}")
    if any(k > w_frozen.shape[1] for k in frozen_k_ends):
        raise ValueError(f"frozen_k_ends {tuple(frozen_k_ends)} exceed I_f={w_frozen.shape[1]}")


def _zeros_whole(dx) -> bool:
    """Whether the zeros of dx's old channels come from one fill of all of dx, which the
    kernel then writes over, as the torch backend's do: H200, bf16 dx of 64 x 320 x 56 x 56
    (14609cb's profile): 68 us for a strided fill of the 256 old channels, 39 for a whole
    fill of that size.  On a GPU only: on the CPU the interpreter runs these kernels, and
    the strided fill keeps its branch tested (the test forces the other)."""
    return dx.is_cuda


def _zero_untouched(dx, c_lo, empty):
    """Zero what the dx kernel will not write: the old channels (or all, if it won't run)."""
    if empty or (c_lo and _zeros_whole(dx)):
        dx.zero_()
    elif c_lo:
        dx[:, :c_lo].zero_()


def _geometry(x, w, stride, padding, dilation):
    n, c, h, wd = x.shape
    kh, kw = w.shape[2], w.shape[3]
    st, pad, dil = _pair(stride), _pair(padding), _pair(dilation)
    ho = _out_size(h, kh, st[0], pad[0], dil[0])
    wo = _out_size(wd, kw, st[1], pad[1], dil[1])
    if ho <= 0 or wo <= 0:
        raise ValueError(f"output size {ho}x{wo} is empty for input {h}x{wd}")
    return n, c, h, wd, kh, kw, ho, wo, st + pad + dil


def _depthwise_split(x, w_frozen, w_new, frozen_k_ends):
    c_f = frozen_k_ends[-1] if len(frozen_k_ends) else 0
    c = x.shape[1]
    o_total = w_frozen.shape[0] + w_new.shape[0]
    if c == 0 or o_total % c or w_frozen.shape[0] != c_f * (o_total // c):
        raise ValueError(f"depthwise weights ({w_frozen.shape[0]} + {w_new.shape[0]} filters) "
                         f"do not match {c} channels with {c_f} frozen")
    return c_f, o_total // c


def _norm_args(norm, o_f, dummy):
    """Kernel arguments of a folded BatchNorm ``norm`` = (mean, var, weight, bias, eps)."""
    if norm is None or not o_f:
        return (dummy,) * 4 + (0.0,), dict(NORM=False, NORM_W=False, NORM_B=False)
    mean, var, weight, bias, eps = norm
    for name, t in (("mean", mean), ("var", var), ("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (o_f,):
            raise ValueError(f"the folded BatchNorm's {name} has shape {tuple(t.shape)}, "
                             f"expected ({o_f},)")
    return ((mean, var, _or(weight, mean), _or(bias, mean), float(eps)),
            dict(NORM=True, NORM_W=weight is not None, NORM_B=bias is not None))


def expanded_conv2d_forward(x: torch.Tensor, w_frozen: torch.Tensor,
                            b_frozen: Optional[torch.Tensor], w_new: torch.Tensor,
                            b_new: Optional[torch.Tensor], w_couple: Optional[torch.Tensor],
                            frozen_out_groups: Sequence[int], frozen_k_ends: Sequence[int],
                            stride, padding, dilation, depthwise: bool,
                            norm=None) -> torch.Tensor:
    """y = [frozen staircase rows | trainable rows](x) + bias, one kernel launch.

    ``norm`` = (mean, var, weight or None, bias or None, eps), each of the O_f frozen
    channels: an eval-mode BatchNorm applied to them in the epilogue."""
    _check(x, w_frozen, w_new, w_couple, frozen_out_groups, frozen_k_ends, depthwise)
    _check_nchw_mode()
    dt = x.dtype
    w_frozen, w_new = w_frozen.to(dt), w_new.to(dt)
    w_couple = None if w_couple is None else w_couple.to(dt)
    n, c, h, wd, kh, kw, ho, wo, geo = _geometry(x, w_new, stride, padding, dilation)
    o_f, o_n = w_frozen.shape[0], w_new.shape[0]
    o = o_f + o_n
    y_format = _memory_format(x)  # y takes the caller's layout, whatever the kernels read
    if not depthwise:
        x, _ = _for_gathers(x)  # (an NCHW x: a channels_last copy, transpose.py)
        w_frozen, w_new, w_couple = map(_channels_inner, (w_frozen, w_new, w_couple))
    has_couple = w_couple is not None and w_couple.numel() > 0
    m = n * ho * wo
    tma = _tma()
    use_tma = not depthwise and m > 0 and tma.usable(
        x, w_frozen, w_new, w_couple if has_couple else None, geo[:2], False)
    # The descriptor kernel stores a box's pixels along W: it writes an NCHW y in place,
    # no channels_last round trip (the others write channels_last, transposed after; so does
    # the descriptor kernel with EXPANSE_FAST_CONV_NCHW_Y=transpose, which the GPU run times
    # beside the default: a box row of NCHW is 16 bytes).
    in_place = use_tma and _nchw_y_mode() == "direct"
    y = torch.empty((n, o, ho, wo), device=x.device, dtype=dt,
                    memory_format=y_format if in_place else _memory_format(x))
    if y.numel() == 0:
        return y.contiguous(memory_format=y_format)
    wf, wn = _or(w_frozen, y), _or(w_new, y)
    bf, bn = _or(b_frozen, y), _or(b_new, y)
    has_bf = b_frozen is not None and b_frozen.numel() > 0
    has_bn = b_new is not None and b_new.numel() > 0
    norm_ptrs, norm_flags = _norm_args(norm, o_f, y)

    if depthwise:
        _, mult = _depthwise_split(x, w_frozen, w_new, frozen_k_ends)
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(o, meta["BLOCK_N"]))
        launch(
            _dw_fwd_kernel, grid,
            x, wf, wn, bf, bn, y, *norm_ptrs, m, o, mult, h, wd, ho, wo, o_f,
            *x.stride(), wf.stride(0), *wf.stride()[2:], wn.stride(0), *wn.stride()[2:],
            *y.stride(), *geo, KH=kh, KW=kw, HAS_BF=has_bf, HAS_BN=has_bn, **norm_flags)
        return y

    i_f = w_frozen.shape[1]
    widths = tuple(int(g) for g in frozen_out_groups) + (o_n,)
    k_ends = tuple(int(k) for k in frozen_k_ends) + (c,)
    groups = _groups_tensor(widths, k_ends, x.device)
    wc = _or(w_couple, y)
    out_vec = multiple_of_all(itertools.accumulate(widths))
    if use_tma and tma.forward(x, w_frozen, w_new, w_couple if has_couple else None, bf, bn,
                               y, groups, widths, norm_ptrs, norm_flags, geo, has_bf, has_bn,
                               out_vec, _prec(dt)):
        return _in_format(y, y_format)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"])
                         * sum(triton.cdiv(g, meta["BLOCK_N"]) for g in widths),)
    launch(
        _conv_fwd_kernel, grid,
        x, wf, wn, wc, bf, bn, y, groups, *norm_ptrs, m, o, c, h, wd, ho, wo, len(widths), o_f,
        i_f, *x.stride(), *wf.stride(), *wn.stride(), *wc.stride(), *y.stride(), *geo,
        KH=kh, KW=kw, HAS_BF=has_bf, HAS_BN=has_bn, HAS_COUPLE=has_couple, **norm_flags,
        CH_VEC=multiple_of_all((c, i_f) + k_ends) if _FWD_VECTOR_MASK else 1,
        OUT_VEC=out_vec, PREC=_prec(dt))
    return _in_format(y, y_format)


def _in_format(y, fmt):
    """The kernels' output in the caller's layout: a channels_last y handed back as NCHW
    through the tiled transpose (transpose.py), anything else as torch copies it."""
    if fmt == torch.contiguous_format and not y.is_contiguous():
        return transpose.to_nchw(y)
    return y.contiguous(memory_format=fmt)


_TMA_MODULE = None


def _tma():
    # imported at first use (it imports this module), then kept: this runs on every call
    global _TMA_MODULE
    if _TMA_MODULE is None:
        from . import expanded_conv_tma
        _TMA_MODULE = expanded_conv_tma
    return _TMA_MODULE


def _wgrad(dy, x, dy_c0, o, x_c0, c, kh, kw, geo, ho, wo, need_db, out_dtype, scale=None):
    """(dW (o, c, kh, kw), db (o,) or None) reduced over every pixel; ``scale`` (o,)
    multiplies dy's columns (not db's)."""
    n, _, h, wd = x.shape
    m = n * ho * wo
    split = _split_for(triton.cdiv(o, 64) * triton.cdiv(c, 64) * kh * kw, m, x.device)
    chunk = triton.cdiv(m, split)
    # fp32 partial sums to add up; a lone split stores the result's dtype (the kernels'
    # stores round, as .to() would) and needs no second pass
    part = torch.float32 if split > 1 else out_dtype
    dw = torch.empty((split, o, c, kh, kw), device=x.device, dtype=part)
    db = torch.empty((split, o), device=x.device, dtype=part) if need_db else dw
    tma = _tma()
    if not (tma.wgrad_usable(dy, x, dy_c0, o, x_c0, c, geo[:2])
            and tma.wgrad(dy, x, dw, db, scale, dy_c0, o, x_c0, c, geo, split, need_db)) \
            and not (tma.wgrad_nchw_usable(dy, x, dy_c0, o, x_c0, c, ho, wo, geo)
                     and tma.wgrad_nchw(dy, x, dw, db, scale, dy_c0, o, x_c0, c, geo, split,
                                        need_db)):
        grid = lambda meta: (triton.cdiv(o, meta["BLOCK_M"]),
                             triton.cdiv(c, meta["BLOCK_N"]) * kh * kw, split)
        launch(
            _conv_wgrad_kernel, grid,
            dy, x, dw, db, dw if scale is None else scale, o, c, m, h, wd, ho, wo, dy_c0,
            x_c0, chunk, *dy.stride(), *x.stride(), *geo, KH=kh, KW=kw, SPLIT=split,
            HAS_DB=need_db, SCALE=scale is not None, PREC=_prec(x.dtype))
    return _reduced(dw, out_dtype), (_reduced(db, out_dtype) if need_db else None)


def _reduced(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The sum of a weight gradient's split partials (dim 0) in ``dtype``: a lone split
    was stored in ``dtype`` already."""
    return parts[0] if parts.shape[0] == 1 else parts.sum(0).to(dtype)


def expanded_conv2d_backward(dy: torch.Tensor, x: torch.Tensor, w_frozen: torch.Tensor,
                             w_new: torch.Tensor, w_couple: Optional[torch.Tensor],
                             frozen_out_groups: Sequence[int], frozen_k_ends: Sequence[int],
                             stride, padding, dilation, depthwise: bool, need_dx_new: bool,
                             need_dx_old: bool, need_dw: bool, need_db: bool,
                             need_dcouple: bool, norm_scale: Optional[torch.Tensor] = None):
    """(dx or None, dw_new or None, db_new or None, dcouple or None); no frozen dW is formed.

    dx has x's full channel width; unless ``need_dx_old`` its first I_f channels are zeros.
    ``norm_scale`` (O_f,): the frozen columns of dy are multiplied by it where they are read
    (the forward folded a BatchNorm whose derivative it is)."""
    _check(x, w_frozen, w_new, w_couple, frozen_out_groups, frozen_k_ends, depthwise)
    _check_nchw_mode()
    dt = x.dtype
    dy = dy.to(dt)
    w_frozen, w_new = w_frozen.to(dt), w_new.to(dt)
    w_couple = None if w_couple is None else w_couple.to(dt)
    n, c, h, wd, kh, kw, ho, wo, geo = _geometry(x, w_new, stride, padding, dilation)
    o_f, o_n = w_frozen.shape[0], w_new.shape[0]
    if tuple(dy.shape) != (n, o_f + o_n, ho, wo):
        raise ValueError(f"dy has shape {tuple(dy.shape)}, expected {(n, o_f + o_n, ho, wo)}")
    wdt = w_new.dtype
    want_dx = need_dx_new or need_dx_old
    dx = dw = db = dcouple = None
    empty = x.numel() == 0 or dy.numel() == 0
    if want_dx:  # in the caller's layout, whatever the kernels read
        dx = torch.empty(x.shape, device=x.device, dtype=dt, memory_format=_memory_format(x))
    wf, wn = _or(w_frozen, x), _or(w_new, x)
    if norm_scale is not None:
        if tuple(norm_scale.shape) != (o_f,):
            raise ValueError(f"norm_scale has shape {tuple(norm_scale.shape)}, expected ({o_f},)")
        if not o_f:
            norm_scale = None

    if depthwise:
        c_f, mult = _depthwise_split(x, w_frozen, w_new, frozen_k_ends)
        m = n * ho * wo
        if (need_dw or need_db) and not empty and o_n:
            split = _split_for(triton.cdiv(o_n, 32) * kh * kw, m, x.device)
            chunk = triton.cdiv(m, split)
            part = torch.float32 if split > 1 else wdt  # (as in _wgrad)
            dwp = torch.empty((split, o_n, kh * kw), device=x.device, dtype=part)
            dbp = torch.empty((split, o_n), device=x.device, dtype=part) if need_db else dwp
            grid = lambda meta: (triton.cdiv(o_n, meta["BLOCK_N"]), kh * kw, split)
            launch(
                _dw_wgrad_kernel, grid,
                dy, x, dwp, dbp, m, o_n, mult, h, wd, ho, wo, o_f, chunk,
                *dy.stride(), *x.stride(), *geo, KH=kh, KW=kw, SPLIT=split, HAS_DB=need_db)
            dw = _reduced(dwp, wdt).view(o_n, 1, kh, kw) if need_dw else None
            db = _reduced(dbp, wdt) if need_db else None
        else:
            dw = torch.zeros_like(w_new) if need_dw else None
            db = w_new.new_zeros(o_n) if need_db else None
        c_lo = 0 if need_dx_old else c_f
        if want_dx:
            _zero_untouched(dx, c_lo, empty)
        if want_dx and not empty and c > c_lo:
            p = n * h * wd
            grid = lambda meta: (triton.cdiv(p, meta["BLOCK_M"]),
                                 triton.cdiv(c - c_lo, meta["BLOCK_N"]))
            norm = norm_scale is not None and need_dx_old  # frozen dy read only for dx_old
            launch(
                _dw_dx_kernel, grid,
                dy, wf, wn, dx, norm_scale if norm else dx, p, c, c_lo, mult, h, wd, ho, wo,
                o_f, *dy.stride(), wf.stride(0), *wf.stride()[2:], wn.stride(0),
                *wn.stride()[2:], *dx.stride(), *geo, KH=kh, KW=kw, NORM=norm)
        return dx, dw, db, None

    i_f = w_frozen.shape[1]
    has_couple = w_couple is not None and w_couple.numel() > 0
    # The frozen columns of dy are read for dx_old and the coupling block only (by the kernels
    # that run): otherwise only the trainable ones are copied, and dy_new_c0 says where
    # they start.  x is copied only for the weight gradients.
    couple = has_couple and o_f > 0
    c_lo = 0 if need_dx_old else i_f
    run_dx = want_dx and not empty and c > c_lo
    run_wgrad = (need_dw or need_db) and o_n > 0 and not empty
    run_dcouple = need_dcouple and has_couple and not empty
    reads_frozen_dy = (run_dx and (need_dx_old or couple)) or run_dcouple
    dy_c0 = 0 if reads_frozen_dy else o_f
    dy, at = _for_gathers(dy, dy_c0)
    dy_new_c0 = o_f - dy_c0 + at
    dx_copied = _copied_for_gathers(x)  # the dx kernel writes channels_last if x's is not
    if run_wgrad or run_dcouple:  # the dx kernel never reads x
        # x is copied to channels_last unless every weight gradient reads NCHW in place
        wgrads = ([(dy_new_c0, o_n, 0, c)] if run_wgrad else []) \
            + ([(0, o_f, i_f, c - i_f)] if run_dcouple else [])
        if not all(_tma().wgrad_nchw_usable(dy, x, *cols, ho, wo, geo) for cols in wgrads):
            x, _ = _for_gathers(x)
    if need_dw or need_db:
        if run_wgrad:
            dw, db = _wgrad(dy, x, dy_new_c0, o_n, 0, c, kh, kw, geo, ho, wo, need_db, wdt)
        else:
            dw, db = torch.zeros_like(w_new), w_new.new_zeros(o_n)
        dw = dw if need_dw else None
        db = db if need_db else None
    if need_dcouple and w_couple is not None:
        if run_dcouple:
            dcouple = _wgrad(dy, x, 0, o_f, i_f, c - i_f, kh, kw, geo, ho, wo, False,
                             w_couple.dtype, scale=norm_scale)[0]
        else:
            dcouple = torch.zeros_like(w_couple)
    if want_dx:
        _zero_untouched(dx, c_lo, empty)
    if run_dx:
        p = n * h * wd
        groups = _groups_tensor(tuple(int(g) for g in frozen_out_groups),
                                tuple(int(k) for k in frozen_k_ends), x.device)
        # weight tiles are read along the input channels: channels_last weights
        wf, wn = _or(_channels_inner(w_frozen), x), _or(_channels_inner(w_new), x)
        wc = _or(_channels_inner(w_couple), x)
        # the frozen columns of dy are read (and scaled) for dx_old and the coupling only
        norm = norm_scale is not None and (need_dx_old or couple)
        tma = _tma()
        scale = norm_scale if norm else None  # onto the weights: dy's tiles stay in smem
        wf_old = wf if need_dx_old and w_frozen.numel() else None  # (its rows, if any)
        # with dx_old, the channels are tiled in bands cut at every k_end and at I_f
        bands = (base.band_ends(frozen_out_groups, frozen_k_ends, i_f, True) + (c,)
                 if need_dx_old else (c,))
        use_tma = o_n > 0 and tma.dx_usable(dy, wn, wc if couple else None, wf_old, o_f,
                                            dy_new_c0, frozen_k_ends, geo, need_dx_old,
                                            i_f=i_f, frozen_out_groups=frozen_out_groups,
                                            bands=bands[:-1])
        # Where x was copied, the kernels write channels [c_lo, C) into a channels_last
        # buffer of their own (dx_c0 = c_lo), copied into dx after: the zeros of the old
        # channels never make the round trip.  At stride 1 the descriptor kernel stores a
        # box's pixels along W, so it writes an NCHW dx in place.
        direct = not dx_copied or (use_tma and tuple(geo[:2]) == (1, 1))
        dx_k, dx_c0 = (dx, 0) if direct else (torch.empty(
            (n, c - c_lo, h, wd), device=x.device, dtype=dt,
            memory_format=torch.channels_last), c_lo)
        if not (use_tma and tma.grad_input(
                dy, wn, _rows_scaled(wc, scale) if couple else None,
                wf_old if wf_old is None else _rows_scaled(wf_old, scale), o_f, i_f, groups,
                len(frozen_out_groups), dx_k, dy_new_c0, c_lo, dx_c0, geo, _prec(dt),
                bands=bands[:-1])):
            grid = lambda meta: (triton.cdiv(p, meta["BLOCK_M"]),
                                 base.band_tiles(bands, meta["BLOCK_N"]) if need_dx_old
                                 else triton.cdiv(c - c_lo, meta["BLOCK_N"]))
            launch(  # dy holds no columns if it is never read
                _conv_dx_kernel, grid,
                _or(dy, dx_k), wf, wn, wc, dx_k, groups,
                base.band_table(bands, x.device) if need_dx_old else groups,  # (unread)
                norm_scale if norm else dx_k, p, c,
                h, wd, ho, wo, len(frozen_out_groups), o_f, o_n, i_f, len(bands), c_lo,
                dy_new_c0,
                c_lo - dx_c0, *dy.stride(), *wf.stride(), *wn.stride(), *wc.stride(),
                *dx_k.stride(), *geo, KH=kh, KW=kw, NEED_OLD=need_dx_old, HAS_COUPLE=couple,
                NORM=norm, CH_VEC=multiple_of_all((c, i_f, c_lo) + tuple(frozen_k_ends)),
                ROW_VEC=multiple_of_all((o_f, o_n, dy_new_c0) + tuple(itertools.accumulate(
                    frozen_out_groups))), PREC=_prec(dt))
        if dx_k is not dx:  # (into x's NCHW layout: the tiled transpose)
            transpose.copy_to_nchw_(dx[:, c_lo:], dx_k)
    return dx, dw, db, dcouple
