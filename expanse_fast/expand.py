"""Widen a whole model: ``expand`` (torch.fx width propagation + layer swap), and the way
back to plain modules: ``source_model`` (any earlier task) and ``merge`` (the newest).

The graph is used only to *analyse* the model: which tensors carry new features, how wide
each layer's new input group is, and whether anything would mix old and new features.  The
returned model is a deep copy of the user's module with its layers swapped, so its own
``forward`` code runs unchanged.
"""
from __future__ import annotations

import copy
import math
import numbers
import operator
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .fuse import fuse_activations
from .fold import fold_batchnorms
from .graph import ExpansionError, swap_module as _swap, trace as _trace
from .layout import width as _units
from .nn import ExpandedBatchNorm1d, ExpandedBatchNorm2d, ExpandedConv2d, ExpandedLinear
from .nn.fused import FUSED_TYPES
from .nn.input_grad import unwatch, watch
from .nn.norm import _ExpandedBatchNorm

Width = Union[float, int, Mapping[str, int]]


# ---- what passes feature groups through unchanged ------------------------------------------
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU,
    nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
)
_PASS_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, F.selu, F.hardswish, F.mish,
    F.softplus, F.sigmoid, F.tanh, F.dropout, F.dropout1d, F.dropout2d, torch.relu,
    torch.sigmoid, torch.tanh, torch.abs, torch.exp, operator.neg,
}
# ...and what passes them through only on a conv map: pooling, padding and resizing work
# along the trailing dimensions, a conv map's pixels but a Linear output's features.
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.ZeroPad2d, nn.Upsample,
)
_SPATIAL_FUNCTIONS = {
    F.max_pool2d, F.avg_pool2d, F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, F.adaptive_avg_pool1d,
}
_PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "float", "half", "bfloat16",
                 "to", "type_as", "detach", "abs", "exp", "neg"}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
           torch.mul, torch.div, operator.iadd, operator.imul}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_"}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_NON_TENSOR_METHODS = {"size", "dim", "numel"}


@dataclass(frozen=True)
class _Feat:
    """The feature dimension of one traced value: current width and width being added.

    ``cur`` is None for data (width unknown, never widened).  ``factor`` is the number of
    features per channel once a conv map is flattened, None while unknown.
    """
    cur: Optional[int]
    new: int
    factor: Optional[int] = 1
    channels_first: bool = False  # a conv map (features in dim 1), not features-last

    @property
    def widened(self) -> bool:
        return self.new > 0


_DATA = _Feat(None, 0)


def _new_width(width: Width, name: str, current: int) -> int:
    if isinstance(width, Mapping):
        return _units(width.get(name, 0), f"width[{name!r}]")
    if isinstance(width, bool):
        raise TypeError("width must be a float, an int or a {module_name: int} dict")
    if isinstance(width, numbers.Integral):
        return _units(width, "width")
    if isinstance(width, float):
        if not (math.isfinite(width) and width >= 0):
            raise ValueError(f"width must be a finite fraction >= 0, got {width}")
        return max(1, round(width * current)) if width > 0 else 0
    raise TypeError(f"width must be a float, an int or a {{module_name: int}} dict, got "
                    f"{type(width).__name__}")


def _find_head(graph: fx.Graph, modules: Dict[str, nn.Module], head: Optional[str]) -> str:
    if head is not None:
        if head not in modules or not isinstance(
                modules[head], (nn.Linear, nn.Conv2d, ExpandedLinear, ExpandedConv2d)):
            raise ExpansionError(f"head={head!r} is not a Linear or Conv2d module of the model")
        return head
    called = [n.target for n in graph.nodes if n.op == "call_module"]
    for kinds in ((nn.Linear, ExpandedLinear), (nn.Conv2d, ExpandedConv2d)):
        found = [t for t in called if isinstance(modules[t], kinds)]
        if found:
            return found[-1]
    raise ExpansionError("the model has no Linear or Conv2d layer to widen")


class _Plan:
    """Walks the graph once and records, for every layer, the widths it must grow by."""

    def __init__(self, model: nn.Module, width: Width, new_classes: int, head: Optional[str],
                 mode: str):
        self.modules = dict(model.named_modules())
        self.graph = _trace(model)
        self.width, self.new_classes, self.mode = width, int(new_classes), mode
        self.head = _find_head(self.graph, self.modules, head)
        self.grow: Dict[str, Tuple[int, ...]] = {}  # path -> (new_in, new_out) or (new,)
        self.feat: Dict[fx.Node, Optional[_Feat]] = {}
        for node in self.graph.nodes:
            self.feat[node] = self._visit(node)
        if isinstance(width, Mapping):
            unknown = set(width) - set(self.grow)
            if unknown:
                raise ExpansionError(f"width names modules that are not widened layers of the "
                                     f"model: {sorted(unknown)}")

    # ---- helpers ----------------------------------------------------------------------
    def _arg_feats(self, node: fx.Node):
        return [self.feat.get(a) for a in node.all_input_nodes]

    def _widened_input(self, node: fx.Node) -> Optional[_Feat]:
        for f in self._arg_feats(node):
            if f is not None and f.widened:
                return f
        return None

    def _first_tensor(self, node: fx.Node) -> _Feat:
        for f in self._arg_feats(node):
            if f is not None:
                return f
        return _DATA

    def _refuse(self, node: fx.Node, why: str):
        if any(a.op == "call_module" and a.target == self.head and self.new_classes
               for a in node.all_input_nodes):
            # the common case: a model that returns log-probabilities (log_softmax, nll_loss)
            why += (f"; it reads the head {self.head!r}, whose new classes would change the "
                    "old classes' values (a softmax would renormalise them over the new "
                    "ones): return the logits and apply it in the loss (F.cross_entropy "
                    "takes logits), or keep the classes with new_classes=0")
        raise ExpansionError(f"cannot widen node {node.name!r} ({node.op} {_target_name(node)}): "
                             f"{why}")

    def _record(self, path: str, grow: Tuple[int, ...]):
        if path in self.grow and self.grow[path] != grow:
            raise ExpansionError(f"module {path!r} is called twice with different widths "
                                 f"{self.grow[path]} and {grow}")
        self.grow[path] = grow

    # ---- the walk ------------------------------------------------------------------------
    def _visit(self, node: fx.Node) -> Optional[_Feat]:
        if node.op == "placeholder":
            return _DATA
        if node.op == "output":
            return None
        if node.op == "get_attr":
            return self._visit_attr(node)
        if node.op == "call_module":
            return self._visit_module(node, self.modules[node.target])
        if node.op == "call_function":
            return self._visit_function(node)
        if node.op == "call_method":
            return self._visit_method(node)
        self._refuse(node, "unsupported graph node")

    def _visit_attr(self, node: fx.Node) -> Optional[_Feat]:
        self._refuse(node, "the forward reads a parameter or buffer directly; only Linear, "
                           "Conv2d and BatchNorm modules can be widened")

    def _layer_in(self, node: fx.Node, current_in: int, path: str) -> int:
        f = self._first_tensor(node)
        if not f.widened:
            return 0
        if f.factor is None:  # flattened conv map: features per channel from this layer
            if f.cur is None or current_in % f.cur:
                self._refuse(node, f"a flattened map of {f.cur} channels cannot feed "
                                   f"{current_in} input features")
            return f.new * (current_in // f.cur)
        if f.cur is not None and f.cur != current_in:
            self._refuse(node, f"{path} expects {current_in} features but gets {f.cur}")
        return f.new

    def _visit_module(self, node: fx.Node, m: nn.Module) -> Optional[_Feat]:
        path = node.target
        if isinstance(m, (nn.Linear, ExpandedLinear)):
            new_in = self._layer_in(node, m.in_features, path)
            new_out = (self.new_classes if path == self.head
                       else _new_width(self.width, path, m.out_features))
            self._record(path, (new_in, new_out))
            return _Feat(m.out_features, new_out)
        if isinstance(m, (nn.Conv2d, ExpandedConv2d)):
            depthwise = (m.depthwise if isinstance(m, ExpandedConv2d)
                         else m.groups > 1 and m.groups == m.in_channels)
            if isinstance(m, nn.Conv2d) and m.groups > 1 and not depthwise:
                raise ExpansionError(f"module {path!r}: grouped convolutions (groups="
                                     f"{m.groups}) cannot be widened; only groups=1 or depthwise")
            new_in = self._layer_in(node, m.in_channels, path)
            if depthwise:
                new_out = new_in * (m.out_channels // m.in_channels)
            elif path == self.head:
                new_out = self.new_classes
            else:
                new_out = _new_width(self.width, path, m.out_channels)
            self._record(path, (new_in, new_out))
            return _Feat(m.out_channels, new_out, channels_first=True)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, _ExpandedBatchNorm)):
            f = self._first_tensor(node)
            self._record(path, (f.new,))
            return _Feat(m.num_features, f.new, channels_first=f.channels_first)
        if isinstance(m, nn.Flatten):
            return self._flatten(node, m.start_dim)
        has_params = any(True for _ in m.parameters(recurse=True))
        if has_params:
            raise ExpansionError(f"module {path!r} ({type(m).__name__}) holds parameters and "
                                 "is not a Linear, Conv2d or BatchNorm: expand() cannot widen it "
                                 "exactly")
        if isinstance(m, _PASS_MODULES):
            return self._first_tensor(node)
        if isinstance(m, _SPATIAL_MODULES):
            return self._spatial(node, type(m).__name__)
        if self._widened_input(node):
            self._refuse(node, f"{type(m).__name__} is not known to keep old and new features "
                               "apart")
        return self._first_tensor(node)

    def _spatial(self, node: fx.Node, what: str) -> _Feat:
        """A pooling, padding or resizing op: it keeps a conv map's channel groups apart, but
        on anything else its trailing dimension holds the features."""
        f = self._widened_input(node)
        if f is not None and not f.channels_first:
            self._refuse(node, f"{what} works along the last dimension, which here holds "
                               "features (a Linear's output or a flattened map), not a conv "
                               "map's pixels: it would mix old and new features")
        return self._first_tensor(node)

    def _flatten(self, node: fx.Node, start_dim: int) -> _Feat:
        f = self._first_tensor(node)
        if not f.widened:
            return _Feat(None, 0)
        if start_dim != 1:
            self._refuse(node, f"flatten from dim {start_dim} moves the channel dimension")
        return _Feat(f.cur, f.new, None)

    def _visit_function(self, node: fx.Node) -> Optional[_Feat]:
        fn = node.target
        if fn in _BINARY:
            return self._binary(node)
        if fn is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            return self._flatten(node, start)
        if fn in (torch.cat, torch.concat, torch.stack):
            if self._widened_input(node):
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
                if dim != 0:
                    self._refuse(node, "concatenating widened tensors along a feature dimension "
                                       "breaks the old-features-first order")
            return self._first_tensor(node)
        if fn is getattr:
            return None  # x.shape and similar
        if fn is operator.getitem:
            return self._index(node)
        if fn in (torch.mean, torch.sum, torch.amax):
            return self._reduce(node)
        if fn in _PASS_FUNCTIONS:
            return self._first_tensor(node)
        if fn in _SPATIAL_FUNCTIONS:
            return self._spatial(node, fn.__name__)
        if self._widened_input(node):
            self._refuse(node, "this function is not known to keep old and new features apart "
                               "(normalisations over features, softmax over classes and "
                               "reshapes that move channels would mix them)")
        return self._first_tensor(node)

    def _visit_method(self, node: fx.Node) -> Optional[_Feat]:
        name = node.target
        if name in _NON_TENSOR_METHODS:
            return None
        if name in _BINARY_METHODS:
            return self._binary(node)
        if name in _FLATTEN_METHODS:
            return self._reshape(node)
        if name in ("mean", "sum", "amax"):
            return self._reduce(node)
        if name in _PASS_METHODS:
            return self._first_tensor(node)
        if self._widened_input(node):
            self._refuse(node, f"tensor method .{name}() is not known to keep old and new "
                               "features apart")
        return self._first_tensor(node)

    def _index(self, node: fx.Node) -> Optional[_Feat]:
        f = self.feat.get(node.args[0])
        if f is None or not f.widened:
            return f if f is not None else None  # sizes, tuples, plain tensors
        index = node.args[1]
        if isinstance(index, tuple):
            rest = index[1:]
            touches = any(i is Ellipsis or not (isinstance(i, slice) and i == slice(None))
                          for i in rest)
            if touches or Ellipsis in index[:1]:
                self._refuse(node, f"indexing {index} of a widened tensor can cut or reorder its "
                                   "features; only batch indexing keeps them apart")
        return f

    def _binary(self, node: fx.Node) -> _Feat:
        feats = [f for f in self._arg_feats(node) if f is not None]
        widened = [f for f in feats if f.widened]
        if widened and any(f.new != widened[0].new for f in feats):
            self._refuse(node, "its operands carry different feature groups: "
                               + " and ".join(f"(width {f.cur}, +{f.new} new)" for f in feats)
                               + "; give both branches the same width")
        return widened[0] if widened else (feats[0] if feats else _DATA)

    def _reshape(self, node: fx.Node) -> _Feat:
        f = self._first_tensor(node)
        if not f.widened:
            return _Feat(None, 0)
        if node.target == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            return self._flatten(node, start)
        shape = node.args[1:]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        if len(shape) == 2 and shape[1] == -1:
            return _Feat(f.cur, f.new, None)
        self._refuse(node, f"a reshape to {shape} of a widened tensor (a hard-coded feature "
                           "size?); use flatten(1) or view(x.size(0), -1)")

    def _reduce(self, node: fx.Node) -> Optional[_Feat]:
        f = self._first_tensor(node)
        if not f.widened:
            return f
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        # Only spatial reductions of a conv map keep the channel groups apart.
        spatial = f.channels_first and dims and all(d in (2, 3, -1, -2) for d in dims)
        if not spatial:
            self._refuse(node, f"a reduction over dims {dims or 'all'} mixes old and new "
                               "features")
        keepdim = node.kwargs.get("keepdim", len(node.args) > 2 and node.args[2])
        return f if keepdim else _Feat(f.cur, f.new, f.factor, channels_first=False)


def _target_name(node: fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", str(t))


def _widened_layer(m: nn.Module, grow: Tuple[int, ...], mode: str) -> nn.Module:
    if isinstance(m, (ExpandedLinear, ExpandedConv2d)):
        return m.expand(*grow)
    if isinstance(m, _ExpandedBatchNorm):
        return m.expand(*grow)
    if isinstance(m, nn.Linear):
        return ExpandedLinear.from_linear(m, *grow, mode=mode)
    if isinstance(m, nn.Conv2d):
        return ExpandedConv2d.from_conv(m, *grow, mode="isolated" if m.groups > 1 else mode)
    if isinstance(m, nn.BatchNorm2d):
        return ExpandedBatchNorm2d.from_bn(m, *grow)
    if isinstance(m, nn.BatchNorm1d):
        return ExpandedBatchNorm1d.from_bn(m, *grow)
    raise AssertionError(f"unexpected module {type(m).__name__}")


def expand(model: nn.Module, width: Width = 0.25, new_classes: int = 0,
           head: Optional[str] = None, mode: str = "isolated",
           backend: str = "auto", fuse: bool = True) -> nn.Module:
    """Return a widened copy of ``model``; ``model`` itself is left untouched.

    width: new units per layer: a fraction of each layer's own width (float), an int, or
        ``{module_name: int}`` (layers not named get none).
    new_classes: new outputs of the head (the last Linear, or ``head="name"``).
    mode: "isolated" (old units never read new ones: every earlier task stays exact) or
        "coupled" (old units read new ones through zero-initialised trainable blocks).
    backend: "auto" follows ``xf.set_backend``; "torch", "triton" or "cuda" pins every
        widened layer of the copy to that backend.
    fuse: let each widened Linear compute the ``nn.ReLU``, ``nn.GELU`` or ``nn.SiLU`` module
        that follows it (:func:`~expanse_fast.fuse_activations`): same results, less work and
        memory in backward.  Also let each widened Conv2d apply the frozen channels of the
        BatchNorm after it (:func:`~expanse_fast.fold_batchnorms`).
    """
    from .backend_choice import BACKENDS
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if mode not in ("isolated", "coupled"):
        raise ValueError(f"mode must be 'isolated' or 'coupled', got {mode!r}")
    new_classes = _units(new_classes, "new_classes")
    plan = _Plan(model, width, new_classes, head, mode)
    big = copy.deepcopy(model)
    layers = dict(big.named_modules())
    for path, grow in plan.grow.items():
        layer = _widened_layer(layers[path], grow, mode)
        if isinstance(layer, (ExpandedLinear, ExpandedConv2d)):
            # Old inputs come from the frozen path: nobody needs their gradient.
            layer.skip_old_input_grad = layer.mode == "isolated"
            layer.backend = None if backend == "auto" else backend
        elif isinstance(layer, _ExpandedBatchNorm):
            # Isolated: its frozen channels are a frozen function of the data, so their
            # input gradient is never read (coupled: old channels read trainable blocks).
            layer.skip_old_input_grad = mode == "isolated"
        _swap(big, path, layer)
    _freeze_all_but_newest(big)
    watch_input_grad(big)
    if fuse:
        fuse_activations(big)
        fold_batchnorms(big)
    return big


def watch_input_grad(big: nn.Module) -> None:
    """Let ``big``'s layers form the old features' gradient in the calls where ``big``'s
    input requires grad (see ``expanse_fast.nn.input_grad``)."""
    watch(big, expanded_layers(big))


_TRAINABLE_NAMES = ("weight_new", "bias_new", "weight_couple")


def _freeze_all_but_newest(model: nn.Module):
    for name, p in model.named_parameters():
        p.requires_grad_(name.rpartition(".")[2] in _TRAINABLE_NAMES)


def _plain_copy(big: nn.Module, task: Optional[int]) -> nn.Module:
    model = copy.deepcopy(big)
    unwatch(model)
    for path, m in list(model.named_modules()):
        if isinstance(m, ExpandedLinear):
            _swap(model, path, m.to_linear(task))
        elif isinstance(m, ExpandedConv2d):
            _swap(model, path, m.to_conv(task))
        elif isinstance(m, _ExpandedBatchNorm):
            bn = m.to_bn(task)
            bn.train(m.training)
            _swap(model, path, bn)
        elif isinstance(m, FUSED_TYPES):  # its layer, now plain, no longer applies it
            _swap(model, path, m.unfused())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def source_model(big: nn.Module, task: int = 0) -> nn.Module:
    """A plain torch module of the task-``task`` architecture with that task's weights.

    For task 0 it holds the pretrained weights bit for bit, so its outputs are the
    pretrained model's exactly.  (In the coupled layout the widened model's old outputs
    drift with training; this returns the function as it was.)
    """
    return _plain_copy(big, task)


def merge(big: nn.Module) -> nn.Module:
    """Plain torch layers holding the full staircase weights (zeros in the upper blocks);
    the same outputs as ``big`` in eval mode."""
    return _plain_copy(big, None)


def print_trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """Print and return (trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    pct = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}")
    return trainable, total


def expanded_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Every expanded layer of ``model`` by path."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (ExpandedLinear, ExpandedConv2d, _ExpandedBatchNorm))}

