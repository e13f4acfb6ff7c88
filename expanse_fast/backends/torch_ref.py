"""The ``torch`` backend: structured PyTorch ops.

It never multiplies a zero block and never forms a frozen gradient: one GEMM per frozen
output group over the inputs that group reads, one GEMM for the trainable group, and in
backward only the trainable dW/db and the input gradient that was asked for.  It is the
CPU path and the reference every other backend is checked against (besides float64).

Every backend module exposes the same functions with the same arguments:

``linear_forward(x, w_frozen, b_frozen, w_new, b_new, w_couple, frozen_out_groups, frozen_k_ends,
                 activation="", pre=None)``
    x (N, I) -> y (N, O_f + o_new), then ``activation`` (one of ``ACTIVATIONS``) applied to y
    in place.  ``pre`` (N, P), given for the smooth activations only, receives the
    pre-activation of y's last P columns: what their backward reads.
``linear_backward(dy, x, w_frozen, w_new, w_couple, frozen_out_groups, frozen_k_ends,
                  need_dx_new, need_dx_old, need_dw, need_db, need_dcouple, saved=None,
                  activation="")``
    -> (dx or None, dw_new or None, db_new or None, dcouple or None).  dx has the full input
    width; when only ``need_dx_new`` its first I_f columns are zeros (nobody reads them).
    With a fused activation ``saved`` is what its gradient reads (the output for ReLU, the
    forward's ``pre`` otherwise); dy is passed through the activation's gradient only on the
    columns this backward reads.
``conv2d_forward(x, ..., stride, padding, dilation, depthwise, frozen_bn=None)`` and
    ``conv2d_backward(..., need_dcouple, frozen_dy_scale=None)`` the same for NCHW
    convolutions (channels are the groups).  ``frozen_bn`` = (mean, var, weight, bias, eps):
    an eval-mode BatchNorm of the O_f frozen output channels (weight and bias may be None)
    folded into the forward, applied after the bias and the coupling term.
    ``frozen_dy_scale`` (O_f,) is that BatchNorm's ``weight / sqrt(var + eps)``: backward
    multiplies the frozen columns of dy by it, and only when it reads them (dx_old,
    dcouple, the coupled dx_new).
``availability(device) -> (bool, reason)``.

Accumulations use out-of-place ``addmm`` (not ``addmm_``) so that the torch profiler counts
every multiply-add this backend does; the tests compare that count with the useful work.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import padded_stats

Maybe = Optional[Tensor]


def availability(device: torch.device) -> Tuple[bool, str]:
    return True, "always available (structured PyTorch ops)"


def _frozen_block(w_frozen: Tensor, b_frozen: Maybe, r0: int, r1: int, k: int):
    """(weight rows r0:r1 over the first k inputs, their bias): the tensors themselves where
    that is all of them (a view costs host time on every call)."""
    if r0 == 0 and r1 == w_frozen.shape[0] and k == w_frozen.shape[1]:
        return w_frozen, b_frozen
    return w_frozen[r0:r1, :k], None if b_frozen is None else b_frozen[r0:r1]


def _frozen_row_blocks(frozen_out_groups: Sequence[int], frozen_k_ends: Sequence[int]):
    """Yield (row_start, row_end, k_end) for each non-empty frozen output group."""
    start = 0
    for rows, k_end in zip(frozen_out_groups, frozen_k_ends):
        if rows:
            yield start, start + rows, k_end
        start += rows


# ---------------------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------------------
def _affine_into(out: Tensor, x: Tensor, w: Tensor, b: Maybe, bias_in_out: bool = False
                 ) -> Tensor:
    """out = x @ w.T (+ b), written straight into a column slice of the output (BLAS takes
    the row stride as its leading dimension, so no temporary and no torch.cat).  With
    ``bias_in_out``, ``out`` holds b already (``_fill_biases``) and one GEMM adds the product
    onto it: what aten's addmm does after copying b in itself, the same arithmetic."""
    if bias_in_out:
        return torch.addmm(out, x, w.t(), out=out)
    # (F.linear's out= overload: aten's addmm, or mm without a bias, on w.t() as above, in
    # one Python call instead of two)
    return torch.nn.functional.linear(x, w, b, out=out)


# A GPU's addmm into a column slice copies the bias in through a strided kernel first (its
# cuBLASLt bias epilogue needs a contiguous output): on the H200 about 137 us of the 16384 x
# (4096+1024) layer's forward, some 1.6 ns an output.  The biases of every block can go into
# the whole output in one contiguous pass instead, for two or three more calls (cat, copy,
# zeros for a missing bias).  That machine's host spends about 20 us a call (the fine-tuned
# MLP step: 2.0 ms for the 94 aten calls counted here with foreach AdamW), so the pass
# pays from about 2^25 outputs.  Below, a step of such layers is paced by the host anyway
# (the MLP step at 4096 x (1024+256): 3.7 ms eager, 0.46 in a CUDA graph).  On CPU the
# strided copy is as fast as a contiguous one.
ONE_BIAS_PASS_MIN_ELEMENTS = 1 << 25


def _one_bias_pass(y: Tensor) -> bool:
    return y.is_cuda and y.numel() >= ONE_BIAS_PASS_MIN_ELEMENTS


def _fill_biases(y: Tensor, b_frozen: Maybe, b_new: Maybe, o_f: int) -> bool:
    """Every block's bias into y in one broadcast copy; False where there is none."""
    if b_frozen is None and b_new is None:
        return False
    o_new = y.shape[1] - o_f
    parts = [b if b is not None else y.new_zeros(n) for b, n in ((b_frozen, o_f), (b_new, o_new))]
    y.copy_(torch.cat(parts).expand_as(y))
    return True


def _checkable(x: Tensor) -> bool:
    """Whether a bit-for-bit check can read ``x``: a plain CPU tensor (not a FakeTensor, a
    FunctionalTensor or another subclass, whose values are not there to compare)."""
    return x.is_cpu and type(x) in (Tensor, torch.nn.Parameter)


def _same_bits(a: Tensor, b: Tensor) -> bool:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    size = a.element_size()
    if a.shape != b.shape or a.dtype != b.dtype or size not in ints:
        return False
    return torch.equal(a.view(ints[size]), b.view(ints[size]))


# A frozen block reads a column slice of the widened input (and, after a second expansion, of
# the frozen weight): BLAS sees a row stride wider than the block.  For some small shapes it
# then takes another kernel than for the contiguous operands the pretrained layer had, and
# the sum rounds differently in the last bit (seen on CPU at 2-3 rows).  The first call of
# each such shape checks the block bit for bit against contiguous operands; a shape that
# differs is computed from contiguous operands from then on.  (On a GPU the old outputs are
# not bit for bit the pretrained ones anyway: the Triton and CUDA kernels sum in their own
# order.)  The call's own data cannot settle it alone: two summation orders often round a
# few sums alike (a 3 x 1 block of a 64-input head, strided, matched the contiguous one on
# 68% of random inputs), so the check also runs probes of the same layout until some 512
# sums have been compared (at most 64 probes: a few microseconds each for such blocks).
_STRIDED_EXACT: dict = {}  # shape key -> does the strided block keep the pretrained bits


def _probe_like(t: Tensor, gen: torch.Generator, wide: bool) -> Tensor:
    """A tensor of ``t``'s sizes, strides, dtype and address modulo 64 (what a BLAS or
    oneDNN kernel choice may depend on), holding normal values (``wide``: spread over many
    binades as well)."""
    size, stride, esize = tuple(t.shape), tuple(t.stride()), t.element_size()
    extent = 1 + sum((n - 1) * st for n, st in zip(size, stride)) if t.numel() else 0
    # the values go into the whole buffer, the view taken after: a view whose elements
    # share memory (a stride of 0: an expanded input) cannot be written through
    n = extent + 64 // esize
    values = torch.randn(n, generator=gen)
    if wide:
        span = 3 if t.dtype in (torch.float16, torch.bfloat16) else 8  # (fp16 stays finite)
        values *= torch.exp2(torch.randint(-span, span + 1, (n,), generator=gen).float())
    buf = values.to(t.dtype)
    shift = ((t.data_ptr() - buf.data_ptr()) % 64) // esize
    return buf.as_strided(size, stride, shift)


PROBED_SUMS = 512


def _probes_agree(compute, operands: Sequence[Maybe], n_out: int) -> bool:
    """Whether ``compute(*probes) -> (strided result, contiguous result)`` agree bit for
    bit on probes laid out as ``operands``: enough probes to compare about PROBED_SUMS
    sums (at most 64), normal values and values over many binades in turn."""
    gen = torch.Generator().manual_seed(20261130)
    for i in range(min(64, max(1, -(-PROBED_SUMS // max(n_out, 1))))):
        probes = [None if t is None else _probe_like(t, gen, wide=bool(i % 2))
                  for t in operands]
        strided, alone = compute(*probes)
        if not _same_bits(strided, alone):
            return False
    return True


def _frozen_affine_into(out: Tensor, x: Tensor, w: Tensor, b: Maybe,
                        bias_in_out: bool = False) -> Tensor:
    """``_affine_into`` for a frozen block, with the bits of ``F.linear`` on contiguous
    ``x`` and ``w`` into a fresh tensor (what the pretrained layer computed)."""
    if ((x.is_contiguous() and w.is_contiguous() and out.is_contiguous())
            or not _checkable(x) or not x.shape[1] or torch.jit.is_tracing()):
        # (a check while torch.jit.trace records would be recorded, and its bit view of
        # the floats trips TorchScript's alias analysis)
        return _affine_into(out, x, w, b, bias_in_out)
    key = (x.shape, x.stride(), w.shape, w.stride(), out.stride(), x.dtype,
           x.data_ptr() % 64, w.data_ptr() % 64, out.data_ptr() % 64, b is None,
           torch.get_num_threads())
    exact = _STRIDED_EXACT.get(key)
    if exact:
        return _affine_into(out, x, w, b, bias_in_out)
    alone = torch.nn.functional.linear(x.contiguous(), w.contiguous(), b)
    if exact is None:
        _affine_into(out, x, w, b, bias_in_out)

        def both(po, px, pw, pb):
            return (_affine_into(po, px, pw, pb),
                    torch.nn.functional.linear(px.contiguous(), pw.contiguous(), pb))
        exact = (_same_bits(out, alone)
                 and (bias_in_out or _probes_agree(both, (out, x, w, b), out.numel())))
        if len(_STRIDED_EXACT) > 4096:
            _STRIDED_EXACT.clear()
        _STRIDED_EXACT[key] = exact
    if not exact:
        out.copy_(alone)
    return out


# What the expanded linear can fuse: "gelu" is the exact (erf) GELU of nn.GELU(), "gelu_tanh"
# its tanh approximation (nn.GELU(approximate="tanh")).
ACTIVATIONS = ("", "relu", "gelu", "gelu_tanh", "silu")
# Their gradient needs the pre-activation, which the forward saves (ReLU's needs its output).
SMOOTH_ACTIVATIONS = ("gelu", "gelu_tanh", "silu")


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def apply_activation_(y: Tensor, activation: str) -> Tensor:
    """``activation`` applied to y in place (aten's own kernels: the same bits as the
    unfused nn.ReLU / nn.GELU / nn.SiLU)."""
    if activation == "relu":
        y.relu_()
    elif activation in ("gelu", "gelu_tanh"):
        torch.ops.aten.gelu_(y, approximate="none" if activation == "gelu" else "tanh")
    elif activation == "silu":
        torch.ops.aten.silu_(y)
    return y


def activation_grad(activation: str, dy: Tensor, saved: Tensor, out: Maybe = None) -> Tensor:
    """dy through ``activation``'s gradient; ``saved`` is the output (ReLU) or the
    pre-activation (the smooth ones), of dy's shape.  Written into ``out`` when given."""
    aten, kw = torch.ops.aten, {}
    if activation == "relu":
        args, op = (dy, saved, 0), aten.threshold_backward
    elif activation in ("gelu", "gelu_tanh"):
        args, op = (dy, saved), aten.gelu_backward
        kw["approximate"] = "none" if activation == "gelu" else "tanh"
    elif activation == "silu":
        args, op = (dy, saved), aten.silu_backward
    else:
        raise ValueError(f"no gradient for activation {activation!r}")
    return op(*args, **kw) if out is None else op.grad_input(*args, grad_input=out, **kw)


def saved_columns(saved: Tensor, width: int, c0: int, c1: int) -> Tensor:
    """Columns [c0, c1) of a (N, width) output, out of ``saved``, which holds the output's
    last ``saved.shape[1]`` columns."""
    first = width - saved.shape[1]
    if c0 < first:
        raise RuntimeError(f"the fused activation's backward reads output columns {c0}..{c1} "
                           f"but the forward saved only columns {first}..{width}")
    return saved[:, c0 - first:c1 - first]


def conv_out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    """A convolution's output length along one dimension."""
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def conv_memory_format(x: Tensor) -> torch.memory_format:
    """The memory format of a conv's y and dx: channels_last where x is channels_last (and
    not NCHW-contiguous as well, as with one channel), else NCHW contiguous.  One rule for
    every backend and the ops' fake implementations, so a compiled graph gets the strides it
    was traced with (kernels/expanded_conv.py, which imports nothing of the package, keeps
    the same rule as ``_memory_format``)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def reads_frozen_dy(w_couple: Maybe, need_dx_new: bool, need_dx_old: bool,
                    need_dcouple: bool) -> bool:
    """Whether a linear backward reads dy's frozen columns: for dcouple, dx_old, or dx_new
    through the coupling block."""
    coupled = w_couple is not None and w_couple.shape[1] > 0
    return need_dcouple or need_dx_old or ((need_dx_new or need_dx_old) and coupled)


def activation_grad_full(dy: Tensor, activation: str, saved: Tensor, o_f: int,
                         old_too: bool) -> Tensor:
    """A full-width dy for kernels that read it whole: the newest columns through the
    activation's gradient, the frozen ones too when ``old_too``, else left unset (the
    caller's kernels do not read them)."""
    o = dy.shape[1]
    dz = torch.empty_like(dy)
    if o > o_f:
        activation_grad(activation, dy[:, o_f:], saved_columns(saved, o, o_f, o),
                        out=dz[:, o_f:])
    if old_too and o_f:
        activation_grad(activation, dy[:, :o_f], saved_columns(saved, o, 0, o_f),
                        out=dz[:, :o_f])
    return dz


def linear_forward(x: Tensor, w_frozen: Tensor, b_frozen: Maybe, w_new: Tensor, b_new: Maybe,
                   w_couple: Maybe, frozen_out_groups: Sequence[int],
                   frozen_k_ends: Sequence[int], activation: str = "",
                   pre: Maybe = None) -> Tensor:
    if activation not in ACTIVATIONS:
        check_activation(activation)  # (raises; a call per layer spared where it would not)
    o_f, i_f = w_frozen.shape
    y = x.new_empty((x.shape[0], o_f + w_new.shape[0]))
    if x.shape[0] == 0:
        return y
    bias_in_y = _one_bias_pass(y) and _fill_biases(y, b_frozen, b_new, o_f)
    for r0, r1, k in _frozen_row_blocks(frozen_out_groups, frozen_k_ends):
        out = y[:, r0:r1]
        _frozen_affine_into(out, x[:, :k], *_frozen_block(w_frozen, b_frozen, r0, r1, k),
                            bias_in_y)
        if w_couple is not None and w_couple.shape[1]:
            # out-of-place addmm: the profiler counts it (tests compare FLOP counts)
            out.copy_(torch.addmm(out, x[:, i_f:], w_couple[r0:r1].t()))
    if w_new.shape[0]:
        _affine_into(y[:, o_f:], x, w_new, b_new, bias_in_y)
    if pre is not None and pre.shape[1]:
        pre.copy_(y[:, y.shape[1] - pre.shape[1]:])
    return apply_activation_(y, activation)  # in place: no second (N, O) tensor


def linear_backward(dy: Tensor, x: Tensor, w_frozen: Tensor, w_new: Tensor, w_couple: Maybe,
                    frozen_out_groups: Sequence[int], frozen_k_ends: Sequence[int],
                    need_dx_new: bool, need_dx_old: bool, need_dw: bool, need_db: bool,
                    need_dcouple: bool, saved: Maybe = None, activation: str = ""):
    o_f, i_f = w_frozen.shape
    o = dy.shape[1]
    coupled = w_couple is not None and w_couple.shape[1] > 0 and o_f > 0
    need_dx = need_dx_new or need_dx_old
    # The frozen rows' dy is read only for dcouple, dx_old and the coupled dx_new: with a
    # fused activation, its gradient is applied to those columns only when one is wanted.
    dy_new = dy[:, o_f:]
    dy_old = None  # (a view costs host time: made only where it is read)
    if reads_frozen_dy(w_couple, need_dx_new, need_dx_old, need_dcouple):
        dy_old = dy[:, :o_f]
        if activation and o_f:
            dy_old = activation_grad(activation, dy_old, saved_columns(saved, o, 0, o_f))
    if activation and o > o_f:  # (no newest column: no pre-activation of one was saved)
        dy_new = activation_grad(activation, dy_new, saved_columns(saved, o, o_f, o))
    dx = dw = db = dcouple = None
    if need_dw:
        dw = dy_new.t() @ x
    if need_db:
        db = dy_new.sum(0)
    if need_dcouple and w_couple is not None:
        dcouple = dy_old.t() @ x[:, i_f:]
    if need_dx:
        # The zeros of the old columns nobody reads come from one contiguous fill of the
        # whole tensor, written over after: no slower than a fill of the strided old
        # columns (an H200 took 91 us for those of a 16384 x 5120 bf16 dx; on 2 CPU cores
        # a 4096 x 1280 fp32 dx with its product took 2.7 ms against 2.8 strided), and
        # one call less.
        dx = x.new_empty(x.shape) if need_dx_old else x.new_zeros(x.shape)
        dx_new = dx[:, i_f:]
        torch.mm(dy_new, w_new[:, i_f:], out=dx_new)
        if coupled:
            dx_new.copy_(torch.addmm(dx_new, dy_old, w_couple))
        if need_dx_old:
            dx_old = dx[:, :i_f]
            torch.mm(dy_new, w_new[:, :i_f], out=dx_old)
            for r0, r1, k in _frozen_row_blocks(frozen_out_groups, frozen_k_ends):
                dx_old[:, :k].copy_(torch.addmm(dx_old[:, :k], dy_old[:, r0:r1],
                                                w_frozen[r0:r1, :k]))
    return dx, dw, db, dcouple


# ---------------------------------------------------------------------------------------
# Conv2d (NCHW; channels are the groups)
# ---------------------------------------------------------------------------------------
def _conv(x: Tensor, w: Tensor, b: Maybe, stride, padding, dilation, groups: int = 1) -> Tensor:
    if w.shape[0] == 0 or w.shape[1] == 0 or x.shape[1] == 0:
        # aten refuses empty filters; an empty sum is zeros (plus the bias)
        def pair(v):
            return (int(v),) * 2 if isinstance(v, int) else tuple(int(a) for a in v)
        (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
        ho = conv_out_size(x.shape[2], w.shape[2], sh, ph, dh)
        wo = conv_out_size(x.shape[3], w.shape[3], sw, pw, dw)
        y = x.new_zeros((x.shape[0], w.shape[0], ho, wo))
        return y if b is None else y + b.view(1, -1, 1, 1)
    return torch.nn.functional.conv2d(x, w, b, stride, padding, dilation, groups)


# The newest rows' filters over the frozen inputs ride along in the last frozen block's
# convolution: one call writes those frozen channels and the newest ones into one tensor (no
# second pass over the input, no torch.cat), and only the newest filters' columns over the
# newest inputs run apart.  On the CPU every output channel of a convolution is its own sum,
# so the frozen channels keep their bits; that is the convolution library's choice, not its
# promise, so the first call of each shape checks it bit for bit against the frozen block
# alone, and a shape that ever differs keeps the separate convolutions.
_JOINT_EXACT: dict = {}  # shape key -> do the frozen rows keep their bits


def _joint_rows(x: Tensor, w_old: Tensor, b_old: Maybe, w_new: Tensor, b_new: Maybe, stride,
                padding, dilation, groups: int) -> Maybe:
    """conv(x, [w_old; w_new]) whose first rows equal conv(x, w_old) bit for bit, or None
    when this shape does not keep them (found at this call or an earlier one; the caller
    then convolves apart)."""
    if (not _checkable(x) or (b_old is None) != (b_new is None) or x.shape[1] == 0
            or w_old.shape[0] == 0 or w_new.shape[0] == 0 or torch.jit.is_tracing()):
        return None  # (under torch.jit.trace: no check to record, convolve apart)
    # (the weights' strides too: a channels_last frozen weight takes another path alone)
    key = (x.dtype, tuple(x.shape), tuple(x.stride()), tuple(w_old.shape), w_old.stride(),
           tuple(w_new.shape), w_new.stride(), str(stride), str(padding), str(dilation),
           groups, b_old is not None, torch.get_num_threads())
    ok = _JOINT_EXACT.get(key)
    if ok is False:
        return None
    w = torch.cat([w_old, w_new])
    b = None if b_old is None else torch.cat([b_old, b_new])
    y = _conv(x, w, b, stride, padding, dilation, groups)
    if ok is None:
        def alone_of(xx):
            if groups == 1:
                return _conv(xx, w_old, b_old, stride, padding, dilation)
            c_old = w_old.shape[0] * xx.shape[1] // w.shape[0]  # depthwise: first channels
            return _conv(_first_channels(xx, c_old), w_old, b_old, stride, padding, dilation,
                         c_old)

        def both(px):  # (see _STRIDED_EXACT: one call's data may round alike by chance)
            return (_conv(px, w, b, stride, padding, dilation, groups)[:, :w_old.shape[0]],
                    alone_of(px))
        alone = alone_of(x)
        ok = (_same_bits(y[:, :w_old.shape[0]], alone)
              and _probes_agree(both, (x,), alone.numel()))
        if len(_JOINT_EXACT) > 4096:
            _JOINT_EXACT.clear()
        _JOINT_EXACT[key] = ok
        if not ok:
            # This call convolves apart too, as every later one will: keeping the joint
            # result's new rows made the first call's newest channels round differently from
            # the next call's on the same input (seen on an AMD EPYC CPU).
            return None
    return y


# ---- an eval-mode BatchNorm folded into the frozen output channels -------------------------
def bn_scale(var: Tensor, weight: Maybe, eps: float) -> Tensor:
    """Per-channel factor of an eval-mode BatchNorm, ``weight / sqrt(var + eps)``: the
    derivative of its output by its input."""
    scale = torch.rsqrt(var + eps)
    return scale if weight is None else scale * weight


def frozen_batch_norm(y: Tensor, frozen_bn) -> Tensor:
    """``y`` with its first O_f channels through the eval-mode BatchNorm ``frozen_bn`` =
    (mean, var, weight, bias, eps) of length O_f; the other channels unchanged.

    The frozen channels keep the bits of the unfused conv -> BatchNorm: a per-channel
    multiply-add in torch ops differs from aten's BatchNorm kernel in the last bit (seen
    on CPU for every float dtype), so this runs ``F.batch_norm`` itself, over the whole
    output as the unfused BatchNorm does (same shape, memory format and kernel), with
    stand-in statistics for the newest channels (``padded_stats``), whose raw
    values are then put back."""
    mean, var, weight, bias, eps = frozen_bn
    n_new = y.shape[1] - mean.shape[0]
    if n_new:
        mean, var, weight, bias = padded_stats.pad((mean, var, weight, bias), n_new)
    out = torch.nn.functional.batch_norm(y, mean, var, weight, bias, False, 0.0, eps)
    if n_new:
        out[:, -n_new:] = y[:, -n_new:]
    return out


def frozen_dy(dy: Tensor, o_f: int, scale: Maybe,
              memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """The frozen columns of dy (contiguous in ``memory_format``), times a folded
    BatchNorm's scale if any."""
    if scale is None:
        return dy[:, :o_f].contiguous(memory_format=memory_format)
    scaled = torch.mul(dy[:, :o_f], scale.to(dy.dtype).view((1, -1) + (1,) * (dy.dim() - 2)))
    return scaled.contiguous(memory_format=memory_format)


def conv2d_forward(x: Tensor, w_frozen: Tensor, b_frozen: Maybe, w_new: Tensor, b_new: Maybe,
                   w_couple: Maybe, frozen_out_groups: Sequence[int],
                   frozen_k_ends: Sequence[int], stride, padding, dilation,
                   depthwise: bool, frozen_bn=None) -> Tensor:
    if frozen_bn is not None and not w_frozen.shape[0]:
        frozen_bn = None
    parts, whole = _conv2d_parts(x, w_frozen, b_frozen, w_new, b_new, w_couple,
                                 frozen_out_groups, frozen_k_ends, stride, padding, dilation,
                                 depthwise)
    if frozen_bn is not None and not whole and parts[0].shape[1] == w_frozen.shape[0]:
        # All frozen channels are one tensor of their own, the pretrained conv's output: its
        # BatchNorm runs on it alone, as in the pretrained model (aten's per-channel kernel:
        # the same bits as over the whole output), with no stand-in statistics, no pass over
        # the newest channels and no copy of them back.
        mean, var, weight, bias, eps = frozen_bn
        parts[0] = torch.nn.functional.batch_norm(parts[0], mean, var, weight, bias, False, 0.0,
                                                  eps)
        frozen_bn = None
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    if frozen_bn is not None:
        y = frozen_batch_norm(y, frozen_bn)
    return y


def _conv2d_parts(x: Tensor, w_frozen: Tensor, b_frozen: Maybe, w_new: Tensor, b_new: Maybe,
                  w_couple: Maybe, frozen_out_groups: Sequence[int],
                  frozen_k_ends: Sequence[int], stride, padding, dilation,
                  depthwise: bool) -> Tuple[List[Tensor], bool]:
    """(parts, whole): the conv's output as channel blocks in order, to be concatenated;
    ``whole`` when one part mixes frozen and newest channels (a joint convolution).  Else
    each frozen block is a part of its own, followed by the newest rows' part."""
    if depthwise:
        c_f = _depthwise_frozen_in(frozen_k_ends)
        c_new = x.shape[1] - c_f
        if c_f and c_new:
            y = _joint_rows(x, w_frozen, b_frozen, w_new, b_new, stride, padding, dilation,
                            groups=x.shape[1])
            if y is not None:
                return [y], True
        y_old = _conv(_first_channels(x, c_f), w_frozen, b_frozen, stride, padding, dilation,
                      groups=c_f) \
            if c_f else None
        y_new = _conv(x[:, c_f:], w_new, b_new, stride, padding, dilation, groups=c_new) \
            if c_new else None
        parts = [p for p in (y_old, y_new) if p is not None]
        if not parts:
            raise ValueError("depthwise conv with no channels")
        return parts, False
    i_f = w_frozen.shape[1]
    blocks = list(_frozen_row_blocks(frozen_out_groups, frozen_k_ends))
    coupled = w_couple is not None and w_couple.shape[1] > 0
    joint = None
    if blocks and not coupled:
        r0, r1, k = blocks[-1]
        joint = _joint_rows(_first_channels(x, k),
                            *_frozen_block(w_frozen, b_frozen, r0, r1, k), w_new[:, :k], b_new,
                            stride, padding, dilation, 1)
        if joint is not None:
            blocks.pop()
            if k < x.shape[1]:  # the newest filters' columns over the inputs after k
                # (add_ on the view: `joint[...] += t` would also copy the view onto itself)
                joint[:, r1 - r0:].add_(_conv(x[:, k:], w_new[:, k:], None, stride, padding,
                                              dilation))
    parts = []
    for r0, r1, k in blocks:
        y = _conv(_first_channels(x, k), *_frozen_block(w_frozen, b_frozen, r0, r1, k), stride,
                  padding, dilation)
        if coupled:
            y = y + _conv(x[:, i_f:], w_couple[r0:r1], None, stride, padding, dilation)
        parts.append(y)
    if joint is not None:
        parts.append(joint)
    elif w_new.shape[0] or not parts:
        parts.append(_conv(x, w_new, b_new, stride, padding, dilation))
    return parts, joint is not None


def _first_channels(x: Tensor, k: int) -> Tensor:
    """x's first k channels for a frozen block's convolution.  One channel out of a
    channels_last map is a slice aten makes dense its own way, and then convolves along
    another path than the pretrained conv's dense 1-channel input (1 ulp off, seen on CPU):
    that slice is made dense first (one channel: a small copy)."""
    s = x[:, :k]
    if k == 1 and x.shape[1] > 1 and not s.is_contiguous():
        s = s.contiguous()
    return s


def _depthwise_frozen_in(frozen_k_ends: Sequence[int]) -> int:
    """Frozen input channels of a depthwise conv (each channel is its own filter group)."""
    return frozen_k_ends[-1] if frozen_k_ends else 0


def _conv_grads(dy: Tensor, x: Tensor, w: Tensor, stride, padding, dilation, groups: int,
                need_dx: bool, need_dw: bool, need_db: bool):
    """Only the asked-for gradients of y = conv(x, w) + b (aten's output mask)."""
    if not (need_dx or need_dw or need_db):
        return None, None, None
    if w.shape[0] == 0 or x.shape[1] == 0 or x.shape[0] == 0:
        # aten refuses empty weights; the gradients of an empty product are zeros
        return (x.new_zeros(x.shape) if need_dx else None,
                w.new_zeros(w.shape) if need_dw else None,
                w.new_zeros(w.shape[:1]) if need_db else None)
    if need_dx and not need_dw:
        x = _shape_of(x)
    pair = lambda v: [int(v)] * 2 if isinstance(v, int) else [int(a) for a in v]  # noqa: E731
    dx, dw, db = torch.ops.aten.convolution_backward(
        dy, x, w, [w.shape[0]] if need_db else None, pair(stride), pair(padding),
        pair(dilation), False, [0, 0], groups, [need_dx, need_dw, need_db])
    return dx, dw, db


def _rows_then_images(dy: Tensor) -> bool:
    """Whether :func:`_bias_grad` sums ``dy``: a dense NCHW one with pixels to sum."""
    return dy.dim() == 4 and dy.is_contiguous() and dy.shape[2] * dy.shape[3] > 1


def _bias_grad(dy: Tensor) -> Tensor:
    """db of an NCHW-contiguous dy: each (image, channel) row's pixels summed first (a
    reduction along contiguous memory), then the images, in float32 at least, as aten's.
    aten's one sum over (0, 2, 3) interleaves the two: on the H200 it took 59 us to read
    the 26 MB dy of the ResNet-50 stage's new channels (2026-12-01), against about 10 at
    the copy rate."""
    n, c, h, w = dy.shape
    acc = torch.promote_types(dy.dtype, torch.float32)
    return dy.view(n, c, h * w).sum(2, dtype=acc).sum(0).to(dy.dtype)


def _shape_of(x: Tensor) -> Tensor:
    """``x``, or where it is a channel slice (not dense), an uninitialized tensor of its shape
    and layout.  The input gradient of a convolution reads only the input's shape, but aten
    first makes the input dense: a copy of the slice (on the H200's ResNet-50 stage, 26 MB for
    the newest 64 channels, 103 MB for the old 256) that nothing reads."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    channels_inner = x.dim() == 4 and x.stride(1) == 1 and x.shape[1] > 1
    fmt = torch.channels_last if channels_inner else torch.contiguous_format
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def conv2d_backward(dy: Tensor, x: Tensor, w_frozen: Tensor, w_new: Tensor, w_couple: Maybe,
                    frozen_out_groups: Sequence[int], frozen_k_ends: Sequence[int], stride,
                    padding, dilation, depthwise: bool, need_dx_new: bool, need_dx_old: bool,
                    need_dw: bool, need_db: bool, need_dcouple: bool,
                    frozen_dy_scale: Maybe = None):
    o_f = w_frozen.shape[0]
    dy_new = dy[:, o_f:]
    # dy's slices go in x's memory format: aten's conv backward takes its layout from x and
    # the weight, and would copy an NCHW dy back to channels_last
    fmt = conv_memory_format(x)
    if depthwise:
        c_f = _depthwise_frozen_in(frozen_k_ends)
        c_new = x.shape[1] - c_f
        dx_new = dw = db = None
        if need_dx_new or need_dx_old or need_dw or need_db:
            dx_new, dw, db = _conv_grads(dy_new.contiguous(memory_format=fmt), x[:, c_f:], w_new,
                                         stride, padding, dilation, max(c_new, 1),
                                         need_dx_new or need_dx_old, need_dw, need_db)
        dx = None
        if need_dx_new or need_dx_old:
            dx = torch.zeros_like(x)  # in x's memory format: elementwise grads stay fast
            if need_dx_old and c_f:
                dx[:, :c_f] = _conv_grads(frozen_dy(dy, o_f, frozen_dy_scale, fmt), x[:, :c_f],
                                          w_frozen, stride, padding, dilation, c_f, True, False,
                                          False)[0]
            if dx_new is not None:
                dx[:, c_f:] = dx_new
        return dx, dw, db, None

    i_f = w_frozen.shape[1]
    dy_new = dy_new.contiguous(memory_format=fmt)
    # dW and db of the trainable rows: one weight-gradient conv over the whole input (db from
    # aten there, except from an NCHW dy: _bias_grad).
    own_db = need_db and _rows_then_images(dy_new)
    _, dw, db = _conv_grads(dy_new, x, w_new, stride, padding, dilation, 1, False, need_dw,
                            need_db and not own_db)
    if own_db:
        db = _bias_grad(dy_new)
    need_dx = need_dx_new or need_dx_old
    coupled = w_couple is not None and w_couple.shape[1] > 0 and o_f > 0
    # The frozen columns of dy are read (and a folded BatchNorm's scale applied to them)
    # only for dcouple, dx_old and the coupled dx_new.
    dy_old = None
    if o_f and ((need_dcouple and w_couple is not None) or need_dx_old or (need_dx and coupled)):
        dy_old = frozen_dy(dy, o_f, frozen_dy_scale, fmt)
    dcouple = None
    if need_dcouple and w_couple is not None:
        dcouple = (_conv_grads(dy_old, x[:, i_f:], w_couple, stride, padding, dilation, 1, False,
                               True, False)[1] if o_f else torch.zeros_like(w_couple))
    dx = None
    if need_dx:
        if need_dx_old:
            dx = _conv_grads(dy_new, x, w_new, stride, padding, dilation, 1, True, False,
                             False)[0]
            for r0, r1, k in _frozen_row_blocks(frozen_out_groups, frozen_k_ends):
                dx[:, :k] += _conv_grads(dy_old[:, r0:r1].contiguous(memory_format=fmt), x[:, :k],
                                         w_frozen[r0:r1, :k], stride, padding, dilation, 1, True,
                                         False, False)[0]
        else:
            dx = torch.zeros_like(x)  # in x's memory format (channels_last stays so)
            if x.shape[1] > i_f and w_new.shape[0]:
                dx[:, i_f:] = _conv_grads(dy_new, x[:, i_f:], w_new[:, i_f:], stride, padding,
                                          dilation, 1, True, False, False)[0]
        if coupled:
            dx[:, i_f:] += _conv_grads(dy_old, x[:, i_f:], w_couple, stride, padding, dilation,
                                       1, True, False, False)[0]
    return dx, dw, db, dcouple
