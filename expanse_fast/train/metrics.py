"""Continual-learning metrics from an accuracy matrix.

``R[i][j]`` is the accuracy on task j after training on tasks 0..i (T tasks, T x T).

- ACC = mean_j R[T-1][j]                                   (Lopez-Paz & Ranzato 2017)
- BWT = mean_{j<T-1} (R[T-1][j] - R[j][j])                 (same; negative = forgetting)
- FWT = mean_{j>0} (R[j-1][j] - b[j]), b[j] the accuracy of an untrained model on task j
- forgetting = mean_{j<T-1} (max_{l<T-1} R[l][j] - R[T-1][j])  (Chaudhry et al. 2018)

The metrics are in the units of R (fractions or percent, whichever is given).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np


def _matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"R must be a non-empty square T x T matrix, got shape {R.shape}")
    return R


def cl_metrics(R, b: Optional[Sequence[float]] = None) -> Dict[str, Optional[float]]:
    """ACC, BWT, FWT and forgetting of accuracy matrix ``R`` (see the module docstring).

    BWT, FWT and forgetting need two tasks or more (None otherwise); FWT also needs ``b``.
    """
    R = _matrix(R)
    T = R.shape[0]
    out: Dict[str, Optional[float]] = {"ACC": float(R[-1].mean()), "BWT": None, "FWT": None,
                                       "forgetting": None}
    if T < 2:
        return out
    old = np.arange(T - 1)
    out["BWT"] = float((R[-1, old] - R[old, old]).mean())
    # Chaudhry et al.: the best accuracy task j ever had before the last task, minus now.
    out["forgetting"] = float((R[:-1, old].max(axis=0) - R[-1, old]).mean())
    if b is not None:
        b = np.asarray(b, dtype=np.float64)
        if b.shape != (T,):
            raise ValueError(f"b must hold one accuracy per task ({T}), got shape {b.shape}")
        later = np.arange(1, T)
        out["FWT"] = float((R[later - 1, later] - b[later]).mean())
    return out
