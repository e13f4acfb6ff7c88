"""The expanded linear kernels with tensor-descriptor (TMA) loads, for Hopper GPUs.

They compute what the pointer-load kernels of ``expanded_linear`` compute, tile for tile.
Operand tiles arrive through host-made tensor descriptors: on sm_90 each is one bulk copy
into shared memory (no per-element addresses or masks; whatever lies past a descriptor's
shape reads as zeros, which adds nothing to a sum).

* forward: every tile through descriptors; frozen rows read x through one that ends at I_f,
  so they never load a newer input.  The partial tile where a group's staircase ends is
  loaded whole and its columns at or past k_end are zeroed in both operands before the
  product: where k_end lies inside w_frozen (several expansions) the stored zero-block
  columns of that one tile are loaded but never reach the sum (an inf or NaN there stays
  out); for a single expansion (k_end = I_f) the descriptors read zeros there.
* dW (and dW_couple): every tile through descriptors; the fused db sum as before.
* dx: the newest rows and the coupling block through descriptors (their K ends where the
  tensors end); for dx_old the frozen groups' rows too, straight from the bulk copies to
  wgmma: the old columns are tiled in bands cut at every k_end (as in the pointer kernel),
  so a group reaches all of a tile's stored columns or none (a staircase whose k_ends
  decrease, or a k_end that is no whole 16-byte unit, keeps the pointer kernel).

Descriptors need 16-byte aligned bases and row strides and a unit column stride
(:func:`usable` checks); otherwise, and for fp32 (whose ieee dot gains nothing from it), the
pointer kernel runs.  ``EXPANSE_FAST_TMA``: "1" always (where the layout allows; the CPU
tests run it in the interpreter), "0" never, unset: on CUDA devices of compute capability 9
or more for fp16/bf16.  If a launch fails (a Triton without descriptor support, say), the
variants are switched off for the process with a warning naming the error
(``disabled_reason``), and the pointer kernels compute the result.  The conv descriptor
kernels (``expanded_conv_tma``) share these switches.
"""
from __future__ import annotations

import itertools
import os
import warnings
from typing import Optional

import torch
import triton
import triton.language as tl

from . import expanded_linear as base
from .launch import launch

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # an older Triton
    TensorDescriptor = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

MODE = os.environ.get("EXPANSE_FAST_TMA", "auto")
disabled_reason: Optional[str] = _IMPORT_ERROR

if TensorDescriptor is not None:
    class _Checked(TensorDescriptor):
        """A host descriptor of a tensor that ``usable`` has already checked (16-byte
        aligned base and strides, unit innermost stride, not empty).  TensorDescriptor's
        own construction repeats those checks: 2.2 us instead of 0.7 us a descriptor on
        the 2-core CI machine, and a layer's forward and backward make up to 12 per step.
        The driver still refuses a bad one when it encodes it (a failed launch, below)."""

        def __post_init__(self):
            """No checks here: ``usable`` made them before the launch."""


def _boxes(**shapes):
    """A config pre-hook: each named descriptor's box, in tile names ("M", "N", "K")."""
    def hook(nargs):
        for name, dims in shapes.items():
            nargs[name].block_shape = [nargs["BLOCK_" + d] for d in dims]
    return hook


def _configs(hook):
    return [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages,
                          pre_hook=hook) for c in base._configs()]


def _autotune(key, rows, cols, **boxes):
    return triton.autotune(configs=_configs(_boxes(**boxes)), key=key,
                           prune_configs_by={"early_config_prune": base._pruner(rows, cols)})


@_autotune(["M", "O", "I", "G"], "M", "O", x_desc="MK", xo_desc="MK", wf_desc="NK",
           wn_desc="NK", wc_desc="NK")
@triton.jit
def _fwd_tma_kernel(x_desc, xo_desc, wf_desc, wn_desc, wc_desc,
                    bf_ptr, bn_ptr, y_ptr, tab_ptr, pre_ptr,
                    M, O, I, I_F, O_F, G, P0, s_ym, s_yn, s_pm,
                    HAS_BF: tl.constexpr, HAS_BN: tl.constexpr, HAS_COUPLE: tl.constexpr,
                    ACT: tl.constexpr, HAS_PRE: tl.constexpr, PREC: tl.constexpr,
                    COL_VEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    tl.static_assert(BLOCK_N % COL_VEC == 0)
    pid_m, col0, col_end, k_end, is_new = base._locate_fwd_tile(tab_ptr, M, G, BLOCK_M,
                                                                BLOCK_N, GROUP_M, COL_VEC)
    off_m = pid_m * BLOCK_M
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = col0 + tl.arange(0, BLOCK_N)
    m_mask = (rm < M)[:, None]
    n_mask = base._col_mask(rn, col_end, COL_VEC)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # Full K tiles.  Two loops, one of them empty, rather than a branch: the tile's group
    # picks the weight (frozen rows, or the newest rows at col0 - O_F).  Frozen rows read x
    # through xo_desc, which covers the old inputs x[:, :I_F] only: past them it reads zeros,
    # so no old unit ever loads a newer input.
    k_full = k_end // BLOCK_K * BLOCK_K
    for k in range(0, tl.where(is_new, 0, k_full), BLOCK_K):
        acc = tl.dot(xo_desc.load([off_m, k]), wf_desc.load([col0, k]).T, acc,
                     input_precision=PREC)
    for k in range(0, tl.where(is_new, k_full, 0), BLOCK_K):
        acc = tl.dot(x_desc.load([off_m, k]), wn_desc.load([col0 - O_F, k]).T, acc,
                     input_precision=PREC)
    # The partial tile where the staircase ends: a whole tile through the descriptors (past
    # I_F for frozen rows, past I for the newest, they read zeros), its columns at or past
    # k_end zeroed in both operands before the product.  For a frozen group whose k_end lies
    # inside w_frozen (a staircase of several expansions) that tile does load w_frozen's
    # stored zero-block columns and x's columns up to the next tile edge, and drops them
    # here: none reaches the sum (an inf or NaN there stays out).  Pointer loads instead
    # would cost the whole kernel registers (240 instead of 154 at 128x128x64, and spills).
    if k_full < k_end:
        if is_new:
            xa = x_desc.load([off_m, k_full])
            wb = wn_desc.load([col0 - O_F, k_full])
        else:
            xa = xo_desc.load([off_m, k_full])
            wb = wf_desc.load([col0, k_full])
        live = ((k_full + tl.arange(0, BLOCK_K)) < k_end)[None, :]
        xa = tl.where(live, xa, 0.0).to(xa.dtype)
        wb = tl.where(live, wb, 0.0).to(wb.dtype)
        acc = tl.dot(xa, wb.T, acc, input_precision=PREC)

    if HAS_COUPLE:
        # Coupled layout: frozen rows also read the newest inputs [I_F, I) through w_couple.
        # Past I the x descriptor reads zeros, past its width the w_couple one: no tail.
        for k in range(0, tl.where(is_new, 0, I - I_F), BLOCK_K):
            acc = tl.dot(x_desc.load([off_m, I_F + k]), wc_desc.load([col0, k]).T, acc,
                         input_precision=PREC)
    base._fwd_epilogue(acc, rm, rn, m_mask, n_mask, col_end, bf_ptr, bn_ptr, y_ptr, pre_ptr,
                       O_F, P0, s_ym, s_yn, s_pm, HAS_BF, HAS_BN, ACT, HAS_PRE, COL_VEC)


def _describable(t: torch.Tensor, rank: int = 2) -> bool:
    """A descriptor can cover ``t``: unit innermost stride, 16-byte aligned base and strides."""
    elt = t.element_size()
    return (t.dim() == rank and t.numel() > 0 and t.stride(-1) == 1
            and all((s * elt) % 16 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0)


def aligned(t: torch.Tensor, *counts: int) -> bool:
    """Whether each count (of columns, channels) is a whole number of 16-byte units of
    ``t``'s dtype.  A descriptor's innermost coordinate must be 16-byte aligned, and the
    kernels start tiles at such counts along it: the newest inputs at I_f (dx), a conv's
    taps at multiples of its channels (a 2x2 filter over 4 frozen channels would put tap 1
    at channel 4)."""
    return all(c * t.element_size() % 16 == 0 for c in counts)


def enabled_for(first: torch.Tensor) -> bool:
    """Whether descriptor kernels may run for operands like ``first`` (device, dtype), by
    ``EXPANSE_FAST_TMA`` and whether an earlier launch failed."""
    if disabled_reason is not None or MODE == "0":
        return False
    if MODE != "1":
        if first.device.type != "cuda" or first.dtype not in (torch.float16, torch.bfloat16):
            return False
        if torch.cuda.get_device_capability(first.device) < (9, 0):
            return False
    return True


def usable(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a kernel whose descriptors cover ``tensors`` (None: not used) can run with
    descriptor loads (see the module docstring); the first tensor sets device and dtype."""
    return enabled_for(tensors[0]) and all(_describable(t) for t in tensors if t is not None)


def _launch(what: str, kernel, grid, descriptors, *args, **meta) -> bool:
    """Launch ``kernel`` with descriptors over ``descriptors``; False (after a warning, and
    with every descriptor kernel off for the process) when it cannot run here."""
    global disabled_reason
    try:  # each config's pre-hook sets the real boxes
        descs = [_Checked(t, t.shape, t.stride(), [1] * t.dim()) for t in descriptors]
        launch(kernel, grid, *descs, *args, **meta)
    except Exception as exc:  # noqa: BLE001 -- reported, then the pointer kernels run
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        disabled_reason = f"{what}: {type(exc).__name__}: {first_line}"
        warnings.warn(f"expanse_fast: the TMA kernels are off for this process "
                      f"({disabled_reason}); the pointer-load kernels run instead",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


def forward(x, w_frozen, w_new, w_couple, b_frozen, b_new, y, tab, pre, p0, grid, **meta):
    """The forward through descriptors; False when it cannot run here."""
    wc = w_couple if meta["HAS_COUPLE"] else w_new
    i_f = w_frozen.shape[1]
    x_old = x[:, :i_f] if i_f > 0 else x  # (no frozen inputs: never read)
    return _launch(
        "forward", _fwd_tma_kernel, grid, (x, x_old, w_frozen, w_new, wc),
        b_frozen if b_frozen is not None else y, b_new if b_new is not None else y, y, tab,
        pre if pre is not None else y,
        x.shape[0], y.shape[1], x.shape[1], w_frozen.shape[1], w_frozen.shape[0],
        tab.shape[0], p0, y.stride(0), y.stride(1), pre.stride(0) if pre is not None else 0,
        **meta)


# ---------------------------------------------------------------------------------------
# dW = A^T B over the rows (A = dy_new, B = x; or A = dy_old, B = x_new), db fused
# ---------------------------------------------------------------------------------------
@_autotune(["R", "C", "M", "K_CHUNK"], "R", "C", a_desc="KM", b_desc="KN")
@triton.jit
def _dw_tma_kernel(a_desc, b_desc, a_ptr, dw_ptr, db_ptr, R, C, M, K_CHUNK,
                   s_am, s_ar, s_dws, s_dwr, s_dwc, s_dbs, s_db,
                   HAS_DB: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    pid_r, pid_c = base._swizzle(pid, (R + BLOCK_M - 1) // BLOCK_M,
                                 tl.maximum((C + BLOCK_N - 1) // BLOCK_N, 1), GROUP_M)
    r0 = pid_r * BLOCK_M
    c0 = pid_c * BLOCK_N
    rr = r0 + tl.arange(0, BLOCK_M)
    rc = c0 + tl.arange(0, BLOCK_N)
    k_lo = sid * K_CHUNK
    k_hi = tl.minimum(k_lo + K_CHUNK, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # A split's rows end on a tile boundary (K_CHUNK is a multiple of 256), or at M, past
    # which the descriptors read zeros: no tail tile.
    for k in range(k_lo, tl.where(C > 0, k_hi, k_lo), BLOCK_K):
        acc = tl.dot(a_desc.load([k, r0]).T, b_desc.load([k, c0]), acc, input_precision=PREC)
    base._dw_store(acc, dw_ptr, db_ptr, a_ptr + rr[:, None] * s_ar, rr, rc,
                   (rr < R)[:, None], (rc < C)[None, :], pid_c, sid, R, k_lo, k_hi,
                   s_am, s_dws, s_dwr, s_dwc, s_dbs, s_db, HAS_DB, BLOCK_M, BLOCK_K)


def grad_weight(a, b, dw, db, chunk, grid, **meta) -> bool:
    """dW (and db) through descriptors; False when it cannot run here."""
    dbp = db if db is not None else dw
    return _launch("dW", _dw_tma_kernel, grid, (a, b),
                   a, dw, dbp, a.shape[1], b.shape[1], a.shape[0], chunk,
                   a.stride(0), a.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
                   dbp.stride(0), db.stride(1) if db is not None else 0, **meta)


# ---------------------------------------------------------------------------------------
# dx: new-input tiles dy_new w_new[:, cols] (+ dy_old w_couple), old-input tiles
# dy_new w_new[:, cols] + the frozen groups' rows, cut at their k_end, when NEED_OLD
# ---------------------------------------------------------------------------------------
@_autotune(["M", "I", "I_F", "O_F", "O_N", "G", "NB"], "M", "I", dyn_desc="MK", wn_desc="KN",
           dyo_desc="MK", wc_desc="KN", wf_desc="KN")
@triton.jit
def _dx_tma_kernel(dyn_desc, wn_desc, dyo_desc, wc_desc, wf_desc, dx_ptr, tab_ptr, bands_ptr,
                   M, I, I_F, O_F, O_N, G, NB, s_dxm,
                   NEED_OLD: tl.constexpr, HAS_COUPLE: tl.constexpr, PREC: tl.constexpr,
                   K_VEC: tl.constexpr, COL_VEC: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    tl.static_assert(BLOCK_N % K_VEC == 0 and BLOCK_K % K_VEC == 0)
    pid_m, col0, col_end, is_old = base._locate_dx_tile(M, I, I_F, bands_ptr, NB, BLOCK_M,
                                                        BLOCK_N, GROUP_M, COL_VEC)
    off_m = pid_m * BLOCK_M
    rm = off_m + tl.arange(0, BLOCK_M)
    rk = col0 + tl.arange(0, BLOCK_N)
    m_mask = (rm < M)[:, None]
    k_mask = base._col_mask(rk, col_end, COL_VEC)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Newest rows (old tiles only when NEED_OLD): the tile's columns past I, and the rows
    # past O_N, read as zeros.
    if NEED_OLD:
        o_hi = O_N
    else:
        o_hi = tl.where(is_old, 0, O_N)
    for k in range(0, o_hi, BLOCK_K):
        acc = tl.dot(dyn_desc.load([off_m, k]), wn_desc.load([k, col0]), acc,
                     input_precision=PREC)
    if NEED_OLD:
        # An old tile lies in one band of the old columns, cut at every k_end: a frozen
        # group reaches all the columns it stores or none.  k_ends nondecreasing (the
        # staircase, the launcher checks): rows [0, o_lo) end at or before col0 and never
        # reach the tile, rows [o_lo, O_F) reach past it and go from the bulk copies to
        # wgmma.  Their columns past the band (where a group's zero block may start: a NaN
        # stored there, or 0 * a NaN of its dy) land in columns that are not stored.
        o_lo = tl.where(is_old, 0, O_F)
        for g in range(G - 1):
            o_lo = tl.where(tl.load(tab_ptr + 3 * g + 2) <= col0,
                            tl.maximum(o_lo, tl.load(tab_ptr + 3 * g + 1)), o_lo)
        for k in range(o_lo, O_F, BLOCK_K):
            acc = tl.dot(dyo_desc.load([off_m, k]), wf_desc.load([k, col0]), acc,
                         input_precision=PREC)
    if HAS_COUPLE:
        # Coupled layout: every frozen row reads the newest inputs through w_couple.
        for k in range(0, tl.where(is_old, 0, O_F), BLOCK_K):
            acc = tl.dot(dyo_desc.load([off_m, k]), wc_desc.load([k, col0 - I_F]), acc,
                         input_precision=PREC)
    dx = dx_ptr + rm.to(tl.int64)[:, None] * s_dxm + rk[None, :]
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=m_mask & k_mask)


def nondecreasing(k_ends) -> bool:
    """Whether frozen groups' k_ends never decrease (the staircase the descriptor kernels'
    dx_old cut assumes: rows sorted by reach)."""
    k_ends = list(k_ends)
    return all(a <= b for a, b in zip(k_ends[:-1], k_ends[1:]))


def _reads_frozen_rows(w_frozen, need_old) -> bool:
    return bool(need_old) and w_frozen.shape[0] > 0 and w_frozen.shape[1] > 0


def grad_input_usable(dy, w_frozen, w_new, w_couple, frozen_out_groups, frozen_k_ends,
                      need_old, bands) -> bool:
    """Whether dx can run through descriptors: every operand it reads describable; with
    dx_old, frozen groups whose k_ends never decrease (a staircase), and every offset a
    descriptor load starts at a whole 16-byte unit (``bands``: the old columns' band ends,
    expanded_linear.band_ends)."""
    o_f = w_frozen.shape[0]
    old = _reads_frozen_rows(w_frozen, need_old)
    if old and not nondecreasing(frozen_k_ends):
        return False
    # new tiles start at I_f, old ones at each band; with dx_old, dy's frozen columns are
    # read from a group's first row on
    rows = list(itertools.accumulate(frozen_out_groups)) if old else []
    if not aligned(dy, w_new.shape[1], w_frozen.shape[1], *bands, *rows):
        return False
    return usable(dy[:, o_f:], w_new, dy[:, :o_f] if (w_couple is not None or old) else None,
                  w_couple, w_frozen if old else None)


def grad_input(dy, w_frozen, w_new, w_couple, dx, tab, bands, grid, **meta) -> bool:
    """dx through descriptors; False when it cannot run here.  ``w_couple``: None unless
    the coupling block is read."""
    o_f = w_frozen.shape[0]
    dy_new, dy_old = dy[:, o_f:], dy[:, :o_f]
    couple = meta["HAS_COUPLE"]
    old = _reads_frozen_rows(w_frozen, meta["NEED_OLD"])
    descs = (dy_new, w_new, dy_old if couple or old else dy_new,
             w_couple if couple else w_new, w_frozen if old else w_new)
    return _launch("dx", _dx_tma_kernel, grid, descs,
                   dx, tab, bands, dy.shape[0], w_new.shape[1], w_frozen.shape[1],
                   o_f if couple or old else 0, w_new.shape[0], tab.shape[0], bands.numel(),
                   dx.stride(0),
                   **meta)
