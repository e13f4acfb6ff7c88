"""Fusing each expanded Linear with the activation module (ReLU, GELU, SiLU) that follows it.

The fused layer applies the activation itself, and its backward applies the activation's
gradient only to the gradient columns it reads. In the isolated layout those are the newest
outputs alone, so the frozen part of the activation's gradient is never formed, and GELU and
SiLU keep the pre-activation of the newest columns only. Without fusion, a separate module
allocates and fills the full-width output and gradient, and GELU/SiLU save the full-width
input.
"""
from __future__ import annotations

from collections import Counter
from typing import List

import torch.fx as fx
from torch import nn

from .graph import hooked, module_pairs, swap_modules
from .nn import ExpandedLinear
from .nn.fused import fused_stand_in


def _fusable_pair(node: fx.Node, modules, calls: Counter):
    """(layer path, activation path) when ``node`` is a fusable activation module called once
    on the single use of an expanded Linear's output, else None."""
    if node.op != "call_module" or fused_stand_in(modules[node.target]) is None:
        return None
    if node.kwargs or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    if src.op != "call_module" or len(src.users) != 1:
        return None
    layer = modules[src.target]
    if not isinstance(layer, ExpandedLinear) or layer.activation:
        return None
    if hooked(layer):
        return None  # a hook on the layer would see the activation's output: leave it apart
    if hooked(modules[node.target]):
        return None  # the activation module gives way to a stand-in, without its hooks
    if calls[src.target] != 1 or calls[node.target] != 1:
        return None  # a shared module serves other call sites too
    return src.target, node.target


def fuse_activations(model: nn.Module) -> List[str]:
    """Let every expanded Linear compute the ``nn.ReLU``, ``nn.GELU`` or ``nn.SiLU`` module
    that directly follows it.

    Changes ``model`` in place: the layer gets ``activation="relu"`` (``"gelu"``,
    ``"gelu_tanh"``, ``"silu"``) and the activation module is replaced by a
    :class:`~expanse_fast.nn.FusedReLU` (``FusedGELU``, ``FusedSiLU``) under the same name
    (state dicts do not change). Outputs and gradients of trainable tensors stay the same. A
    pair is left apart when the layer's output has other users, when either module is called
    more than once, or when either module carries hooks. Returns the paths of the fused
    activation modules.
    """
    fused, swaps = [], []
    for layer_path, act_path in module_pairs(model, _fusable_pair):
        activation, stand_in = fused_stand_in(model.get_submodule(act_path))
        model.get_submodule(layer_path).activation = activation
        swaps.append((act_path, stand_in))
        fused.append(act_path)
    swap_modules(model, swaps)
    return fused
