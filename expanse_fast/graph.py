"""Tracing a model with torch.fx (expanded layers stay leaves), the shapes of its values on
example inputs, finding module pairs in it and swapping its modules: the graph tools that
expand(), fuse_activations() and fold_batchnorms() share."""
from __future__ import annotations

import collections
import contextlib
import copy
import logging
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn

from .nn import ExpandedConv2d, ExpandedLinear
from .nn.blocks import hooked  # noqa: F401  (fold, fuse and expand ask it here)
from .nn.norm import _ExpandedBatchNorm


class ExpansionError(ValueError):
    """The model cannot be widened exactly; the message names the node or module."""


# A user's subclass of these (a custom init, say) is called as one module too, as torch's
# own are: fx would trace into it and meet its weight as a bare parameter.  Whether it can
# be widened (it must compute as the plain layer) the plan asks it then, by its path.
_LAYER_KINDS = (ExpandedLinear, ExpandedConv2d, _ExpandedBatchNorm, nn.Linear, nn.Conv2d,
                nn.modules.batchnorm._BatchNorm)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _LAYER_KINDS):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.Graph:
    """The model's graph, with every expanded layer as one call_module node.  What the
    forward stores on its modules while traced (a feature map kept for later, a call
    counter, an entry appended to a list or dict it holds) is put back as it was: it would
    hold fx proxies, which cannot be pickled.  The tensor constants the forward creates,
    which fx puts on the root module, go with the graph instead (``graph_constants``)."""
    with _attributes_kept(model) as added_to_root:
        try:
            graph = _Tracer().trace(model)
        except Exception as exc:
            raise ExpansionError(
                f"expand() and fuse_activations() need a torch.fx-traceable model; tracing "
                f"{type(model).__name__} failed: {type(exc).__name__}: {exc}") from exc
    read = {n.target for n in graph.nodes if n.op == "get_attr"}
    graph._expanse_constants = {k: v for k, v in added_to_root.items() if k in read}
    return graph


def graph_constants(graph: fx.Graph) -> Dict[str, object]:
    """The tensor constants a traced forward created (fx's ``_tensor_constant0``, ...)."""
    return getattr(graph, "_expanse_constants", {})


_CONTAINERS = (list, dict, set, collections.deque)


def _snapshots(value, seen: set, out: list) -> None:
    """(container, shallow copy) of ``value`` and of every container inside it (a dict of
    lists, say), each once; a container of many entries is taken whole, its entries
    unvisited (what a trace appends is a few proxies, not thousands)."""
    if not isinstance(value, _CONTAINERS) or id(value) in seen:
        return
    seen.add(id(value))
    out.append((value, copy.copy(value)))
    if len(value) <= 1024:
        for item in (value.values() if isinstance(value, dict) else value):
            _snapshots(item, seen, out)


def _put_back(container, before) -> None:
    if isinstance(container, list):
        container[:] = before
    elif isinstance(container, collections.deque):
        container.clear()
        container.extend(before)
    else:  # dict (OrderedDict, defaultdict: their own class kept) or set
        container.clear()
        container.update(before)


@contextlib.contextmanager
def _attributes_kept(model: nn.Module):
    """Every module's plain attributes, and the contents of the lists, dicts, sets and deques
    they hold (nested too), as they were before, when this ends; yields what was added to
    the root."""
    saved = [(m, dict(m.__dict__)) for m in model.modules()]
    contents: list = []
    seen: set = set()
    for m, attributes in saved:
        for key, value in attributes.items():
            if key not in ("_parameters", "_buffers", "_modules"):
                _snapshots(value, seen, contents)
    added_to_root: Dict[str, object] = {}
    try:
        yield added_to_root
    finally:
        for m, before in saved:
            now = m.__dict__
            for key in [k for k in now if k not in before]:
                if m is model:
                    added_to_root[key] = now[key]
                del now[key]
            for key, value in before.items():
                if now.get(key, _MISSING) is not value:
                    now[key] = value
        for container, before in contents:
            _put_back(container, before)


_MISSING = object()


def swap_modules(root: nn.Module, replacements: Sequence[Tuple[str, nn.Module]]) -> nn.Module:
    """Put each ``new`` where the submodule at its dotted path was, and under every other
    name that module is kept under (an alias: ``self.fc`` beside ``self.net[2]``), in that
    module's training mode (a layer built in training mode inside a model in eval mode
    would, as a BatchNorm, normalise by the batch).  The paths name modules as they were
    before any of these swaps; a name inside a module replaced here is gone with it.
    Returns the root: the new one where the path "" is among them."""
    named = list(root.named_modules(remove_duplicate=False))
    at = dict(named)
    paths_of: Dict[int, List[str]] = {}
    for p, m in named:
        paths_of.setdefault(id(m), []).append(p)
    for path, new in replacements:
        old = at[path] if path in at else root.get_submodule(path)
        new.train(old.training)
        if not path:
            root = new
            continue
        placed = False
        for alias in paths_of.get(id(old), [path]):
            parent_path, _, name = alias.rpartition(".")
            parent = at.get(parent_path)
            try:
                still = parent is not None and (root.get_submodule(parent_path)
                                                if parent_path else root) is parent
            except AttributeError:
                still = False
            if still:  # (not inside a module that a swap before this one replaced)
                setattr(parent, name, new)
                placed = True
        if not placed:
            raise ExpansionError(f"cannot put the widened {path!r} back into the model: every "
                                 "name it has lies inside a module replaced before it")
    return root


PairMatcher = Callable[[fx.Node, Dict[str, nn.Module], Counter], Optional[Tuple[str, str]]]


def module_pairs(model: nn.Module, match: PairMatcher) -> List[Tuple[str, str]]:
    """The (producer path, consumer path) pairs that ``match(node, modules, calls)`` finds,
    in graph order; ``calls`` counts the call sites of each module path.  A forward that
    takes other paths in training and in eval mode is traced in both: only the pairs found
    in both count (in the other mode the producer's output may have another user)."""
    modules = dict(model.named_modules())

    def pairs(graph):
        calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        return [pair for pair in (match(node, modules, calls) for node in graph.nodes)
                if pair is not None]
    found = pairs(trace(model))
    with in_other_mode(model):
        other = set(pairs(trace(model)))
    return [pair for pair in found if pair in other]


@contextlib.contextmanager
def in_other_mode(model: nn.Module):
    """``model`` in the other of training and eval mode while it lasts; then every module
    in the mode it had."""
    modes = {m: m.training for m in model.modules()}
    model.train(not model.training)
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


@contextlib.contextmanager
def _through_custom_ops():
    """Expanded layers' eager shortcut picks a backend for the tensors' device (a layer
    pinned to Triton refuses a CPU tensor); their custom ops run a fake implementation on
    fake tensors, which needs none.  (Process-wide while it lasts: another thread's calls
    take the custom ops too, slower by their dispatch, the same results.)"""
    from . import ops
    saved = ops.USE_EAGER_FUNCTIONS
    ops.USE_EAGER_FUNCTIONS = False
    try:
        yield
    finally:
        ops.USE_EAGER_FUNCTIONS = saved


def target_name(node: fx.Node) -> str:
    """What a node calls, for messages: a function's name, a module's path, a method."""
    return getattr(node.target, "__name__", str(node.target))


def _first_line(exc: Exception) -> str:
    # (errors raised under fake tensors append the graph and a debugging how-to)
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def node_shapes(model: nn.Module, graph: fx.Graph, example_inputs: Sequence
                ) -> Dict[fx.Node, Tuple[int, ...]]:
    """The shape of every tensor value of ``graph`` (traced from ``model``) when the model
    runs on ``example_inputs``.

    The graph runs on fake tensors, on a fake copy of the model: no arithmetic, no memory
    for the weights, and nothing of ``model`` changes (a BatchNorm in training mode counts
    its batches on the copy)."""
    from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode

    mode = FakeTensorMode()
    with FakeCopyMode(mode):
        fake_model = copy.deepcopy(model)
        for name, value in copy.deepcopy(graph_constants(graph)).items():
            setattr(fake_model, name, value)  # (fx's constants go with the graph)
    shapes: Dict[fx.Node, Tuple[int, ...]] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node):
            try:
                value = super().run_node(node)
            except Exception as exc:
                why = f"{type(exc).__name__}: {_first_line(exc)}"
                if "DynamicOutputShape" in why or "DataDependent" in why:
                    why += (" (the example runs on fake tensors, which hold no values: a "
                            "shape that depends on them, as a boolean mask's, is unknown)")
                raise ExpansionError(
                    f"example_inputs: running the model on them failed at node {node.name!r} "
                    f"({node.op} {target_name(node)}): "
                    f"{why}") from exc
            if isinstance(value, torch.Tensor):
                shapes[node] = tuple(value.shape)
            elif isinstance(value, (bool, int, float)):
                shapes[node] = ()  # a Python number broadcasts as a 0-d tensor does
            return value

    fakes = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]
    # (the fake-tensor mode logs each failed op's traceback as an error before raising it:
    # the ExpansionError below says what failed, where)
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        with mode, torch.no_grad(), _through_custom_ops():
            recorder = _Recorder(fx.GraphModule(fake_model, graph))
            recorder.extra_traceback = False  # (our message names the node already)
            recorder.run(*fakes)
    finally:
        fake_log.setLevel(level)
    return shapes
