"""Group arithmetic of an expanded layer: the one place that knows the staircase.

A layer's input features (or channels) and outputs are split into groups: group 0 is the
pretrained width, group t the units added by the t-th expansion.  Tensors are stored as

* ``w_frozen``  (O_f, I_f): every output group but the newest, over every input group but
  the newest.  In the isolated layout frozen output group g reads only input groups 0..g
  (its columns past ``k_end[g]`` are zeros that kernels never read); in the coupled layout
  every frozen row reads all of I_f.
* ``w_new``     (o_T, I): the newest output group, reading every input group.  Trainable.
* ``w_couple``  (O_f, i_T): coupled layout only: old outputs reading the newest inputs,
  trainable, initialised at zero.

``O_f = sum(out_groups[:-1])``, ``I_f = sum(in_groups[:-1])``, ``I = sum(in_groups)``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from itertools import accumulate
from typing import Tuple

MODES = ("isolated", "coupled")


def width(value, name: str, least: int = 0) -> int:
    """A group's width, or any count: an int >= ``least`` (a float or a bool would be
    truncated without a word)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")
    return int(value)


def check_groups(name: str, groups) -> Tuple[int, ...]:
    """A tuple of group widths: at least one, each an int >= 0."""
    groups = tuple(groups)
    if not groups:
        raise ValueError(f"{name} must hold at least one group, got ()")
    return tuple(width(g, f"{name} widths ({groups})") for g in groups)


_DERIVED = ("_in_features", "_out_features", "_frozen_in", "_frozen_out", "_frozen_k_ends")


@dataclass(frozen=True)
class Layout:
    """Widths of every input and output group of one expanded layer, and its mode."""

    in_groups: Tuple[int, ...]
    out_groups: Tuple[int, ...]
    mode: str = "isolated"

    def __post_init__(self):
        object.__setattr__(self, "in_groups", check_groups("in_groups", self.in_groups))
        object.__setattr__(self, "out_groups", check_groups("out_groups", self.out_groups))
        if len(self.in_groups) != len(self.out_groups):
            raise ValueError(
                f"in_groups {self.in_groups} and out_groups {self.out_groups} must have the "
                "same number of groups (one per task)")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        # The layout is immutable and every forward of its layer reads these: computed once.
        # (Not functools.cached_property: its lock stops torch.compile's tracing.)
        frozen_in = sum(self.in_groups[:-1])
        k_ends = (tuple(frozen_in for _ in self.out_groups[:-1]) if self.mode == "coupled"
                  else tuple(accumulate(self.in_groups))[: len(self.in_groups) - 1])
        for name, value in zip(_DERIVED, (sum(self.in_groups), sum(self.out_groups), frozen_in,
                                          sum(self.out_groups[:-1]), k_ends)):
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str):
        # Only for names the instance lacks: a layout pickled (torch.save of a whole model)
        # before the derived sizes were stored computes them on first use.
        if name in _DERIVED and "in_groups" in self.__dict__:
            self.__post_init__()
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ---- sizes -------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return len(self.in_groups)

    @property
    def in_features(self) -> int:
        return self._in_features

    @property
    def out_features(self) -> int:
        return self._out_features

    @property
    def frozen_in(self) -> int:
        """I_f: input width read by frozen rows at most (all groups but the newest)."""
        return self._frozen_in

    @property
    def frozen_out(self) -> int:
        """O_f: number of frozen output units."""
        return self._frozen_out

    @property
    def new_in(self) -> int:
        return self.in_groups[-1]

    @property
    def new_out(self) -> int:
        return self.out_groups[-1]

    @property
    def frozen_out_groups(self) -> Tuple[int, ...]:
        return self.out_groups[:-1]

    @property
    def frozen_k_ends(self) -> Tuple[int, ...]:
        """For each frozen output group, how many leading input features it reads."""
        return self._frozen_k_ends

    def in_offsets(self) -> Tuple[int, ...]:
        return (0,) + tuple(accumulate(self.in_groups))

    def out_offsets(self) -> Tuple[int, ...]:
        return (0,) + tuple(accumulate(self.out_groups))

    # ---- growth ------------------------------------------------------------------------
    def expanded(self, new_in: int, new_out: int) -> "Layout":
        """Layout after one more expansion (the current newest group becomes frozen)."""
        return Layout(self.in_groups + (width(new_in, "new_in"),),
                      self.out_groups + (width(new_out, "new_out"),), self.mode)

    def task(self, k: int) -> "Layout":
        """Layout of the model as it stood after task k (groups 0..k)."""
        if (isinstance(k, bool) or not isinstance(k, numbers.Integral)
                or not 0 <= k < self.num_groups):
            raise ValueError(f"task must be an int in 0..{self.num_groups - 1}, got {k!r}")
        return Layout(self.in_groups[: k + 1], self.out_groups[: k + 1], self.mode)

    # ---- work counts (DESIGN.md section 2) -----------------------------------------------
    def forward_macs(self) -> int:
        """Multiply-adds per row (per output pixel for a conv, times kernel area)."""
        macs = sum(o * k for o, k in zip(self.frozen_out_groups, self.frozen_k_ends))
        macs += self.new_out * self.in_features
        if self.mode == "coupled":
            macs += self.frozen_out * self.new_in
        return macs

    def backward_macs(self, need_input_grad: bool = True, need_old_input_grad: bool = False) -> int:
        """Multiply-adds per row of the backward pass: trainable dW, and dx where asked."""
        macs = self.new_out * self.in_features  # dW_new
        if self.mode == "coupled":
            macs += self.frozen_out * self.new_in  # dW_couple
        if need_input_grad:
            macs += self.new_out * self.new_in  # dx_new from the new rows
            if self.mode == "coupled":
                macs += self.frozen_out * self.new_in  # dx_new through the coupling block
            if need_old_input_grad:
                macs += self.new_out * self.frozen_in
                macs += sum(o * k for o, k in zip(self.frozen_out_groups, self.frozen_k_ends))
        return macs

    def dense_macs(self) -> int:
        """A masked dense layer of the full width: forward, dW and dx."""
        return 3 * self.out_features * self.in_features
