"""Tracing a model with torch.fx (expanded layers stay leaves), finding module pairs in it and
swapping its modules: the graph tools that expand(), fuse_activations() and fold_batchnorms()
share."""
from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, List, Optional, Tuple

import torch.fx as fx
from torch import nn

from .nn import ExpandedConv2d, ExpandedLinear
from .nn.norm import _ExpandedBatchNorm


class ExpansionError(ValueError):
    """The model cannot be widened exactly; the message names the node or module."""


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (ExpandedLinear, ExpandedConv2d, _ExpandedBatchNorm)):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.Graph:
    """The model's graph, with every expanded layer as one call_module node."""
    try:
        return _Tracer().trace(model)
    except Exception as exc:
        raise ExpansionError(
            f"expand() and fuse_activations() need a torch.fx-traceable model; tracing "
            f"{type(model).__name__} failed: {type(exc).__name__}: {exc}") from exc


def swap_module(root: nn.Module, path: str, new: nn.Module):
    """Put ``new`` where the submodule at dotted ``path`` was."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


PairMatcher = Callable[[fx.Node, Dict[str, nn.Module], Counter], Optional[Tuple[str, str]]]


def module_pairs(model: nn.Module, match: PairMatcher) -> List[Tuple[str, str]]:
    """The (producer path, consumer path) pairs that ``match(node, modules, calls)`` finds,
    in graph order; ``calls`` counts the call sites of each module path."""
    graph = trace(model)
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    return [pair for pair in (match(node, modules, calls) for node in graph.nodes)
            if pair is not None]
