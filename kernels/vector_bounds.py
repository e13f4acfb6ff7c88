"""Vector-sized bounds for the kernels' masks.

A mask compared with a bound the compiler cannot see (a value from a group table, or any
run-time channel count) differs element by element as far as it knows, so every masked
load or store becomes a 2-byte one, and a 2-byte access needs a register for its value and
one for its address: the kernels spill and stop pipelining.  When every bound is a
multiple of V (checked here, on the host), ``i // V < bound // V`` is the same mask, and
the compiler sees it constant over V contiguous elements: whole 16-byte vectors.
"""
from typing import Iterable


def multiple_of_all(bounds: Iterable[int]) -> int:
    """The largest of 16, 8, 1 that divides every bound (an empty set: 16)."""
    bounds = [int(b) for b in bounds]
    return next(v for v in (16, 8, 1) if all(b % v == 0 for b in bounds))
