"""Triton kernels for the expanded (staircase) linear layer.

Pure kernels and their launchers: tensors and sizes in, tensors out.  Nothing here imports
from ``expanse_fast``; the group arithmetic arrives as plain lists (``frozen_out_groups``,
``frozen_k_ends``) and is turned into a tiny int32 table, one row per output group:
``(first column, end column, k_end)``.  Frozen groups come first (their columns are rows of
``w_frozen``), the newest group last (rows of ``w_new``, reading every input).

Three kernels:

* ``_fwd_kernel``  y = [x W_g^T + b_g]_g, every group in ONE launch into one output.  A
  column tile never straddles two groups (each group is cut into its own BLOCK_N tiles,
  located by a scan of the table), so its K loop stops at the group's k_end: the zero
  block right of the staircase is never loaded.  Coupled layout: frozen tiles run a second
  K loop over the newest inputs with ``w_couple``.  Bias and activation in the epilogue.
* ``_dw_kernel``   dW = A^T B over the rows (A = dy_new, B = x; or A = dy_old, B = x_new for
  the coupling block), with db = column sums of A fused: the programs of the first column
  tile sum their A rows after the main loop (one extra read of dy_new, no atomics).  When
  dW has too few tiles for the GPU, the row reduction is split (fp32 partials, summed by
  one small torch reduction).
* ``_dx_kernel``   dx tiles split at I_f.  New-input tiles: dy_new w_new[:, I_f:] (+ dy_old
  w_couple).  Old-input tiles: dy_new w_new[:, :I_f] + sum_g dy_g w_frozen[g, :k_end_g], only
  when NEED_OLD; otherwise they store zeros without computing anything.  With NEED_OLD the
  old columns are tiled in bands cut at every k_end, so a tile never multiplies a group's
  dy with the zeros right of its k_end: a NaN or Inf in that dy stays out of the columns
  the group does not read.

All accumulate in fp32 and store in the input dtype.  Activations: ``gelu`` is the exact
(erf) GELU, ``gelu_tanh`` torch's ``gelu(approximate="tanh")``.  For the smooth ones the
forward can also store the pre-activation of the last columns (``pre``): their backward
reads it.
"""
from __future__ import annotations

import itertools
import os
from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .launch import launch
from .vector_bounds import multiple_of_all

# Read once, like Triton itself does when it decorates the kernels below.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
# EXPANSE_FAST_AUTOTUNE=0: the first config that fits the shape, no tuning compiles (the GPU
# test run: each autotuned specialisation would compile every config).
AUTOTUNE = os.environ.get("EXPANSE_FAST_AUTOTUNE", "1") != "0"

ACTIVATIONS = {None: 0, "relu": 1, "gelu_tanh": 2, "silu": 3, "gelu": 4}


# ---------------------------------------------------------------------------------------
# Autotuning
# ---------------------------------------------------------------------------------------
def _configs():
    if INTERPRET:
        # The interpreter runs every config it benchmarks: one small tile, several tiles
        # per group even on test-sized shapes.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2},
                              num_warps=1, num_stages=1)]
    # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages: largest first.  The configs the H200 runs of
    # 2026-11-28 picked at 16384 x 4096..5120 and 8192 x 1024..1280 (bf16), and one small
    # tile; each extra config costs a compile per specialisation when tuning.
    shapes = [
        (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
        (128, 128, 32, 4, 4), (64, 64, 64, 4, 4),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
                          num_warps=w, num_stages=s) for m, n, k, w, s in shapes]


_SMEM_BUDGET: Dict[int, int] = {}


def smem_budget(device: torch.device) -> int:
    """Bytes of shared memory the pipelined operand tiles may take on ``device``: 88% of
    what one block may opt into (H100/H200: 227 KB -> 200 KB; A100: 163 KB; most consumer
    GPUs: 99 KB), the rest left for the epilogue and bookkeeping."""
    if device.type != "cuda":
        return 200 * 1024
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMEM_BUDGET:
        props = torch.cuda.get_device_properties(index)
        optin = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
        _SMEM_BUDGET[index] = int(optin * 0.88)
    return _SMEM_BUDGET[index]


def _pruner(rows: str, cols: str):
    """Config pruning for a kernel whose output tile spans args ``rows`` x ``cols``."""

    def prune(configs, named_args, **kwargs):
        first = next(v for v in named_args.values() if isinstance(v, torch.Tensor))
        elt, budget = first.element_size(), smem_budget(first.device)
        # A tile much larger than the problem only wastes work (and autotuning time).
        cap_m = max(64, triton.next_power_of_2(named_args[rows]))
        cap_n = max(64, triton.next_power_of_2(named_args[cols]))
        # A large problem fills the GPU with 128 x 128 tiles or bigger: smaller ones would
        # only cost tuning compiles.
        big = named_args[rows] >= 4096 and named_args[cols] >= 1024
        # The exact GELU's erf beside an accumulator of 128 fp32 values a thread spills on
        # sm_90a (40-168 bytes): such tiles go for it.
        erf = kwargs.get("ACT", named_args.get("ACT")) == ACTIVATIONS["gelu"]
        keep = [c for c in configs
                if c.kwargs["BLOCK_M"] <= cap_m and c.kwargs["BLOCK_N"] <= cap_n
                and (not big or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 128 * 128)
                and (not erf or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 128 * 32 * c.num_warps)
                # pipelined operands must fit shared memory (fp32 doubles them)
                and c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"])
                * c.kwargs["BLOCK_K"] * elt <= budget]
        # nothing fits (a small-memory GPU and fp32): the smallest config
        keep = keep or configs[-1:]
        return keep if AUTOTUNE else keep[:1]

    return prune


def _autotune(key, rows, cols):
    return triton.autotune(configs=_configs(), key=key,
                           prune_configs_by={"early_config_prune": _pruner(rows, cols)})


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------
@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row tiles sweep the columns together (L2 reuse)."""
    span = GROUP_M * num_pid_n
    first_m = (pid // span) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % span) % size_m
    pid_n = (pid % span) // size_m
    return pid_m, pid_n


@triton.jit
def _dot_k(acc, a_base, b_base, s_ak, s_bk, a_mask, b_mask, k_lo, k_hi,
           BLOCK_K: tl.constexpr, PREC: tl.constexpr, K_VEC: tl.constexpr):
    """acc += A[:, k_lo:k_hi] @ B[k_lo:k_hi, :], A at a_base + k * s_ak (a_base (BM, 1)),
    B at b_base + k * s_bk (b_base (1, BN)).

    Full K tiles first, with no mask along K: a mask along the contiguous axis would stop
    vectorised (cp.async / TMA-width) loads, and with them software pipelining.  Then one
    masked tail tile, its mask over whole K_VEC vectors (k_lo and k_hi are multiples of
    K_VEC: vector_bounds.py).
    """
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_base + (k_lo + rk).to(tl.int64)[None, :] * s_ak
    b_ptrs = b_base + (k_lo + rk).to(tl.int64)[:, None] * s_bk
    k_full = k_lo + (k_hi - k_lo) // BLOCK_K * BLOCK_K
    for _ in range(k_lo, k_full, BLOCK_K):
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk
    if k_full < k_hi:
        k_in = (k_full + rk) // K_VEC < k_hi // K_VEC  # = k_full + rk < k_hi
        a = tl.load(a_ptrs, mask=a_mask & k_in[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=b_mask & k_in[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _locate_fwd_tile(tab_ptr, M, G, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     GROUP_M: tl.constexpr, COL_VEC: tl.constexpr):
    """This program's output tile: (row tile, first column, group end column, k_end, is the
    newest group).  Each group is tiled on its own, so a tile stays inside one group.
    Every group boundary is a multiple of COL_VEC (the launcher checks; vector_bounds.py
    says why): the first column is returned as one visibly."""
    pid = tl.program_id(0)
    num_pid_n = pid * 0
    for g in range(G):
        num_pid_n += (tl.load(tab_ptr + 3 * g + 1) - tl.load(tab_ptr + 3 * g)
                      + BLOCK_N - 1) // BLOCK_N
    pid_m, pid_n = _swizzle(pid, (M + BLOCK_M - 1) // BLOCK_M, num_pid_n, GROUP_M)

    # Which group owns column tile pid_n: scan the table (a handful of rows).
    col0 = pid_n * 0
    col_end = col0
    k_end = col0
    grp = col0
    seen = col0
    for g in range(G):
        c0 = tl.load(tab_ptr + 3 * g)
        c1 = tl.load(tab_ptr + 3 * g + 1)
        t = (c1 - c0 + BLOCK_N - 1) // BLOCK_N
        hit = (pid_n >= seen) & (pid_n < seen + t)
        col0 = tl.where(hit, c0 + (pid_n - seen) * BLOCK_N, col0)
        col_end = tl.where(hit, c1, col_end)
        k_end = tl.where(hit, tl.load(tab_ptr + 3 * g + 2), k_end)
        grp = tl.where(hit, g, grp)
        seen += t
    return pid_m, col0 // COL_VEC * COL_VEC, col_end, k_end, grp == G - 1


@triton.jit
def _sigmoid(u):
    # exp of -|u| only: no overflow for large |u| (the interpreter's numpy warns on inf)
    e = tl.exp(-tl.abs(u))
    return tl.where(u >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _col_mask(rn, col_end, COL_VEC: tl.constexpr):
    """rn < col_end, for a col_end that is a multiple of COL_VEC: constant over vectors."""
    return rn // COL_VEC < col_end // COL_VEC


@triton.jit
def _fwd_epilogue(acc, rm, rn, m_mask, n_mask, col_end, bf_ptr, bn_ptr, y_ptr, pre_ptr,
                  O_F, P0, s_ym, s_yn, s_pm, HAS_BF: tl.constexpr, HAS_BN: tl.constexpr,
                  ACT: tl.constexpr, HAS_PRE: tl.constexpr, COL_VEC: tl.constexpr):
    """Bias (the newest group's columns are [O_F, O): masked loads pick the right vector
    without branching), the pre-activation store, the activation, the output store.  O_F,
    P0 and col_end are multiples of COL_VEC."""
    n_ok = _col_mask(rn, col_end, COL_VEC)
    if HAS_BN:
        acc += tl.load(bn_ptr + (rn - O_F), mask=n_ok & ~_col_mask(rn, O_F, COL_VEC),
                       other=0.0).to(tl.float32)[None, :]
    if HAS_BF:
        acc += tl.load(bf_ptr + rn, mask=n_ok & _col_mask(rn, O_F, COL_VEC), other=0.0
                       ).to(tl.float32)[None, :]
    if HAS_PRE:
        # the pre-activation of columns [P0, O), which the activation's backward reads
        pre = pre_ptr + rm.to(tl.int64)[:, None] * s_pm + (rn - P0)[None, :]
        tl.store(pre, acc.to(pre_ptr.dtype.element_ty),
                 mask=m_mask & n_mask & ~_col_mask(rn, P0, COL_VEC)[None, :])
    if ACT == 1:
        acc = tl.where(acc < 0.0, 0.0, acc)  # (NaN stays NaN, as in torch; maximum drops it)
    elif ACT == 2:  # gelu, tanh approximation: x * sigmoid(2 * sqrt(2/pi) * (x + 0.044715 x^3))
        acc = acc * _sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc))
    elif ACT == 3:
        acc = acc * _sigmoid(acc)
    elif ACT == 4:  # exact gelu: x * Phi(x)
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    y = y_ptr + rm.to(tl.int64)[:, None] * s_ym + rn[None, :] * s_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask & n_mask)


@_autotune(key=["M", "O", "I", "G"], rows="M", cols="O")
@triton.jit
def _fwd_kernel(x_ptr, wf_ptr, wn_ptr, wc_ptr, bf_ptr, bn_ptr, y_ptr, tab_ptr, pre_ptr,
                M, O, I, I_F, O_F, G, P0,
                s_xm, s_xk, s_wfo, s_wno, s_wco, s_wck, s_ym, s_yn, s_pm,
                HAS_BF: tl.constexpr, HAS_BN: tl.constexpr, HAS_COUPLE: tl.constexpr,
                ACT: tl.constexpr, HAS_PRE: tl.constexpr, PREC: tl.constexpr,
                COL_VEC: tl.constexpr, K_VEC: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    tl.static_assert(BLOCK_N % COL_VEC == 0 and BLOCK_K % K_VEC == 0)
    pid_m, col0, col_end, k_end, is_new = _locate_fwd_tile(tab_ptr, M, G, BLOCK_M, BLOCK_N,
                                                           GROUP_M, COL_VEC)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = col0 + tl.arange(0, BLOCK_N)
    m_mask = (rm < M)[:, None]
    n_mask = _col_mask(rn, col_end, COL_VEC)[None, :]
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * s_xm
    # Pick the weight by the group (both have unit stride along K: see the launcher).
    if is_new:
        w_cols = wn_ptr + (rn - O_F).to(tl.int64)[None, :] * s_wno
    else:
        w_cols = wf_ptr + rn.to(tl.int64)[None, :] * s_wfo
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Staircase: the K loop ends at the group's k_end, columns past it are never read.
    acc = _dot_k(acc, x_rows, w_cols, s_xk, 1, m_mask, n_mask, 0, k_end, BLOCK_K, PREC, K_VEC)
    if HAS_COUPLE:
        # Coupled layout: frozen rows also read the newest inputs through w_couple.
        acc = _dot_k(acc, x_rows + I_F * s_xk, wc_ptr + rn.to(tl.int64)[None, :] * s_wco,
                     s_xk, s_wck, m_mask, n_mask, 0, tl.where(is_new, 0, I - I_F),
                     BLOCK_K, PREC, K_VEC)
    _fwd_epilogue(acc, rm, rn, m_mask, n_mask, col_end, bf_ptr, bn_ptr, y_ptr, pre_ptr,
                  O_F, P0, s_ym, s_yn, s_pm, HAS_BF, HAS_BN, ACT, HAS_PRE, COL_VEC)


@_autotune(key=["R", "C", "M", "K_CHUNK"], rows="R", cols="C")
@triton.jit
def _dw_kernel(a_ptr, b_ptr, dw_ptr, db_ptr, R, C, M, K_CHUNK,
               s_am, s_ar, s_bm, s_bc, s_dws, s_dwr, s_dwc, s_dbs, s_db,
               HAS_DB: tl.constexpr, PREC: tl.constexpr, K_VEC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               GROUP_M: tl.constexpr):
    """dw[s, r, c] = sum_m a[m, r] b[m, c] and db[s, r] = sum_m a[m, r] over the rows m of
    split s = program_id(1): [s * K_CHUNK, (s + 1) * K_CHUNK)."""
    tl.static_assert(BLOCK_K % K_VEC == 0)
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    # max(1, .) column tiles so that db is still produced when C == 0.
    pid_r, pid_c = _swizzle(pid, (R + BLOCK_M - 1) // BLOCK_M,
                            tl.maximum((C + BLOCK_N - 1) // BLOCK_N, 1), GROUP_M)
    rr = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = (rr < R)[:, None]
    c_mask = (rc < C)[None, :]
    k_lo = sid * K_CHUNK
    k_hi = tl.minimum(k_lo + K_CHUNK, M)
    a_cols = a_ptr + rr[:, None] * s_ar
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The reduction runs over the rows of dy and x (C == 0: only the column sum is wanted).
    acc = _dot_k(acc, a_cols, b_ptr + rc[None, :] * s_bc, s_am, s_bm, r_mask, c_mask,
                 k_lo, tl.where(C > 0, k_hi, k_lo), BLOCK_K, PREC, K_VEC)
    _dw_store(acc, dw_ptr, db_ptr, a_cols, rr, rc, r_mask, c_mask, pid_c, sid, R, k_lo, k_hi,
              s_am, s_dws, s_dwr, s_dwc, s_dbs, s_db, HAS_DB, BLOCK_M, BLOCK_K)


@triton.jit
def _dw_store(acc, dw_ptr, db_ptr, a_cols, rr, rc, r_mask, c_mask, pid_c, sid, R, k_lo, k_hi,
              s_am, s_dws, s_dwr, s_dwc, s_dbs, s_db, HAS_DB: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Store one dW tile of split ``sid``; the first column tile also sums db."""
    dw = dw_ptr + sid * s_dws + rr.to(tl.int64)[:, None] * s_dwr + rc[None, :] * s_dwc
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=r_mask & c_mask)
    if HAS_DB:
        # Only the first column tile sums, after (not inside) the pipelined main loop.
        if pid_c == 0:
            rk = tl.arange(0, BLOCK_K)
            db = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                k = k0 + rk
                a = tl.load(a_cols + k.to(tl.int64)[None, :] * s_am,
                            mask=r_mask & (k[None, :] < k_hi), other=0.0)
                db += tl.sum(a.to(tl.float32), axis=1)
            tl.store(db_ptr + sid * s_dbs + rr * s_db, db.to(db_ptr.dtype.element_ty),
                     mask=rr < R)


@triton.jit
def _band_tiles(bands_ptr, NB, BLOCK_N: tl.constexpr):
    """How many tiles of BLOCK_N columns the NB bands of ``bands_ptr`` make (their end
    columns; the first band starts at 0), each band tiled on its own."""
    tiles = NB * 0
    start = tiles
    for b in range(NB):
        end = tl.load(bands_ptr + b)
        tiles += (end - start + BLOCK_N - 1) // BLOCK_N  # (no tl.cdiv: slow interpreted)
        start = end
    return tiles


@triton.jit
def _band_tile(t, bands_ptr, NB, BLOCK_N: tl.constexpr, VEC: tl.constexpr):
    """Tile t of the bands: (its first column, its band's end).  Band ends are multiples of
    VEC (the launcher checks): the first column is returned as one visibly
    (vector_bounds.py).  Past the last tile: (0, 0)."""
    col0 = t * 0
    col_end = col0
    seen = col0
    start = col0
    for b in range(NB):
        end = tl.load(bands_ptr + b)
        n = (end - start + BLOCK_N - 1) // BLOCK_N
        hit = (t >= seen) & (t < seen + n)
        col0 = tl.where(hit, start + (t - seen) * BLOCK_N, col0)
        col_end = tl.where(hit, end, col_end)
        seen += n
        start = end
    return col0 // VEC * VEC, col_end


@triton.jit
def _locate_dx_tile(M, I, I_F, bands_ptr, NB, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    GROUP_M: tl.constexpr, COL_VEC: tl.constexpr):
    """This program's dx tile: (row tile, first column, end column, is an old-input tile).

    The old inputs [0, I_f) come first, cut into the NB bands of ``bands_ptr``, each tiled
    on its own; then the new ones [I_f, I).  The launcher cuts the bands at every frozen
    group's k_end, so a group reaches either all of a tile's stored columns or none: no
    tile adds a group's dy times its zeroed weights (0 * NaN) into columns that group never
    reads.  Band ends, I_f and I are multiples of COL_VEC."""
    pid = tl.program_id(0)
    n_old = _band_tiles(bands_ptr, NB, BLOCK_N)
    pid_m, pid_n = _swizzle(pid, (M + BLOCK_M - 1) // BLOCK_M,
                            n_old + (I - I_F + BLOCK_N - 1) // BLOCK_N, GROUP_M)
    is_old = pid_n < n_old
    old0, old_end = _band_tile(pid_n, bands_ptr, NB, BLOCK_N, COL_VEC)
    col0 = tl.where(is_old, old0, I_F + (pid_n - n_old) * BLOCK_N)
    col_end = tl.where(is_old, old_end, I)
    return pid_m, col0 // COL_VEC * COL_VEC, col_end, is_old


@triton.jit
def _dx_frozen_groups(acc, dy_rows, wf_ptr, tab_ptr, rk, m_mask, col0, is_old, G, s_dyo,
                      s_wfo, s_wfk, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
                      K_VEC: tl.constexpr):
    """Frozen group g adds dy_g @ w_frozen[g, cols] to the tile if it reads the tile's
    columns (k_end_g past col0: then past all the tile stores, _locate_dx_tile's bands)."""
    for g in range(G - 1):
        # row bounds are multiples of K_VEC (the launcher checks), shown as such: dy's
        # loads from r0 on stay 16-byte ones (vector_bounds.py)
        r0 = tl.load(tab_ptr + 3 * g) // K_VEC * K_VEC
        k_end = tl.load(tab_ptr + 3 * g + 2)
        r_hi = tl.where(is_old & (k_end > col0), tl.load(tab_ptr + 3 * g + 1) // K_VEC * K_VEC,
                        r0)
        acc = _dot_k(acc, dy_rows, wf_ptr + rk[None, :] * s_wfk, s_dyo, s_wfo, m_mask,
                     (rk // K_VEC < k_end // K_VEC)[None, :], r0, r_hi, BLOCK_K, PREC, K_VEC)
    return acc


@_autotune(key=["M", "I", "I_F", "O_F", "O_N", "G", "NB"], rows="M", cols="I")
@triton.jit
def _dx_kernel(dy_ptr, wf_ptr, wn_ptr, wc_ptr, dx_ptr, tab_ptr, bands_ptr,
               M, I, I_F, O_F, O_N, G, NB,
               s_dym, s_dyo, s_wfo, s_wfk, s_wno, s_wnk, s_wco, s_wck, s_dxm, s_dxk,
               NEED_OLD: tl.constexpr, HAS_COUPLE: tl.constexpr, PREC: tl.constexpr,
               K_VEC: tl.constexpr, COL_VEC: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    tl.static_assert(BLOCK_N % K_VEC == 0 and BLOCK_K % K_VEC == 0)
    tl.static_assert(BLOCK_N % COL_VEC == 0)
    pid_m, col0, col_end, is_old = _locate_dx_tile(M, I, I_F, bands_ptr, NB, BLOCK_M,
                                                   BLOCK_N, GROUP_M, COL_VEC)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = col0 + tl.arange(0, BLOCK_N)     # dx columns of this tile
    m_mask = (rm < M)[:, None]
    k_mask = _col_mask(rk, col_end, COL_VEC)[None, :]
    dy_rows = dy_ptr + rm.to(tl.int64)[:, None] * s_dym
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # Newest rows: dy_new @ w_new[:, cols]; on old tiles only when NEED_OLD.
    if NEED_OLD:
        o_hi = O_N
    else:
        o_hi = tl.where(is_old, 0, O_N)
    acc = _dot_k(acc, dy_rows + O_F * s_dyo, wn_ptr + rk[None, :] * s_wnk, s_dyo, s_wno,
                 m_mask, k_mask, 0, o_hi, BLOCK_K, PREC, K_VEC)
    if NEED_OLD:
        acc = _dx_frozen_groups(acc, dy_rows, wf_ptr, tab_ptr, rk, m_mask, col0, is_old, G,
                                s_dyo, s_wfo, s_wfk, BLOCK_K, PREC, K_VEC)
    if HAS_COUPLE:
        # Coupled layout: every frozen row reads the newest inputs through w_couple.
        acc = _dot_k(acc, dy_rows, wc_ptr + (rk - I_F)[None, :] * s_wck, s_dyo, s_wco,
                     m_mask, k_mask, 0, tl.where(is_old, 0, O_F), BLOCK_K, PREC, K_VEC)

    dx = dx_ptr + rm.to(tl.int64)[:, None] * s_dxm + rk[None, :] * s_dxk
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=m_mask & k_mask)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------
_TABLES: Dict[tuple, torch.Tensor] = {}


def group_table(frozen_out_groups: Sequence[int], frozen_k_ends: Sequence[int], i_f: int,
                o_new: int, i: int, device) -> torch.Tensor:
    """int32 (G, 3) rows (col_start, col_end, k_end): frozen groups, then the newest group.

    Cached per layout and device: no host-to-device copy on the hot path.
    """
    key = (tuple(frozen_out_groups), tuple(frozen_k_ends), i_f, o_new, i, str(device))
    tab = _TABLES.get(key)
    if tab is None:
        rows, start = [], 0
        for width, k_end in zip(frozen_out_groups, frozen_k_ends):
            if not 0 <= k_end <= i_f:
                raise ValueError(f"frozen k_end {k_end} outside [0, {i_f}]")
            rows.append((start, start + width, k_end))
            start += width
        rows.append((start, start + o_new, i))
        tab = torch.tensor(rows, dtype=torch.int32, device=device)
        _TABLES[key] = tab
    return tab


def band_ends(frozen_out_groups: Sequence[int], frozen_k_ends: Sequence[int], i_f: int,
              need_old: bool) -> Tuple[int, ...]:
    """Where the dx kernels cut the old input columns [0, I_f) into bands tiled apart: at
    every k_end of a frozen group with rows when the old columns are computed (a group then
    reaches all of a tile's columns or none), else one band of zeros."""
    inner = {int(k) for rows, k in zip(frozen_out_groups, frozen_k_ends)
             if rows and 0 < k < i_f} if need_old else set()
    return tuple(sorted(inner)) + (int(i_f),)


def band_tiles(bands: Sequence[int], block: int) -> int:
    """How many tiles of ``block`` columns the bands make (each tiled on its own)."""
    return sum(triton.cdiv(e - s, block) for s, e in zip((0,) + tuple(bands[:-1]), bands))


def band_table(bands: Sequence[int], device) -> torch.Tensor:
    """int32 band ends on the device, cached like the group table."""
    key = ("bands", tuple(bands), str(device))
    t = _TABLES.get(key)
    if t is None:
        t = torch.tensor(list(bands), dtype=torch.int32, device=device)
        _TABLES[key] = t
    return t


def _precision(dtype: torch.dtype) -> str:
    # fp32 uses tensor-core tf32 only when torch itself allows it for matmuls.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _check(x: torch.Tensor, *ws: Optional[torch.Tensor]):
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D input, got shape {tuple(x.shape)}")
    for w in ws:
        if w is not None and w.dtype != x.dtype:
            raise TypeError(f"dtype mismatch: {w.dtype} vs input {x.dtype}")
        if w is not None and w.device != x.device:
            raise ValueError(f"device mismatch: {w.device} vs input {x.device}")


def _unit_k(w: torch.Tensor) -> torch.Tensor:
    return w if w.stride(1) == 1 or w.shape[1] <= 1 else w.contiguous()


def _grid2(m, n):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * n(meta),)


def linear_forward(x: torch.Tensor, w_frozen: torch.Tensor, b_frozen: Optional[torch.Tensor],
                   w_new: torch.Tensor, b_new: Optional[torch.Tensor],
                   w_couple: Optional[torch.Tensor], frozen_out_groups: Sequence[int],
                   frozen_k_ends: Sequence[int], activation: Optional[str] = None,
                   pre: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y (N, O_f + o_new) = staircase(x) + bias, then ``activation``, in one launch.

    ``pre`` (N, P), if given, receives the pre-activation of y's last P columns."""
    _check(x, w_frozen, b_frozen, w_new, b_new, w_couple)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    n, i = x.shape
    o_f, i_f = w_frozen.shape
    o_new = w_new.shape[0]
    if w_new.shape[1] != i or sum(frozen_out_groups) != o_f:
        raise ValueError("w_new / w_frozen / frozen_out_groups do not match x")
    y = torch.empty((n, o_f + o_new), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    couple = w_couple is not None and w_couple.shape[1] > 0 and o_f > 0
    wc = w_couple if couple else w_new  # any valid pointer; unused unless HAS_COUPLE
    # The kernel picks w_frozen or w_new per tile; a shared unit K stride keeps that a
    # pointer choice only (weights are parameters: contiguous already, no copy).
    w_frozen, w_new = _unit_k(w_frozen), _unit_k(w_new)
    has_pre = pre is not None and pre.shape[1] > 0
    if has_pre and (pre.shape[0] != n or pre.shape[1] > o_f + o_new or pre.stride(1) != 1
                    or pre.dtype != x.dtype):
        raise ValueError(f"pre must be a row-major ({n}, <= {o_f + o_new}) {x.dtype} tensor, "
                         f"got {tuple(pre.shape)} {pre.dtype} with strides {pre.stride()}")
    tab = group_table(frozen_out_groups, frozen_k_ends, i_f, o_new, i, x.device)
    widths = list(frozen_out_groups) + [o_new]
    grid = _grid2(n, lambda meta: sum(triton.cdiv(w, meta["BLOCK_N"]) for w in widths))
    p0 = o_f + o_new - (pre.shape[1] if has_pre else 0)
    meta = dict(HAS_BF=b_frozen is not None and o_f > 0, HAS_BN=b_new is not None and o_new > 0,
                HAS_COUPLE=couple, ACT=ACTIVATIONS[activation], HAS_PRE=has_pre,
                COL_VEC=multiple_of_all(list(itertools.accumulate(widths)) + [p0]),
                PREC=_precision(x.dtype))
    tma = _tma()
    if tma.usable(x, w_frozen, w_new, w_couple if couple else None) and tma.forward(
            x, w_frozen, w_new, w_couple, b_frozen, b_new, y, tab, pre if has_pre else None,
            p0, grid, **meta):
        return y
    launch(
        _fwd_kernel, grid, x, w_frozen, w_new, wc, b_frozen if b_frozen is not None else y,
        b_new if b_new is not None else y, y, tab, pre if has_pre else y,
        n, o_f + o_new, i, i_f, o_f, len(widths), p0,
        x.stride(0), x.stride(1), w_frozen.stride(0), w_new.stride(0),
        wc.stride(0), wc.stride(1), y.stride(0), y.stride(1),
        pre.stride(0) if has_pre else 0,
        K_VEC=multiple_of_all(list(frozen_k_ends) + [i, i_f]), **meta)
    return y


_TMA_MODULE = None


def _tma():
    # imported at first use (it imports this module), then kept: this runs on every call
    global _TMA_MODULE
    if _TMA_MODULE is None:
        from . import expanded_linear_tma
        _TMA_MODULE = expanded_linear_tma
    return _TMA_MODULE


def _auto_split(r: int, c: int, m: int, device: torch.device) -> int:
    """Split the row reduction when dW has too few tiles to fill the GPU (a skinny dW_new
    over many rows is the common case: few new units, long batch)."""
    if INTERPRET or device.type != "cuda" or m < 4096:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(r, 128) * max(triton.cdiv(c, 128), 1)
    return max(1, min(triton.cdiv(2 * sms, tiles), m // 2048, 32))


def grad_weight(a: torch.Tensor, b: torch.Tensor, with_colsum: bool = False,
                split_k: Optional[int] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(a^T b, a.sum(0) if with_colsum) for a (M, R), b (M, C), fp32 accumulation.

    dW_new = grad_weight(dy_new, x); dW_couple = grad_weight(dy_old, x_new).  ``split_k``
    (default: chosen from the sizes) > 1 splits the M reduction: each split writes fp32
    partial sums, added up by one small torch reduction.
    """
    _check(a, b)
    m, r = a.shape
    c = b.shape[1]
    if b.shape[0] != m:
        raise ValueError(f"row mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if r == 0 or (c == 0 and not with_colsum) or m == 0:  # empty: no launch
        return (a.new_zeros((r, c)), a.new_zeros((r,)) if with_colsum else None)
    split = split_k or _auto_split(r, c, m, a.device)
    # Rows per split: a multiple of 256, so of every BLOCK_K (full tiles until the last).
    chunk = triton.cdiv(triton.cdiv(m, split), 256) * 256 if split > 1 else m
    split = triton.cdiv(m, chunk)
    out_dtype = a.dtype if split == 1 else torch.float32
    dw = torch.empty((split, r, c), dtype=out_dtype, device=a.device)
    db = torch.empty((split, r), dtype=out_dtype, device=a.device) if with_colsum else None
    dbp = db if db is not None else dw  # any valid pointer; unused unless HAS_DB

    def grid(meta):
        return (triton.cdiv(r, meta["BLOCK_M"]) * max(triton.cdiv(c, meta["BLOCK_N"]), 1),
                split)

    meta = dict(HAS_DB=with_colsum, PREC=_precision(a.dtype))
    tma = _tma()
    if not (c > 0 and tma.usable(a, b) and tma.grad_weight(a, b, dw, db, chunk, grid, **meta)):
        launch(_dw_kernel, grid, a, b, dw, dbp, r, c, m, chunk,
               a.stride(0), a.stride(1), b.stride(0), b.stride(1),
               dw.stride(0), dw.stride(1), dw.stride(2), dbp.stride(0),
               db.stride(1) if db is not None else 0,
               K_VEC=multiple_of_all([m, chunk]), **meta)
    if split == 1:
        return dw[0], None if db is None else db[0]
    return dw.sum(0).to(a.dtype), None if db is None else db.sum(0).to(a.dtype)


def grad_input(dy: torch.Tensor, w_frozen: torch.Tensor, w_new: torch.Tensor,
               w_couple: Optional[torch.Tensor], frozen_out_groups: Sequence[int],
               frozen_k_ends: Sequence[int], need_dx_old: bool) -> torch.Tensor:
    """dx (N, I): new-input columns always; old-input columns computed only when
    ``need_dx_old``, else written as zeros by the same launch."""
    _check(dy, w_frozen, w_new, w_couple)
    n = dy.shape[0]
    o_f, i_f = w_frozen.shape
    o_new, i = w_new.shape
    if dy.shape[1] != o_f + o_new:
        raise ValueError(f"dy has {dy.shape[1]} columns, expected {o_f + o_new}")
    dx = torch.empty((n, i), dtype=dy.dtype, device=dy.device)
    if dx.numel() == 0:
        return dx
    couple = w_couple is not None and w_couple.shape[1] > 0 and o_f > 0
    wc = w_couple if couple else w_new
    tab = group_table(frozen_out_groups, frozen_k_ends, i_f, o_new, i, dy.device)
    bands = band_ends(frozen_out_groups, frozen_k_ends, i_f, need_dx_old)
    grid = _grid2(n, lambda meta: band_tiles(bands, meta["BLOCK_N"])
                  + triton.cdiv(i - i_f, meta["BLOCK_N"]))
    meta = dict(NEED_OLD=bool(need_dx_old), HAS_COUPLE=couple, PREC=_precision(dy.dtype),
                K_VEC=multiple_of_all(list(itertools.accumulate(frozen_out_groups))
                                      + [o_f, o_new] + list(frozen_k_ends)),
                COL_VEC=multiple_of_all(bands + (i,)))
    bands_t = band_table(bands, dy.device)
    tma = _tma()
    if dx.stride(1) == 1 \
            and tma.grad_input_usable(dy, w_frozen, w_new, w_couple if couple else None,
                                      list(frozen_out_groups), list(frozen_k_ends),
                                      need_dx_old, bands) \
            and tma.grad_input(dy, w_frozen, w_new, w_couple if couple else None, dx, tab,
                               bands_t, grid, **meta):
        return dx
    launch(_dx_kernel, grid, dy, w_frozen, w_new, wc, dx, tab, bands_t,
           n, i, i_f, o_f, o_new, tab.shape[0], len(bands),
           dy.stride(0), dy.stride(1), w_frozen.stride(0), w_frozen.stride(1),
           w_new.stride(0), w_new.stride(1), wc.stride(0), wc.stride(1),
           dx.stride(0), dx.stride(1), **meta)
    return dx
