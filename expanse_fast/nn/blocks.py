"""Storage shared by the expanded Linear and Conv2d: the frozen staircase, the trainable
newest row group and (coupled layout) the trainable coupling block.

Weights carry trailing dimensions ``tail`` (``()`` for Linear, ``(kh, kw)`` for Conv2d).
Frozen tensors are ``nn.Parameter(requires_grad=False)``: they move with ``.to()``, appear in
``state_dict`` and never receive a gradient or optimizer state.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..layout import Layout


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def hooked(m: nn.Module) -> bool:
    """Whether ``m`` carries hooks of its own (forward, forward-pre, backward): a module
    that fusing or folding would replace, or make see other values, is then left apart."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


# What each plain layer computes with, by its kind: a subclass that overrides one of these
# computes something else (a QAT Linear fake-quantizes its weight, a fused ConvBn2d runs its
# BatchNorm), which a widened layer, computing the plain product, would silently drop.
_COMPUTE_METHODS = {nn.Linear: ("forward",), nn.Conv2d: ("forward", "_conv_forward"),
                    nn.modules.batchnorm._BatchNorm: ("forward",)}


def own_computation(module: nn.Module) -> Optional[str]:
    """Why ``module``, a subclass of a plain Linear, Conv2d or BatchNorm, cannot be widened
    as that plain layer (it overrides how the layer computes), or None where it can."""
    for base, methods in _COMPUTE_METHODS.items():
        if isinstance(module, base):
            own = [m for m in methods if getattr(type(module), m) is not getattr(base, m)]
            if own:
                kind = type(module)
                return (f"{kind.__module__}.{kind.__qualname__} overrides "
                        f"{base.__name__}.{own[0]}: a widened layer computes the plain "
                        f"{base.__name__}'s product and would drop what it adds, changing the "
                        f"old outputs; make it a plain {base.__name__} first")
    return None


def not_widenable(module: nn.Module) -> Optional[str]:
    """Why a Linear, Conv2d or BatchNorm cannot be widened as it is, or None: a lazy layer
    not yet initialised (no weights to freeze), or one that computes its own way."""
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return (f"{type(module).__name__} is not initialised yet (a lazy layer): run one "
                "forward pass before widening it")
    return own_computation(module)


def refuse_not_widenable(module: nn.Module, caller: str) -> None:
    why = not_widenable(module)
    if why:
        raise TypeError(f"{caller}: {why}")


def channels_last_strides(shape) -> Tuple[int, ...]:
    o, c, kh, kw = shape
    return (c * kh * kw, 1, kw * c, c)


def channels_last_strided(w: Tensor) -> bool:
    """Whether ``w`` has exactly channels_last strides, and they are not NCHW's (a weight of
    one input channel, the same bytes either way, is told apart by them)."""
    if w.dim() != 4 or not w.numel():
        return False
    o, c, kh, kw = w.shape
    return tuple(w.stride()) == channels_last_strides(w.shape) != (c * kh * kw, kh * kw, kw, 1)


def as_channels_last(t: Optional[Tensor]) -> Optional[Tensor]:
    """A copy of the 4-D ``t`` with exactly channels_last strides (None stays None)."""
    if t is None or t.dim() != 4 or not t.numel():
        return t
    return torch.empty_strided(t.shape, channels_last_strides(t.shape), dtype=t.dtype,
                               device=t.device).copy_(t)


def init_new_rows(w: Tensor, fan_in: int) -> Tensor:
    """PyTorch's default init of a fresh layer with this fan-in (kaiming_uniform, a=sqrt(5))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        return w.uniform_(-bound, bound)


def refuse_scripting(module: nn.Module):
    """What ``torch.jit.script`` gets from an expanded module (it calls each module's
    ``__prepare_scriptable__`` before compiling): the ways that work, instead of the
    compiler's complaint about the first annotation it cannot read."""
    raise TypeError(
        f"torch.jit.script cannot compile {type(module).__name__}: its forward runs "
        "expanse_fast's ops from Python. Record the widened model with torch.jit.trace("
        "model.eval(), example) or torch.export.export(model, (example,)), or script plain "
        "copies: xf.merge(model) (every task) or xf.source_model(model, task)")


class ExpandedBlocks(nn.Module):
    """Base class: holds the blocks of a staircase layer and grows it."""

    layout: Layout
    skip_old_input_grad: bool
    # set by input_grad.watch() inside a widened model; the class default spares a layer
    # called on its own the two exceptions of nn.Module's missing-attribute lookup
    input_grad_watch = None

    def _set_blocks(self, layout: Layout, w_frozen: Tensor, b_frozen: Optional[Tensor],
                    w_new: Tensor, b_new: Optional[Tensor], w_couple: Optional[Tensor]):
        self.layout = layout
        self.weight_frozen = _frozen(w_frozen)
        self.weight_new = nn.Parameter(w_new)
        self.weight_couple = nn.Parameter(w_couple) if w_couple is not None else None
        if b_new is not None:
            self.bias_frozen = _frozen(b_frozen)
            self.bias_new = nn.Parameter(b_new)
        else:
            self.bias_frozen = None
            self.bias_new = None

    def _block_tensors(self):
        """(weight_frozen, bias_frozen, weight_new, bias_new, weight_couple) for a call.
        Read from the parameter dict where they are there: nn.Module's attribute fallback
        costs about a microsecond a name (five names a call); a block that is None lives in
        the instance dict, and a parametrized one is a property (both plain getattr)."""
        p = self._parameters
        return (p["weight_frozen"] if "weight_frozen" in p else self.weight_frozen,
                p["bias_frozen"] if "bias_frozen" in p else self.bias_frozen,
                p["weight_new"] if "weight_new" in p else self.weight_new,
                p["bias_new"] if "bias_new" in p else self.bias_new,
                p["weight_couple"] if "weight_couple" in p else self.weight_couple)

    def __prepare_scriptable__(self):
        refuse_scripting(self)

    # ---- what the layer is ------------------------------------------------------------
    @property
    def in_groups(self) -> Tuple[int, ...]:
        return self.layout.in_groups

    @property
    def out_groups(self) -> Tuple[int, ...]:
        return self.layout.out_groups

    @property
    def mode(self) -> str:
        return self.layout.mode

    def _tail(self) -> Tuple[int, ...]:
        return tuple(self.weight_new.shape[2:])

    def _fan_in(self, in_features: int) -> int:
        return in_features * math.prod(self._tail())

    # ---- the whole staircase as dense tensors ------------------------------------------
    def dense_weight(self, task: Optional[int] = None) -> Tensor:
        """Weight of the task-``task`` layer (default: the newest) with zeros in the upper
        blocks: exactly what a plain layer needs to compute the same outputs."""
        lay = self.layout
        w_f = self.weight_frozen.detach()
        full = w_f.new_zeros((lay.out_features, lay.in_features) + self._tail())
        full[: lay.frozen_out, : lay.frozen_in] = w_f
        if self.weight_couple is not None:
            full[: lay.frozen_out, lay.frozen_in:] = self.weight_couple.detach()
        full[lay.frozen_out:] = self.weight_new.detach()
        if task is None:
            return full
        sub = lay.task(task)
        return full[: sub.out_features, : sub.in_features].clone()

    def dense_bias(self, task: Optional[int] = None) -> Optional[Tensor]:
        if self.bias_new is None:
            return None
        full = torch.cat([self.bias_frozen.detach(), self.bias_new.detach()])
        if task is None:
            return full
        return full[: self.layout.task(task).out_features].clone()

    # ---- growth -------------------------------------------------------------------------
    def expand(self, new_in: int, new_out: int) -> "ExpandedBlocks":
        """Freeze the current newest group and add ``new_in`` inputs and ``new_out`` outputs.

        Re-create the optimizer afterwards: the trainable parameters are new tensors.
        """
        old = self.layout
        lay = old.expanded(new_in, new_out)
        w_f_new = self.dense_weight()  # every current row becomes frozen
        tail = self._tail()
        w_new = init_new_rows(w_f_new.new_empty((new_out, lay.in_features) + tail),
                              self._fan_in(lay.in_features))
        w_couple = (w_f_new.new_zeros((lay.frozen_out, new_in) + tail)
                    if lay.mode == "coupled" else None)
        b_f = self.dense_bias()
        b_new = b_f.new_zeros((new_out,)) if b_f is not None else None
        if channels_last_strided(self.weight_frozen):
            # a channels_last model stays so: aten picks its convolution by the weight's
            # strides, and the old rows keep their bits only with the pretrained path
            w_f_new, w_new, w_couple = map(as_channels_last, (w_f_new, w_new, w_couple))
        self._set_blocks(lay, w_f_new, b_f, w_new, b_new, w_couple)
        return self

    def trainable_state(self) -> Dict[str, Tensor]:
        return {n: p for n, p in self.named_parameters(recurse=False) if p.requires_grad}
