"""FLOP formulas of the custom ops for ``torch.utils.flop_counter.FlopCounterMode``.

A custom op is opaque to the counter: without a formula, a compiled model (which calls the
ops) or ``EXPANSE_FAST_CUSTOM_OPS=1`` counted nothing for the expanded layers.  Each formula
counts what the op computes (2 FLOPs a multiply-add, as the counter's matmul formula does):
the blocks that are not zero, and in backward only the gradients asked for.  The formulas
get the ops' arguments with every tensor replaced by its shape.
"""
from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from .backends.torch_ref import conv_out_size


def _rows(shape) -> int:
    return math.prod(shape[:-1])


def _frozen_macs(frozen_out_groups, frozen_k_ends) -> int:
    return sum(o * k for o, k in zip(frozen_out_groups, frozen_k_ends))


def _coupled_in(w_couple) -> int:
    return w_couple[1] if w_couple is not None else 0


def linear_forward_macs(x, w_frozen, w_new, w_couple, frozen_out_groups, frozen_k_ends) -> int:
    per_row = (_frozen_macs(frozen_out_groups, frozen_k_ends) + w_new[0] * x[-1]
               + w_frozen[0] * _coupled_in(w_couple))
    return _rows(x) * per_row


def backward_macs_per_row(i, i_f, o_f, o_new, coupled_in, frozen, need_dx_new, need_dx_old,
                          need_dw, need_dcouple) -> int:
    """Multiply-adds per row (per output pixel and kernel tap for a conv) of a backward."""
    macs = o_new * i if need_dw else 0
    if need_dcouple:
        macs += o_f * coupled_in
    if need_dx_new or need_dx_old:
        macs += o_new * (i - i_f) + o_f * coupled_in
    if need_dx_old:
        macs += o_new * i_f + frozen
    return macs


@register_flop_formula(torch.ops.expanse_fast.linear)
def _linear_flops(x, w_frozen, b_frozen, w_new, b_new, w_couple, frozen_out_groups,
                  frozen_k_ends, *args, out_val=None, **kwargs) -> int:
    return 2 * linear_forward_macs(x, w_frozen, w_new, w_couple, frozen_out_groups,
                                   frozen_k_ends)


@register_flop_formula(torch.ops.expanse_fast.linear_backward)
def _linear_backward_flops(dy, x, w_frozen, w_new, w_couple, frozen_out_groups, frozen_k_ends,
                           need_dx_new, need_dx_old, need_dw, need_db, need_dcouple,
                           *args, out_val=None, **kwargs) -> int:
    per_row = backward_macs_per_row(
        x[-1], w_frozen[1], w_frozen[0], w_new[0], _coupled_in(w_couple),
        _frozen_macs(frozen_out_groups, frozen_k_ends), need_dx_new, need_dx_old, need_dw,
        need_dcouple and w_couple is not None)
    return 2 * _rows(dy) * per_row


def _pixels(x, w_new, stride, padding, dilation) -> int:
    """Output pixels of the conv over all images."""
    kh, kw = w_new[2], w_new[3]
    return (x[0] * conv_out_size(x[2], kh, stride[0], padding[0], dilation[0])
            * conv_out_size(x[3], kw, stride[1], padding[1], dilation[1]))


@register_flop_formula(torch.ops.expanse_fast.conv2d)
def _conv2d_flops(x, w_frozen, b_frozen, w_new, b_new, w_couple, frozen_out_groups,
                  frozen_k_ends, stride, padding, dilation, depthwise, *args, out_val=None,
                  **kwargs) -> int:
    taps = w_new[2] * w_new[3]
    if depthwise:  # each output channel reads one input channel
        per_pixel = (w_frozen[0] + w_new[0]) * taps
    else:
        per_pixel = taps * (_frozen_macs(frozen_out_groups, frozen_k_ends) + w_new[0] * x[1]
                            + w_frozen[0] * _coupled_in(w_couple))
    return 2 * _pixels(x, w_new, stride, padding, dilation) * per_pixel


@register_flop_formula(torch.ops.expanse_fast.conv2d_backward)
def _conv2d_backward_flops(dy, x, w_frozen, w_new, w_couple, frozen_out_groups, frozen_k_ends,
                           stride, padding, dilation, depthwise, need_dx_new, need_dx_old,
                           need_dw, need_db, need_dcouple, *args, out_val=None,
                           **kwargs) -> int:
    taps = w_new[2] * w_new[3]
    pixels = dy[0] * dy[2] * dy[3]
    if depthwise:
        o_f, o_new = w_frozen[0], w_new[0]
        per_pixel = (o_new if need_dw else 0) + (o_new if need_dx_new or need_dx_old else 0) \
            + (o_f if need_dx_old else 0)
    else:
        per_pixel = backward_macs_per_row(
            x[1], w_frozen[1], w_frozen[0], w_new[0], _coupled_in(w_couple),
            _frozen_macs(frozen_out_groups, frozen_k_ends), need_dx_new, need_dx_old,
            need_dw, need_dcouple and w_couple is not None)
    return 2 * pixels * taps * per_pixel
