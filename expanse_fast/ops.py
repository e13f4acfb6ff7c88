"""The op registry: ``torch.library`` custom ops for the expanded linear and conv2d, their
fake (meta) implementations for ``torch.compile``, their autograd, and backend dispatch.

Frozen tensors never take part in autograd: backward returns None for them and never forms
their gradient.  ``need_dx_old`` says whether the gradient of the old input features is
wanted: ``expand()`` turns it off for isolated layers whose old inputs come from the frozen
path (then those columns of dx are zeros that nobody reads).

The conv2d op can fold an eval-mode BatchNorm into its frozen output channels
(``bn_mean``, ``bn_var``, ``bn_weight``, ``bn_bias``, ``bn_eps``: the frozen channels'
statistics and affine, length O_f, all frozen): those channels come out as
``(conv - mean) / sqrt(var + eps) * weight + bias``.  Its backward op takes the map's
derivative ``bn_scale`` and applies it to the frozen columns of dy only where it reads them.

Public functional forms: :func:`expanded_linear` and :func:`expanded_conv2d` (they check
their arguments, then call the custom ops ``torch.ops.expanse_fast.*``).  Under a
``torch.func`` transform they compute the composite of ``composite.py`` instead, and a
batched backward (``is_grads_batched``) or a differentiable one (``create_graph=True``)
takes its gradients from there too.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import backend_choice, composite
from .backends import torch_ref
from .backends.torch_ref import (ACTIVATIONS, SMOOTH_ACTIVATIONS, conv_memory_format,
                                 reads_frozen_dy)

LIB = "expanse_fast"
_EMPTY = (0,)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    # Custom ops return tensors, never None: an unneeded gradient travels as an empty tensor.
    return like.new_empty(_EMPTY) if t is None else t


def _fake_grads(dy, x, w_new, w_couple, need_dx, need_dw, need_db, need_dcouple,
                dx_format=torch.contiguous_format):
    # one fresh empty tensor per unneeded gradient: outputs of an op never alias each other
    empty = lambda: dy.new_empty(_EMPTY)  # noqa: E731
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=dx_format)
            if need_dx else empty(),
            w_new.new_empty(w_new.shape) if need_dw else empty(),
            w_new.new_empty((w_new.shape[0],)) if need_db else empty(),
            w_couple.new_empty(w_couple.shape) if (need_dcouple and w_couple is not None)
            else empty())


# ---------------------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------------------
def _linear_impl(x: Tensor, w_frozen: Tensor, b_frozen: Optional[Tensor], w_new: Tensor,
            b_new: Optional[Tensor], w_couple: Optional[Tensor], frozen_out_groups: List[int],
            frozen_k_ends: List[int], need_dx_old: bool, activation: str = "",
            pre_columns: int = 0, backend: str = "") -> Tuple[Tensor, Tensor]:
    """-> (y, pre): ``pre`` holds the pre-activation of y's last ``pre_columns`` columns,
    which the backward of a smooth activation (GELU, SiLU) reads; (N, 0) otherwise."""
    return _linear_eager_impl(x, w_frozen, b_frozen, w_new, b_new, w_couple,
                              frozen_out_groups, frozen_k_ends, need_dx_old, activation,
                              pre_columns, backend, True)


def _linear_eager_impl(x, w_frozen, b_frozen, w_new, b_new, w_couple, frozen_out_groups,
                       frozen_k_ends, need_dx_old, activation="", pre_columns=0, backend="",
                       empty_pre=False):
    """``_linear_impl`` with ``pre`` None where it holds no column (a custom op must return
    a tensor, ``empty_pre``; an autograd.Function need not, which spares an allocation per
    call)."""
    macs = x.shape[0] * x.shape[1] * (w_frozen.shape[0] + w_new.shape[0])  # dense product's
    backend = backend_choice.resolve(x.device, "linear", backend, dtype=x.dtype, macs=macs)
    pre = x.new_empty((x.shape[0], pre_columns)) if pre_columns or empty_pre else None
    y = backend.linear_forward(x, w_frozen, b_frozen, w_new, b_new, w_couple,
                               frozen_out_groups, frozen_k_ends, activation,
                               pre=pre if pre_columns else None)
    return y, pre


_linear = torch.library.custom_op(f"{LIB}::linear", mutates_args=())(_linear_impl)


@_linear.register_fake
def _(x, w_frozen, b_frozen, w_new, b_new, w_couple, frozen_out_groups, frozen_k_ends,
      need_dx_old, activation="", pre_columns=0, backend=""):
    return (x.new_empty((x.shape[0], w_frozen.shape[0] + w_new.shape[0])),
            x.new_empty((x.shape[0], pre_columns)))


def _linear_backward_impl(dy: Tensor, x: Tensor, w_frozen: Tensor, w_new: Tensor,
                     w_couple: Optional[Tensor], frozen_out_groups: List[int],
                     frozen_k_ends: List[int], need_dx_new: bool, need_dx_old: bool,
                     need_dw: bool, need_db: bool, need_dcouple: bool,
                     saved: Optional[Tensor] = None, activation: str = "", backend: str = ""
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``saved``: with a fused ``activation``, what its gradient reads (the forward's output
    for ReLU, its ``pre`` for the smooth ones), else None."""
    grads = _linear_grads(dy, x, w_frozen, w_new, w_couple, frozen_out_groups, frozen_k_ends,
                          need_dx_new, need_dx_old, need_dw, need_db, need_dcouple, saved,
                          activation, backend)
    return tuple(_or_empty(g, dy) for g in grads)


def _linear_grads(dy, x, w_frozen, w_new, w_couple, frozen_out_groups, frozen_k_ends,
                  need_dx_new, need_dx_old, need_dw, need_db, need_dcouple, saved, activation,
                  backend):
    """(dx, dw, db, dcouple), None where not wanted: the backward op's work, which the eager
    backward calls directly (no empty placeholders to make and drop)."""
    backend = backend_choice.resolve(dy.device, "linear", backend, backward=True)
    return backend.linear_backward(dy.contiguous(), x, w_frozen, w_new, w_couple,
                                   frozen_out_groups, frozen_k_ends, need_dx_new, need_dx_old,
                                   need_dw, need_db, need_dcouple, saved=saved,
                                   activation=activation)


_linear_backward = torch.library.custom_op(f"{LIB}::linear_backward",
                                           mutates_args=())(_linear_backward_impl)


@_linear_backward.register_fake
def _(dy, x, w_frozen, w_new, w_couple, frozen_out_groups, frozen_k_ends, need_dx_new,
      need_dx_old, need_dw, need_db, need_dcouple, saved=None, activation="", backend=""):
    return _fake_grads(dy, x, w_new, w_couple, need_dx_new or need_dx_old, need_dw, need_db,
                       need_dcouple)


def _linear_setup_context(ctx, inputs, output):
    (x, w_frozen, b_frozen, w_new, b_new, w_couple, frozen_out_groups, frozen_k_ends,
     need_dx_old) = inputs[:9]
    activation = inputs[9] if len(inputs) > 9 else ""
    y, pre = output
    # A fused activation's backward reads the output (ReLU's mask, as nn.ReLU saves it) or
    # the pre-activation (GELU, SiLU: only the columns that backward reads were kept).
    saved = None if not activation else (pre if activation in SMOOTH_ACTIVATIONS else y)
    # (the biases only for a differentiable or batched backward, which recomputes the
    # activation's input: saving a parameter costs no memory)
    ctx.save_for_backward(x, w_frozen, w_new, w_couple, saved, b_frozen, b_new)
    if pre is not None:  # (None from the eager twin when it holds nothing)
        ctx.mark_non_differentiable(pre)
    ctx.set_materialize_grads(False)  # no zeros are made for pre's (absent) gradient
    ctx.groups = (list(frozen_out_groups), list(frozen_k_ends))
    ctx.need_dx_old = need_dx_old
    ctx.activation = activation
    # Backward may run on another thread: keep the choice in force now.
    ctx.backend = (inputs[11] if len(inputs) > 11 else "") or backend_choice.get_backend()


_SIX_NONES = (None,) * 6  # the gradients of the linear op's non-tensor inputs


def _linear_autograd_backward(ctx, dy, _dpre=None):
    x, w_frozen, w_new, w_couple, saved, b_frozen, b_new = ctx.saved_tensors
    need_x, _, _, need_w, need_b, need_c = ctx.needs_input_grad[:6]
    if dy is None or not (need_x or need_w or need_b or need_c):
        return (None,) * 12
    if torch.is_grad_enabled() or composite.batched_backward(dy):
        # create_graph=True or batched gradients: the composite's vjp (composite.py)
        dx, dw, db, dc = composite.linear_vjp(dy, x, w_frozen, b_frozen, w_new, b_new,
                                              w_couple, *ctx.groups, ctx.activation)
    else:
        backward = _linear_grads if getattr(ctx, "eager", False) else _linear_backward
        dx, dw, db, dc = backward(dy, x, w_frozen, w_new, w_couple, *ctx.groups,
                                  need_x, need_x and ctx.need_dx_old, need_w, need_b, need_c,
                                  saved, ctx.activation, ctx.backend)
    return ((dx if need_x else None), None, None, (dw if need_w else None),
            (db if need_b else None), (dc if need_c else None)) + _SIX_NONES


_linear.register_autograd(_linear_autograd_backward, setup_context=_linear_setup_context)


# ---------------------------------------------------------------------------------------
# Conv2d
# ---------------------------------------------------------------------------------------
def _conv_out_hw(x, w_new, stride, padding, dilation) -> Tuple[int, int]:
    """Output height and width of the conv (stride, padding, dilation: 2-lists)."""
    kh, kw = w_new.shape[2], w_new.shape[3]
    return (torch_ref.conv_out_size(x.shape[2], kh, stride[0], padding[0], dilation[0]),
            torch_ref.conv_out_size(x.shape[3], kw, stride[1], padding[1], dilation[1]))


def _conv2d_impl(x: Tensor, w_frozen: Tensor, b_frozen: Optional[Tensor], w_new: Tensor,
            b_new: Optional[Tensor], w_couple: Optional[Tensor], frozen_out_groups: List[int],
            frozen_k_ends: List[int], stride: List[int], padding: List[int],
            dilation: List[int], depthwise: bool, need_dx_old: bool,
            bn_mean: Optional[Tensor] = None, bn_var: Optional[Tensor] = None,
            bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
            bn_eps: float = 0.0, backend: str = "") -> Tensor:
    backend = backend_choice.resolve(x.device, "conv2d", backend, dtype=x.dtype,
                                     macs=_conv_macs(x, w_frozen, w_new, stride, padding,
                                                     dilation, depthwise))
    frozen_bn = None if bn_mean is None else (bn_mean, bn_var, bn_weight, bn_bias, bn_eps)
    y = backend.conv2d_forward(x, w_frozen, b_frozen, w_new, b_new, w_couple,
                               frozen_out_groups, frozen_k_ends, stride, padding, dilation,
                               depthwise, frozen_bn=frozen_bn)
    return y.contiguous(memory_format=conv_memory_format(x))  # a no-op but where torch's
    # own conv chose otherwise (an NCHW x with channels_last weights, one channel)


def _conv_macs(x, w_frozen, w_new, stride, padding, dilation, depthwise) -> int:
    """Multiply-adds of the dense convolution (what "auto" sizes a call by)."""
    ho, wo = _conv_out_hw(x, w_new, stride, padding, dilation)
    per_output = w_new.shape[2] * w_new.shape[3] * (1 if depthwise else x.shape[1])
    return x.shape[0] * ho * wo * (w_frozen.shape[0] + w_new.shape[0]) * per_output


_conv2d = torch.library.custom_op(f"{LIB}::conv2d", mutates_args=())(_conv2d_impl)


@_conv2d.register_fake
def _(x, w_frozen, b_frozen, w_new, b_new, w_couple, frozen_out_groups, frozen_k_ends, stride,
      padding, dilation, depthwise, need_dx_old, bn_mean=None, bn_var=None, bn_weight=None,
      bn_bias=None, bn_eps=0.0, backend=""):
    ho, wo = _conv_out_hw(x, w_new, stride, padding, dilation)
    return torch.empty((x.shape[0], w_frozen.shape[0] + w_new.shape[0], ho, wo),
                       dtype=x.dtype, device=x.device, memory_format=conv_memory_format(x))


def _conv2d_backward_impl(dy: Tensor, x: Tensor, w_frozen: Tensor, w_new: Tensor,
                     w_couple: Optional[Tensor], frozen_out_groups: List[int],
                     frozen_k_ends: List[int], stride: List[int], padding: List[int],
                     dilation: List[int], depthwise: bool, need_dx_new: bool,
                     need_dx_old: bool, need_dw: bool, need_db: bool, need_dcouple: bool,
                     bn_scale: Optional[Tensor] = None,
                     backend: str = "") -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``bn_scale``: a folded BatchNorm's ``weight / sqrt(var + eps)`` (O_f,), or None."""
    grads = _conv2d_grads(dy, x, w_frozen, w_new, w_couple, frozen_out_groups, frozen_k_ends,
                          stride, padding, dilation, depthwise, need_dx_new, need_dx_old,
                          need_dw, need_db, need_dcouple, bn_scale, backend)
    return tuple(_or_empty(g, dy) for g in grads)


def _conv2d_grads(dy, x, w_frozen, w_new, w_couple, frozen_out_groups, frozen_k_ends, stride,
                  padding, dilation, depthwise, need_dx_new, need_dx_old, need_dw, need_db,
                  need_dcouple, bn_scale, backend):
    """(dx, dw, db, dcouple), None where not wanted (see ``_linear_grads``)."""
    dx_backend = (backend_choice.input_grad_backend(dy.device, "conv2d", backend)
                  if need_dx_new or need_dx_old else None)
    backend = backend_choice.resolve(dy.device, "conv2d", backend, backward=True)
    # dy goes in with its strides: every backend reads any layout (a channels_last dy stays
    # channels_last, which the Triton kernels read best)
    args = (dy, x, w_frozen, w_new, w_couple, frozen_out_groups, frozen_k_ends, stride,
            padding, dilation, depthwise)
    if dx_backend is not None and dx_backend is not backend:
        dx = dx_backend.conv2d_backward(*args, need_dx_new, need_dx_old, False, False, False,
                                        frozen_dy_scale=bn_scale)[0]
        _, dw, db, dcouple = backend.conv2d_backward(*args, False, False, need_dw, need_db,
                                                     need_dcouple, frozen_dy_scale=bn_scale)
    else:
        dx, dw, db, dcouple = backend.conv2d_backward(
            *args, need_dx_new, need_dx_old, need_dw, need_db, need_dcouple,
            frozen_dy_scale=bn_scale)
    # the layouts the fake promises (torch's own backward gives weight gradients in the
    # layout of x or of the weights); the weight-sized ones are cheap to copy
    if dx is not None:
        dx = dx.contiguous(memory_format=conv_memory_format(x))
    dw, dcouple = (None if g is None else g.contiguous() for g in (dw, dcouple))
    return dx, dw, db, dcouple


_conv2d_backward = torch.library.custom_op(f"{LIB}::conv2d_backward",
                                           mutates_args=())(_conv2d_backward_impl)


@_conv2d_backward.register_fake
def _(dy, x, w_frozen, w_new, w_couple, frozen_out_groups, frozen_k_ends, stride, padding,
      dilation, depthwise, need_dx_new, need_dx_old, need_dw, need_db, need_dcouple,
      bn_scale=None, backend=""):
    return _fake_grads(dy, x, w_new, w_couple, need_dx_new or need_dx_old, need_dw, need_db,
                       need_dcouple, dx_format=conv_memory_format(x))


_CONV2D_INPUTS = 19  # x ... need_dx_old (13), bn_mean ... bn_eps (5), backend


def _conv2d_setup_context(ctx, inputs, output):
    (x, w_frozen, _, w_new, _, w_couple, frozen_out_groups, frozen_k_ends, stride, padding,
     dilation, depthwise, need_dx_old) = inputs[:13]
    bn_var, bn_weight = (inputs[14], inputs[15]) if len(inputs) > 14 else (None, None)
    # A folded BatchNorm: its var and weight give the frozen columns' dy scale in backward.
    ctx.save_for_backward(x, w_frozen, w_new, w_couple, bn_var, bn_weight)
    ctx.bn_eps = inputs[17] if len(inputs) > 17 else 0.0
    ctx.static = (list(frozen_out_groups), list(frozen_k_ends), list(stride), list(padding),
                  list(dilation), depthwise)
    ctx.need_dx_old = need_dx_old
    ctx.backend = (inputs[18] if len(inputs) > 18 else "") or backend_choice.get_backend()


def _conv2d_autograd_backward(ctx, dy):
    x, w_frozen, w_new, w_couple, bn_var, bn_weight = ctx.saved_tensors
    need_x, _, _, need_w, need_b, need_c = ctx.needs_input_grad[:6]
    if not (need_x or need_w or need_b or need_c):
        return (None,) * _CONV2D_INPUTS
    need_dx_old = need_x and ctx.need_dx_old
    if torch.is_grad_enabled() or composite.batched_backward(dy):
        # create_graph=True or batched gradients: the composite's vjp (composite.py)
        if bn_var is not None:  # the folded BatchNorm's derivative on the frozen channels
            o_f = w_frozen.shape[0]
            scale = torch_ref.bn_scale(bn_var, bn_weight, ctx.bn_eps).to(dy.dtype)
            dy_old, dy_new = dy.split([o_f, dy.shape[1] - o_f], dim=1)
            dy = torch.cat([dy_old * scale.view(1, -1, 1, 1), dy_new], dim=1)
        dx, dw, db, dc = composite.conv2d_vjp(dy, x, w_frozen, w_new, need_b, w_couple,
                                              *ctx.static)
    else:
        bn_scale = None
        if bn_var is not None and reads_frozen_dy(w_couple, need_x, need_dx_old, need_c):
            # only when the backward reads the frozen columns of dy
            bn_scale = torch_ref.bn_scale(bn_var, bn_weight, ctx.bn_eps)
        backward = _conv2d_grads if getattr(ctx, "eager", False) else _conv2d_backward
        dx, dw, db, dc = backward(dy, x, w_frozen, w_new, w_couple, *ctx.static, need_x,
                                  need_dx_old, need_w, need_b, need_c, bn_scale, ctx.backend)
    return ((dx if need_x else None), None, None, (dw if need_w else None),
            (db if need_b else None), (dc if need_c else None)) + (None,) * (_CONV2D_INPUTS - 6)


_conv2d.register_autograd(_conv2d_autograd_backward, setup_context=_conv2d_setup_context)


# ---------------------------------------------------------------------------------------
# Eager twins of the ops
# ---------------------------------------------------------------------------------------
# A custom op's Python dispatch costs about 0.2 ms per forward and more per backward (2-core
# CPU), more than a whole small layer takes.  Outside torch.compile the checked forms below
# therefore run the same implementation, context and backward through a plain
# autograd.Function; under torch.compile (and for opcheck) they go through the custom ops.
# EXPANSE_FAST_CUSTOM_OPS=1 sends eager calls through the custom ops too.
USE_EAGER_FUNCTIONS = os.environ.get("EXPANSE_FAST_CUSTOM_OPS", "0") != "1"


def _eager_function(name: str, impl, setup_context, backward, n_tensors: int) -> type:
    """An autograd.Function running ``impl``, ``setup_context`` and ``backward`` of a custom
    op.  It takes the op's first ``n_tensors`` inputs (the differentiable ones) and then all
    the others in one tuple: Function.apply costs about a microsecond per argument.  Its
    ``impl`` is kept as ``function.impl``: a call no gradient will reach runs it directly."""
    def forward(ctx, *args):
        inputs = args[:n_tensors] + args[n_tensors]
        out = impl(*inputs)
        setup_context(ctx, inputs, out)
        ctx.eager = True  # backward calls the implementation, not the custom op
        return out

    def backward_(ctx, *grads):
        # (the op's gradients past its tensors are all None: one for the tuple here)
        return backward(ctx, *grads)[:n_tensors + 1]

    # (with create_graph=True the backward runs with grad mode on and is differentiable)
    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward_),
                 "impl": staticmethod(impl)})


# Both ops begin with the same six tensors: x, w_frozen, b_frozen, w_new, b_new, w_couple.
_EAGER_TENSORS = 6
_LinearFunction = _eager_function("_LinearFunction", _linear_eager_impl, _linear_setup_context,
                                  _linear_autograd_backward, _EAGER_TENSORS)
_Conv2dFunction = _eager_function("_Conv2dFunction", _conv2d_impl, _conv2d_setup_context,
                                  _conv2d_autograd_backward, _EAGER_TENSORS)


_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)
_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # (torch 2.6 and later)


def _call(op, function, *args) -> Tensor:
    # (torch.jit.trace cannot record a Function whose argument is a tuple of lists: it
    # records the custom op, which a saved trace can run too; and a dispatch mode, as
    # FlopCounterMode or FakeTensorMode, sees the custom op as one unit, with its FLOP
    # formula and fake implementation, not the probes and slices inside)
    if (USE_EAGER_FUNCTIONS and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and not _dispatch_modes()):
        if _grad_reaches(args[:_EAGER_TENSORS]):
            return function.apply(*args[:_EAGER_TENSORS], args[_EAGER_TENSORS:])
        # (inference, a frozen model: no graph node, no context; Function.apply and
        # setup_context cost about 5 us of a 25 us call of a small layer)
        return function.impl(*args)
    return op(*args)


def _grad_reaches(tensors: Sequence[Optional[Tensor]]) -> bool:
    """Whether autograd would record a call on ``tensors``: grad mode is on and one of them
    requires grad."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


# ---------------------------------------------------------------------------------------
# Checked functional forms
# ---------------------------------------------------------------------------------------
# Whether autocast is on for any device type (torch >= 2.4); else ask for x's own.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast(x: Tensor, *tensors: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """Under ``torch.autocast`` for x's device: x and the blocks in its lower-precision dtype,
    as nn.Linear and nn.Conv2d get them (the casts are differentiable: trainable blocks
    keep float32 gradients); otherwise unchanged.  Called where ``_any_autocast()``."""
    device = x.device.type
    try:
        enabled = torch.is_autocast_enabled(device)
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        enabled = False
    if not enabled:
        return (x,) + tensors
    dtype = torch.get_autocast_dtype(device)
    # (autocast leaves float64 alone, as nn.Linear and nn.Conv2d find it)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point()
                 and t.dtype != torch.float64 else t for t in (x,) + tensors)


TRAIN_ALL_HINT = ("; to train every weight, train xf.merge(model) instead (plain layers "
                  "holding the whole staircase)")


# The blocks both ops take after x, by name; the first two are frozen.
_BLOCK_NAMES = ("w_frozen", "b_frozen", "w_new", "b_new", "w_couple")


def _elsewhere(t: Tensor, on_cpu: bool, device: Optional[torch.device]) -> bool:
    """Whether ``t`` lies off the input's device: ``on_cpu`` (no device object made for a
    CPU input), else ``device``."""
    return not t.is_cpu if on_cpu else t.device != device


def _check_tensors(what: str, x: Tensor, blocks: Sequence[Optional[Tensor]],
                   use_composite: bool):
    """The blocks (named by ``_BLOCK_NAMES``) share x's dtype and device; the frozen ones
    need no gradient (outside torch.func)."""
    dtype, on_cpu = x.dtype, x.is_cpu
    device = None if on_cpu else x.device  # (a CPU input needs no device object)
    for name, t in zip(_BLOCK_NAMES, blocks):
        if t is None:
            continue
        if t.dtype != dtype:
            raise TypeError(f"{what}: input dtype is {dtype} but {name} is {t.dtype}; "
                            f"cast the input (or the layer) so both match")
        if _elsewhere(t, on_cpu, device):
            raise ValueError(f"{what}: input is on {x.device} but {name} is on {t.device}; "
                             f"move both to one device")
    if use_composite:
        return  # torch.func differentiates what it is given; the composite forms every gradient
    for name, t in zip(_BLOCK_NAMES[:2], blocks[:2]):
        if t is not None and t.requires_grad:
            raise ValueError(f"{what}: {name} requires grad, but frozen tensors must not "
                             f"(only the newest group is trainable){TRAIN_ALL_HINT}")


def _check_blocks(what: str, w_frozen: Tensor, w_new: Tensor, w_couple: Optional[Tensor],
                  frozen_out_groups: Sequence[int], frozen_k_ends: Sequence[int],
                  b_frozen: Optional[Tensor] = None, b_new: Optional[Tensor] = None,
                  depthwise: bool = False):
    """The blocks' shapes against each other (a mismatch would reach aten as an error
    about its own tensors, or read past a block)."""
    dims = 4 if what == "expanded_conv2d" else 2
    if (w_frozen.dim() != dims or w_new.dim() != dims
            or (w_couple is not None and w_couple.dim() != dims)):
        for name, w in (("w_frozen", w_frozen), ("w_new", w_new), ("w_couple", w_couple)):
            if w is not None and w.dim() != dims:
                raise ValueError(f"{what}: {name} must be {dims}-D, got shape "
                                 f"{tuple(w.shape)}")
    if sum(frozen_out_groups) != w_frozen.shape[0]:
        raise ValueError(f"{what}: frozen_out_groups {tuple(frozen_out_groups)} sum to "
                         f"{sum(frozen_out_groups)} but w_frozen has {w_frozen.shape[0]} rows")
    if len(frozen_k_ends) != len(frozen_out_groups):
        raise ValueError(f"{what}: one k_end per frozen group expected, got "
                         f"{tuple(frozen_k_ends)} for groups {tuple(frozen_out_groups)}")
    for name, b, rows in (("b_frozen", b_frozen, w_frozen.shape[0]),
                          ("b_new", b_new, w_new.shape[0])):
        if b is not None and (b.dim() != 1 or b.shape[0] != rows):
            raise ValueError(f"{what}: {name} must have shape ({rows},) (one per row of "
                             f"w_{name[2:]}), got {tuple(b.shape)}")
    if dims == 4 and w_frozen.shape[2:] != w_new.shape[2:]:
        raise ValueError(f"{what}: w_frozen and w_new must have one kernel size, got "
                         f"{tuple(w_frozen.shape[2:])} and {tuple(w_new.shape[2:])}")
    if depthwise:
        for name, w in (("w_frozen", w_frozen), ("w_new", w_new)):
            if w.shape[1] != 1:
                raise ValueError(f"{what}: a depthwise {name} reads one channel a filter "
                                 f"(rows, 1, kh, kw), got shape {tuple(w.shape)}")
        c_f = frozen_k_ends[-1] if frozen_k_ends else 0
        if c_f < 0 or (w_frozen.shape[0] % c_f if c_f else w_frozen.shape[0]):
            raise ValueError(f"{what}: a depthwise conv's {w_frozen.shape[0]} frozen filters "
                             f"must be a whole multiple of its frozen channels "
                             f"(frozen_k_ends[-1] = {c_f})")
        return
    i_f = w_frozen.shape[1]
    if i_f > w_new.shape[1]:
        raise ValueError(f"{what}: w_frozen reads {i_f} inputs but w_new only {w_new.shape[1]}; "
                         f"the newest rows read every input, the frozen ones a first part")
    if frozen_k_ends and (min(frozen_k_ends) < 0 or max(frozen_k_ends) > i_f):
        raise ValueError(f"{what}: frozen_k_ends {tuple(frozen_k_ends)} must lie in 0..{i_f} "
                         f"(w_frozen's columns)")
    if w_couple is not None:
        want = (w_frozen.shape[0], w_new.shape[1] - i_f) + tuple(w_new.shape[2:])
        if tuple(w_couple.shape) != want:
            raise ValueError(f"{what}: w_couple must have shape {want} (the frozen rows over "
                             f"the inputs past w_frozen's), got {tuple(w_couple.shape)}")


def _check_geometry(what: str, stride, padding, dilation):
    """stride, padding, dilation: ints or pairs of ints (the op takes explicit padding:
    ExpandedConv2d resolves 'same' and 'valid')."""
    for name, v, least in (("stride", stride, 1), ("padding", padding, 0),
                           ("dilation", dilation, 1)):
        if ((type(v) is tuple or type(v) is list) and len(v) == 2 and type(v[0]) is int
                and type(v[1]) is int and v[0] >= least and v[1] >= least):
            continue  # (a module's own pair, the common case: no generator)
        vals = (v,) if isinstance(v, int) else tuple(v) if isinstance(v, (tuple, list)) else None
        if (vals is None or len(vals) not in (1, 2)
                or not all(isinstance(a, int) and not isinstance(a, bool) and a >= least
                           for a in vals)):
            extra = (" (the op takes explicit padding; ExpandedConv2d resolves 'same' and "
                     "'valid')" if name == "padding" and isinstance(v, str) else "")
            raise ValueError(f"{what}: {name} must be an int >= {least} or a pair of them, "
                             f"got {v!r}{extra}")


def expanded_linear(x: Tensor, w_frozen: Tensor, b_frozen: Optional[Tensor], w_new: Tensor,
                    b_new: Optional[Tensor], w_couple: Optional[Tensor] = None, *,
                    frozen_out_groups: Sequence[int], frozen_k_ends: Sequence[int],
                    need_dx_old: bool = True, activation: Optional[str] = None,
                    backend: Optional[str] = None) -> Tensor:
    """y = [frozen staircase rows | trainable rows] applied to x of shape (..., I).

    ``activation`` ("relu", "gelu", "gelu_tanh" or "silu") fuses that activation into the
    op: applied in the forward's epilogue, and in backward its gradient is applied only to
    the gradient columns that are read.  GELU and SiLU keep their pre-activation for
    backward, of those columns only (in an isolated layer with ``need_dx_old=False``, the
    newest ones).
    ``backend`` pins this call to one backend; None follows ``xf.set_backend``."""
    what = "expanded_linear"
    if _any_autocast():  # (the common case costs one C call, no tuple of the blocks)
        x, w_frozen, b_frozen, w_new, b_new, w_couple = _autocast(
            x, w_frozen, b_frozen, w_new, b_new, w_couple)
    activation = activation or ""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{what}: activation must be None or one of "
                         f"{[a for a in ACTIVATIONS if a]}, got {activation!r}")
    use_composite = composite.needed()
    _check_tensors(what, x, (w_frozen, b_frozen, w_new, b_new, w_couple), use_composite)
    _check_blocks(what, w_frozen, w_new, w_couple, frozen_out_groups, frozen_k_ends,
                  b_frozen, b_new)
    in_features = w_new.shape[1]
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{what}: expected input with {in_features} features in its last "
                         f"dimension, got shape {tuple(x.shape)}")
    if use_composite:  # torch.func, dual tensors: plain differentiable ops, any backend
        return composite.linear(x, w_frozen, b_frozen, w_new, b_new, w_couple,
                                frozen_out_groups, frozen_k_ends, activation)
    if x.dim() == 2:
        x2 = x  # (a reshape costs a few microseconds of host time per call)
    else:
        lead = x.shape[:-1]
        rows = 1
        for d in lead:  # (not math.prod: torch.compile cannot trace it over symbolic sizes)
            rows = rows * d
        x2 = x.reshape(rows, in_features)  # -1 would be ambiguous for 0 features
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y, _ = _call(_linear, _LinearFunction, x2, w_frozen, b_frozen, w_new, b_new, w_couple,
                 list(frozen_out_groups), list(frozen_k_ends), bool(need_dx_old), activation,
                 _pre_columns(activation, x2, w_frozen, w_new, b_new, w_couple, need_dx_old),
                 _backend_arg(backend))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def _pre_columns(activation: str, x: Tensor, w_frozen: Tensor, w_new: Tensor,
                 b_new: Optional[Tensor], w_couple: Optional[Tensor], need_dx_old: bool) -> int:
    """How many trailing output columns' pre-activation the backward of a smooth activation
    will read: none without autograd, the newest ones, or all when the frozen columns'
    gradient feeds dx_old or the coupling block."""
    if activation not in SMOOTH_ACTIVATIONS:
        return 0
    # A traced or exported graph keeps the width it records for every later call, also on
    # an input that needs a gradient: it keeps the columns such a call reads.  (torch.jit
    # .trace checks its trace under no_grad: the width must not depend on the grad mode.)
    traced = torch.jit.is_tracing() or _exporting()
    if not torch.is_grad_enabled() and not traced:
        return 0
    x_grad = x.requires_grad or traced
    if not x_grad and not any(t is not None and t.requires_grad for t in (w_new, b_new,
                                                                          w_couple)):
        return 0
    o_f, o_new = w_frozen.shape[0], w_new.shape[0]
    couple_grad = w_couple is not None and w_couple.requires_grad
    if o_f and reads_frozen_dy(w_couple, x_grad, x_grad and need_dx_old, couple_grad):
        return o_f + o_new
    return o_new


def _backend_arg(backend: Optional[str]) -> str:
    if backend in (None, "", "auto"):
        return "" if backend is None else backend
    if backend not in backend_choice.BACKENDS:
        raise ValueError(f"backend must be one of {backend_choice.BACKENDS}, got {backend!r}")
    return backend


def _pair(v) -> List[int]:
    """An int or a sequence of one or two ints as a pair (as F.conv2d takes them)."""
    if isinstance(v, int):
        return [v, v]
    return [int(v[0]), int(v[0])] if len(v) == 1 else [int(a) for a in v]


def expanded_conv2d(x: Tensor, w_frozen: Tensor, b_frozen: Optional[Tensor], w_new: Tensor,
                    b_new: Optional[Tensor], w_couple: Optional[Tensor] = None, *,
                    frozen_out_groups: Sequence[int], frozen_k_ends: Sequence[int],
                    stride=1, padding=0, dilation=1, depthwise: bool = False,
                    need_dx_old: bool = True, bn_mean: Optional[Tensor] = None,
                    bn_var: Optional[Tensor] = None, bn_weight: Optional[Tensor] = None,
                    bn_bias: Optional[Tensor] = None, bn_eps: float = 1e-5,
                    backend: Optional[str] = None) -> Tensor:
    """The expanded convolution of an NCHW (or channels_last) batch.

    ``bn_mean`` and ``bn_var`` (with optional ``bn_weight``, ``bn_bias``; length O_f, no
    gradient) fold an eval-mode BatchNorm into the frozen output channels: they come out as
    ``(conv - bn_mean) / sqrt(bn_var + bn_eps) * bn_weight + bn_bias``, applied after the
    bias and the coupling term; the newest channels stay raw."""
    what = "expanded_conv2d"
    if _any_autocast():
        x, w_frozen, b_frozen, w_new, b_new, w_couple = _autocast(
            x, w_frozen, b_frozen, w_new, b_new, w_couple)
    _check_geometry(what, stride, padding, dilation)
    use_composite = composite.needed()
    _check_tensors(what, x, (w_frozen, b_frozen, w_new, b_new, w_couple), use_composite)
    _check_blocks(what, w_frozen, w_new, w_couple, frozen_out_groups, frozen_k_ends,
                  b_frozen, b_new, bool(depthwise))
    if depthwise:
        c_f = frozen_k_ends[-1] if frozen_k_ends else 0
        if c_f:
            in_channels = c_f + w_new.shape[0] // (w_frozen.shape[0] // c_f)
        else:  # no frozen filters to read the multiplier from: any divisor will do
            c = x.shape[1] if x.dim() == 4 else 0
            in_channels = c if c and w_new.shape[0] % c == 0 else w_new.shape[0]
    else:
        in_channels = w_new.shape[1]
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{what}: expected a 4-D (N, C, H, W) input with C = {in_channels}, "
                         f"got shape {tuple(x.shape)}")
    _check_frozen_bn(what, x, w_frozen.shape[0], bn_mean, bn_var, bn_weight, bn_bias, bn_eps,
                     use_composite)
    if use_composite:  # torch.func, dual tensors: plain differentiable ops, any backend
        frozen_bn = None if bn_mean is None else (bn_mean, bn_var, bn_weight, bn_bias, bn_eps)
        return composite.conv2d(x, w_frozen, b_frozen, w_new, b_new, w_couple,
                                frozen_out_groups, frozen_k_ends, _pair(stride), _pair(padding),
                                _pair(dilation), bool(depthwise), frozen_bn)
    return _call(_conv2d, _Conv2dFunction, x, w_frozen, b_frozen, w_new, b_new, w_couple,
                 list(frozen_out_groups), list(frozen_k_ends), _pair(stride), _pair(padding),
                 _pair(dilation), bool(depthwise), bool(need_dx_old), bn_mean, bn_var,
                 bn_weight, bn_bias, float(bn_eps), _backend_arg(backend))


_HALVES = (torch.float16, torch.bfloat16)


def _check_frozen_bn(what: str, x: Tensor, o_f: int, mean, var, weight, bias, eps,
                     use_composite: bool):
    """A folded BatchNorm: one frozen 1-D tensor of O_f values each, in the input's dtype
    or float32 (as F.batch_norm allows), on the input's device."""
    if mean is None:
        if var is not None or weight is not None or bias is not None:
            raise ValueError(f"{what}: bn_var, bn_weight and bn_bias need bn_mean")
        return
    if var is None:
        raise ValueError(f"{what}: bn_mean needs bn_var (the frozen channels' variances)")
    if not eps >= 0:
        raise ValueError(f"{what}: bn_eps must be >= 0, got {eps}")
    dtype, on_cpu = mean.dtype, x.is_cpu
    device = None if on_cpu else x.device  # (a CPU input needs no device object)
    for t in (var, weight, bias):
        if t is not None and t.dtype != dtype:
            dtypes = {t.dtype for t in (mean, var, weight, bias) if t is not None}
            raise TypeError(f"{what}: bn_mean, bn_var, bn_weight and bn_bias must share one "
                            f"dtype, got {sorted(map(str, dtypes))}")
    for name, t in (("bn_mean", mean), ("bn_var", var), ("bn_weight", weight),
                    ("bn_bias", bias)):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != o_f:
            raise ValueError(f"{what}: {name} must hold one value per frozen output channel "
                             f"({o_f}), got shape {tuple(t.shape)}")
        if t.dtype != x.dtype and not (t.dtype == torch.float32 and x.dtype in _HALVES):
            raise TypeError(f"{what}: {name} is {t.dtype}; a folded BatchNorm's tensors take "
                            f"the input's dtype ({x.dtype}), or float32 for a float16 or "
                            f"bfloat16 input (as F.batch_norm)")
        if _elsewhere(t, on_cpu, device):
            raise ValueError(f"{what}: input is on {x.device} but {name} is on {t.device}; "
                             f"move both to one device")
        if t.requires_grad and not use_composite:
            raise ValueError(f"{what}: {name} requires grad, but a folded BatchNorm's frozen "
                             f"channels are fixed{TRAIN_ALL_HINT}")


from . import op_flops  # noqa: E402,F401  (the custom ops' FLOP formulas, for FlopCounterMode)
