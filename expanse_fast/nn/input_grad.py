"""When a widened model must form the gradient of its old features after all.

Inside a model widened by ``expand()`` (isolated layout) the old features are a frozen
function of the model's input, so training never needs their gradient and the layers skip
it (``skip_old_input_grad``).  That holds only while the input itself needs no gradient.
Saliency maps, adversarial examples or a trainable module in front of the widened model
make the input require grad, and then the input's gradient runs through the old path: with
the skip it would silently miss that part.  So the model watches its input: forward
pre-hooks on the widened model and on every module that holds widened layers note, at the
outermost such call, whether a tensor it is given requires grad, and the layers read that
note before they skip.  Forward hooks count the calls' ends, so a layer called on its own
(no note for this call) decides from its own input.  A checkpoint's recomputation, in
backward, must decide as the call it recomputes did (a non-reentrant checkpoint refuses
saved tensors of other shapes; a reentrant one backpropagates through the recomputation),
even if the model was called again since: so every watched module and layer called
inside a watched call remembers the note under its input's storage, and a call in
backward (the recomputation of a checkpointed module, or of a layer) takes the note
remembered for its input.  A call without grad mode (a reentrant checkpoint's first pass)
notes nothing a recomputation could keep: that recomputation decides from its input again.
A graph recorded by ``torch.jit.trace`` or ``torch.export`` keeps its choices for every
later input, so while recording no layer skips.
"""
from __future__ import annotations

import weakref
from typing import Mapping

import torch
from torch import nn
from torch.utils._pytree import tree_leaves


_MAX_NOTES = 4096  # remembered notes: the inputs of the calls a backward may recompute


try:
    from torch._subclasses.fake_tensor import is_fake as _is_fake
except ImportError:  # (a torch without it: the fake tensor's storage read warns, no more)
    def _is_fake(t) -> bool:
        return False


def _storage_key(t: torch.Tensor):
    """What a tensor and its detached copy (a reentrant checkpoint's recomputation input)
    share: the storage and the offset in it; None where there is no plain storage."""
    # every fake tensor's storage reads 0, with a deprecation warning; a plain tensor or
    # parameter is none (is_fake would cost about a microsecond a call to say so)
    if type(t) is not torch.Tensor and type(t) is not nn.Parameter and _is_fake(t):
        return None
    try:
        return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)
    except (RuntimeError, NotImplementedError):  # fake, functional or sparse tensors
        return None


class InputGradWatch:
    """The forward pre-hook of one widened model and of its modules that hold widened
    layers, shared by those layers: ``needed`` says whether the outermost call's input
    requires grad, with grad mode on; ``depth`` counts the watched calls in progress;
    ``notes`` holds the note each inner call's input ran under (see the module's
    docstring)."""

    def __init__(self):
        self.needed = False
        self.with_grad = True  # the outermost call's grad mode
        self.depth = 0
        self.notes = {}

    def remember(self, t) -> None:
        if torch.compiler.is_compiling():
            return  # (a compiled graph recomputes its checkpoints in its own backward)
        key = _storage_key(t) if isinstance(t, torch.Tensor) else None
        if key is not None:
            if len(self.notes) >= _MAX_NOTES:
                self.notes.clear()
            # a call without grad mode (a reentrant checkpoint's first pass) decided nothing
            # its recomputation could keep: None, decided again from the inputs then.  The
            # tensor is held weakly: a note outlives it only as long as the tensor does (a
            # later tensor at the freed address is another input, the note not its own).
            self.notes[key] = (weakref.ref(t), self.needed if self.with_grad else None)

    def recall(self, t, default):
        """The note a recomputed call on ``t`` ran under: True, False, or None where it ran
        without grad mode; ``default`` where none is remembered (a checkpoint holds the
        inputs it recomputes from: a note whose tensor is gone is no note)."""
        key = _storage_key(t) if isinstance(t, torch.Tensor) else None
        note = self.notes.get(key)
        if note is None or note[0]() is None:
            return default
        return note[1]

    def __getstate__(self):
        # notes are of the tensors of calls in flight: none is worth keeping in a copy
        # (and weak references do not pickle)
        state = dict(self.__dict__)
        state["notes"] = {}
        return state

    def __call__(self, module: nn.Module, args, kwargs):
        # (a model called on tensors alone, the common case, needs no pytree walk: about
        # 2 us of every call)
        plain = not kwargs and all(isinstance(a, torch.Tensor) for a in args)
        leaves = args if plain else tree_leaves((args, kwargs))
        first = next((t for t in leaves if isinstance(t, torch.Tensor)), None)
        if self.depth:
            self.remember(first)
        else:
            # the outermost watched call: the model, or a part called apart; in backward, a
            # checkpointed module recomputed, which takes its own call's note (the model
            # itself, whose input no call remembers, decides from its input again: the same
            # input as the call it recomputes, which a reentrant checkpoint ran without
            # grad mode)
            note = self.recall(first, None) if _in_backward() else None
            self.with_grad = torch.is_grad_enabled()
            self.needed = note if note is not None else self.with_grad and (
                any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves)
                or self._pre_hooks_after(module) or self._unfrozen(module))
        self.depth += 1

    @staticmethod
    def _unfrozen(module: nn.Module) -> bool:
        """Whether a parameter of ``module`` outside its widened layers requires grad: a
        module its user unfroze or put in after expand() (an embedding in front, say) gets
        its gradient through the old features.  Looked up at each call with grad mode, as
        modules may come and go (a walk over the modules, about 0.3 us each: named_modules
        would take 2 us)."""
        stack = [module]
        while stack:
            part = stack.pop()
            if part is None:
                continue
            if hasattr(type(part), "input_grad_watch"):
                continue  # a widened layer (its parametrizations, if any, are its own)
            for p in part._parameters.values():
                if p is not None and p.requires_grad:
                    return True
            stack.extend(part._modules.values())
        return False

    def _pre_hooks_after(self, module: nn.Module) -> bool:
        """Whether a forward pre-hook runs after this one on ``module``: one a user put there
        after expand() may hand forward another input (a trainable perturbation, say) than
        the one seen here, so the old features' gradient is formed, to be safe."""
        hooks = list(module._forward_pre_hooks.values())
        return any(h is self for h in hooks) and hooks[-1] is not self


class _CallEnd:
    """The watched modules' forward hook (``always_call``: it runs when forward raises)."""

    def __init__(self, watch: InputGradWatch):
        self.watch = watch

    def __call__(self, module: nn.Module, args, output):
        self.watch.depth = max(0, self.watch.depth - 1)


_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)
# (torch 2.6 and later; before, torch.export recorded as torch.jit.trace is not seen)
_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _in_backward() -> bool:
    # (a compiled graph recomputes a checkpoint inside its own backward: never Python here)
    return not torch.compiler.is_compiling() and _graph_task_id() != -1


def skips_old_input_grad(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``layer`` skips its old input features' gradient in this call on ``x``: it
    was told to (``skip_old_input_grad``) and the watched call it runs in has an input that
    needs no gradient (called on its own: ``x`` itself needs none)."""
    if not layer.skip_old_input_grad:
        return False
    if torch.jit.is_tracing() or _exporting():
        return False  # the graph keeps this choice for inputs that need a gradient too
    watch = getattr(layer, "input_grad_watch", None)
    if watch is None:
        return True
    if watch.depth:
        watch.remember(x)  # for a checkpoint that recomputes this layer on its own
        return not watch.needed
    note = watch.recall(x, None) if _in_backward() else None
    if note is not None:  # this layer recomputed on its own: its own call's note
        return not note
    return not (torch.is_grad_enabled() and x.requires_grad)


def _hooks_of(module: nn.Module):
    return ([k for k, h in module._forward_pre_hooks.items() if isinstance(h, InputGradWatch)],
            [k for k, h in module._forward_hooks.items() if isinstance(h, _CallEnd)])


def unwatch(model: nn.Module) -> None:
    """Remove the watch from ``model`` and its modules (a plain copy needs none)."""
    for module in model.modules():
        pre, post = _hooks_of(module)
        for key in pre:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
        for key in post:
            del module._forward_hooks[key]
            module._forward_hooks_always_called.pop(key, None)


def watch(model: nn.Module, layers: Mapping[str, nn.Module]) -> InputGradWatch:
    """Give ``model`` one watch (replacing an earlier one, as after a second ``expand()``) on
    itself and on every module that holds one of ``layers`` (path -> layer), and hand it to
    the layers."""
    unwatch(model)
    w = InputGradWatch()
    holders = {""}
    for path in layers:
        parts = path.split(".")
        holders.update(".".join(parts[:i]) for i in range(1, len(parts)))
    for path in sorted(holders):
        module = model.get_submodule(path)
        module.register_forward_pre_hook(w, with_kwargs=True)
        module.register_forward_hook(_CallEnd(w), always_call=True)
    for layer in layers.values():
        layer.input_grad_watch = w
    return w
