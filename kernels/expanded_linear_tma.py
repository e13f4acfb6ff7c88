"""The expanded linear forward with tensor-descriptor (TMA) loads, for Hopper GPUs.

It computes what ``expanded_linear._fwd_kernel`` computes, tile for tile.  The full K tiles
of x and of the weights arrive through host-made tensor descriptors: on sm_90 each is one
bulk copy into shared memory (no per-element addresses or masks, rows past the end read as
zeros).  The last, partial K tile of a group, where the staircase ends at a k_end that need
not be a multiple of the tile, goes through the plain kernel's masked pointer loads, so no
weight column past k_end is ever read.

Descriptors need 16-byte aligned bases and row strides and a unit column stride
(:func:`usable` checks); otherwise, and for fp32 (whose ieee dot gains nothing from it), the
pointer kernel runs.  ``EXPANSE_FAST_TMA``: "1" always (where the layout allows; the CPU
tests run it in the interpreter), "0" never, unset: on CUDA devices of compute capability 9
or more for fp16/bf16.  If a launch fails (a Triton without descriptor support, say), the
variant is switched off for the process with a warning naming the error
(``disabled_reason``), and the pointer kernel computes the result.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
import triton
import triton.language as tl

from . import expanded_linear as base

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # an older Triton
    TensorDescriptor = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

MODE = os.environ.get("EXPANSE_FAST_TMA", "auto")
disabled_reason: Optional[str] = _IMPORT_ERROR


def _set_block_shapes(nargs):
    """Config pre-hook: the descriptors' boxes are the config's tiles."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bm, bk]
    for name in ("wf_desc", "wn_desc", "wc_desc"):
        nargs[name].block_shape = [bn, bk]


def _configs():
    return [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages,
                          pre_hook=_set_block_shapes) for c in base._configs()]


@triton.autotune(configs=_configs(), key=["M", "O", "I", "G"],
                 prune_configs_by={"early_config_prune": base._pruner("M", "O")})
@triton.jit
def _fwd_tma_kernel(x_desc, wf_desc, wn_desc, wc_desc,
                    x_ptr, wf_ptr, wn_ptr, wc_ptr, bf_ptr, bn_ptr, y_ptr, tab_ptr, pre_ptr,
                    M, O, I, I_F, O_F, G, P0,
                    s_xm, s_wfo, s_wno, s_wco, s_ym, s_yn, s_pm,
                    HAS_BF: tl.constexpr, HAS_BN: tl.constexpr, HAS_COUPLE: tl.constexpr,
                    ACT: tl.constexpr, HAS_PRE: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr):
    pid_m, col0, col_end, k_end, is_new = base._locate_fwd_tile(tab_ptr, M, G, BLOCK_M,
                                                                BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = col0 + tl.arange(0, BLOCK_N)
    m_mask = (rm < M)[:, None]
    n_mask = (rn < col_end)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # Full K tiles.  Two loops, one of them empty, rather than a branch: the tile's group
    # picks the weight (frozen rows, or the newest rows at col0 - O_F).
    k_full = k_end // BLOCK_K * BLOCK_K
    for k in range(0, tl.where(is_new, 0, k_full), BLOCK_K):
        acc = tl.dot(x_desc.load([off_m, k]), wf_desc.load([col0, k]).T, acc,
                     input_precision=PREC)
    for k in range(0, tl.where(is_new, k_full, 0), BLOCK_K):
        acc = tl.dot(x_desc.load([off_m, k]), wn_desc.load([col0 - O_F, k]).T, acc,
                     input_precision=PREC)
    # The partial tile where the staircase ends: masked loads stop at k_end.
    if is_new:
        w_cols = wn_ptr + (rn - O_F).to(tl.int64)[None, :] * s_wno
    else:
        w_cols = wf_ptr + rn.to(tl.int64)[None, :] * s_wfo
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * s_xm
    acc = base._dot_k(acc, x_rows, w_cols, 1, 1, m_mask, n_mask, k_full, k_end, BLOCK_K, PREC)

    if HAS_COUPLE:
        # Coupled layout: frozen rows also read the newest inputs [I_F, I) through w_couple.
        k_new = tl.where(is_new, 0, I - I_F)
        kc_full = k_new // BLOCK_K * BLOCK_K
        for k in range(0, kc_full, BLOCK_K):
            acc = tl.dot(x_desc.load([off_m, I_F + k]), wc_desc.load([col0, k]).T, acc,
                         input_precision=PREC)
        acc = base._dot_k(acc, x_rows + I_F, wc_ptr + rn.to(tl.int64)[None, :] * s_wco, 1, 1,
                          m_mask, n_mask, kc_full, k_new, BLOCK_K, PREC)
    base._fwd_epilogue(acc, rm, rn, m_mask, n_mask, col_end, bf_ptr, bn_ptr, y_ptr, pre_ptr,
                       O_F, P0, s_ym, s_yn, s_pm, HAS_BF, HAS_BN, ACT, HAS_PRE)


def _describable(t: torch.Tensor) -> bool:
    elt = t.element_size()
    return (t.dim() == 2 and t.numel() > 0 and t.stride(1) == 1
            and (t.stride(0) * elt) % 16 == 0 and t.data_ptr() % 16 == 0)


def usable(x: torch.Tensor, w_frozen: torch.Tensor, w_new: torch.Tensor,
           w_couple: Optional[torch.Tensor]) -> bool:
    """Whether this forward can run with descriptors (see the module docstring)."""
    if disabled_reason is not None or MODE == "0":
        return False
    if MODE != "1":
        if x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16):
            return False
        if torch.cuda.get_device_capability(x.device) < (9, 0):
            return False
    return all(_describable(t) for t in (x, w_frozen, w_new)
               if t is not None) and (w_couple is None or _describable(w_couple))


def forward(x, w_frozen, w_new, w_couple, b_frozen, b_new, y, tab, pre, p0, grid, **meta):
    """Launch the descriptor kernel; False (after a warning) when it cannot run here."""
    global disabled_reason
    couple = meta["HAS_COUPLE"]
    wc = w_couple if couple else w_new
    dummy = [1, 1]  # each config's pre-hook sets the real boxes
    try:
        descs = [TensorDescriptor.from_tensor(t, dummy) for t in (x, w_frozen, w_new, wc)]
        _fwd_tma_kernel[grid](
            *descs, x, w_frozen, w_new, wc, b_frozen if b_frozen is not None else y,
            b_new if b_new is not None else y, y, tab, pre if pre is not None else y,
            x.shape[0], y.shape[1], x.shape[1], w_frozen.shape[1], w_frozen.shape[0],
            tab.shape[0], p0, x.stride(0), w_frozen.stride(0), w_new.stride(0), wc.stride(0),
            y.stride(0), y.stride(1), pre.stride(0) if pre is not None else 0, **meta)
    except Exception as exc:  # noqa: BLE001 -- reported, then the pointer kernel runs
        disabled_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(f"expanse_fast: the TMA forward is off for this process "
                      f"({disabled_reason}); the pointer-load kernel runs instead",
                      RuntimeWarning, stacklevel=3)
        return False
    return True
