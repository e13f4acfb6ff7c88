"""Batch statistics of an expanded BatchNorm's newest channels over every rank of a process
group (what ``nn.SyncBatchNorm`` does for a plain BatchNorm, whose kernels run on GPUs only).

Training mode only: the mean and the (biased) variance come from two all-reduces, the sums
of ``x`` and then of ``(x - mean)^2`` over the whole group's batch, in float32 (the second
pass keeps the variance exact where the mean is large against the spread).  The all-reduces
are differentiable (_AllReduceSum): backward all-reduces the gradients of the sums, so each
rank's input gradient sees every rank's loss, as the one-process batch norm of the combined
batch would give.  The running statistics take the group's mean and
unbiased variance, so they stay the same on every rank.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


class _AllReduceSum(torch.autograd.Function):
    """The sum of ``t`` over the group's ranks; its gradient is the sum of the ranks'
    gradients (every rank's loss reads the sum).  (torch.distributed.nn's all_reduce does the
    same but is deprecated from torch 2.13 on.)"""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def group_size(group) -> int:
    """Ranks in ``group`` (None: the default group); 1 outside a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def synced_batch_norm(x: Tensor, running_mean: Tensor, running_var: Tensor,
                      weight: Optional[Tensor], bias: Optional[Tensor], momentum: float,
                      eps: float, group=None) -> Tensor:
    """Training-mode batch norm of ``x`` (N, C, ...) with statistics over ``group``'s ranks;
    updates ``running_mean`` and ``running_var`` in place."""
    c = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    shape = (1, c) + (1,) * (x.dim() - 2)
    xf = x.float()
    local = torch.cat([xf.sum(dims), xf.new_full((1,), float(x.numel() // max(c, 1)))])
    total = _AllReduceSum.apply(local, group)
    count = float(total[c].detach())
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got "
                         f"{int(count)} over the process group (input size "
                         f"{tuple(x.shape)} on this rank)")
    mean = total[:c] / count
    centred = xf - mean.view(shape)
    var = _AllReduceSum.apply((centred * centred).sum(dims), group) / count
    y = centred * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        y = y * weight.float().view(shape)
    if bias is not None:
        y = y + bias.float().view(shape)
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.detach().to(running_mean.dtype),
                                             alpha=momentum)
        unbiased = var.detach() * (count / (count - 1))
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return y.to(x.dtype)
