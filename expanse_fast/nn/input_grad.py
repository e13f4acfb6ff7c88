"""When a widened model must form the gradient of its old features after all.

Inside a model widened by ``expand()`` (isolated layout) the old features are a frozen
function of the model's input, so training never needs their gradient and the layers skip
it (``skip_old_input_grad``).  That holds only while the input itself needs no gradient.
Saliency maps, adversarial examples or a trainable module in front of the widened model
make the input require grad, and then the input's gradient runs through the old path: with
the skip it would silently miss that part.  So the model watches its input: a forward
pre-hook on the widened model notes, at every call, whether a tensor it is given requires
grad, and its layers read that note before they skip.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_leaves


class InputGradWatch:
    """The forward pre-hook of one widened model, shared by its layers: ``needed`` says
    whether the current call's input requires grad (with grad mode on)."""

    def __init__(self):
        self.needed = False

    def __call__(self, module: nn.Module, args, kwargs):
        self.needed = torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves((args, kwargs)))


def skips_old_input_grad(layer: nn.Module) -> bool:
    """Whether ``layer`` skips its old input features' gradient in this call: it was told
    to (``skip_old_input_grad``) and its model's input does not require grad."""
    if not layer.skip_old_input_grad:
        return False
    watch = getattr(layer, "input_grad_watch", None)
    return watch is None or not watch.needed


def unwatch(model: nn.Module) -> None:
    """Remove the model's watch (a plain copy of a widened model needs none)."""
    hooks = model._forward_pre_hooks
    for key in [k for k, h in hooks.items() if isinstance(h, InputGradWatch)]:
        del hooks[key]
        model._forward_pre_hooks_with_kwargs.pop(key, None)


def watch(model: nn.Module, layers: Iterable[nn.Module]) -> InputGradWatch:
    """Give ``model`` one watch (replacing an earlier one, as after a second ``expand()``)
    and hand it to ``layers``."""
    unwatch(model)
    w = InputGradWatch()
    model.register_forward_pre_hook(w, with_kwargs=True)
    for layer in layers:
        layer.input_grad_watch = w
    return w
