"""Expanded BatchNorm: frozen channels always normalise as in eval mode (a fixed per-channel
affine map with their pretrained statistics); the newest channels are an ordinary,
trainable BatchNorm with running statistics of their own."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import _frozen


class _ExpandedBatchNorm(nn.Module):
    _expected_dims: Tuple[int, ...] = ()

    def __init__(self, groups: Sequence[int], eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None):
        super().__init__()
        groups = tuple(int(g) for g in groups)
        if not groups or any(g < 0 for g in groups):
            raise ValueError(f"groups must be a non-empty tuple of widths >= 0, got {groups}")
        if not track_running_stats:
            raise ValueError("an expanded BatchNorm needs track_running_stats=True: the frozen "
                             "channels must keep their pretrained statistics")
        self.groups = groups
        self.eps, self.momentum, self.affine = eps, momentum, affine
        kw = {"device": device, "dtype": dtype}
        n_f, n_new = sum(groups[:-1]), groups[-1]
        self._set_frozen(torch.zeros(n_f, **kw), torch.ones(n_f, **kw),
                         torch.ones(n_f, **kw) if affine else None,
                         torch.zeros(n_f, **kw) if affine else None)
        self._set_new(n_new, kw)
        # Kept only so that the task-0 BatchNorm comes back with its exact state.
        self.register_buffer("num_batches_tracked_frozen",
                             torch.tensor(0, dtype=torch.long, device=device))

    # ---- storage ------------------------------------------------------------------------
    def _set_frozen(self, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                    bias: Optional[Tensor]):
        self.register_buffer("running_mean_frozen", mean)
        self.register_buffer("running_var_frozen", var)
        self.weight_frozen = _frozen(weight) if weight is not None else None
        self.bias_frozen = _frozen(bias) if bias is not None else None

    def _set_new(self, n: int, kw):
        self.register_buffer("running_mean_new", torch.zeros(n, **kw))
        self.register_buffer("running_var_new", torch.ones(n, **kw))
        self.register_buffer("num_batches_tracked_new", torch.tensor(0, dtype=torch.long,
                                                                     device=kw["device"]))
        self.weight_new = nn.Parameter(torch.ones(n, **kw)) if self.affine else None
        self.bias_new = nn.Parameter(torch.zeros(n, **kw)) if self.affine else None

    @classmethod
    def from_bn(cls, bn: nn.modules.batchnorm._BatchNorm, new: int = 0):
        """Widen a trained BatchNorm by ``new`` channels; ``bn`` is left untouched."""
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"from_bn expects a BatchNorm module, got {type(bn).__name__}")
        ref = bn.running_mean if bn.running_mean is not None else bn.weight
        layer = cls((bn.num_features, new), bn.eps, bn.momentum, bn.affine,
                    bn.track_running_stats, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            layer.running_mean_frozen.copy_(bn.running_mean)
            layer.running_var_frozen.copy_(bn.running_var)
            if bn.affine:
                layer.weight_frozen.copy_(bn.weight)
                layer.bias_frozen.copy_(bn.bias)
            if bn.num_batches_tracked is not None:
                layer.num_batches_tracked_frozen.copy_(bn.num_batches_tracked)
        return layer

    @property
    def num_features(self) -> int:
        return sum(self.groups)

    @property
    def in_groups(self) -> Tuple[int, ...]:
        return self.groups

    out_groups = in_groups

    def expand(self, new: int) -> "_ExpandedBatchNorm":
        """Freeze the newest channels (statistics and affine) and add ``new`` channels."""
        d = lambda name: torch.cat([getattr(self, name + "_frozen").detach(),  # noqa: E731
                                    getattr(self, name + "_new").detach()])
        weight = d("weight") if self.affine else None
        bias = d("bias") if self.affine else None
        kw = {"device": self.running_mean_new.device, "dtype": self.running_mean_new.dtype}
        self._set_frozen(d("running_mean"), d("running_var"), weight, bias)
        self.groups = self.groups + (int(new),)
        self._set_new(int(new), kw)
        return self

    # ---- compute -------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in self._expected_dims or x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__} expected a {'/'.join(map(str, self._expected_dims))}-D "
                f"input with {self.num_features} channels (groups {self.groups}) in dim 1, "
                f"got shape {tuple(x.shape)}")
        n_f = self.running_mean_frozen.shape[0]
        parts = []
        if n_f:
            parts.append(F.batch_norm(x[:, :n_f], self.running_mean_frozen,
                                      self.running_var_frozen, self.weight_frozen,
                                      self.bias_frozen, False, 0.0, self.eps))
        if self.groups[-1]:
            parts.append(self._new_channels(x[:, n_f:]))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _new_channels(self, x: Tensor) -> Tensor:
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked_new.add_(1)
            if momentum is None:  # cumulative moving average, as nn.BatchNorm does
                momentum = 1.0 / float(self.num_batches_tracked_new)
        return F.batch_norm(x, self.running_mean_new, self.running_var_new, self.weight_new,
                            self.bias_new, self.training, momentum or 0.0, self.eps)

    def to_bn(self, task: Optional[int] = None) -> nn.modules.batchnorm._BatchNorm:
        """A plain BatchNorm (eval statistics) of task ``task``'s channels (default: all)."""
        k = len(self.groups) - 1 if task is None else task
        if not 0 <= k < len(self.groups):
            raise ValueError(f"task must be in 0..{len(self.groups) - 1}, got {task}")
        n = sum(self.groups[: k + 1])
        cat = lambda name: torch.cat([getattr(self, name + "_frozen").detach(),  # noqa: E731
                                      getattr(self, name + "_new").detach()])[:n]
        bn = self._plain_type()(n, self.eps, self.momentum, self.affine, True,
                                device=self.running_mean_new.device,
                                dtype=self.running_mean_new.dtype)
        with torch.no_grad():
            bn.running_mean.copy_(cat("running_mean"))
            bn.running_var.copy_(cat("running_var"))
            if self.affine:
                bn.weight.copy_(cat("weight"))
                bn.bias.copy_(cat("bias"))
            if k == 0:
                bn.num_batches_tracked.copy_(self.num_batches_tracked_frozen)
        return bn

    def extra_repr(self) -> str:
        return f"groups={self.groups}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"


class ExpandedBatchNorm1d(_ExpandedBatchNorm):
    _expected_dims = (2, 3)

    @staticmethod
    def _plain_type():
        return nn.BatchNorm1d


class ExpandedBatchNorm2d(_ExpandedBatchNorm):
    _expected_dims = (4,)

    @staticmethod
    def _plain_type():
        return nn.BatchNorm2d
