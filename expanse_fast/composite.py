"""The expanded ops as plain differentiable PyTorch ops, for ``torch.func`` transforms,
forward-mode AD and second derivatives.

``torch.func.grad``, ``vmap``, ``jacrev``, ``jvp`` and ``functional_call``-based per-sample
gradients cannot run through custom autograd: the eager ``autograd.Function`` would need a
vmap rule and a forward-mode formula, and the ``torch.library`` ops' generated Function has
no ``setup_context`` (torch <= 2.13 refuses it under any transform, pytorch/pytorch#168393).
So while a transform or a forward-mode AD level is active (:func:`needed`) the layers
compute the same staircase from slices, ``F.linear`` / ``F.conv2d`` and ``torch.cat``, and
autograd differentiates that.  The outputs are the same math as every backend's; the
gradients are exact for whatever the transform differentiates (nothing is skipped: inside
a transform, torch.func decides what is differentiated, not ``requires_grad``).  Otherwise
only the two backwards at the end of this file run here.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends.torch_ref import _conv, _depthwise_frozen_in, _frozen_row_blocks

Maybe = Optional[Tensor]

_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jvp, ...) is running this call."""
    return bool(_transforms_active())


def needed() -> bool:
    """Whether this call must run the composite: under a torch.func transform, or inside
    ``torch.autograd.forward_ad.dual_level()`` (dual tensors need a forward-mode formula,
    which the composite's ops have)."""
    return transforms_active() or torch.autograd.forward_ad._current_level >= 0


_is_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def batched_backward(dy: Tensor) -> bool:
    """Whether a backward runs batched: under a torch.func transform, or on the batched
    gradients of ``torch.autograd.grad(..., is_grads_batched=True)`` (torch's older vmap)."""
    if transforms_active():
        return True
    return bool(_is_legacy_batched(dy))


def activate(y: Tensor, activation: str) -> Tensor:
    """The fused ``activation`` applied out of place (the same aten kernels as the
    in-place epilogue of the torch backend)."""
    if activation == "relu":
        return F.relu(y)
    if activation in ("gelu", "gelu_tanh"):
        return F.gelu(y, approximate="none" if activation == "gelu" else "tanh")
    if activation == "silu":
        return F.silu(y)
    return y


def _part(b: Maybe, r0: int, r1: int) -> Maybe:
    return None if b is None else b[r0:r1]


def linear(x: Tensor, w_frozen: Tensor, b_frozen: Maybe, w_new: Tensor, b_new: Maybe,
           w_couple: Maybe, frozen_out_groups: Sequence[int], frozen_k_ends: Sequence[int],
           activation: str = "") -> Tensor:
    """y (..., O_f + o_new) of x (..., I): each frozen output group over the inputs it
    reads (plus the coupling block over the newest inputs), then the newest rows."""
    i_f = w_frozen.shape[1]
    coupled = w_couple is not None and w_couple.shape[1] > 0
    parts = []
    for r0, r1, k in _frozen_row_blocks(frozen_out_groups, frozen_k_ends):
        y = F.linear(x[..., :k], w_frozen[r0:r1, :k], _part(b_frozen, r0, r1))
        if coupled:
            y = y + F.linear(x[..., i_f:], w_couple[r0:r1])
        parts.append(y)
    parts.append(F.linear(x, w_new, b_new))
    return activate(torch.cat(parts, dim=-1), activation)


def conv2d(x: Tensor, w_frozen: Tensor, b_frozen: Maybe, w_new: Tensor, b_new: Maybe,
           w_couple: Maybe, frozen_out_groups: Sequence[int], frozen_k_ends: Sequence[int],
           stride, padding, dilation, depthwise: bool, frozen_bn=None) -> Tensor:
    """The expanded convolution of x (N, C, H, W), the frozen channels through the folded
    eval-mode BatchNorm ``frozen_bn`` = (mean, var, weight, bias, eps) when given."""
    def conv(inp, w, b, groups=1):
        return _conv(inp, w, b, stride, padding, dilation, groups)

    if depthwise:
        c_f = _depthwise_frozen_in(frozen_k_ends)
        c_new = x.shape[1] - c_f
        parts = [conv(x[:, :c_f], w_frozen, b_frozen, c_f)] if c_f else []
        if c_new:
            parts.append(conv(x[:, c_f:], w_new, b_new, c_new))
        if not parts:
            raise ValueError("depthwise conv with no channels")
    else:
        i_f = w_frozen.shape[1]
        coupled = w_couple is not None and w_couple.shape[1] > 0
        parts = []
        for r0, r1, k in _frozen_row_blocks(frozen_out_groups, frozen_k_ends):
            y = conv(x[:, :k], w_frozen[r0:r1, :k], _part(b_frozen, r0, r1))
            if coupled:
                y = y + conv(x[:, i_f:], w_couple[r0:r1], None)
            parts.append(y)
        if w_new.shape[0] or not parts:
            parts.append(conv(x, w_new, b_new))
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    o_f = w_frozen.shape[0]
    if frozen_bn is None or not o_f:
        return y
    mean, var, weight, bias, eps = frozen_bn
    frozen = F.batch_norm(y[:, :o_f], mean, var, weight, bias, False, 0.0, eps)
    return torch.cat([frozen, y[:, o_f:]], dim=1)


# ---- backward, batched or differentiable ----------------------------------------------------
# Two backwards the kernels cannot give: a batched one (torch.autograd.grad(...,
# is_grads_batched=True), behind torch.autograd.functional.jacobian(vectorize=True), runs
# the eager layers' backward under torch's older vmap, where the backends' out= GEMMs have no
# batching rule), and a differentiable one (create_graph=True, for a gradient penalty, a
# second-order meta-gradient, a Hessian-vector product).  Both take torch.func.vjp of the
# composite forward above, which is made of differentiable, batchable ops.
def _pullback(forward, dy: Tensor, x: Tensor, w_new: Tensor, b_new: Maybe, w_couple: Maybe):
    """(dx, dw_new, db_new, dcouple) of ``forward(x, w_new, b_new, w_couple)`` at dy; None
    for an absent tensor."""
    primals = [x, w_new, b_new, w_couple]
    present = [i for i, t in enumerate(primals) if t is not None]

    def of_present(*tensors):
        args = list(primals)
        for i, t in zip(present, tensors):
            args[i] = t
        return forward(*args)

    _, pull = torch.func.vjp(of_present, *(primals[i] for i in present))
    grads = [None] * len(primals)
    for i, g in zip(present, pull(dy)):
        grads[i] = g
    return tuple(grads)


def linear_vjp(dy: Tensor, x: Tensor, w_frozen: Tensor, b_frozen: Maybe, w_new: Tensor,
               b_new: Maybe, w_couple: Maybe, frozen_out_groups: Sequence[int],
               frozen_k_ends: Sequence[int], activation: str = ""):
    """(dx, dw_new, db_new, dcouple) of the expanded linear, its activation included."""
    def forward(x, w_new, b_new, w_couple):
        return linear(x, w_frozen, b_frozen, w_new, b_new, w_couple, frozen_out_groups,
                      frozen_k_ends, activation)
    return _pullback(forward, dy, x, w_new, b_new, w_couple)


def conv2d_vjp(dy: Tensor, x: Tensor, w_frozen: Tensor, w_new: Tensor, with_bias: bool,
               w_couple: Maybe, frozen_out_groups: Sequence[int], frozen_k_ends: Sequence[int],
               stride, padding, dilation, depthwise: bool):
    """(dx, dw_new, db_new, dcouple) of the expanded conv2d (no folded BatchNorm: the caller
    scales dy's frozen channels); ``with_bias``: whether to form db_new."""
    def forward(x, w_new, b_new, w_couple):
        return conv2d(x, w_frozen, None, w_new, b_new, w_couple, frozen_out_groups,
                      frozen_k_ends, stride, padding, dilation, depthwise)
    b_new = w_new.new_zeros(w_new.shape[0]) if with_bias else None  # its value enters no
    return _pullback(forward, dy, x, w_new, b_new, w_couple)       # gradient
