"""Expanded BatchNorm: frozen channels always normalise as in eval mode (a fixed per-channel
affine map with their pretrained statistics); the newest channels are an ordinary,
trainable BatchNorm with running statistics of their own.

The frozen channels are normalised by one eval-mode ``F.batch_norm`` over the whole
(contiguous) input, so they run the very kernel the pretrained BatchNorm ran: their outputs
are bit-identical to the pretrained model's.  The newest channels' values then overwrite
their part of that output (one tensor, no ``torch.cat``).  ``skip_old_input_grad`` (set by
``expand()`` in the isolated layout, where the frozen channels are a frozen function of the
data) leaves the frozen channels out of autograd: the input gradient of those channels is
then zeros, as for the expanded Linear and Conv2d layers.

Folded (``expanse_fast.fold_batchnorms``): the ExpandedConv2d in front applies the frozen
channels' fixed map itself, so the BatchNorm passes them through untouched and normalises
only the newest channels, writing them into its input in place (no full-width copy).

``sync_batch_stats`` (``expanse_fast.train.distributed.sync_batchnorm`` sets it): in training
mode the newest channels' statistics are those of every rank's batch together (norm_sync.py)."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import composite, ops
from ..layout import check_groups, width
from .blocks import _frozen, hooked, refuse_not_widenable, refuse_scripting
from .input_grad import skips_old_input_grad
from .norm_sync import group_size, synced_batch_norm


_GLOBAL_HOOK_DICTS = tuple(name for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
    "_global_backward_pre_hooks") if hasattr(torch.nn.modules.module, name))


def _global_hooks() -> bool:
    g = torch.nn.modules.module
    for name in _GLOBAL_HOOK_DICTS:  # (read each call: the registries change in place)
        if getattr(g, name):
            return True
    return False


def fold_in_force(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether a folded conv -> BatchNorm pair runs folded in this call.  A hook on either
    module (put there after the fold, or a global one) must see what the unfolded pair
    computes: the conv's raw output, a BatchNorm output that is a tensor of its own (a
    backward hook wraps it; the folded BatchNorm writes into its input).  The conv decides,
    once per call, and leaves the answer on the BatchNorm (``ran_folded``), which follows
    it: a hook that removes itself between the two calls cannot split them."""
    return not (hooked(conv) or hooked(bn) or _global_hooks())


class _ExpandedBatchNorm(nn.Module):
    _expected_dims: Tuple[int, ...] = ()
    # Set by fold_batchnorms(): the ExpandedConv2d before this layer already applied the
    # frozen channels' eval-mode map, so forward normalises the newest channels only.
    frozen_folded: bool = False
    # Whether the conv that folded this BatchNorm ran folded in its latest call (it ran
    # unfolded while a hook was there: fold_in_force); this call follows it.
    ran_folded: bool = True
    input_grad_watch = None  # set by input_grad.watch() (see ExpandedBlocks)
    # Set by distributed.sync_batchnorm(): in training mode inside a process group of more
    # than one rank, the newest channels' batch statistics span every rank's batch.
    sync_batch_stats: bool = False
    sync_group = None  # the process group (None: the default one)

    def __prepare_scriptable__(self):
        refuse_scripting(self)

    def __init__(self, groups: Sequence[int], eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None):
        super().__init__()
        groups = check_groups("groups", groups)
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
        # True inside a model expanded (isolated) by expand(): nothing trainable lies behind
        # the frozen channels, so their input gradient is not formed (it reads as zeros).
        self.skip_old_input_grad = False

    # ---- storage ------------------------------------------------------------------------
    def _set_frozen(self, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                    bias: Optional[Tensor]):
        self.register_buffer("running_mean_frozen", mean)
        self.register_buffer("running_var_frozen", var)
        self.weight_frozen = _frozen(weight) if weight is not None else None
        self.bias_frozen = _frozen(bias) if bias is not None else None

    def _new_tensors(self, n: int, kw) -> dict:
        """The tensors of ``n`` fresh channels (made before any is set: an allocation that
        fails leaves the layer as it was)."""
        return {"running_mean_new": torch.zeros(n, **kw), "running_var_new": torch.ones(n, **kw),
                "num_batches_tracked_new": torch.tensor(0, dtype=torch.long,
                                                        device=kw["device"]),
                "weight_new": nn.Parameter(torch.ones(n, **kw)) if self.affine else None,
                "bias_new": nn.Parameter(torch.zeros(n, **kw)) if self.affine else None}

    def _set_new(self, n: int, kw, made: Optional[dict] = None):
        made = self._new_tensors(n, kw) if made is None else made
        for name in ("running_mean_new", "running_var_new", "num_batches_tracked_new"):
            self.register_buffer(name, made[name])
        self.weight_new, self.bias_new = made["weight_new"], made["bias_new"]

    @classmethod
    def from_bn(cls, bn: nn.modules.batchnorm._BatchNorm, new: int = 0):
        """Widen a trained BatchNorm by ``new`` channels; ``bn`` is left untouched."""
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"from_bn expects a BatchNorm module, got {type(bn).__name__}")
        refuse_not_widenable(bn, "from_bn")
        if not bn.track_running_stats:
            raise ValueError("an expanded BatchNorm needs track_running_stats=True: the frozen "
                             "channels must keep their pretrained statistics")
        plain = cls._plain_type()
        if not isinstance(bn, plain):  # (its to_bn() would give back the other kind)
            raise TypeError(f"{cls.__name__}.from_bn expects an nn.{plain.__name__}, got "
                            f"{type(bn).__name__}")
        ref = bn.running_mean
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
        new = width(new, "new")  # before anything changes
        d = lambda name: torch.cat([getattr(self, name + "_frozen").detach(),  # noqa: E731
                                    getattr(self, name + "_new").detach()])
        weight = d("weight") if self.affine else None
        bias = d("bias") if self.affine else None
        kw = {"device": self.running_mean_new.device, "dtype": self.running_mean_new.dtype}
        made = self._new_tensors(int(new), kw)
        self._set_frozen(d("running_mean"), d("running_var"), weight, bias)
        self.groups = self.groups + (new,)
        self._set_new(int(new), kw, made)
        return self

    # ---- compute -------------------------------------------------------------------------
    def frozen_map(self) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], float]:
        """(mean, var, weight, bias, eps) of the frozen channels' eval-mode map: the current
        tensors (read at each call, so they follow ``.to()``), for a layer that folds it."""
        # (read from the module's dicts: nn.Module's attribute fallback costs about a
        # microsecond a name, and a folded conv asks on every call; a missing affine is
        # None in the instance dict)
        b, p = self._buffers, self._parameters
        return (b["running_mean_frozen"], b["running_var_frozen"],
                p["weight_frozen"] if "weight_frozen" in p else self.weight_frozen,
                p["bias_frozen"] if "bias_frozen" in p else self.bias_frozen, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in self._expected_dims or x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__} expected a {'/'.join(map(str, self._expected_dims))}-D "
                f"input with {self.num_features} channels (groups {self.groups}) in dim 1, "
                f"got shape {tuple(x.shape)}")
        if self.training and self.groups[-1] and composite.transforms_active():
            raise RuntimeError(
                f"{type(self).__name__} in training mode updates its running statistics in "
                "place, which torch.func transforms (grad, vmap, jacrev, ...) refuse, as for "
                "nn.BatchNorm: call model.eval() before the transform")
        self._check_frozen()
        if self.frozen_folded and self.ran_folded:
            return self._newest_only(x)
        n_f, n_new = self.running_mean_frozen.shape[0], self.groups[-1]
        if not n_new:
            return F.batch_norm(x, self.running_mean_frozen, self.running_var_frozen,
                                self.weight_frozen, self.bias_frozen, False, 0.0, self.eps)
        if not n_f:
            return self._new_channels(x)
        if not self.training:
            # every channel is a fixed affine map: one kernel, the new affine keeps its graph
            return F.batch_norm(x, *self._all_channels(keep_graph=True), False, 0.0, self.eps)
        # Training: the newest channels' batch statistics (a contiguous copy of them runs
        # aten's fast kernels, forward and backward), then written over the eval-mode output.
        y_new = self._new_channels(x[:, n_f:].contiguous())
        if composite.needed():  # torch.func, dual tensors: no custom autograd (composite.py)
            frozen = F.batch_norm(x[:, :n_f], *self.frozen_map()[:4], False, 0.0, self.eps)
            return torch.cat([frozen, y_new], dim=1)
        return _FrozenThenNew.apply(x, y_new, *self._all_channels(keep_graph=False), self.eps,
                                    not skips_old_input_grad(self, x))

    def _check_frozen(self):
        # the frozen affine never trains: unfrozen by hand it would stay as it is, silently
        if composite.needed():
            return  # torch.func differentiates what it is given (composite.py)
        for name in ("weight_frozen", "bias_frozen"):
            t = getattr(self, name)
            if t is not None and t.requires_grad:
                raise ValueError(f"{type(self).__name__}: {name} requires grad, but frozen "
                                 f"tensors must not (only the newest group is trainable)"
                                 f"{ops.TRAIN_ALL_HINT}")

    def _all_channels(self, keep_graph: bool):
        """Per-channel (mean, var, weight, bias) of all channels: frozen, then newest (with
        ``keep_graph`` the newest affine keeps its graph, and under torch.func every one)."""
        everything = keep_graph and composite.needed()

        def cat(name):
            f, n = getattr(self, name + "_frozen"), getattr(self, name + "_new")
            if f is None:
                return None
            return torch.cat([f if everything else f.detach(), n if keep_graph else n.detach()])
        return cat("running_mean").detach(), cat("running_var").detach(), cat("weight"), cat("bias")

    def reset_running_stats(self) -> None:
        """Reset the newest channels' running statistics, as ``nn.BatchNorm`` resets all of
        its own; the frozen channels keep their pretrained ones (an earlier task needs
        them)."""
        with torch.no_grad():
            self.running_mean_new.zero_()
            self.running_var_new.fill_(1)
            self.num_batches_tracked_new.zero_()

    def _momentum(self) -> float:
        """This step's momentum for the newest channels' statistics (counts the step)."""
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked_new.add_(1)
            if momentum is None:  # cumulative moving average, as nn.BatchNorm does
                momentum = 1.0 / float(self.num_batches_tracked_new)
        return momentum or 0.0

    def _syncs(self) -> bool:
        """Whether this call's newest-channel statistics span the process group."""
        return self.training and self.sync_batch_stats and group_size(self.sync_group) > 1

    def _new_channels(self, x: Tensor) -> Tensor:
        momentum = self._momentum()
        if self._syncs():
            return synced_batch_norm(x, self.running_mean_new, self.running_var_new,
                                     self.weight_new, self.bias_new, momentum, self.eps,
                                     self.sync_group)
        return F.batch_norm(x, self.running_mean_new, self.running_var_new, self.weight_new,
                            self.bias_new, self.training, momentum, self.eps)

    def _newest_only(self, x: Tensor) -> Tensor:
        """Folded: the frozen channels of ``x`` are final; normalise the newest ones."""
        n_f = x.shape[1] - self.groups[-1]
        if not self.groups[-1]:
            return x
        if self.training and x.shape[1] and x.numel() // x.shape[1] == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input "
                             f"size {tuple(x.shape)}")  # as F.batch_norm says
        if (torch.compiler.is_compiling() or torch.jit.is_tracing()
                or composite.needed() or self._syncs()):
            # out of place for the compiler, which plans the memory itself (and for
            # torch.jit.trace, which cannot record a Function that writes into its input,
            # for torch.func, which runs no custom autograd, and for statistics synced over
            # the process group, which _new_channels computes)
            skip = skips_old_input_grad(self, x) and not composite.needed()
            old = x[:, :n_f].detach() if skip else x[:, :n_f]
            return torch.cat([old, self._new_channels(x[:, n_f:].contiguous())], dim=1)
        return _NewestInPlace.apply(x, self.weight_new, self.bias_new, self.running_mean_new,
                                    self.running_var_new, self.training, self._momentum(),
                                    self.eps, not skips_old_input_grad(self, x))

    def to_bn(self, task: Optional[int] = None) -> nn.modules.batchnorm._BatchNorm:
        """A plain BatchNorm (eval statistics) of task ``task``'s channels (default: all)."""
        k = len(self.groups) - 1 if task is None else task
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) \
                or not 0 <= k < len(self.groups):
            raise ValueError(f"task must be an int in 0..{len(self.groups) - 1}, got {task!r}")
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
        return (f"groups={self.groups}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}"
                + (", frozen channels folded into the conv before" if self.frozen_folded
                   else "")
                + (", newest channels' batch statistics synced over the process group"
                   if self.sync_batch_stats else ""))


class _FrozenThenNew(torch.autograd.Function):
    """Eval-mode BatchNorm of every channel of ``x`` (the frozen channels' fixed affine map,
    computed by aten's own kernel over the contiguous input), with the newest channels
    replaced by ``y_new``.  Backward hands ``y_new`` its gradient and, only when
    ``old_grad``, gives ``x`` the frozen channels' gradient ``dy * weight / sqrt(var + eps)``;
    otherwise ``x`` gets no gradient from here (the new channels' own path gives theirs)."""

    @staticmethod
    def forward(ctx, x, y_new, mean, var, weight, bias, eps, old_grad):
        out = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        n_f = x.shape[1] - y_new.shape[1]
        out[:, n_f:] = y_new
        ctx.n_f, ctx.old_grad = n_f, old_grad
        if old_grad:
            scale = torch.rsqrt(var[:n_f] + eps)
            ctx.scale = scale if weight is None else scale * weight[:n_f]
        return out

    @staticmethod
    def backward(ctx, dy):
        n_f = ctx.n_f
        dx = dy_new = None
        if ctx.needs_input_grad[0] and ctx.old_grad:
            shape = (1, n_f) + (1,) * (dy.dim() - 2)
            if torch.is_grad_enabled() or composite.batched_backward(dy):
                # create_graph=True, or batched gradients (vmap: no batching rule for an
                # out= multiply): out of place, differentiable
                dy_old, dy_new_part = dy.split([n_f, dy.shape[1] - n_f], dim=1)
                dx = torch.cat([dy_old * ctx.scale.view(shape),
                                torch.zeros_like(dy_new_part)], dim=1)
            else:
                dx = torch.zeros_like(dy)
                torch.mul(dy[:, :n_f], ctx.scale.view(shape), out=dx[:, :n_f])
        if ctx.needs_input_grad[1]:
            dy_new = dy[:, n_f:].contiguous()
        return dx, dy_new, None, None, None, None, None, None


class _NewestInPlace(torch.autograd.Function):
    """The BatchNorm of the newest channels of ``x`` (training or eval mode), written over
    them in ``x`` itself; the frozen channels pass through.  ``x`` is the output of the
    conv that folded this BatchNorm (its only user), so writing into it spares a copy of
    the frozen channels.  Backward hands the frozen channels ``dy`` (zeros when not
    ``old_grad``: nobody reads them) and the newest ones aten's BatchNorm gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, training, momentum, eps, old_grad):
        n_f = x.shape[1] - mean.shape[0]
        ctx.n_f, ctx.training, ctx.eps, ctx.old_grad = n_f, training, eps, old_grad
        ctx.has_bias = bias is not None
        ctx.mark_dirty(x)
        if x.numel() == 0:  # an empty batch: nothing to normalise (aten's raw op refuses it)
            ctx.empty = mean.shape[0]
            return x
        ctx.empty = None
        x_new = x[:, n_f:].clone(memory_format=torch.contiguous_format)  # saved: not a view
        y_new, save_mean, save_invstd = torch.native_batch_norm(
            x_new, weight, bias, mean, var, training, momentum, eps)
        x[:, n_f:] = y_new
        ctx.save_for_backward(x_new, weight, save_mean, save_invstd)
        # eval mode: its backward reads the running statistics of this call (copies: a
        # training call before the backward would move the buffers themselves)
        ctx.running = None if training else (mean.clone(), var.clone())
        return x

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            # create_graph=True: the newest channels' input was copied inside forward, out of
            # the graph, so the second derivatives that run through it would be missing
            raise RuntimeError(
                "a second derivative (create_graph=True) through an ExpandedBatchNorm folded "
                "into the conv before it is not supported: call unfold_batchnorm() on that "
                "conv (and on every ExpandedConv2d whose folded_batchnorm is set), or widen "
                "the unwidened model with xf.expand(..., fuse=False) (a model already folded "
                "keeps its folds through a later expand())")
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.empty is not None:  # an empty batch: empty or zero gradients
            zeros = dy.new_zeros(ctx.empty)
            return ((torch.zeros_like(dy) if need_x else None, zeros if need_w else None,
                     zeros.clone() if need_b and ctx.has_bias else None) + (None,) * 6)
        x_new, weight, save_mean, save_invstd = ctx.saved_tensors
        n_f = ctx.n_f
        mean, var = ctx.running or (None, None)
        dx = dw = db = None
        if need_x or need_w or need_b:
            dx_new, dw, db = torch.ops.aten.native_batch_norm_backward(
                dy[:, n_f:].contiguous(), x_new, weight, mean, var, save_mean, save_invstd,
                ctx.training, ctx.eps,
                [need_x, need_w and weight is not None, need_b and ctx.has_bias])
        if need_x:
            if ctx.old_grad:
                dx = torch.empty_like(dy)
                dx[:, :n_f] = dy[:, :n_f]
            else:  # (one fill of the whole, as the linear backward's dx)
                dx = torch.zeros_like(dy)
            dx[:, n_f:] = dx_new
        return (dx, dw if need_w else None, db if need_b else None) + (None,) * 6


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
