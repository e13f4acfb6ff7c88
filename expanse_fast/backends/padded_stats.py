"""A folded BatchNorm's frozen statistics lengthened by stand-ins for the newest channels,
in three ops per call instead of eight.

The torch backend runs aten's BatchNorm over a conv's whole output (the frozen channels'
bits depend on that kernel), so each call needs the frozen mean, var, weight and bias
padded to the output's channel count.  A fill and a cat per tensor cost eight launches per
layer and call on a GPU, where they pace an eager step of small layers.  Here the present
tensors are stacked, one cat appends a block of stand-ins, and the rows come back as views.

Only the stand-in block is kept between calls: it depends on nothing the user can change
(its length, dtype and device), so no cached value can go stale.  The frozen statistics
themselves are read anew every call.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

Maybe = Optional[Tensor]
STAND_INS = (0.0, 1.0, 1.0, 0.0)  # mean, var, weight, bias of the newest channels (unread)
_BLOCKS: Dict[tuple, Tensor] = {}
MAX_BLOCKS = 256  # distinct (values, length, dtype, device) kept; more are made per call


def pad(stats: Sequence[Maybe], n_new: int) -> Tuple[Maybe, ...]:
    """(mean, var, weight, bias) each lengthened by ``n_new`` stand-ins (None stays None)."""
    present = [(t, v) for t, v in zip(stats, STAND_INS) if t is not None]
    if not present:
        return tuple(stats)
    first = present[0][0]
    block = _stand_ins(tuple(v for _, v in present), n_new, first.dtype, first.device)
    rows = torch.cat([torch.stack([t for t, _ in present]), block], dim=1).unbind(0)
    it = iter(rows)
    return tuple(None if t is None else next(it) for t in stats)


def _stand_ins(values: Tuple[float, ...], n_new: int, dtype: torch.dtype,
               device: torch.device) -> Tensor:
    """(len(values), n_new): row i all ``values[i]``; made once per kind where that is safe."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())):
        # (what a compiler traces or a capture records holds no values yet)
        return _make(values, n_new, dtype, device)
    key = (values, n_new, dtype, device)
    block = _BLOCKS.get(key)
    if block is None:
        block = _make(values, n_new, dtype, device)
        if len(_BLOCKS) < MAX_BLOCKS:  # (never freed: another stream may be reading one)
            if device.type == "cuda":  # written before any stream can read it
                torch.cuda.current_stream(device).synchronize()
            _BLOCKS[key] = block
    return block


def _make(values, n_new, dtype, device) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device)[:, None].expand(
        len(values), n_new).contiguous()
