"""``expanse-fast bench``: expanse_fast side by side with what a user would otherwise write.

Every comparison (a *group*) runs a *subject*, an expanse_fast layer or expanded model (once
per backend usable on the device), and its *peers* (DESIGN.md section 6), on the same weights
and inputs:

- ``masked dense``: the full-width plain layer (or model) holding the staircase weights,
  its frozen entries kept by a gradient-mask hook (the forum workaround);
- ``cat modules``: Progressive-Nets style, one plain module per output group (old ones
  frozen, reading the old inputs; the new one reading all inputs), outputs joined with
  ``torch.cat``;
- ``fine-tune original``: the un-widened layer (or model), everything trainable;
- ``LoRA (PEFT)``: the un-widened layer with a PEFT LoRA adapter whose trainable parameter
  count matches the subject's (skipped, with the reason, when PEFT is not installed).

Layer subjects sit as a hidden layer inside an expanded model: their input needs a gradient
for its new features only (``skip_old_input_grad``); the peers compute what they compute in
that place (the full input gradient, or the new module's, for ``cat modules``).

Reported per peer: its median time over the subject's (the speed-up), beside the useful-work
limit: the multiply-adds the peer runs (counted by ``torch.utils.flop_counter`` on one call)
over the subject's useful multiply-adds (each expanded layer's ``Layout`` counts, DESIGN.md
section 2).  Model steps also report peak memory, measured (see :func:`peak_step_bytes`).

Imported by ``benchmarks/`` (pytest-benchmark) and by the command line; it never imports
pytest-benchmark itself.
"""
from __future__ import annotations

import copy
import gc
import importlib
import json
import math
import os
import platform
import statistics
import sys
import textwrap
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .backend_choice import availability
from .files import ensure_writable_dir
from .expand import expand, merge, source_model
from .nn import ExpandedConv2d, ExpandedLinear
from .nn.input_grad import skips_old_input_grad

PASSES = ("fwd", "bwd", "fwd+bwd")
WIDENINGS = (0.10, 0.25, 0.50, 1.00)  # new units as a fraction of the pretrained width
MASKED, CAT, FINETUNE, LORA = ("masked dense", "cat modules", "fine-tune original",
                               "LoRA (PEFT)")


# =========================================================================================
# Peers (one implementation each; benchmarks/ imports them from here)
# =========================================================================================
def _plain(expanded: nn.Module) -> nn.Module:
    """Plain torch copy holding the full staircase weights (a layer or a whole model)."""
    if isinstance(expanded, ExpandedLinear):
        return expanded.to_linear()
    if isinstance(expanded, ExpandedConv2d):
        return expanded.to_conv()
    return merge(expanded)


def masked_dense(expanded: nn.Module) -> nn.Module:
    """The forum workaround: a full-width plain copy whose gradients are multiplied by a mask
    that keeps only the newest group's rows (so frozen and zero weight blocks never move,
    with an optimizer without weight decay).  Everything else is trained as usual, so
    autograd computes the full dW and dx, and a BatchNorm normalises every channel by the
    batch in training mode (its old channels' statistics move: a plain BatchNorm cannot
    hold part of its channels in eval mode, as the expanded one does)."""
    dense = _plain(expanded)
    params = dict(dense.named_parameters())
    masked = set()
    for name, p in expanded.named_parameters():
        path, _, leaf = name.rpartition(".")
        if not p.requires_grad or leaf not in ("weight_new", "bias_new"):
            continue
        target = params[(path + "." if path else "") + leaf[: -len("_new")]]
        rows = target.new_zeros((target.shape[0],) + (1,) * (target.dim() - 1))
        rows[target.shape[0] - p.shape[0]:] = 1  # the newest group: the last rows
        target.register_hook(lambda g, m=rows: g * m)
        masked.add(id(target))
    for p in dense.parameters():
        p.requires_grad_(id(p) in masked)
    return dense


class CatModules(nn.Module):
    """Progressive-Nets style layer: one plain module per output group g, reading input
    groups 0..g, outputs joined with ``torch.cat``; only the newest module is trainable.

    ``detach_old``: the frozen modules' inputs come from frozen columns and need no gradient
    (as inside an expanded model), so they are detached."""

    def __init__(self, expanded: nn.Module, detach_old: bool = True):
        super().__init__()
        if not isinstance(expanded, (ExpandedLinear, ExpandedConv2d)):
            raise TypeError(f"CatModules wraps an ExpandedLinear or ExpandedConv2d, got "
                            f"{type(expanded).__name__}")
        if expanded.mode != "isolated" or getattr(expanded, "depthwise", False):
            raise ValueError("CatModules models the isolated, non-depthwise layout")
        lay = expanded.layout
        w, b = expanded.dense_weight(), expanded.dense_bias()
        o_off, k_ends = lay.out_offsets(), lay.in_offsets()[1:]
        self.k_ends = list(k_ends)
        self.detach_old = detach_old
        self.parts = nn.ModuleList()
        for g in range(lay.num_groups):
            rows, k = slice(o_off[g], o_off[g + 1]), k_ends[g]
            part = self._plain_like(expanded, k, rows.stop - rows.start)
            with torch.no_grad():
                part.weight.copy_(w[rows, :k])
                if b is not None:
                    part.bias.copy_(b[rows])
            part.requires_grad_(g == lay.num_groups - 1)
            self.parts.append(part)

    @staticmethod
    def _plain_like(expanded: nn.Module, k: int, n: int) -> nn.Module:
        kw = dict(bias=expanded.bias_new is not None, device=expanded.weight_new.device,
                  dtype=expanded.weight_new.dtype)
        if isinstance(expanded, ExpandedLinear):
            return nn.Linear(k, n, **kw)
        return nn.Conv2d(k, n, expanded.kernel_size, expanded.stride, expanded.padding,
                         expanded.dilation, **kw)

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.parts) - 1
        outs = []
        for g, (part, k) in enumerate(zip(self.parts, self.k_ends)):
            xi = x if k == x.shape[1] else x[:, :k]
            outs.append(part(xi.detach() if self.detach_old and g < last else xi))
        return torch.cat(outs, dim=1)


def finetune_original(expanded: nn.Module) -> nn.Module:
    """The pretrained, un-widened layer or model (task 0), everything trainable."""
    if isinstance(expanded, ExpandedLinear):
        plain = expanded.to_linear(0)
    elif isinstance(expanded, ExpandedConv2d):
        plain = expanded.to_conv(0)
    else:
        plain = source_model(expanded, 0)
    return plain.requires_grad_(True)


def peft_missing() -> Optional[str]:
    """None if PEFT can be imported, else why not."""
    try:
        importlib.import_module("peft")
    except Exception as exc:  # ImportError, or a broken install
        return f"PEFT is not importable ({type(exc).__name__}: {exc}); pip install peft"
    return None


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


def lora_rank(expanded: nn.Module) -> int:
    """LoRA rank whose trainable parameter count is closest to the expanded layer's."""
    trainable = sum(p.numel() for p in expanded.parameters() if p.requires_grad)
    old_in, old_out = expanded.layout.in_groups[0], expanded.layout.out_groups[0]
    area = math.prod(expanded.kernel_size) if isinstance(expanded, ExpandedConv2d) else 1
    per_rank = old_in * area + old_out  # A: r x in (x kh x kw), B: out x r
    return max(1, round(trainable / per_rank))


def lora_peer(expanded: nn.Module) -> nn.Module:
    """The original layer with a PEFT LoRA adapter of matched trainable-parameter count.

    lora_B starts at zero (PEFT's default), so outputs equal the original layer's."""
    from peft import LoraConfig, inject_adapter_in_model

    r = lora_rank(expanded)
    held = _Holder(finetune_original(expanded))
    cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=["layer"],
                     bias="none")
    held = inject_adapter_in_model(cfg, held)
    for name, p in held.named_parameters():
        p.requires_grad_("lora_" in name)
    return held


# =========================================================================================
# A small ResNet-style CNN (fx-traceable, so expand() widens it)
# =========================================================================================
class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetStyle(nn.Module):
    """stem 3x3 -> block(c) -> block(2c, stride 2) -> global average pool -> Linear."""

    def __init__(self, channels: int = 32, classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.block1 = _Block(channels, channels, 1)
        self.block2 = _Block(channels, 2 * channels, 2)
        self.fc = nn.Linear(2 * channels, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def mlp(widths: Sequence[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


# =========================================================================================
# Work counts
# =========================================================================================
def counted_macs(fn: Callable[[], object]) -> int:
    """Multiply-adds of the matmuls and convolutions ``fn`` runs (torch's FLOP counter)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


def useful_macs(module: nn.Module, forward: Callable[[], object], passes: str) -> int:
    """The subject's useful multiply-adds (DESIGN.md section 2) for ``passes``, read off the
    expanded layers that one call of ``forward`` runs (their layouts, how many rows or output
    pixels they see, and whether their input needs a gradient)."""
    seen = []

    def hook(layer, inputs, output):
        lay = layer.layout
        if isinstance(layer, ExpandedConv2d):
            positions = output.shape[0] * output.shape[2] * output.shape[3]
            area = math.prod(layer.kernel_size)
        else:
            positions, area = output.numel() // max(output.shape[-1], 1), 1
        if getattr(layer, "depthwise", False):
            raise ValueError("useful_macs counts dense (groups=1) layers only")
        need_dx = inputs[0].requires_grad
        skip = skips_old_input_grad(layer, inputs[0])
        fwd, bwd = lay.forward_macs(), lay.backward_macs(need_dx, not skip)
        seen.append(positions * area * ((fwd if passes in ("fwd", "fwd+bwd", "step") else 0)
                                        + (bwd if passes in ("bwd", "fwd+bwd", "step") else 0)))

    layers = [m for m in module.modules() if isinstance(m, (ExpandedLinear, ExpandedConv2d))]
    handles = [m.register_forward_hook(hook) for m in layers]
    was = module.training
    module.eval()  # no BatchNorm statistics move; gradient mode stays on (it decides dx)
    try:
        forward()
    finally:
        module.train(was)
        for h in handles:
            h.remove()
    return sum(seen)


# =========================================================================================
# Cases: a group of contenders timed side by side
# =========================================================================================
@dataclass
class Contender:
    name: str
    role: str                               # "subject" or "peer"
    call: Callable[[], object]              # the timed call
    setup: Optional[Callable[[], None]] = None   # untimed, before every call
    output: Optional[Callable[[], Tensor]] = None  # forward output (equality checks)
    shared: Optional[int] = None            # leading output columns shared with the subject
    module: Optional[nn.Module] = None
    x: Optional[Tensor] = None              # the input the call reads
    grad_params: int = 0                    # parameters that get a gradient (and optimizer state)
    count: Optional[Callable[[], int]] = None  # multiply-adds of one call (see count_macs)
    macs: int = 0                           # subject: useful; peer: counted
    note: str = ""
    detail: str = ""                        # shown beside the name (LoRA's rank)
    times: List[float] = field(default_factory=list)


@dataclass
class Case:
    group: str
    kind: str                               # "linear", "conv2d", "mlp", "cnn"
    passes: str                             # "fwd", "bwd", "fwd+bwd", "step"
    contenders: List[Contender]
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    # model cases: name -> builder of a fresh step function (memory measurement)
    builders: Dict[str, Callable[[], Callable[[], object]]] = field(default_factory=dict)

    @property
    def subjects(self) -> List[Contender]:
        return [c for c in self.contenders if c.role == "subject"]

    def get(self, name: str) -> Contender:
        return next(c for c in self.contenders if c.name == name)


@dataclass(frozen=True)
class LayerSpec:
    op: str                      # "linear" or "conv2d"
    old: int                     # pretrained width (features or channels)
    new: Tuple[int, ...]         # width added by each expansion: (256,), or (128, 128)
    rows: int                    # linear: rows; conv2d: batch
    passes: str                  # "fwd", "bwd" or "fwd+bwd"
    hw: int = 0                  # conv2d: height and width of the input map
    kernel: int = 3

    @property
    def group(self) -> str:
        widths = "+".join(str(w) for w in (self.old,) + self.new)
        grown = (f"{len(self.new) + 1} groups" if len(self.new) > 1
                 else f"{100 * self.new[0] / self.old:.0f}%")
        if self.op == "linear":
            return f"linear {widths} ({grown}), {self.rows} rows, {self.passes}"
        return (f"conv2d {self.kernel}x{self.kernel} {widths} ch ({grown}), "
                f"{self.rows}x{self.hw}x{self.hw}, {self.passes}")


@dataclass(frozen=True)
class ModelSpec:
    kind: str                    # "mlp" or "cnn"
    widths: Tuple[int, ...]      # mlp: every width, input to classes; cnn: (channels, classes)
    rows: int                    # batch
    width: float = 0.25          # new units per layer, as a fraction
    new_classes: int = 10
    hw: int = 0                  # cnn: input height and width (3 channels)

    @property
    def group(self) -> str:
        pct = f"{100 * self.width:.0f}%"
        if self.kind == "mlp":
            return (f"MLP {'-'.join(map(str, self.widths))} +{pct}, +{self.new_classes} "
                    f"classes, {self.rows} rows, AdamW step")
        return (f"ResNet-style CNN c{self.widths[0]} +{pct}, +{self.new_classes} classes, "
                f"{self.rows}x3x{self.hw}x{self.hw}, AdamW step")


def subject_backends(device: torch.device) -> List[str]:
    """Backends timed as subjects: torch everywhere; triton and cuda where they run natively
    (on a CPU Triton only has its slow interpreter, which is no measurement)."""
    names = ["torch"]
    if device.type == "cuda":
        names += [b for b in ("triton", "cuda") if availability(b, device)[0]]
    return names


def _seeded(seed: int):
    torch.manual_seed(seed)


def _zero(tensors: Sequence[Tensor]):
    for t in tensors:
        t.grad = None


def _layer_calls(module: nn.Module, x: Tensor, dy: Tensor, passes: str):
    """(call, setup) of one forward, backward or both, as a hidden layer would run them."""
    leaves = [x] + [p for p in module.parameters() if p.requires_grad]
    if passes == "fwd":
        def call():
            with torch.no_grad():
                return module(x)
        return call, None
    if passes == "bwd":
        state = {}

        def setup():
            _zero(leaves)
            state["y"] = module(x)

        def call():
            state.pop("y").backward(dy)
        return call, setup

    def call():
        _zero(leaves)
        module(x).backward(dy)
    return call, None


def _grad_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def widened_layer(spec: LayerSpec, device="cpu", dtype=torch.float32):
    """(layer, shape): a fresh pretrained layer widened as ``spec`` says (one expansion per
    entry of ``spec.new``), as a hidden layer of an expanded model (skip_old_input_grad),
    and ``shape(c)``, the shape of a batch of ``c`` features or channels for it."""
    kw = dict(device=torch.device(device), dtype=dtype)
    if spec.op == "linear":
        base = nn.Linear(spec.old, spec.old, **kw)
        layer = ExpandedLinear.from_linear(base, spec.new[0], spec.new[0])
        shape = lambda c: (spec.rows, c)  # noqa: E731
    elif spec.op == "conv2d":
        base = nn.Conv2d(spec.old, spec.old, spec.kernel, padding=spec.kernel // 2, **kw)
        layer = ExpandedConv2d.from_conv(base, spec.new[0], spec.new[0])
        shape = lambda c: (spec.rows, c, spec.hw, spec.hw)  # noqa: E731
    else:
        raise ValueError(f"op must be 'linear' or 'conv2d', got {spec.op!r}")
    for n in spec.new[1:]:
        layer.expand(n, n)
    layer.skip_old_input_grad = True  # a hidden layer of an expanded model
    return layer, shape


def build_layer_case(spec: LayerSpec, device="cpu", dtype=torch.float32, seed: int = 0,
                     backends: Optional[Sequence[str]] = None,
                     peers: Sequence[str] = (MASKED, CAT, FINETUNE, LORA)) -> Case:
    """One layer widened per ``spec``: subjects (one per backend) and peers, same weights."""
    device = torch.device(device)
    _seeded(seed)
    kw = dict(device=device, dtype=dtype)
    layer, shape = widened_layer(spec, device, dtype)
    width = layer.layout.in_features
    x = torch.randn(shape(width), **kw).requires_grad_()
    dy = torch.randn(shape(layer.layout.out_features), **kw)
    x_old = x.detach()[:, : spec.old].contiguous().requires_grad_()
    dy_old = dy[:, : spec.old].contiguous()

    case = Case(spec.group, spec.op, spec.passes, [])
    for name in backends or subject_backends(device):
        sub = copy.deepcopy(layer)
        sub.backend = name
        call, setup = _layer_calls(sub, x, dy, spec.passes)
        c = Contender(f"expanse_fast [{name}]", "subject", call, setup,
                      output=lambda m=sub: m(x), module=sub, x=x, grad_params=_grad_params(sub))
        c.count = lambda m=sub: useful_macs(m, lambda: m(x), spec.passes)
        case.contenders.append(c)

    def add_peer(name: str, module: nn.Module, xin: Tensor, dyin: Tensor, shared, note="",
                 detail=""):
        call, setup = _layer_calls(module, xin, dyin, spec.passes)
        c = Contender(name, "peer", call, setup, output=lambda: module(xin), shared=shared,
                      module=module, x=xin, grad_params=_grad_params(module), note=note,
                      detail=detail)

        def count() -> int:
            if setup is not None:
                setup()  # a backward-only case counts the backward alone
            return counted_macs(call)
        c.count = count
        case.contenders.append(c)

    for peer in peers:
        if peer == MASKED:
            add_peer(MASKED, masked_dense(layer), x, dy, None, "full width, gradient-mask hook")
        elif peer == CAT:
            add_peer(CAT, CatModules(layer), x, dy, None, "Progressive-Nets style, torch.cat")
        elif peer == FINETUNE:
            add_peer(FINETUNE, finetune_original(layer), x_old, dy_old, spec.old,
                     "the un-widened layer, all trainable")
        elif peer == LORA:
            why = peft_missing()
            if why:
                case.skipped.append((LORA, why))
                continue
            r = lora_rank(layer)
            add_peer(LORA, lora_peer(layer), x_old, dy_old, spec.old,
                     f"rank {r}, matched trainable parameters", f"r={r}")
        else:
            raise ValueError(f"unknown peer {peer!r}")
    return case


def _adamw(params) -> torch.optim.Optimizer:
    # No weight decay: decoupled decay would move the masked peer's frozen weights.
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)


def _step_fn(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], object]:
    model.train()
    opt = _adamw([p for p in model.parameters() if p.requires_grad])

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    step.state = (model, opt)  # what persists between steps (memory measurement)
    return step


def build_model_case(spec: ModelSpec, device="cpu", dtype=torch.float32, seed: int = 0,
                     backends: Optional[Sequence[str]] = None) -> Case:
    """A training step (forward, backward, AdamW) of the expanded model against fine-tuning
    the original model and the full-width masked model; data input, random labels."""
    device = torch.device(device)
    _seeded(seed)
    kw = dict(device=device, dtype=dtype)
    if spec.kind == "mlp":
        base = mlp(spec.widths).to(**kw)
        x = torch.randn(spec.rows, spec.widths[0], **kw)
        classes = spec.widths[-1]
    elif spec.kind == "cnn":
        channels, classes = spec.widths
        base = ResNetStyle(channels, classes).to(**kw)
        with torch.no_grad():  # non-trivial BatchNorm statistics, as after pretraining
            base.train()
            for _ in range(2):
                base(torch.randn(spec.rows, 3, spec.hw, spec.hw, **kw))
        x = torch.randn(spec.rows, 3, spec.hw, spec.hw, **kw)
    else:
        raise ValueError(f"kind must be 'mlp' or 'cnn', got {spec.kind!r}")
    base.eval()
    y_new = torch.randint(classes, classes + spec.new_classes, (spec.rows,), device=device)
    y_old = torch.randint(0, classes, (spec.rows,), device=device)

    def widened(backend: str) -> nn.Module:
        # The same new units for every backend (each call draws them afresh), and the
        # caller's random stream left as it was.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + 1)
            return expand(base, width=spec.width, new_classes=spec.new_classes,
                          backend=backend)

    case = Case(spec.group, spec.kind, "step", [])
    bigs = {}
    for name in backends or subject_backends(device):
        big = bigs[name] = widened(name)
        label = f"expanse_fast [{name}]"
        c = Contender(label, "subject", _step_fn(big, x, y_new), output=lambda m=big: m(x),
                      module=big, x=x, grad_params=_grad_params(big))
        c.count = lambda m=big: useful_macs(m, lambda: m(x), "step")
        case.contenders.append(c)
        case.builders[label] = lambda n=name: _step_fn(widened(n), x, y_new)
    big = next(iter(bigs.values()))
    for name, make, y, shared, note in (
            (MASKED, masked_dense, y_new, None, "full width, gradient masks"),
            (FINETUNE, finetune_original, y_old, classes, "the original model, all trainable")):
        peer = make(big)
        step = _step_fn(peer, x, y)
        c = Contender(name, "peer", step, output=lambda m=peer: m(x), shared=shared,
                      module=peer, x=x, grad_params=_grad_params(peer), note=note)
        c.count = lambda s=step: counted_macs(s)  # runs one step: after any output check
        case.contenders.append(c)
        case.builders[name] = lambda mk=make, yy=y: _step_fn(mk(widened("torch")), x, yy)
    return case


def count_macs(case: Case):
    """Fill every contender's ``macs``.  It runs each once (a model peer takes an optimizer
    step), so check outputs first."""
    for c in case.contenders:
        c.macs = c.count()


def max_abs_diffs(case: Case) -> Dict[str, float]:
    """Each other contender's (peers, and the subjects on the other backends) largest
    absolute difference from the first subject's output on the part they share (every
    output, or the original outputs), models in eval mode."""
    def outputs(c: Contender) -> Tensor:
        was = c.module.training
        c.module.eval()
        try:
            with torch.no_grad():
                return c.output()
        finally:
            c.module.train(was)

    ref = outputs(case.subjects[0])
    diffs = {}
    for c in case.contenders[1:]:
        out = outputs(c)
        n = out.shape[1] if c.shared is None else c.shared
        if c.shared is None and out.shape != ref.shape:
            raise AssertionError(f"{c.name}: output shape {tuple(out.shape)} differs from the "
                                 f"subject's {tuple(ref.shape)}")
        gap = (out[:, :n] - ref[:, :n]).abs()
        diffs[c.name] = gap.max().item() if gap.numel() else 0.0
    return diffs


# =========================================================================================
# Measuring
# =========================================================================================
def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(c: Contender, device: torch.device) -> float:
    if c.setup is not None:
        c.setup()
    _sync(device)
    t0 = time.perf_counter()
    c.call()
    _sync(device)
    return time.perf_counter() - t0


def time_case(case: Case, device, rounds: Tuple[int, int] = (5, 30), budget_s: float = 3.0,
              warmup: int = 1):
    """Time every contender, interleaved round by round (a load change on a shared machine
    then hits all of them alike); as many rounds as ``budget_s`` allows, within ``rounds``."""
    device = torch.device(device)
    for _ in range(warmup):
        for c in case.contenders:
            time_once(c, device)
    lo, hi = rounds
    n, spent = 0, 0.0
    while n < lo or (n < hi and spent < budget_s):
        for c in case.contenders:
            c.times.append(time_once(c, device))
            spent += c.times[-1]
        n += 1


# ---- peak memory -----------------------------------------------------------------------
def _tensors(obj):
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages that operators create under this mode and that are
    still alive, and their peak.  Exact for operator outputs (views and in-place results
    are not new memory), independent of the allocator's state; blind to temporaries that
    live and die inside one operator and to library workspaces."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: Dict[int, int] = {}

    def _freed(self, key: int):
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = getattr(func, "_schema", None)
        returns = schema.returns if schema is not None else [None]
        for ret, value in zip(returns, out if len(returns) > 1 else (out,)):
            if ret is not None and ret.alias_info is not None:  # a view, in-place, out=
                continue
            for t in _tensors(value):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._sizes:
                    self._sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._freed, key)  # runs when it dies
        self.peak = max(self.peak, self.live)
        return out


def state_bytes(objects) -> int:
    """Bytes of the parameters and buffers of modules and the state of optimizers (each
    storage once); gradients are not included."""
    sizes = {}
    for obj in objects:
        if isinstance(obj, nn.Module):
            tensors = list(obj.parameters()) + list(obj.buffers())
        else:  # an optimizer
            tensors = list(_tensors([dict(s) for s in obj.state.values()]))
        for t in tensors:
            sizes[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(sizes.values())


def peak_step_bytes(build: Callable[[], Callable[[], object]], device) -> int:
    """Peak tensor memory of one training step of a freshly built contender, after a first
    step (so the optimizer state exists): parameters, buffers, optimizer state, gradients,
    activations and temporaries; not the input batch.  ``build()`` returns the step, whose
    ``state`` lists the modules and optimizers it keeps; the step starts by dropping the
    old gradients (``zero_grad(set_to_none=True)``).

    CPU: :func:`state_bytes` plus the peak of :class:`LiveTensorBytes` over the step.
    CUDA: ``torch.cuda.max_memory_allocated`` over the allocation before building."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        step = build()
        step()  # creates the gradients and the optimizer state
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        step = build()
        step()  # creates the optimizer state
        kept = state_bytes(step.state)
        with LiveTensorBytes() as counter:
            step()
        peak = kept + counter.peak
    del step
    gc.collect()
    return peak


def model_peak_bytes(case: Case, device) -> Dict[str, int]:
    """Peak memory of one training step of every contender of a model case."""
    return {name: peak_step_bytes(build, device) for name, build in case.builders.items()}


# =========================================================================================
# Plans: which cases, at which sizes
# =========================================================================================
def _widened(old: int, frac: float) -> int:
    return max(1, round(frac * old))


def layer_specs(op: str, old: int, rows: int, passes=PASSES, widenings=WIDENINGS,
                three_groups: bool = True, hw: int = 0) -> List[LayerSpec]:
    news = [(_widened(old, f),) for f in widenings]
    if three_groups:  # two expansions of 12.5% each
        news.append((_widened(old, 0.125), _widened(old, 0.125)))
    return [LayerSpec(op, old, new, rows, p, hw) for new in news for p in passes]


MLP_WIDTHS = (1024, 1024, 1024, 1024, 10)


def plan(size: str = "default") -> List[object]:
    """Specs to run.  "default": about a minute on 2 CPU cores; "full": every widening and
    pass at the default sizes; "tiny": seconds (smoke tests)."""
    if size == "tiny":
        return (layer_specs("linear", 16, 7, widenings=(0.25,))
                + layer_specs("linear", 16, 5, passes=("fwd+bwd",), widenings=(1.0,),
                              three_groups=False)
                + layer_specs("conv2d", 8, 2, passes=("fwd+bwd",), widenings=(0.25,), hw=5)
                + [ModelSpec("mlp", (24, 16, 16, 16, 4), 9, 0.25, 3),
                   ModelSpec("cnn", (4, 4), 3, 0.25, 2, hw=8)])
    if size == "default":
        return (layer_specs("linear", 1024, 4096, passes=("fwd+bwd",), widenings=(0.25,),
                            three_groups=False)
                + layer_specs("linear", 1024, 512, passes=("fwd", "bwd"), widenings=(0.25,),
                              three_groups=False)
                + layer_specs("linear", 1024, 512, passes=("fwd+bwd",),
                              widenings=(0.10, 0.50, 1.00))
                + layer_specs("conv2d", 128, 8, passes=("fwd+bwd",), widenings=(0.25,),
                              three_groups=False, hw=16)
                + [ModelSpec("mlp", MLP_WIDTHS, 4096), ModelSpec("cnn", (32, 10), 32, hw=32)])
    if size == "full":
        return (layer_specs("linear", 1024, 4096) + layer_specs("conv2d", 128, 8, hw=16)
                + [ModelSpec("mlp", MLP_WIDTHS, 4096), ModelSpec("cnn", (32, 10), 32, hw=32)])
    raise ValueError(f"size must be 'tiny', 'default' or 'full', got {size!r}")


def build_case(spec, device="cpu", dtype=torch.float32, seed: int = 0) -> Case:
    if isinstance(spec, LayerSpec):
        return build_layer_case(spec, device, dtype, seed)
    return build_model_case(spec, device, dtype, seed)


# =========================================================================================
# Results
# =========================================================================================
def _median(c: Contender) -> float:
    return statistics.median(c.times)


def case_result(case: Case, diffs: Optional[Dict[str, float]] = None) -> dict:
    """A JSON-ready record of one timed case."""
    subjects = case.subjects
    fastest = min(subjects, key=_median)
    rows = []
    for c in case.contenders:
        row = {"name": c.name, "role": c.role, "median_s": _median(c), "rounds": len(c.times),
               "macs": c.macs, "grad_params": c.grad_params, "peak_bytes": None,
               "note": c.note, "detail": c.detail}
        if diffs is not None:  # every contender but the first subject, the reference
            row["max_abs_diff"] = None if c is subjects[0] else diffs.get(c.name)
        if c.role == "peer":
            row["vs"] = fastest.name
            row["speedup"] = _median(c) / _median(fastest)
            row["limit"] = c.macs / fastest.macs if fastest.macs else None
            row["pct_of_limit"] = (100 * row["speedup"] / row["limit"]) if row["limit"] else None
            row["speedup_vs"] = {s.name: _median(c) / _median(s) for s in subjects}
        rows.append(row)
    return {"group": case.group, "kind": case.kind, "passes": case.passes,
            "contenders": rows, "skipped": [{"name": n, "reason": r} for n, r in case.skipped]}


def environment(device, dtype) -> dict:
    device = torch.device(device)
    env = {"device": str(device), "dtype": str(dtype).replace("torch.", ""),
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "python": platform.python_version(), "machine": platform.machine(),
           "processor": platform.processor() or platform.machine(),
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "memory": ("torch.cuda.max_memory_allocated over the allocation before building"
                      if device.type == "cuda" else
                      "parameters, buffers and optimizer state plus the most bytes alive at "
                      "once among the tensors the step creates (gradients, activations, "
                      "temporaries); not the input batch nor library workspaces")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


DIFF_WARNING = {"float32": 1e-3, "float64": 1e-9}  # |peer - subject| worth a warning


def format_table(result: dict) -> str:
    env = result["env"]
    legend = [f"peers: {MASKED} = the full-width layer/model with a gradient-mask hook; {CAT} "
              "= frozen old and trainable new modules joined by torch.cat; "
              f"{FINETUNE} = the un-widened layer/model, all trainable; {LORA} = LoRA on "
              "the original layer, rank r matching expanse_fast's trainable parameters.",
              "speed-up: the peer's median time over expanse_fast's.  limit: the peer's "
              "multiply-adds over expanse_fast's useful ones (DESIGN.md section 2).",
              "peak MB: one training step, " + env["memory"] + "."]
    lines = [f"expanse-fast bench: {env['device']}"
             + (f" ({env['gpu']})" if env.get("gpu") else "")
             + f", {env['dtype']}, {env['threads']} threads, torch {env['torch']}"]
    lines += [textwrap.fill(text, 96, subsequent_indent="  ") for text in legend]
    warn_at = DIFF_WARNING.get(env["dtype"], 5e-2)
    head = (f"  {'contender':24} {'median ms':>10} {'speed-up':>9} {'limit':>7} "
            f"{'% of limit':>10} {'grad params':>12} {'peak MB':>8}")
    for case in result["cases"]:
        lines += ["", case["group"], head]
        for r in case["contenders"]:
            peer = r["role"] == "peer"
            speed = f"{r['speedup']:.2f}x" if peer else "-"
            lim = f"{r['limit']:.2f}x" if peer and r["limit"] else "-"
            pct = f"{r['pct_of_limit']:.0f}%" if peer and r["pct_of_limit"] else "-"
            peak = f"{r['peak_bytes'] / 2**20:.1f}" if r["peak_bytes"] is not None else "-"
            name = f"{r['name']} {r['detail']}".strip()
            lines.append(f"  {name:24} {1e3 * r['median_s']:10.2f} {speed:>9} {lim:>7} "
                         f"{pct:>10} {r['grad_params']:12,} {peak:>8}")
        for s in case["skipped"]:
            lines.append(f"  {s['name']:24} skipped: {s['reason']}")
        reference = case["contenders"][0]["name"]
        for r in case["contenders"]:
            if (r.get("max_abs_diff") or 0) > warn_at:
                lines.append(f"  WARNING: {r['name']} differs from {reference} by "
                             f"{r['max_abs_diff']:.2e} on their shared outputs")
    return "\n".join(lines)


def run(size: str = "default", device="cpu", dtype=torch.float32, only: str = "",
        budget_s: float = 3.0, rounds: Tuple[int, int] = (5, 30), memory: bool = True,
        check: bool = True, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Build, check, time (and for model steps, measure memory of) every case of ``plan``."""
    device = torch.device(device)
    specs = [s for s in plan(size) if not only or only in s.group]
    cases = []
    start = time.perf_counter()
    say = progress or (lambda _: None)
    for spec in specs:
        say(f"{time.perf_counter() - start:5.1f}s  {spec.group}")
        case = build_case(spec, device, dtype)
        diffs = max_abs_diffs(case) if check else None
        count_macs(case)
        time_case(case, device, rounds, budget_s)
        peaks = model_peak_bytes(case, device) if memory else {}
        result = case_result(case, diffs)
        for row in result["contenders"]:
            row["peak_bytes"] = peaks.get(row["name"])
        cases.append(result)
        del case
        gc.collect()
    say(f"{time.perf_counter() - start:5.1f}s  done")
    return {"env": environment(device, dtype), "size": size, "cases": cases}


def main(args) -> int:
    """``expanse-fast bench`` (arguments parsed by cli.py)."""
    if args.max_rounds < args.min_rounds:
        raise ValueError(f"--max-rounds {args.max_rounds} is below --min-rounds "
                         f"{args.min_rounds}")
    try:
        device = torch.device(args.device)
    except RuntimeError:  # (torch's own message lists twenty device types)
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    groups = [s.group for s in plan(args.size)]
    if args.filter and not any(args.filter in g for g in groups):
        raise ValueError(f"--filter {args.filter!r} matches no group of --size {args.size} "
                         f"(it is a substring of a group's name: {'; '.join(groups)})")
    if args.save:  # proved writable now, not after the whole run
        if os.path.isdir(args.save):
            raise IsADirectoryError(f"--save {args.save!r} is a folder: give the JSON file's "
                                    f"name (e.g. {os.path.join(args.save, 'bench.json')!r})")
        folder = os.path.dirname(os.path.abspath(args.save))
        try:
            ensure_writable_dir(folder)
        except OSError as exc:
            raise OSError(f"--save {args.save!r}: cannot write to {folder!r}: "
                          f"{exc.strerror or exc}") from None
    dtype = getattr(torch, args.dtype)
    say = None if args.quiet else (lambda g: print(f"[bench] {g}", file=sys.stderr,
                                                   flush=True))
    result = run(args.size, device, dtype, only=args.filter, budget_s=args.budget,
                 rounds=(args.min_rounds, args.max_rounds), memory=not args.no_memory,
                 progress=say)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_table(result))
    if args.save:
        with open(args.save, "w") as f:
            json.dump(result, f, indent=1)
    return 0

