"""ExpandedLinear: a drop-in widened ``nn.Linear``."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .. import ops
from ..layout import Layout
from .blocks import ExpandedBlocks, init_new_rows, refuse_not_widenable
from .input_grad import skips_old_input_grad


class ExpandedLinear(ExpandedBlocks):
    """A Linear layer whose inputs and outputs are split into groups (DESIGN.md section 2).

    Output group g reads input groups 0..g (isolated layout) and only the newest output
    group is trainable.  ``skip_old_input_grad`` (set by ``expand()``) skips the gradient
    of the old input features when nothing trainable lies behind them (unless the model's
    input requires grad: ``expanse_fast.nn.input_grad``).  ``activation``
    ("relu", "gelu", "gelu_tanh", "silu") fuses the activation module that follows the layer
    into it (``expand()`` does this and leaves a :class:`FusedReLU`, :class:`FusedGELU` or
    :class:`FusedSiLU` in the module's place).
    """

    def __init__(self, in_groups: Sequence[int], out_groups: Sequence[int], bias: bool = True,
                 mode: str = "isolated", device=None, dtype=None, activation: str = ""):
        super().__init__()
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"activation must be one of {ops.ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        lay = Layout(tuple(in_groups), tuple(out_groups), mode)
        kw = {"device": device, "dtype": dtype}
        w_frozen = torch.zeros(lay.frozen_out, lay.frozen_in, **kw)
        w_new = init_new_rows(torch.empty(lay.new_out, lay.in_features, **kw), lay.in_features)
        w_couple = torch.zeros(lay.frozen_out, lay.new_in, **kw) if mode == "coupled" else None
        b_frozen = torch.zeros(lay.frozen_out, **kw) if bias else None
        b_new = torch.zeros(lay.new_out, **kw) if bias else None
        self._set_blocks(lay, w_frozen, b_frozen, w_new, b_new, w_couple)
        self.skip_old_input_grad = False
        self.backend: Optional[str] = None  # None: follow xf.set_backend

    @classmethod
    def from_linear(cls, linear: nn.Linear, new_in: int = 0, new_out: int = 0,
                    mode: str = "isolated") -> "ExpandedLinear":
        """Widen a trained ``nn.Linear``: its weights become the frozen group 0 (copied, so
        ``linear`` itself is left untouched)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        refuse_not_widenable(linear, "from_linear")
        w = linear.weight
        layer = cls((linear.in_features, new_in), (linear.out_features, new_out),
                    bias=linear.bias is not None, mode=mode, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.weight_frozen.copy_(w)
            if linear.bias is not None:
                layer.bias_frozen.copy_(linear.bias)
        return layer

    @property
    def in_features(self) -> int:
        return self.layout.in_features

    @property
    def out_features(self) -> int:
        return self.layout.out_features

    def forward(self, x: Tensor) -> Tensor:
        lay = self.layout
        if not x.dim() or x.shape[-1] != lay.in_features:
            raise ValueError(
                f"ExpandedLinear expected input with {self.in_features} features "
                f"(groups {self.in_groups}) in its last dimension, got shape {tuple(x.shape)}")
        return ops.expanded_linear(
            x, *self._block_tensors(), frozen_out_groups=lay.frozen_out_groups,
            frozen_k_ends=lay.frozen_k_ends, need_dx_old=not skips_old_input_grad(self, x),
            activation=self.activation, backend=self.backend)

    def to_linear(self, task: Optional[int] = None) -> nn.Linear:
        """A plain ``nn.Linear`` computing task ``task``'s outputs (default: all groups); a
        fused activation is not part of it (``source_model`` puts the activation module back)."""
        w, b = self.dense_weight(task), self.dense_bias(task)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device,
                        dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        return lin

    def extra_repr(self) -> str:
        act = f", activation={self.activation!r}" if self.activation else ""
        return (f"in_groups={self.in_groups}, out_groups={self.out_groups}, "
                f"bias={self.bias_new is not None}, mode={self.mode!r}{act}")
