"""Folding the frozen channels of each expanded BatchNorm into the expanded conv before it.

A frozen channel of an ExpandedBatchNorm2d is a fixed per-channel affine map (eval-mode
statistics and affine, in training as in eval).  When an ExpandedConv2d feeds such a
BatchNorm directly, the conv applies that map to its frozen output channels itself (in the
Triton kernel's epilogue; the torch backend runs aten's own BatchNorm on them, so they keep
their bits), and in backward multiplies their gradient by the map's scale only where it
reads it.  The BatchNorm then normalises its newest channels only and passes the frozen
ones through: the full-width BatchNorm pass over the frozen channels, forward and
backward, is gone.
"""
from __future__ import annotations

from collections import Counter
from typing import List, Optional, Tuple

import torch.fx as fx
from torch import nn

from .graph import hooked as _hooked, module_pairs
from .nn import ExpandedBatchNorm2d, ExpandedConv2d


def _foldable_pair(node: fx.Node, modules, calls: Counter) -> Optional[Tuple[str, str]]:
    """(conv path, bn path) when ``node`` is an ExpandedBatchNorm2d called once, alone, on
    the single use of an ExpandedConv2d's output with the same channel groups, else None."""
    if node.op != "call_module" or not isinstance(modules[node.target], ExpandedBatchNorm2d):
        return None
    if node.kwargs or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    if src.op != "call_module" or len(src.users) != 1:
        return None  # the conv's output is read elsewhere too: it must stay raw
    conv, bn = modules[src.target], modules[node.target]
    if not isinstance(conv, ExpandedConv2d):
        return None
    if conv.folded_batchnorm is not None or bn.frozen_folded:
        return None  # already folded
    if calls[src.target] != 1 or calls[node.target] != 1:
        return None  # a shared module serves other call sites too
    if _hooked(conv) or _hooked(bn):
        return None  # a hook would see the frozen channels normalised one module early
    if tuple(bn.groups) != tuple(conv.out_groups) or not sum(bn.groups[:-1]):
        return None  # other channel groups, or no frozen channel to fold
    return src.target, node.target


def fold_batchnorms(model: nn.Module) -> List[str]:
    """Let every ExpandedConv2d apply the frozen channels of the ExpandedBatchNorm2d that
    directly follows it.

    Changes ``model`` in place (:meth:`ExpandedConv2d.fold_batchnorm`): the BatchNorm stays
    in its place, with its state, and from then on normalises only its newest channels (in
    training and in eval mode); no state dict key or module path changes, and the frozen
    running statistics are never touched.  Outputs and trainable gradients stay the same
    (on the torch backend the frozen channels bit for bit).  A pair is left apart when the
    conv's output has another user, when either module is called more than once, when
    either carries hooks, or when their channel groups differ.  Folding survives
    ``copy.deepcopy``, ``.to()`` and a later ``expand()``; ``source_model`` and ``merge``
    return plain, unfolded modules.  Returns the paths of the folded BatchNorms.
    """
    folded = []
    for conv_path, bn_path in module_pairs(model, _foldable_pair):
        model.get_submodule(conv_path).fold_batchnorm(model.get_submodule(bn_path))
        folded.append(bn_path)
    return folded
