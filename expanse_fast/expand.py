"""Widen a whole model: ``expand`` (torch.fx width propagation + layer swap), and the way
back to plain modules: ``source_model`` (any earlier task) and ``merge`` (the newest).

The graph is used only to *analyse* the model: which tensors carry new features, in which
dimension, how wide each layer's new input group is, and whether anything would mix old and
new features.  Without example inputs the walk knows ranks only where a conv's 4-d weight
implies them; with them (``example_inputs=``) it runs the graph on fake tensors first and
knows every value's shape.  The returned model is a deep copy of the user's module with its
layers swapped, so its own ``forward`` code runs unchanged.
"""
from __future__ import annotations

import copy
import math
import numbers
import operator
import os
import sys
import warnings
from dataclasses import dataclass, replace
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_leaves

from .fuse import fuse_activations
from .fold import fold_batchnorms
from .graph import ExpansionError, hooked, in_other_mode, node_shapes
from .graph import swap_modules as _swap_all
from .graph import target_name as _target_name, trace as _trace
from .layout import width as _units
from .nn import ExpandedBatchNorm1d, ExpandedBatchNorm2d, ExpandedConv2d, ExpandedLinear
from .nn.fused import FUSED_TYPES
from .nn.blocks import not_widenable
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
# Elementwise ops with optional tensor arguments (bounds, exponents): alone they pass the
# groups through; with another tensor they broadcast like a binary op.
_ELEMENTWISE_FUNCTIONS = {
    torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max, F.hardtanh, F.hardsigmoid,
    F.softsign, F.celu, F.logsigmoid, torch.erf, torch.sqrt, torch.rsqrt, torch.square,
    torch.log, torch.log1p, torch.expm1, torch.reciprocal, torch.sign, operator.pow,
    torch.pow, torch.sin, torch.cos, torch.floor, torch.ceil, torch.round,
}
_ELEMENTWISE_METHODS = {
    "clamp", "clip", "clamp_min", "clamp_max", "clamp_", "relu_", "sigmoid_", "tanh_",
    "square", "sqrt", "rsqrt", "pow", "log", "log1p", "exp_", "expm1", "erf", "reciprocal",
    "sign", "sin", "cos", "floor", "ceil", "round", "abs_", "neg_",
}
# ...and what passes them through only where the features are not among the trailing
# dimensions it works along (a conv map's pixels, but a Linear output's features):
# pooling, padding and resizing, with the number of those dimensions (None: every one after
# the channels).
_SPATIAL_MODULES = {
    nn.MaxPool1d: 1, nn.AvgPool1d: 1, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveMaxPool1d: 1,
    nn.MaxPool2d: 2, nn.AvgPool2d: 2, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveMaxPool2d: 2,
    nn.ZeroPad2d: 2, nn.Upsample: None,
}
_SPATIAL_FUNCTIONS = {
    F.max_pool1d: 1, F.avg_pool1d: 1, F.adaptive_avg_pool1d: 1,
    F.max_pool2d: 2, F.avg_pool2d: 2, F.adaptive_avg_pool2d: 2, F.adaptive_max_pool2d: 2,
    F.interpolate: None,
}
_PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "float", "half", "bfloat16",
                 "to", "type_as", "detach", "abs", "exp", "neg"}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
           torch.mul, torch.div, operator.iadd, operator.imul, torch.maximum, torch.minimum}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_"}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_RESHAPE_METHODS = {"view", "reshape"}
# ops that only reorder or add dimensions (the features move, intact)
_MOVE_METHODS = {"transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis",
                 "unsqueeze", "t"}
_MOVE_FUNCTIONS = {torch.transpose, torch.swapaxes, torch.swapdims, torch.permute,
                   torch.movedim, torch.moveaxis, torch.unsqueeze, torch.t}
_MOVE_ATTRIBUTES = {"T", "mT"}
_NON_TENSOR_METHODS = {"size", "dim", "numel"}

# Appended to the refusals that the shapes could lift.
_NO_SHAPES = ("; expand() traced the model without shapes, so it takes a Linear's output as "
              "(batch, features) and a conv's as (batch, channels, height, width): pass "
              "example_inputs=(x,) to let it see the real ones")


@dataclass(frozen=True)
class _Feat:
    """Where one traced value holds its features, and how many: ``cur`` now (None for data,
    whose width is unknown and never widened) and ``new`` being added.

    ``axis`` is the features' dimension of a tensor of ``rank`` dimensions.  With example
    inputs the rank is the value's own; without, a conv's output is taken as (batch,
    channels, height, width), which its 4-d weight all but ensures, and a Linear's as
    (batch, features), which nothing ensures: ``sure`` is False for ranks that rest on that
    guess, and ops whose exactness would hang on it are refused.  ``factor`` is the number
    of features per channel once a conv map is flattened, None while unknown.
    """
    cur: Optional[int]
    new: int
    factor: Optional[int] = 1
    axis: int = 1
    rank: int = 2
    sure: bool = False

    @property
    def widened(self) -> bool:
        return self.new > 0

    @property
    def last(self) -> bool:
        return self.axis == self.rank - 1

    def reranked(self, rank: int) -> "_Feat":
        """This value after an op that leaves its (unwidened) features alone but makes it
        ``rank``-d: a later layer's output takes its rank from it."""
        return replace(self, rank=rank, axis=min(self.axis, max(rank - 1, 0)))


_DATA = _Feat(None, 0)


@dataclass(frozen=True)
class _Pair:
    """The (values, indices) of max or min over a dimension: each holds one entry per
    feature, where ``feat`` says."""
    feat: _Feat


def _dims(dims, rank: int) -> Optional[Tuple[int, ...]]:
    """``dims`` (an int, a sequence of them, or None for all) as sorted non-negative
    dimensions of a ``rank``-dimensional tensor; None if one is not an int in range."""
    if dims is None:
        return tuple(range(rank))
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not all(isinstance(d, int) and -rank <= d < rank for d in dims):
        return None
    return tuple(sorted(d % rank for d in dims))


def _sizes_vouch(src: tuple, out: tuple, asked: tuple) -> bool:
    """Whether a reshape of ``src`` to ``out`` (``asked`` for) regroups the dimensions the
    same way at every size.  A size of 1 in the example hides that ((batch, 1, F) to
    (batch, F) keeps the features in place, (batch, 5, F) to (batch, 5 * F) interleaves
    them), unless the call asks for it by number, as a view to (batch, C, 1, 1) does."""
    if 1 in src:
        return False
    literal = tuple(asked) if len(asked) == len(out) else (None,) * len(out)
    return all(size != 1 or (isinstance(n, int) and n == 1) for size, n in zip(out, literal))


def _new_width(width: Width, name: str, current: int) -> int:
    if isinstance(width, Mapping):
        return _units(width.get(name, 0), f"width[{name!r}]")
    if isinstance(width, bool):
        raise TypeError("width must be a float, an int or a {module_name: int} dict")
    if isinstance(width, numbers.Integral):
        return _units(width, "width")
    if isinstance(width, numbers.Real):  # (a float, or NumPy's float32 and the like)
        width = float(width)
        if not (math.isfinite(width) and width >= 0):
            raise ValueError(f"width must be a finite fraction >= 0, got {width}")
        return max(1, round(width * current)) if width > 0 else 0
    raise TypeError(f"width must be a float, an int or a {{module_name: int}} dict, got "
                    f"{type(width).__name__}")


def _find_head(graph: fx.Graph, modules: Dict[str, nn.Module], head: Optional[str],
               new_classes: int = 0) -> str:
    if head is not None:
        if head not in modules or not isinstance(
                modules[head], (nn.Linear, nn.Conv2d, ExpandedLinear, ExpandedConv2d)):
            raise ExpansionError(f"head={head!r} is not a Linear or Conv2d module of the model")
        return head
    called = [n.target for n in graph.nodes if n.op == "call_module"]
    for kinds in ((nn.Linear, ExpandedLinear), (nn.Conv2d, ExpandedConv2d)):
        found = [t for t in called if isinstance(modules[t], kinds)]
        if found:
            returned = _returned_layers(graph, modules, kinds)
            if new_classes and len(returned) > 1:
                # (which one is the classifier only the user knows: the last one called may
                # be a projection returned beside the logits, or the main head after an
                # auxiliary one, as in GoogLeNet; so a warning, not a refusal)
                names = ", ".join(repr(t) for t in returned)
                warnings.warn(
                    f"expand(): the model returns the outputs of several layers ({names}); "
                    f"{found[-1]!r}, the last one called, takes the {new_classes} new classes "
                    f"and the others grow by width as hidden layers do; name the head with "
                    f"head= to choose it (and silence this warning)",
                    stacklevel=_callers_level())
            return found[-1]
    raise ExpansionError("the model has no Linear or Conv2d layer to widen")


def _callers_level() -> int:
    """The ``stacklevel`` that points a warning raised by the caller of this at the first
    frame outside the package (the user's expand() call, however deep the package's own
    calls went)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _returned_layers(graph: fx.Graph, modules: Dict[str, nn.Module], kinds) -> List[str]:
    """The layers of ``kinds`` whose outputs the forward returns as they are (in a tuple,
    list or dict or alone), in the order returned."""
    out = next((n for n in graph.nodes if n.op == "output"), None)
    if out is None:
        return []
    found: List[str] = []
    for leaf in tree_leaves(out.args):
        if (isinstance(leaf, fx.Node) and leaf.op == "call_module"
                and isinstance(modules[leaf.target], kinds) and leaf.target not in found):
            found.append(leaf.target)
    return found


def _example_tuple(example_inputs) -> Optional[tuple]:
    if example_inputs is None or isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of the model's positional "
                    f"arguments, got {type(example_inputs).__name__}")


class _Plan:
    """Walks the graph once and records, for every layer, the widths it must grow by."""

    def __init__(self, model: nn.Module, width: Width, new_classes: int, head: Optional[str],
                 mode: str, example_inputs: Optional[tuple] = None,
                 graph: Optional[fx.Graph] = None, check_names: bool = True,
                 multiple_of: int = 1):
        self.multiple_of = multiple_of
        self.modules = dict(model.named_modules())
        self.graph = _trace(model) if graph is None else graph
        self.shapes = (None if example_inputs is None
                       else node_shapes(model, self.graph, example_inputs))
        self.width, self.new_classes, self.mode = width, int(new_classes), mode
        self.head = _find_head(self.graph, self.modules, head, int(new_classes))
        self.grow: Dict[str, Tuple[int, ...]] = {}  # path -> (new_in, new_out) or (new,)
        self.ride_through: set = set()  # Linear layers over another dimension, kept as they are
        self.feat: Dict[fx.Node, Optional[_Feat]] = {}
        for node in self.graph.nodes:
            self.feat[node] = self._checked(node, self._visit(node))
        self._check_head_is_an_output()
        if check_names:
            self.check_width_names()

    def _new_units(self, path: str, current: int) -> int:
        """The new outputs of a hidden layer (the head's are the new classes), rounded up to
        the plan's multiple."""
        n = _new_width(self.width, path, current)
        return -(-n // self.multiple_of) * self.multiple_of

    def _check_head_is_an_output(self):
        """The head's new outputs are classes: a widened layer after it (head= naming a
        hidden layer) would take them as new features and widen the model's output too."""
        seen, todo = set(), [n for n in self.graph.nodes
                             if n.op == "call_module" and n.target == self.head]
        while todo:
            for user in todo.pop().users:
                if user in seen or _reads_size(user):  # (a size carries no features)
                    continue
                seen.add(user)
                if user.op == "call_module" and user.target in self.grow and isinstance(
                        self.modules[user.target], (nn.Linear, nn.Conv2d, ExpandedLinear,
                                                    ExpandedConv2d)):
                    raise ExpansionError(
                        f"head={self.head!r} feeds {user.target!r} "
                        f"({type(self.modules[user.target]).__name__}), a layer widened after "
                        "it: the head must be an output layer; name the model's last layer")
                todo.append(user)

    def check_width_names(self):
        if not isinstance(self.width, Mapping):
            return
        unknown = set(self.width) - set(self.grow)
        if unknown:
            raise ExpansionError(f"width names modules that are not widened layers of the "
                                 f"model: {sorted(unknown)}")
        for name in sorted(self.width):
            m = self.modules[name]
            if name == self.head:
                why = "its new outputs are new_classes"
            elif isinstance(m, (nn.modules.batchnorm._BatchNorm, _ExpandedBatchNorm)):
                why = "a BatchNorm takes the new channels of the layer before it"
            elif (isinstance(m, nn.Conv2d) and m.groups > 1) or (
                    isinstance(m, ExpandedConv2d) and m.depthwise):
                why = "a depthwise conv takes the new channels of the layer before it"
            else:
                continue
            raise ExpansionError(f"width names {name!r}, whose width it does not set: {why}")

    def merge(self, other: "_Plan", mode_name: str) -> None:
        """Take in the plan of the model's other mode (training or eval), whose forward
        takes other paths: every layer either mode calls is widened, alike in both."""
        if other.head != self.head:
            raise ExpansionError(
                f"the head is {self.head!r} in one mode and {other.head!r} in {mode_name} mode "
                "(the forward takes other paths): name it with head=")
        for path, grow in other.grow.items():
            if self.grow.setdefault(path, grow) != grow:
                raise ExpansionError(f"module {path!r} is widened by {self.grow[path]} in one "
                                     f"mode and by {grow} in {mode_name} mode")
        self.ride_through |= other.ride_through
        both = self.ride_through & set(self.grow)
        if both:
            raise ExpansionError(f"modules {sorted(both)} are widened in one mode and kept as "
                                 "they are (called on another dimension) in the other")

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

    def _rank(self, node: fx.Node, assumed: int) -> int:
        shape = None if self.shapes is None else self.shapes.get(node)
        return assumed if shape is None else len(shape)

    def _checked(self, node: fx.Node, f: Optional[_Feat]) -> Optional[_Feat]:
        """With example inputs, a widened value's features must be where the walk put
        them: an op the walk misreads is refused, never widened wrongly."""
        if self.shapes is None or f is None or isinstance(f, _Pair):
            return f
        shape = self.shapes.get(node)
        if not f.widened:
            return f if shape is None or f.cur is None else f.reranked(len(shape))
        fits = (shape is not None and len(shape) == f.rank and 0 <= f.axis < f.rank
                and (shape[f.axis] == f.cur if f.factor == 1 or not f.cur
                     else shape[f.axis] % f.cur == 0))
        if not fits:
            self._refuse(node, f"expand() cannot follow its features (it expected {f.cur} of "
                               f"them in dim {f.axis} of a {f.rank}-d value; the shape is "
                               f"{shape})")
        return f

    def _refuse(self, node: fx.Node, why: str, shapes_could_help: bool = False):
        if shapes_could_help and self.shapes is None:
            why += _NO_SHAPES
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
        why = not_widenable(self.modules[path])  # (first: a lazy layer's own hook is no user's)
        if why:
            raise ExpansionError(f"module {path!r}: {why}")
        if hooked(self.modules[path]):
            # the widened layer is a new module: the hooks would be lost, and they would see
            # wider tensors than they were written for
            raise ExpansionError(
                f"module {path!r} carries hooks (forward, forward-pre or backward): the widened "
                "layer that replaces it would not carry them, and they would see other tensors; "
                "remove them before expand() and register them on the widened model")
        if parametrize.is_parametrized(self.modules[path]):
            # its weight is computed from other tensors at each call: a widened copy would
            # freeze one value of it, and the model it came from would hold other tensors
            raise ExpansionError(
                f"module {path!r} has a parametrization (torch.nn.utils.parametrize, e.g. "
                "weight_norm or spectral_norm) on "
                f"{sorted(self.modules[path].parametrizations.keys())}: make it plain first "
                "with torch.nn.utils.parametrize.remove_parametrizations(module, name)")
        if path in self.ride_through:
            raise ExpansionError(f"module {path!r} is called on another dimension than the "
                                 "features (kept as it is) and on the features (widened)")
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
        if not (node.op == "call_function" and node.target in (operator.getitem, getattr)):
            if any(isinstance(self.feat.get(a), _Pair) for a in node.all_input_nodes):
                self._refuse(node, "it takes max's or min's (values, indices) pair as a tensor")
        if node.op == "call_module":
            return self._visit_module(node, self.modules[node.target])
        if node.op == "call_function":
            return self._visit_function(node)
        if node.op == "call_method":
            return self._visit_method(node)
        self._refuse(node, "unsupported graph node")

    def _visit_attr(self, node: fx.Node) -> Optional[_Feat]:
        owner = str(node.target).rpartition(".")[0]
        why = not_widenable(self.modules[owner]) if owner in self.modules else None
        if why:  # a user's subclass of a layer: fx traced into its own forward
            raise ExpansionError(f"module {owner!r}: {why}")
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

    def _reads_features_at(self, node: fx.Node, path: str, axis_of, what: str):
        """Refuse a layer that reads another dimension than the one holding the widened
        features (``axis_of(rank)``: the dimension it reads)."""
        f = self._widened_input(node)
        if f is not None and f.axis != axis_of(f.rank):
            self._refuse(node, f"{path!r} reads {what}, but the widened features are in dim "
                               f"{f.axis} of a {f.rank}-d value")

    def _mixes_another_dimension(self, node: fx.Node, path: str, f: _Feat) -> _Feat:
        """A Linear over tokens or a map's width, the features elsewhere (an MLP-Mixer's
        token mixing): the same map for every feature, so the widened ones ride through it
        apart from the old, and the layer itself is not widened."""
        if path in self.grow:
            self._refuse(node, f"{path!r} is widened where it reads the features and called "
                               "here on another dimension")
        self.ride_through.add(path)
        return replace(f, rank=self._rank(node, f.rank))

    def _visit_module(self, node: fx.Node, m: nn.Module) -> Optional[_Feat]:
        path = node.target
        src = self._first_tensor(node)
        if isinstance(m, (nn.Linear, ExpandedLinear)):
            f = self._widened_input(node)
            if f is not None and not f.last and type(m) is nn.Linear and path != self.head:
                return self._mixes_another_dimension(node, path, f)
            self._reads_features_at(node, path, lambda r: r - 1, "the last dimension")
            new_in = self._layer_in(node, m.in_features, path)
            new_out = (self.new_classes if path == self.head
                       else self._new_units(path, m.out_features))
            self._record(path, (new_in, new_out))
            rank = self._rank(node, src.rank)
            return _Feat(m.out_features, new_out, axis=rank - 1, rank=rank,
                         sure=self.shapes is not None or src.sure)
        if isinstance(m, (nn.Conv2d, ExpandedConv2d)):
            depthwise = (m.depthwise if isinstance(m, ExpandedConv2d)
                         else m.groups > 1 and m.groups == m.in_channels)
            if isinstance(m, nn.Conv2d) and m.groups > 1 and not depthwise:
                raise ExpansionError(f"module {path!r}: grouped convolutions (groups="
                                     f"{m.groups}) cannot be widened; only groups=1 or depthwise")
            self._reads_features_at(node, path, lambda r: r - 3, "the channels (dim -3)")
            new_in = self._layer_in(node, m.in_channels, path)
            if depthwise:
                new_out = new_in * (m.out_channels // m.in_channels)
            elif path == self.head:
                new_out = self.new_classes
            else:
                new_out = self._new_units(path, m.out_channels)
            self._record(path, (new_in, new_out))
            rank = self._rank(node, src.rank if src.widened else 4)
            return _Feat(m.out_channels, new_out, axis=rank - 3, rank=rank, sure=True)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, _ExpandedBatchNorm)):
            self._reads_features_at(node, path, lambda r: 1, "dim 1")
            if src.widened and src.factor is None:
                # a flattened conv map (old channels' pixels first): each new channel brings
                # num_features / channels features, all after the old ones
                new = self._layer_in(node, m.num_features, path)
                self._record(path, (new,))
                return replace(src, rank=self._rank(node, src.rank))
            self._record(path, (src.new,))
            return _Feat(m.num_features, src.new, axis=src.axis, rank=self._rank(node, src.rank),
                         sure=src.sure)
        if isinstance(m, nn.Flatten):
            return self._flatten(node, m.start_dim, m.end_dim)
        has_params = any(True for _ in m.parameters(recurse=True))
        if has_params:
            buffers = [n for n, _ in m.named_buffers()]
            if not self._widened_input(node) and not buffers:
                # it reads what is never widened (the data, an Embedding's tokens): its
                # output stays as it is, and its parameters are frozen with the rest
                return _DATA
            raise ExpansionError(f"module {path!r} ({type(m).__name__}) holds parameters and "
                                 "is not a Linear, Conv2d or BatchNorm: expand() cannot widen it "
                                 "exactly" + (f" (nor keep its buffers {buffers[:3]} fixed: "
                                              "they may change in training mode)"
                                              if not self._widened_input(node) else ""))
        if isinstance(m, _PASS_MODULES):
            return src
        for kind, trailing in _SPATIAL_MODULES.items():
            if isinstance(m, kind):
                return self._spatial(node, type(m).__name__, trailing)
        if self._widened_input(node):
            self._refuse(node, f"{type(m).__name__} is not known to keep old and new features "
                               "apart")
        return _DATA  # (an unknown op: its output's rank is unknown too)

    def _spatial(self, node: fx.Node, what: str, trailing: Optional[int]) -> _Feat:
        """A pooling, padding or resizing op over the ``trailing`` last dimensions (None:
        all after the channels): it keeps the groups apart unless the features are there."""
        f = self._widened_input(node)
        if f is not None:
            n = f.rank - 2 if trailing is None else trailing
            if f.axis >= f.rank - n:
                self._refuse(node, f"{what} works along the last {n} dimension(s), which here "
                                   f"hold the features (dim {f.axis} of a {f.rank}-d value, a "
                                   "Linear's output or a flattened map): it would mix old and "
                                   "new features", shapes_could_help=not f.sure)
        return self._first_tensor(node)

    def _flatten_call(self, node: fx.Node) -> _Feat:
        """torch.flatten(x, start_dim=0, end_dim=-1), or the tensor method."""
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return self._flatten(node, start, end)

    def _flatten(self, node: fx.Node, start: int, end: int = -1) -> _Feat:
        f = self._first_tensor(node)
        span = _dims((start, end), f.rank)
        if not f.widened:
            if not f.sure or span is None:
                return _DATA
            return f.reranked(f.rank - (span[1] - span[0]))
        if span is None:
            self._refuse(node, f"flatten of dims {start}..{end} of a value taken as "
                               f"{f.rank}-d", shapes_could_help=not f.sure)
        s, e = span
        if not f.sure and s <= f.axis:
            # (batch, features).flatten(1) changes nothing, but (batch, tokens, features)
            # would interleave each token's old and new features
            self._refuse(node, f"flatten from dim {start} of a Linear's output is exact only "
                               "if that output is (batch, features)", shapes_could_help=True)
        merged = e - s
        if f.axis < s:
            return replace(f, rank=f.rank - merged)
        if f.axis > e:
            return replace(f, axis=f.axis - merged, rank=f.rank - merged)
        if f.axis != s:
            self._refuse(node, f"flatten of dims {s}..{e} puts dimensions before the features "
                               f"(dim {f.axis}): each slice's old and new features would "
                               "interleave")
        return replace(f, rank=f.rank - merged, factor=f.factor if merged == 0 else None)

    def _visit_function(self, node: fx.Node) -> Optional[_Feat]:
        fn = node.target
        if fn in _BINARY:
            return self._binary(node)
        if fn is torch.flatten:
            return self._flatten_call(node)
        if fn is torch.reshape:
            return self._reshape(node, node.args[1:])
        if fn in (torch.cat, torch.concat, torch.stack):
            return self._join(node, fn is torch.stack)
        if fn is getattr:
            pair = self.feat.get(node.args[0])
            if isinstance(pair, _Pair) and node.args[1] in ("values", "indices"):
                return pair.feat
            if node.args[1] in _MOVE_ATTRIBUTES:
                return self._move(node, lambda t: getattr(t, node.args[1]))
            f = self._widened_input(node)
            if f is not None and node.args[1] == "shape":
                self._size_read(node, f, None)
            return None  # x.shape and similar
        if fn is operator.getitem:
            return self._index(node)
        if fn in _REDUCE_FUNCTIONS:
            return self._reduce(node)
        if fn in (torch.max, torch.min):
            return self._max_min(node)
        if fn in _MOVE_FUNCTIONS:
            return self._move(node, lambda t: fn(t, *node.args[1:], **node.kwargs))
        if fn in _PASS_FUNCTIONS:
            return self._first_tensor(node)
        if fn in _ELEMENTWISE_FUNCTIONS:
            return self._elementwise(node)
        if fn in _SPATIAL_FUNCTIONS:
            return self._spatial(node, fn.__name__, _SPATIAL_FUNCTIONS[fn])
        if fn is F.pad:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
            if isinstance(pad, (tuple, list)) and all(isinstance(p, int) for p in pad):
                return self._spatial(node, "pad", len(pad) // 2)
        if self._widened_input(node):
            self._refuse(node, "this function is not known to keep old and new features apart "
                               "(normalisations over features, softmax over classes and "
                               "reshapes that move channels would mix them)")
        return _DATA

    def _size_read(self, node: fx.Node, f: _Feat, dim) -> None:
        """A widened value's size read as a number (``x.size(d)``, ``x.shape[d]``): the
        features' size is the widened width when the model runs, so a computation with it
        would change the old outputs; other dimensions' sizes are fine.  ``dim`` None: the
        whole shape, whose every use must then be an index or a reshape's shape."""
        if dim is None:
            for user in node.users:
                if (user.op == "call_function" and user.target is operator.getitem
                        and isinstance(user.args[1], int)):
                    self._size_read(user, f, user.args[1])
                elif not _reshape_shape(user, node):
                    self._refuse(node, "the whole shape of a widened value is used (its "
                                       "features' size is the widened width when the model "
                                       "runs; only reshapes may use it)")
            return
        if not isinstance(dim, int):
            self._refuse(node, f"a size of a widened value read at dims {dim!r}")
        if not f.sure and dim != 0:
            self._refuse(node, f"reading size {dim} of a Linear's output is exact only if it "
                               "is not the features'", shapes_could_help=True)
        if f.sure and dim % f.rank == f.axis and not _shapes_only(node):
            self._refuse(node, f"it reads the size of the widened features (dim {dim}), which "
                               "is the widened width when the model runs: a computation with "
                               "it would change the old outputs (only reshapes may use it)")

    def _visit_method(self, node: fx.Node) -> Optional[_Feat]:
        name = node.target
        if name in _NON_TENSOR_METHODS:
            f = self._widened_input(node)
            if f is not None and name == "numel":
                self._refuse(node, "it reads the element count of a widened value, which "
                                   "changes with the widening")
            if f is not None and name == "size":
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                self._size_read(node, f, dim)
            return None
        if name in _BINARY_METHODS:
            return self._binary(node)
        if name == "flatten":
            return self._flatten_call(node)
        if name in _RESHAPE_METHODS:
            return self._reshape(node, node.args[1:])
        if name in _REDUCE_METHODS:
            return self._reduce(node)
        if name in ("max", "min"):
            return self._max_min(node)
        if name in _MOVE_METHODS:
            return self._move(node, lambda t: getattr(t, name)(*node.args[1:], **node.kwargs))
        if name in _PASS_METHODS:
            return self._first_tensor(node)
        if name in _ELEMENTWISE_METHODS:
            return self._elementwise(node)
        if self._widened_input(node):
            self._refuse(node, f"tensor method .{name}() is not known to keep old and new "
                               "features apart")
        return _DATA

    def _elementwise(self, node: fx.Node) -> Optional[_Feat]:
        """An elementwise op: its one tensor's groups pass through; tensor bounds or
        exponents broadcast against it as a binary op's operands do."""
        if len(node.all_input_nodes) > 1:
            return self._binary(node)
        return self._first_tensor(node)

    def _max_min(self, node: fx.Node):
        """max or min: of two tensors, elementwise; over a dimension, a (values, indices)
        pair; over everything, one value."""
        other = node.args[1] if len(node.args) > 1 else node.kwargs.get(
            "dim", node.kwargs.get("other"))
        if isinstance(other, fx.Node):
            return self._binary(node)
        reduced = self._reduce(node)
        return reduced if other is None else _Pair(reduced)

    def _index(self, node: fx.Node) -> Optional[_Feat]:
        f = self.feat.get(node.args[0])
        if isinstance(f, _Pair):
            if node.args[1] not in (0, 1):
                self._refuse(node, f"indexing max's or min's (values, indices) pair with "
                                   f"{node.args[1]!r}")
            return f.feat
        if f is None or not (f.widened or f.sure):
            return f  # sizes, tuples, data
        index = node.args[1]
        items = index if isinstance(index, tuple) else (index,)
        if items.count(Ellipsis) > 1:
            self._refuse(node, f"indexing {index} with more than one Ellipsis")
        if f.widened and not f.sure and (items[:1] == (Ellipsis,) or any(
                i is Ellipsis or not (isinstance(i, slice) and i == slice(None))
                for i in items[1:])):
            # Of a guessed (batch, features) only the first dimension is surely the batch
            # and the last the features: an Ellipsis, or an index after the first, could
            # land on either side of the real dimensions
            self._refuse(node, f"indexing {index} of a Linear's output is exact only if that "
                               "output is (batch, features)", shapes_could_help=True)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        if used > f.rank:
            if not f.widened:
                return f  # (torch names the problem when the model runs)
            self._refuse(node, f"indexing {index} of a value taken as {f.rank}-d",
                         shapes_could_help=not f.sure)
        fill = (slice(None),) * (f.rank - used)
        if Ellipsis in items:
            at = items.index(Ellipsis)
            items = items[:at] + fill + items[at + 1:]
        else:
            items = items + fill
        dim = out = 0  # the dimension read, the dimensions produced so far
        axis = tensors = 0
        for item in items:
            if item is None:
                out += 1
                continue
            if dim == f.axis and f.widened:
                if not (isinstance(item, slice) and item == slice(None)):
                    self._refuse(node, f"indexing {index} of a widened value cuts or reorders "
                                       f"its features (dim {f.axis}); only indexing other "
                                       "dimensions keeps them apart",
                                 shapes_could_help=not f.sure)
                axis = out
                out += 1
            elif isinstance(item, slice):
                out += 1
            elif not isinstance(item, int):  # an index tensor: its dimensions come out
                tensors += 1
                out += self._rank(item, 1) if isinstance(item, fx.Node) else 1
            dim += 1
        if not f.widened:
            return f.reranked(out) if tensors <= 1 else f
        if tensors > 1:
            self._refuse(node, f"indexing {index} of a widened value with several index "
                               "tensors (they can move the dimensions)")
        return replace(f, axis=axis, rank=out)

    def _join(self, node: fx.Node, stack: bool) -> _Feat:
        """torch.cat or torch.stack: fine along any dimension but the features', for
        operands that all carry the same groups in the same place."""
        feats = [f for f in self._arg_feats(node) if f is not None]
        widened = [f for f in feats if f.widened]
        if not widened:
            first = feats[0] if feats else _DATA
            return first.reranked(first.rank + 1) if stack and first.sure else first
        f = widened[0]
        if any((g.new, g.factor, g.axis, g.rank) != (f.new, f.factor, f.axis, f.rank)
               for g in feats):
            self._refuse(node, "its operands carry different feature groups: "
                               + " and ".join(_groups(g) for g in feats))
        raw = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        dims = _dims(raw, f.rank + 1 if stack else f.rank)
        if dims is not None and not stack and dims[0] == f.axis:
            self._refuse(node, "concatenating widened tensors along a feature dimension "
                               "breaks the old-features-first order",
                         shapes_could_help=not f.sure)
        if dims is None or (not f.sure and raw != 0):
            self._refuse(node, f"joining widened values along dim {raw}",
                         shapes_could_help=not f.sure)
        if stack:
            return replace(f, axis=f.axis + (dims[0] <= f.axis), rank=f.rank + 1)
        return f

    def _binary(self, node: fx.Node) -> _Feat:
        """Operands that broadcast: every widened one must put its features in the same
        dimension of the result and carry the same groups; with example inputs, a plain
        tensor of size 1 there (a mask over tokens, say) broadcasts over them."""
        args = [(a, self.feat.get(a)) for a in node.all_input_nodes]
        args = [(a, f) for a, f in args if f is not None]
        widened = [f for _, f in args if f.widened]
        if not widened:
            return args[0][1] if args else _DATA
        rank = self._rank(node, max(f.rank for f in widened))
        axes = {rank - f.rank + f.axis for f in widened}
        if len(axes) > 1:
            self._refuse(node, "its widened operands hold their features in different "
                               "dimensions", shapes_could_help=True)
        (axis,) = axes
        first = widened[0]
        for a, f in args:
            if (f.new, f.factor) == (first.new, first.factor) and (
                    not f.widened or None in (f.cur, first.cur) or f.cur == first.cur):
                continue
            shape = None if self.shapes is None or f.new else self.shapes.get(a)
            if shape is not None:
                at = axis - (rank - len(shape))
                if at < 0 or shape[at] == 1:
                    continue  # broadcast along the features
            gate = any(g.cur == 1 for _, g in args)
            unknown = any(g.cur is None and not g.widened for _, g in args)
            self._refuse(node, "its operands carry different feature groups: "
                               + " and ".join(self._operand(a, g) for a, g in args)
                               + ("; a gate of width 1 broadcast over the features must stay "
                                  "unwidened: give its layer no new units (width={name: 0} "
                                  "for it) and pass example_inputs" if gate else
                                  "" if unknown else "; give both branches the same width"),
                         shapes_could_help=unknown)
        return replace(widened[0], axis=axis, rank=rank,
                       sure=all(f.sure for f in widened))

    def _operand(self, node: fx.Node, f: _Feat) -> str:
        """An operand for a message: its groups and what made it."""
        if f.cur is None and not f.widened:
            made = self._producer(node)
            return (f"the value{made}" if made else repr(node.name)) + ", of unknown shape"
        return _groups(f) + self._producer(node)

    def _producer(self, node: fx.Node) -> str:
        """" from module 'enc.emb' (Embedding)" where a module's call made ``node``."""
        if node.op != "call_module":
            return ""
        return f" from module {node.target!r} ({type(self.modules[node.target]).__name__})"

    def _move(self, node: fx.Node, op) -> Optional[_Feat]:
        """An op that only reorders or adds dimensions (transpose, permute, unsqueeze, .T):
        where the features go is read off the op applied to a shapeless probe."""
        f = self._widened_input(node)
        dynamic = any(isinstance(a, fx.Node) for a in node.args[1:])
        if f is None:
            f = self._first_tensor(node)
            if not f.sure or dynamic:
                return f
            try:
                return f.reranked(op(torch.empty([2] * f.rank, device="meta")).dim())
            except Exception:
                return f  # (torch names the problem when the model runs)
        if not f.sure:
            self._refuse(node, "moving the dimensions of a Linear's output",
                         shapes_could_help=True)
        if dynamic:
            self._refuse(node, "dimensions computed at run time")
        probe = torch.empty([3 if d == f.axis else 2 for d in range(f.rank)], device="meta")
        try:
            sizes = list(op(probe).shape)
        except Exception as exc:  # the op's own complaint about its arguments
            self._refuse(node, f"{type(exc).__name__}: {exc}")
        if sizes.count(3) != 1:
            self._refuse(node, "expand() cannot follow where it puts the features")
        return replace(f, axis=sizes.index(3), rank=len(sizes))

    def _reshape(self, node: fx.Node, shape: tuple) -> _Feat:
        f = self._first_tensor(node)
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        if not f.widened:  # (with shapes, _checked gives it its rank)
            return f.reranked(len(shape)) if f.sure and len(shape) > 1 else _DATA
        seen = None if self.shapes is None else (self.shapes.get(node.args[0]),
                                                 self.shapes.get(node))
        if seen is not None and None not in seen and _sizes_vouch(*seen, shape):
            return self._reshape_seen(node, f, shape, *seen)
        if len(shape) == 2 and shape[1] == -1:
            return self._flatten(node, 1)
        self._refuse(node, f"a reshape to {shape} of a widened tensor (a hard-coded feature "
                           "size?); use flatten(1) or view(x.size(0), -1)",
                     shapes_could_help=not f.sure)

    def _reshape_seen(self, node: fx.Node, f: _Feat, shape: tuple, src: tuple, out: tuple
                      ) -> _Feat:
        """A reshape of ``src`` to ``out`` with example inputs: exact where the features
        stay one dimension of their own (the others regrouped around them), or where they
        merge with the dimensions right after them, old features first (a flatten); the
        size it asks for there must not be a number."""
        ahead = math.prod(src[:f.axis])  # elements before each feature, in row-major order
        starts = [j for j in range(len(out)) if math.prod(out[:j]) == ahead]
        moved = None
        for j in starts:
            if out[j] == src[f.axis]:
                moved = replace(f, axis=j, rank=len(out))
            elif any(out[j] == math.prod(src[f.axis:end]) for end in range(f.axis + 2,
                                                                          len(src) + 1)):
                moved = replace(f, axis=j, rank=len(out), factor=None)
        if moved is None:
            self._refuse(node, f"a reshape of {tuple(src)} to {tuple(out)} moves or splits the "
                               f"features (dim {f.axis})")
        asked = shape[moved.axis] if len(shape) == len(out) else None
        if isinstance(asked, int) and asked != -1:
            self._refuse(node, f"a reshape to {shape} asks for {asked} features, the unwidened "
                               "size; use -1 or a size read from the tensor")
        return moved

    def _reduce(self, node: fx.Node) -> Optional[_Feat]:
        f = self._first_tensor(node)
        raw = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = _dims(raw, f.rank)
        keepdim = node.kwargs.get("keepdim", len(node.args) > 2 and node.args[2])
        if not f.widened:
            if not f.sure or dims is None or keepdim:
                return f
            return f.reranked(f.rank - len(dims))
        if dims is None or f.axis in dims:
            self._refuse(node, f"a reduction over dims {raw if raw is not None else 'all'} "
                               "mixes old and new features", shapes_could_help=not f.sure)
        if not f.sure and (0 in dims or not all(d < 0 for d in (
                (raw,) if isinstance(raw, int) else tuple(raw)))):
            # a guessed rank: dims counted from the end are sure, from the front not (and
            # dim 0 holds the features if the value is unbatched)
            self._refuse(node, f"a reduction over dims {raw} of a Linear's output is exact only "
                               "if that output is (batch, features)", shapes_could_help=True)
        if keepdim:
            return f
        return replace(f, axis=f.axis - sum(d < f.axis for d in dims), rank=f.rank - len(dims))


def _reads_size(node: fx.Node) -> bool:
    """Whether ``node`` reads only a value's sizes (``x.shape``, ``x.size(...)``,
    ``x.dim()``), not its values."""
    return ((node.op == "call_method" and node.target in ("size", "dim"))
            or (node.op == "call_function" and node.target is getattr
                and len(node.args) > 1 and node.args[1] in ("shape", "ndim")))


def _shapes_only(size: fx.Node) -> bool:
    """Whether a size read off a value only goes into the shapes of reshapes (view,
    reshape), where the widened width is the right one (the reshape itself is judged by
    the walk), and into no computation."""
    def ok(u: fx.Node) -> bool:
        if _reshape_shape(u, size):
            return True
        # sizes combined into other sizes (h.shape[1] * h.shape[2]) for a reshape
        return (u.op == "call_function" and u.target in _SIZE_ARITHMETIC
                and all(ok(v) for v in u.users))
    return all(ok(u) for u in size.users)


def _reshape_shape(user: fx.Node, size: fx.Node) -> bool:
    """Whether ``user`` is a view or reshape that takes ``size`` as (part of) its shape,
    not as the tensor it reshapes."""
    return (user.op in ("call_method", "call_function")
            and (user.target in _RESHAPE_METHODS or user.target is torch.reshape)
            and bool(user.args) and user.args[0] is not size)


_SIZE_ARITHMETIC = {operator.mul, operator.add, operator.sub, operator.floordiv}


def _groups(f: _Feat) -> str:
    """A value's groups for a message: (width 8, +2 new), per channel once flattened."""
    return f"(width {f.cur}, +{f.new} new{'' if f.factor == 1 else ' per channel'})"


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
           backend: str = "auto", fuse: bool = True, example_inputs=None,
           multiple_of: int = 1) -> nn.Module:
    """Return a widened copy of ``model``; ``model`` itself is left untouched.

    width: new units per layer: a fraction of each layer's own width (float), an int, or
        ``{module_name: int}`` (layers not named get none).
    new_classes: new outputs of the head (the last Linear, or ``head="name"``).
    mode: "isolated" (old units never read new ones: every earlier task stays exact) or
        "coupled" (old units read new ones through zero-initialised trainable blocks),
        for the layers widened for the first time: an expanded layer keeps its own mode
        (re-expanding a coupled model keeps it coupled), and a depthwise conv is isolated.
    backend: "auto" follows ``xf.set_backend``; "torch", "triton" or "cuda" pins every
        widened layer of the copy to that backend.
    fuse: let each widened Linear compute the ``nn.ReLU``, ``nn.GELU`` or ``nn.SiLU`` module
        that follows it (:func:`~expanse_fast.fuse_activations`): same results, less work and
        memory in backward.  Also let each widened Conv2d apply the frozen channels of the
        BatchNorm after it (:func:`~expanse_fast.fold_batchnorms`).
    example_inputs: a tensor, or a tuple of the model's positional arguments, to run the
        traced graph on (with fake tensors: nothing is computed and the model is unchanged)
        so that expand() knows every value's shape.  Without them it takes each Linear's
        output as (batch, features); with them it also widens models whose Linear layers
        act on (batch, tokens, features), pool or index over tokens, or move the channels
        of a conv map last (transpose, permute, reshape).
    multiple_of: round every hidden layer's new units up to a multiple of this (the head's
        new classes are what they are).  On a GPU, 8 keeps 16-bit rows 16-byte aligned for
        the tensor cores, 64 fills whole tiles: the H200 ran a 4096+410 bf16 layer at a
        third of cuBLAS's rate, every contender alike.
    """
    from .backend_choice import BACKENDS
    if not isinstance(model, nn.Module):
        raise TypeError(f"expand() widens an nn.Module, got {type(model).__name__}")
    lone = {nn.Linear: "ExpandedLinear.from_linear(layer, new_in, new_out)",
            nn.Conv2d: "ExpandedConv2d.from_conv(layer, new_in, new_out)",
            nn.modules.batchnorm._BatchNorm: "ExpandedBatchNorm2d.from_bn(layer, new)"}
    for kind, way in lone.items():
        if isinstance(model, kind):
            why = not_widenable(model)
            raise TypeError(f"expand() cannot widen this model: {why}" if why else
                            f"expand() widens the layers inside a model; for a lone "
                            f"{type(model).__name__} use xf.{way}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(fuse, bool):
        raise TypeError(f"fuse must be True or False, got {type(fuse).__name__} {fuse!r}")
    if mode not in ("isolated", "coupled"):
        raise ValueError(f"mode must be 'isolated' or 'coupled', got {mode!r}")
    new_classes = _units(new_classes, "new_classes")
    multiple_of = _units(multiple_of, "multiple_of", least=1)
    examples = _example_tuple(example_inputs)
    plan = _Plan(model, width, new_classes, head, mode, examples, check_names=False,
                 multiple_of=multiple_of)
    _merge_other_mode(plan, model, width, new_classes, head, mode, examples)
    plan.check_width_names()
    big = copy.deepcopy(model)
    layers = dict(big.named_modules())
    swaps = []
    for path, grow in plan.grow.items():
        layer = _widened_layer(layers[path], grow, mode)
        if isinstance(layer, (ExpandedLinear, ExpandedConv2d)):
            layer.backend = None if backend == "auto" else backend
        swaps.append((path, layer))
    big = _swap_all(big, swaps)  # (one walk over the model for all of them)
    set_old_input_grads(big)
    _freeze_all_but_newest(big)
    watch_input_grad(big)
    if fuse:
        fuse_activations(big)
        fold_batchnorms(big)
    return big


def set_old_input_grads(big: nn.Module) -> None:
    """Let every expanded layer of ``big`` skip its old inputs' gradient exactly when no
    layer of ``big`` is coupled.  Isolated throughout, the old features are a frozen
    function of the data, so nobody reads that gradient.  One coupled layer anywhere (a
    coupled model re-expanded, a depthwise conv, which is always isolated, inside a coupled
    model) makes old features depend on trainable blocks, and the layers after it must pass
    their gradient on."""
    layers = expanded_layers(big)
    isolated = all(getattr(m, "mode", "isolated") == "isolated" for m in layers.values())
    for m in layers.values():
        m.skip_old_input_grad = isolated


def _merge_other_mode(plan: _Plan, model: nn.Module, width, new_classes, head, mode,
                      examples) -> None:
    """A forward with branches on ``self.training`` (an auxiliary head in training, say)
    calls other layers in the other mode: trace that mode too, and widen what either calls.
    The model's modes are put back as they were."""
    other = "eval" if model.training else "training"
    with in_other_mode(model):
        graph = _trace(model)
        if [(n.op, n.target) for n in graph.nodes] == [(n.op, n.target)
                                                       for n in plan.graph.nodes]:
            return  # one graph for both modes
        try:
            other_plan = _Plan(model, width, new_classes, head, mode, examples, graph=graph,
                               check_names=False, multiple_of=plan.multiple_of)
        except ExpansionError as exc:
            raise ExpansionError(f"in {other} mode (the forward takes other paths there): "
                                 f"{exc}") from None
    plan.merge(other_plan, other)


def watch_input_grad(big: nn.Module) -> None:
    """Let ``big``'s layers form the old features' gradient in the calls where ``big``'s
    input requires grad (see ``expanse_fast.nn.input_grad``)."""
    watch(big, expanded_layers(big))


_TRAINABLE_NAMES = ("weight_new", "bias_new", "weight_couple")


def _freeze_all_but_newest(model: nn.Module):
    for name, p in model.named_parameters():
        p.requires_grad_(name.rpartition(".")[2] in _TRAINABLE_NAMES)


def plain_layer(m: nn.Module, task: Optional[int]) -> Optional[nn.Module]:
    """The plain module that stands for ``m`` in task ``task``'s model (None: all groups):
    an nn.Linear, nn.Conv2d or BatchNorm for an expanded layer, the plain activation for a
    fused stand-in (its layer, now plain, no longer applies it); None for other modules."""
    if isinstance(m, ExpandedLinear):
        return m.to_linear(task)
    if isinstance(m, ExpandedConv2d):
        return m.to_conv(task)
    if isinstance(m, _ExpandedBatchNorm):
        return m.to_bn(task)
    if isinstance(m, FUSED_TYPES):
        return m.unfused()
    return None


def _plain_copy(big: nn.Module, task: Optional[int]) -> nn.Module:
    model = copy.deepcopy(big)
    unwatch(model)
    swaps = []
    for path, m in model.named_modules():
        plain = plain_layer(m, task)
        if plain is not None:
            swaps.append((path, plain))
    model = _swap_all(model, swaps)
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
    the same outputs as ``big`` in eval mode while every new unit is finite: a dense layer
    multiplies its zero blocks, and 0 * NaN (or an infinity) is NaN in the old outputs,
    where ``big`` and ``source_model`` never read the new units."""
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

