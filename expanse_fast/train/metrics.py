"""Continual-learning metrics from an accuracy matrix.

``R[i][j]`` is the accuracy on task j after training on tasks 0..i (T tasks, T x T).

- ACC = mean_j R[T-1][j]                                   (Lopez-Paz & Ranzato 2017)
- BWT = mean_{j<T-1} (R[T-1][j] - R[j][j])                 (same; negative = forgetting)
- FWT = mean_{j>0} (R[j-1][j] - b[j]), b[j] the accuracy of an untrained model on task j
- forgetting = mean_{j<T-1} (max_{l<T-1} R[l][j] - R[T-1][j])  (Chaudhry et al. 2018)

The metrics are in the units of R (fractions or percent, whichever is given).  Forgetting's
maximum reads the rows before a task was trained too, as the formula does; where those
entries (above the diagonal) were not measured they may be NaN, and the maximum takes the
rows that were.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np


def _matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"R must be a non-empty square T x T matrix, got shape {R.shape}")
    return R


def _finite(values: np.ndarray, cells, what: str, nan_ok=frozenset()) -> None:
    """Refuse a NaN or an infinity among the cells a metric reads (it would pass into the
    metric without a word), naming the first one; a NaN in ``nan_ok`` means not measured."""
    bad = [c for c, v in zip(cells, values)
           if not np.isfinite(v) and not (c in nan_ok and np.isnan(v))]
    if bad:
        raise ValueError(f"{what} is {values[cells.index(bad[0])]} at {bad[0]}: every entry "
                         "the metrics read must be a finite accuracy")


def cl_metrics(R, b: Optional[Sequence[float]] = None) -> Dict[str, Optional[float]]:
    """ACC, BWT, FWT and forgetting of accuracy matrix ``R`` (see the module docstring).

    BWT, FWT and forgetting need two tasks or more (None otherwise); FWT also needs ``b``.
    """
    R = _matrix(R)
    T = R.shape[0]
    if b is not None:
        b = np.asarray(b, dtype=np.float64)
        if b.shape != (T,):
            raise ValueError(f"b must hold one accuracy per task ({T}), got shape {b.shape}")
    # ACC reads the last row; BWT the diagonal too; forgetting every row but the last, in
    # the first T - 1 columns; FWT the entries just above the diagonal (and b)
    read = {(T - 1, j) for j in range(T)} | {(i, j) for i in range(T - 1) for j in range(T - 1)}
    unmeasured = {(i, j) for i in range(T - 1) for j in range(i + 1, T - 1)}  # (forgetting)
    if b is not None:
        read |= {(j - 1, j) for j in range(1, T)}
        unmeasured -= {(j - 1, j) for j in range(1, T)}  # FWT needs these
    cells = sorted(read)
    names = [f"R[{i}][{j}]" for i, j in cells]
    _finite(np.array([R[c] for c in cells]), names, "R",
            nan_ok={f"R[{i}][{j}]" for i, j in unmeasured})
    out: Dict[str, Optional[float]] = {"ACC": float(R[-1].mean()), "BWT": None, "FWT": None,
                                       "forgetting": None}
    if T < 2:
        return out
    old = np.arange(T - 1)
    out["BWT"] = float((R[-1, old] - R[old, old]).mean())
    # Chaudhry et al.: the best accuracy task j ever had before the last task, minus now.
    out["forgetting"] = float((np.nanmax(R[:-1, old], axis=0) - R[-1, old]).mean())
    if b is not None:
        _finite(b[1:], [f"b[{j}]" for j in range(1, T)], "b")
        later = np.arange(1, T)
        out["FWT"] = float((R[later - 1, later] - b[later]).mean())
    return out
