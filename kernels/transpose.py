"""NCHW <-> channels_last copies for the conv kernels, as tiled transposes.

The conv kernels read channels_last activations; an NCHW x (or dy) is copied first.  torch's
``t.contiguous(memory_format=torch.channels_last)`` walks that copy in the output's order,
so each warp reads 32 channels of one pixel: 2 bytes from each of 32 rows that lie H * W
elements apart, a sector fetched for every 2 useful bytes unless the cache still holds it
when the neighbouring pixel is read (on the H200, the NCHW forward of a ResNet-50 stage's
3x3 conv took 1.04 ms against 0.63 on channels_last input, the copy of its 103 MB input
included).  Here each program loads a (channels x pixels) tile along the pixels, where NCHW
is contiguous, and stores it transposed along the channels, where channels_last is: both
sides move whole rows, the transpose goes through shared memory.  The kernels' channels_last
results (y, dx) go back to an NCHW caller the other way round (``copy_to_nchw_``).

``EXPANSE_FAST_CONV_TRANSPOSE=torch`` keeps torch's copy (for a side-by-side timing; the GPU
run's ceilings section times both).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .launch import launch

MODES = ("triton", "torch")
# (read at each call, so the GPU run can time both in one process)
_ENV = "EXPANSE_FAST_CONV_TRANSPOSE"
# Fewer channels than this: a tile of mostly masked rows; torch's copy reads such an input
# (the data layer's 3 colour channels) well enough.
MIN_CHANNELS = 8


@triton.jit
def _nchw_to_nhwc_kernel(x_ptr, y_ptr, C, HW, W, sxn, sxc, sxh,
                         FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    n = tl.program_id(2)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = (c[:, None] < C) & (p[None, :] < HW)
    # x[n, c, h, w] with w unit-stride: pixels run along a tile row.  FLAT (H's stride is W,
    # as in NCHW and its channel slices): pixel p at offset p, which the compiler sees
    # contiguous (16-byte loads); else row p // W, column p % W.
    if FLAT:
        pix = p.to(tl.int64)
    else:
        pix = (p // W).to(tl.int64) * sxh + p % W
    src = n.to(tl.int64) * sxn + c[:, None].to(tl.int64) * sxc + pix[None, :]
    tile = tl.load(x_ptr + src, mask=mask)
    # y channels_last and dense: y[n, c, h, w] at (n * HW + p) * C + c
    dst = (n.to(tl.int64) * HW + p[:, None]) * C + c[None, :]
    tl.store(y_ptr + dst, tl.trans(tile), mask=tl.trans(mask))


@triton.jit
def _nhwc_to_nchw_kernel(x_ptr, y_ptr, C, HW, syn, syc,
                         BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    n = tl.program_id(2)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = (p[:, None] < HW) & (c[None, :] < C)
    # x channels_last and dense: a tile row is one pixel's channels
    tile = tl.load(x_ptr + (n.to(tl.int64) * HW + p[:, None]) * C + c[None, :], mask=mask)
    # y[n, c, h, w] with H's stride W and w unit-stride (NCHW, or a channel slice of it)
    dst = n.to(tl.int64) * syn + c[:, None].to(tl.int64) * syc + p[None, :]
    tl.store(y_ptr + dst, tl.trans(tile), mask=tl.trans(mask))


# A tile of 64 channels x 64 pixels (8 KB in 16-bit types): each side moves 128-byte rows.
BLOCK = 64


def _grid(t: torch.Tensor):
    n, c, h, w = t.shape
    return (triton.cdiv(h * w, BLOCK), triton.cdiv(c, BLOCK), n)


def mode() -> str:
    value = os.environ.get(_ENV, "triton")
    if value not in MODES:
        raise ValueError(f"{_ENV}={value!r}: expected one of {MODES}")
    return value


def usable(t: torch.Tensor) -> bool:
    """Whether :func:`to_channels_last` copies ``t`` with the tiled kernel: a 4-D tensor
    whose W is unit-stride (NCHW, or a channel slice of it) with enough channels, unless
    the environment asks for torch's copy."""
    return (t.dim() == 4 and t.stride(3) == 1 and t.shape[1] >= MIN_CHANNELS
            and t.numel() > 0 and mode() == "triton")


def to_channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t.contiguous(memory_format=torch.channels_last)``, through the tiled transpose where
    :func:`usable` (the same values, bit for bit: a copy)."""
    if t.is_contiguous(memory_format=torch.channels_last) or not usable(t):
        return t.contiguous(memory_format=torch.channels_last)
    _, c, h, w = t.shape
    y = torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=torch.channels_last)
    launch(_nchw_to_nhwc_kernel, _grid(t), t, y, c, h * w, w, t.stride(0), t.stride(1),
           t.stride(2), FLAT=t.stride(2) == w, BLOCK_C=BLOCK, BLOCK_P=BLOCK, num_warps=4)
    return y


def copy_to_nchw_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` for a dense channels_last ``src`` and an NCHW ``dst`` (or a channel
    slice of one: H's stride W, W unit-stride), through the tiled transpose where
    :func:`usable`: the conv kernels' channels_last results (y, dx) handed back in the
    caller's NCHW layout."""
    if dst.shape != src.shape:
        raise ValueError(f"copy_to_nchw_: shapes differ, {tuple(dst.shape)} and "
                         f"{tuple(src.shape)}")
    flat_dst = dst.dim() == 4 and dst.stride(3) == 1 and dst.stride(2) == dst.shape[3]
    if not (flat_dst and src.is_contiguous(memory_format=torch.channels_last)
            and dst.dtype == src.dtype and dst.device == src.device and usable(dst)):
        return dst.copy_(src)
    _, c, h, w = src.shape
    launch(_nhwc_to_nchw_kernel, _grid(src), src, dst, c, h * w, dst.stride(0),
           dst.stride(1), BLOCK_C=BLOCK, BLOCK_P=BLOCK, num_warps=4)
    return dst


def to_nchw(t: torch.Tensor) -> torch.Tensor:
    """``t.contiguous()`` of a channels_last ``t``, through the tiled transpose where
    :func:`usable`."""
    if t.is_contiguous():
        return t
    return copy_to_nchw_(torch.empty(t.shape, dtype=t.dtype, device=t.device), t)
