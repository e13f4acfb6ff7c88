"""ExpandedConv2d: a drop-in widened ``nn.Conv2d`` (dense or depthwise)."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..layout import Layout
from .blocks import (ExpandedBlocks, as_channels_last, channels_last_strided, init_new_rows,
                     refuse_not_widenable)
from .input_grad import skips_old_input_grad
from .norm import ExpandedBatchNorm2d, fold_in_force


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")  # nn.Conv2d's


def _whole_pair(v, name: str, least: int) -> Tuple[int, int]:
    """``v`` (an int or a pair of ints, each >= ``least``) as a pair; refused, never
    truncated, otherwise (a kernel size of 2.7 is no kernel size)."""
    whole = lambda a: isinstance(a, numbers.Integral) and not isinstance(a, bool)  # noqa: E731
    vals = (v,) if whole(v) else tuple(v) if isinstance(v, (tuple, list)) else None
    if vals is None or len(vals) not in (1, 2) or not all(whole(a) and a >= least
                                                          for a in vals):
        raise ValueError(f"ExpandedConv2d: {name} must be an int >= {least} or a pair of "
                         f"them, got {v!r}")
    return (int(vals[0]), int(vals[-1]))


def _same_padding(kernel_size, dilation) -> Tuple[int, int]:
    """The explicit padding of padding='same' (stride 1)."""
    total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
    if any(t % 2 for t in total):
        raise ValueError("ExpandedConv2d: padding='same' with an even effective kernel pads "
                         "asymmetrically; use an explicit padding")
    return (total[0] // 2, total[1] // 2)


def _resolved_padding(padding, kernel_size, dilation) -> Tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        return _same_padding(kernel_size, dilation)
    if isinstance(padding, str):
        raise ValueError(f"ExpandedConv2d: padding must be 'same', 'valid', an int or a pair, "
                         f"got {padding!r}")
    return _whole_pair(padding, "padding", 0)


def _explicit_padding(conv: nn.Conv2d) -> Tuple[int, int]:
    return _resolved_padding(conv.padding, conv.kernel_size, conv.dilation)


class ExpandedConv2d(ExpandedBlocks):
    """A Conv2d whose channels are split into groups, staircase as ExpandedLinear.

    ``depthwise=True``: every channel has its own filter(s) (``groups == in_channels``);
    widening adds new filters on new channels, ``depth_multiplier`` outputs per channel.

    :meth:`fold_batchnorm` lets the layer apply the frozen channels' eval-mode map of the
    ExpandedBatchNorm2d that follows it (see ``expanse_fast.fold_batchnorms``).
    """

    # The ExpandedBatchNorm2d whose frozen channels this layer applies, or None.  Held as a
    # plain attribute, not a submodule: state dicts and module paths stay as they were.
    _folded_bn: Optional[nn.Module] = None
    # How the border is padded; not "zeros": the input is padded first, as nn.Conv2d does,
    # and every backend convolves it without padding.
    padding_mode: str = "zeros"

    def __init__(self, in_groups: Sequence[int], out_groups: Sequence[int], kernel_size,
                 stride=1, padding=0, dilation=1, bias: bool = True, mode: str = "isolated",
                 depthwise: bool = False, device=None, dtype=None, padding_mode: str = "zeros"):
        super().__init__()
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got "
                             f"{padding_mode!r}")
        self.padding_mode = padding_mode
        lay = Layout(tuple(in_groups), tuple(out_groups), mode)
        kh, kw = _whole_pair(kernel_size, "kernel_size", 1)
        self.kernel_size = (kh, kw)
        self.stride = _whole_pair(stride, "stride", 1)
        self.dilation = _whole_pair(dilation, "dilation", 1)
        self.padding = _resolved_padding(padding, self.kernel_size, self.dilation)
        if padding == "same" and self.stride != (1, 1):
            raise ValueError("ExpandedConv2d: padding='same' needs stride 1 (as in nn.Conv2d)")
        self.depthwise = bool(depthwise)
        if self.depthwise:
            self.depth_multiplier = self._check_depthwise(lay)
        kw_ = {"device": device, "dtype": dtype}
        per_in = lambda n: 1 if self.depthwise else n  # noqa: E731  (input channels per filter)
        w_frozen = torch.zeros((lay.frozen_out, per_in(lay.frozen_in), kh, kw), **kw_)
        w_new = init_new_rows(torch.empty((lay.new_out, per_in(lay.in_features), kh, kw), **kw_),
                              per_in(lay.in_features) * kh * kw)
        w_couple = (torch.zeros((lay.frozen_out, lay.new_in, kh, kw), **kw_)
                    if mode == "coupled" else None)
        b_frozen = torch.zeros(lay.frozen_out, **kw_) if bias else None
        b_new = torch.zeros(lay.new_out, **kw_) if bias else None
        self._set_blocks(lay, w_frozen, b_frozen, w_new, b_new, w_couple)
        self.skip_old_input_grad = False
        self.backend: Optional[str] = None  # None: follow xf.set_backend

    @staticmethod
    def _check_depthwise(lay: Layout) -> int:
        if lay.mode != "isolated":
            raise ValueError("a depthwise ExpandedConv2d only has the isolated layout (its "
                             "channels never mix)")
        ratios = {o // i for i, o in zip(lay.in_groups, lay.out_groups) if i}
        if len(ratios) > 1 or any(o != i * max(ratios | {1}) for i, o in
                                  zip(lay.in_groups, lay.out_groups)):
            raise ValueError(f"depthwise conv: every out group must be the depth multiplier "
                             f"times its in group, got in {lay.in_groups}, out {lay.out_groups}")
        return max(ratios | {1})

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, new_in: int = 0, new_out: int = 0,
                  mode: str = "isolated") -> "ExpandedConv2d":
        """Widen a trained ``nn.Conv2d`` (groups 1, or depthwise); ``conv`` stays untouched.

        For a depthwise conv ``new_out`` must be ``depth_multiplier * new_in``.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        refuse_not_widenable(conv, "from_conv")
        depthwise = conv.groups > 1
        if depthwise and conv.groups != conv.in_channels:
            raise ValueError(f"ExpandedConv2d supports groups=1 or depthwise (groups == "
                             f"in_channels); got groups={conv.groups} with {conv.in_channels} "
                             "input channels")
        w = conv.weight
        layer = cls((conv.in_channels, new_in), (conv.out_channels, new_out), conv.kernel_size,
                    conv.stride, _explicit_padding(conv), conv.dilation,
                    bias=conv.bias is not None, mode=mode, depthwise=depthwise,
                    device=w.device, dtype=w.dtype, padding_mode=conv.padding_mode)
        with torch.no_grad():
            # the pretrained weight's own strides (a channels_last model's): aten picks its
            # convolution by them, and a 1-channel filter in either layout is the same bytes
            # under other strides, convolved another way (1 ulp off)
            layer.weight_frozen.data = w.detach().clone(memory_format=torch.preserve_format)
            if conv.bias is not None:
                layer.bias_frozen.copy_(conv.bias)
        return layer

    @property
    def in_channels(self) -> int:
        return self.layout.in_features

    @property
    def out_channels(self) -> int:
        return self.layout.out_features

    def _fan_in(self, in_features: int) -> int:
        kh, kw = self.kernel_size
        return (1 if self.depthwise else in_features) * kh * kw

    def dense_weight(self, task: Optional[int] = None) -> Tensor:
        if not self.depthwise:
            return super().dense_weight(task)
        full = torch.cat([self.weight_frozen.detach(), self.weight_new.detach()])
        if task is None:
            return full
        return full[: self.layout.task(task).out_features].clone()

    def expand(self, new_in: int, new_out: int) -> "ExpandedConv2d":
        if not self.depthwise:
            return super().expand(new_in, new_out)
        lay = self.layout.expanded(new_in, new_out)
        self._check_depthwise(lay)
        w_f = self.dense_weight()
        w_new = init_new_rows(w_f.new_empty((new_out,) + tuple(w_f.shape[1:])), self._fan_in(1))
        b_f = self.dense_bias()
        b_new = b_f.new_zeros((new_out,)) if b_f is not None else None
        if channels_last_strided(self.weight_frozen):  # (as ExpandedBlocks.expand)
            w_f, w_new = as_channels_last(w_f), as_channels_last(w_new)
        self._set_blocks(lay, w_f, b_f, w_new, b_new, None)
        return self

    # ---- a folded BatchNorm --------------------------------------------------------------
    @property
    def folded_batchnorm(self) -> Optional[nn.Module]:
        """The ExpandedBatchNorm2d whose frozen channels this layer applies, or None."""
        return self._folded_bn

    def fold_batchnorm(self, bn: nn.Module) -> "ExpandedConv2d":
        """Apply ``bn``'s frozen channels (a fixed eval-mode map) in this layer's output and
        let ``bn`` normalise only its newest channels.  ``bn`` must be an
        ExpandedBatchNorm2d with this layer's output groups whose only input is this layer's
        output; it stays where it is in the model (nothing is registered, state dicts do not
        change).  Its statistics are read at each call, so they follow ``.to()``."""
        if not isinstance(bn, ExpandedBatchNorm2d):
            raise TypeError(f"fold_batchnorm expects an ExpandedBatchNorm2d, got "
                            f"{type(bn).__name__}")
        if self._folded_bn is not None or bn.frozen_folded:
            raise ValueError("this conv or this BatchNorm is already folded")
        if tuple(bn.groups) != tuple(self.out_groups):
            raise ValueError(f"cannot fold a BatchNorm with channel groups {tuple(bn.groups)} "
                             f"into a conv with output groups {tuple(self.out_groups)}")
        object.__setattr__(self, "_folded_bn", bn)  # not a submodule
        bn.frozen_folded = True
        return self

    def unfold_batchnorm(self) -> Optional[nn.Module]:
        """Undo :meth:`fold_batchnorm`; returns the BatchNorm (again a whole one) or None."""
        bn = self._folded_bn
        if bn is not None:
            bn.frozen_folded = False
            bn.ran_folded = True
            object.__setattr__(self, "_folded_bn", None)
        return bn

    def _bn_args(self) -> dict:
        bn = self._folded_bn
        if bn is None:
            return {}
        in_force = fold_in_force(self, bn)
        # (the BatchNorm's call follows and reads it; a plain attribute, set without
        # nn.Module.__setattr__'s search of the parameter, buffer and module dicts)
        object.__setattr__(bn, "ran_folded", in_force)
        if not in_force:
            return {}
        if tuple(bn.groups) != tuple(self.out_groups):
            raise RuntimeError(
                f"ExpandedConv2d folds a BatchNorm with channel groups {tuple(bn.groups)} but "
                f"has output groups {tuple(self.out_groups)}: one of the two was expanded "
                "without the other (expand the model with xf.expand, or unfold_batchnorm())")
        mean, var, weight, bias, eps = bn.frozen_map()
        w = self._parameters.get("weight_new")
        if w is None:
            w = self.weight_new
        if mean.is_cpu != w.is_cpu or (not w.is_cpu and mean.device != w.device):
            raise RuntimeError(
                f"ExpandedConv2d on {w.device} folds a BatchNorm on {mean.device}: "
                "a copy of the conv made apart from its BatchNorm (nn.DataParallel replicas, "
                "say) keeps the original one; call unfold_batchnorm() first")
        return dict(bn_mean=mean, bn_var=var, bn_weight=weight, bn_bias=bias, bn_eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3 and x.shape[0] == self.in_channels:
            return self.forward(x.unsqueeze(0)).squeeze(0)  # unbatched, as nn.Conv2d takes
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ExpandedConv2d expected a 4-D (N, C, H, W) or 3-D (C, H, W) input with "
                f"C = {self.in_channels} (channel groups {self.in_groups}), got shape "
                f"{tuple(x.shape)}")
        lay = self.layout
        padding = self.padding
        if self.padding_mode != "zeros":  # what nn.Conv2d does: pad, then convolve unpadded
            (ph, pw) = padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            padding = (0, 0)
        return ops.expanded_conv2d(
            x, *self._block_tensors(), frozen_out_groups=lay.frozen_out_groups,
            frozen_k_ends=lay.frozen_k_ends, stride=self.stride, padding=padding,
            dilation=self.dilation, depthwise=self.depthwise,
            need_dx_old=not skips_old_input_grad(self, x), **self._bn_args(),
            backend=self.backend)

    def to_conv(self, task: Optional[int] = None) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` computing task ``task``'s outputs (default: all groups)."""
        w, b = self.dense_weight(task), self.dense_bias(task)
        lay = self.layout if task is None else self.layout.task(task)
        conv = nn.Conv2d(lay.in_features, lay.out_features, self.kernel_size, self.stride,
                         self.padding, self.dilation,
                         groups=lay.in_features if self.depthwise else 1, bias=b is not None,
                         padding_mode=self.padding_mode, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            if channels_last_strided(self.weight_frozen):  # as the pretrained weight was
                conv.weight.data = as_channels_last(w)
            else:
                conv.weight.copy_(w)
            if b is not None:
                conv.bias.copy_(b)
        return conv

    def extra_repr(self) -> str:
        return (f"in_groups={self.in_groups}, out_groups={self.out_groups}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, "
                + (f"padding_mode={self.padding_mode!r}, " if self.padding_mode != "zeros"
                   else "")
                + f"bias={self.bias_new is not None}, mode={self.mode!r}"
                + (f", depthwise, multiplier={self.depth_multiplier}" if self.depthwise else "")
                + (", applies the frozen channels of the BatchNorm after it"
                   if self._folded_bn is not None else ""))
