"""The ``triton`` backend: one-pass fused Triton kernels (top-level ``kernels/``).

Same functions and arguments as ``torch_ref`` (see its docstring).  Each op lives in its
own kernel module (``expanse_fast.kernels.expanded_linear``, ...), imported under a guard so
that importing this module never fails: ``availability`` says why when the kernels cannot
run.  Each op's functions follow in their own section below.  On a machine without a GPU
the kernels run under Triton's interpreter when ``TRITON_INTERPRET=1`` was set before they
were first imported.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import torch_ref

Maybe = Optional[Tensor]

try:
    from expanse_fast.kernels import expanded_linear
    _IMPORT_ERROR = None
except Exception as e:  # triton missing or broken: report it through availability()
    expanded_linear = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"


def availability(device) -> Tuple[bool, str]:
    if _IMPORT_ERROR is not None:
        return False, f"triton kernels not importable ({_IMPORT_ERROR})"
    device = torch.device(device)
    if expanded_linear.INTERPRET:
        return True, "Triton interpreter (TRITON_INTERPRET=1): correct but slow"
    if device.type != "cuda":
        return False, (f"Triton needs a CUDA device, got {device.type!r} (set TRITON_INTERPRET=1 "
                       "before import to run the kernels on CPU, slowly)")
    if torch.version.hip is not None:
        return False, "ROCm: the Triton kernels are untested there"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 0):
        return False, f"compute capability {cap[0]}.{cap[1]} < 8.0 (bf16 tensor cores)"
    return True, f"Triton on {torch.cuda.get_device_name(device)}"


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _on_its_device(op):
    """Triton launches on the current CUDA device: an op whose first tensor lives on another
    (a model split across GPUs, a thread that never set its device) runs under that tensor's
    device, as torch's own ops and the cuda backend's (a CUDAGuard) do.  Otherwise the
    launch would hand another device's pointers to a kernel on the current one."""
    @functools.wraps(op)
    def call(t, *args, **kwargs):
        if t.is_cuda and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return op(t, *args, **kwargs)
        return op(t, *args, **kwargs)
    return call


def _dense(v: Maybe) -> Maybe:
    """A 1-D vector (a bias, a folded BatchNorm's statistics) the kernels read at unit
    stride: a strided view (say b[::2], through the functional ops) is copied."""
    return v if v is None or not isinstance(v, Tensor) or v.is_contiguous() else v.contiguous()


def _check_dtype(x: Tensor, op: str) -> None:
    """The kernels multiply in fp32/fp16/bf16 (fp32 accumulation): any other dtype would be
    read as one of those (garbage), so it is refused by name."""
    if x.dtype not in DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in DTYPES)
        raise TypeError(f"expanse_fast {op} on the triton backend: expected dtype {names}, got "
                        f"{str(x.dtype).replace('torch.', '')} (backend='torch' runs it)")


# ---------------------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------------------
@_on_its_device
def linear_forward(x: Tensor, w_frozen: Tensor, b_frozen: Maybe, w_new: Tensor, b_new: Maybe,
                   w_couple: Maybe, frozen_out_groups: Sequence[int],
                   frozen_k_ends: Sequence[int], activation: str = "",
                   pre: Maybe = None) -> Tensor:
    torch_ref.check_activation(activation)
    _check_dtype(x, "linear")
    # the activation (and the store of its input, pre) run in the kernel's epilogue
    b_frozen, b_new = _dense(b_frozen), _dense(b_new)
    return expanded_linear.linear_forward(x, w_frozen, b_frozen, w_new, b_new, w_couple,
                                          frozen_out_groups, frozen_k_ends,
                                          activation=activation or None, pre=pre)


@_on_its_device
def linear_backward(dy: Tensor, x: Tensor, w_frozen: Tensor, w_new: Tensor, w_couple: Maybe,
                    frozen_out_groups: Sequence[int], frozen_k_ends: Sequence[int],
                    need_dx_new: bool, need_dx_old: bool, need_dw: bool, need_db: bool,
                    need_dcouple: bool, saved: Maybe = None, activation: str = ""):
    _check_dtype(dy, "linear backward")
    o_f, i_f = w_frozen.shape
    if activation:
        # Fused activation: one elementwise pass over the dy columns the kernels below read
        # (the frozen ones only for dcouple, dx_old or the coupled dx_new).
        old_too = torch_ref.reads_frozen_dy(w_couple, need_dx_new, need_dx_old, need_dcouple)
        dy = torch_ref.activation_grad_full(dy, activation, saved, o_f, old_too)
    dx = dw = db = dcouple = None
    if need_dw or need_db:
        # One launch: dW_new = dy_new^T x with db_new fused.  db alone: the same kernel
        # over zero columns of x, which runs only the column-sum.
        dw, db = expanded_linear.grad_weight(dy[:, o_f:], x if need_dw else x[:, :0],
                                             with_colsum=need_db)
        if not need_dw:
            dw = None
    if need_dcouple and w_couple is not None:
        dcouple, _ = expanded_linear.grad_weight(dy[:, :o_f], x[:, i_f:])
    if need_dx_new or need_dx_old:
        dx = expanded_linear.grad_input(dy, w_frozen, w_new, w_couple, frozen_out_groups,
                                        frozen_k_ends, need_dx_old)
    return dx, dw, db, dcouple


# ---------------------------------------------------------------------------------------
# Conv2d (NCHW; channels are the groups): kernels/expanded_conv.py
# ---------------------------------------------------------------------------------------
def _conv_kernels():
    # imported on first use so that a broken conv module never breaks the linear ops
    from expanse_fast.kernels import expanded_conv
    return expanded_conv


@_on_its_device
def conv2d_forward(x: Tensor, w_frozen: Tensor, b_frozen: Maybe, w_new: Tensor, b_new: Maybe,
                   w_couple: Maybe, frozen_out_groups: Sequence[int],
                   frozen_k_ends: Sequence[int], stride, padding, dilation,
                   depthwise: bool, frozen_bn=None) -> Tensor:
    _check_dtype(x, "conv2d")
    b_frozen, b_new = _dense(b_frozen), _dense(b_new)
    if frozen_bn is not None:
        frozen_bn = tuple(_dense(v) for v in frozen_bn)
    # a folded BatchNorm runs in the kernel's epilogue, on the frozen tiles
    return _conv_kernels().expanded_conv2d_forward(
        x, w_frozen, b_frozen, w_new, b_new, w_couple, frozen_out_groups, frozen_k_ends,
        stride, padding, dilation, depthwise, norm=frozen_bn)


@_on_its_device
def conv2d_backward(dy: Tensor, x: Tensor, w_frozen: Tensor, w_new: Tensor, w_couple: Maybe,
                    frozen_out_groups: Sequence[int], frozen_k_ends: Sequence[int], stride,
                    padding, dilation, depthwise: bool, need_dx_new: bool, need_dx_old: bool,
                    need_dw: bool, need_db: bool, need_dcouple: bool,
                    frozen_dy_scale: Maybe = None):
    _check_dtype(dy, "conv2d backward")
    frozen_dy_scale = _dense(frozen_dy_scale)
    return _conv_kernels().expanded_conv2d_backward(
        dy, x, w_frozen, w_new, w_couple, frozen_out_groups, frozen_k_ends, stride, padding,
        dilation, depthwise, need_dx_new, need_dx_old, need_dw, need_db, need_dcouple,
        norm_scale=frozen_dy_scale)
