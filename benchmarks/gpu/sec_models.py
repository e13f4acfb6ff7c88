"""Benchmark sections ``mlp``, ``cnn`` and ``sweep``: training steps of an expanded MLP (eager
and in CUDA graphs) and of a ResNet-style CNN, and the layers at the other widenings."""
from __future__ import annotations

import dataclasses
import math
import os
import traceback

from gpu_common import BACKEND_NAMES, CHECK_TOL, _short_exc
from gpu_measure import _host_profiles


# ---- (d) MLP training step ---------------------------------------------------------------
def sec_mlp(ctx):
    torch = ctx.torch
    rows, hidden, classes = (32, 32, 10) if ctx.quick else (4096, 1024, 10)
    backends = ctx.usable_backends("linear")
    # EXPANSE_BENCH_MLP_DTYPES (default bfloat16): float32 steps too with
    # "bfloat16,float32"; only bfloat16's are also timed in CUDA graphs.
    names = [n.strip() for n in os.environ.get("EXPANSE_BENCH_MLP_DTYPES",
                                                "bfloat16").split(",") if n.strip()]
    bad = [n for n in names if n not in CHECK_TOL]
    if bad:
        raise ValueError(f"EXPANSE_BENCH_MLP_DTYPES: {bad} not among {sorted(CHECK_TOL)}")
    dtypes = [getattr(torch, n) for n in names]
    for dt in dtypes:
        dname = str(dt).replace("torch.", "")
        if ctx.left() < 6:
            ctx.note(f"mlp {dname}: skipped, out of time")
            continue
        _mlp_steps(ctx, dt, rows, hidden, classes, backends, profile_host=dt == dtypes[0])
        if ctx.cuda:  # (its models, optimizers and inputs went when it returned)
            torch.cuda.empty_cache()


def _mlp_steps(ctx, dt, rows, hidden, classes, backends, profile_host):
    """One dtype's training steps: the expanded MLP under each backend, the masked full-width
    MLP and fine-tuning the original, eager (and in CUDA graphs for bfloat16)."""
    torch = ctx.torch
    from torch import nn
    import torch.nn.functional as F
    import expanse_fast as xf
    dev = ctx.dev
    dname = str(dt).replace("torch.", "")
    variant = f"train step {dname}"
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes)).to(dev, dt)
    big = xf.expand(base, width=0.25, new_classes=classes).to(dev, dt)
    layers = [m for m in big.modules() if isinstance(m, xf.ExpandedLinear)]
    # The first layer reads data: no input gradient there.
    useful = sum(2 * rows * (m.layout.forward_macs() + m.layout.backward_macs(
        need_input_grad=j > 0, need_old_input_grad=False)) for j, m in enumerate(layers))
    dense_flop = lambda dims: sum(  # noqa: E731
        2 * rows * o * i * (3 if j > 0 else 2) for j, (i, o) in enumerate(dims))
    ctx.res.setdefault("config", {})[dname] = dict(
        rows=rows, layers=[(m.in_groups, m.out_groups) for m in layers],
        useful_gflop=useful / 1e9)
    k = ctx.n_sets(rows * hidden * dt.itemsize)
    xs = [torch.randn(rows, hidden, device=dev, dtype=dt) for _ in range(k)]
    ys = [torch.randint(0, classes, (rows,), device=dev) for _ in range(k)]

    def step(model, opt, i):
        opt.zero_grad(set_to_none=True)
        logits = model(xs[i])
        loss = F.cross_entropy(logits[:, -classes:].float(), ys[i])
        loss.backward()
        opt.step()
        return loss

    opt = torch.optim.Adam([p for p in big.parameters() if p.requires_grad], lr=1e-4)

    def expanse(backends):
        for name, why in backends:
            impl = f"expanse/{name}"
            if why:
                ctx.add(variant=variant, impl=impl, kind="expanse", skipped=why)
                continue
            with ctx.backend(name):
                ctx.measure(variant, impl, "expanse",
                            [lambda i=i: step(big, opt, i) for i in range(k)], useful,
                            useful)

    expanse(backends[:1])  # torch, then the peers, then the compiled backends

    masked = xf.merge(big).to(dev, dt)
    for m, e in zip([m for m in masked.modules() if isinstance(m, nn.Linear)], layers):
        keep = torch.zeros(m.out_features, device=dev, dtype=dt)
        keep[e.layout.frozen_out:] = 1
        m.weight.register_hook(lambda g, keep=keep: g * keep[:, None])
        m.bias.register_hook(lambda g, keep=keep: g * keep)
    mopt = torch.optim.Adam(masked.parameters(), lr=1e-4)
    dims = [(m.in_features, m.out_features) for m in masked.modules()
            if isinstance(m, nn.Linear)]
    ctx.measure(variant, "peer/masked", "peer",
                [lambda i=i: step(masked, mopt, i) for i in range(k)], useful,
                dense_flop(dims))
    ft = base
    fopt = torch.optim.Adam(ft.parameters(), lr=1e-4)
    dims = [(m.in_features, m.out_features) for m in ft.modules() if isinstance(m, nn.Linear)]
    ctx.measure(variant, "peer/finetune", "peer",
                [lambda i=i: step(ft, fopt, i) for i in range(k)], useful, dense_flop(dims))
    expanse(backends[1:])
    if dt == torch.bfloat16:
        _measure_graphed_steps(ctx, variant, step, k, useful, backends, big,
                               [("peer/masked", masked), ("peer/finetune", ft)],
                               dense_flop)
    if profile_host:  # last: after every timed row of the section's first dtype
        with ctx.backend("torch"):
            _host_profiles(ctx, variant, [("expanse/torch", lambda: step(big, opt, 0))])
        _host_profiles(ctx, variant, [("peer/finetune", lambda: step(ft, fopt, 0))])


def _measure_graphed_steps(ctx, variant, step, k, useful, backends, big, peers, dense_flop):
    """The same training steps, each captured in a CUDA graph with a capturable Adam of its
    own: what a step costs the GPU without the host's launch overhead, which small layers
    may not hide in an eager step (compare host ms with ms in the eager rows).  Peers first,
    the compiled backends last (a sticky CUDA error ends the section)."""
    import contextlib
    from torch import nn
    torch = ctx.torch
    gvariant = f"{variant}, CUDA graph"
    if not ctx.cuda:
        ctx.note(f"{gvariant}: skipped, CUDA graphs need a GPU")
        return

    def run(impl, kind, model, flop, backend=None):
        if ctx.left() < 8:
            ctx.add(variant=gvariant, impl=impl, kind=kind, skipped="out of time")
            return
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-4, capturable=True)
        fns = [lambda i=i: step(model, opt, i) for i in range(k)]
        try:
            with ctx.backend(backend) if backend else contextlib.nullcontext():
                replays = ctx.graphed(fns)
        except Exception as exc:  # noqa: BLE001 - the error is the row
            traceback.print_exc()
            ctx.add(variant=gvariant, impl=impl, kind=kind, error=_short_exc(exc))
            return
        ctx.measure(gvariant, impl, kind, replays, useful, flop)
        last = ctx.res["rows"][-1]
        if last.get("impl") == impl and last.get("variant") == gvariant:
            last["peak_mib"] = None  # (a replay allocates nothing: the capture did)
        del replays

    for impl, model in peers:
        dims = [(m.in_features, m.out_features) for m in model.modules()
                if isinstance(m, nn.Linear)]
        run(impl, "peer", model, dense_flop(dims))
    for name, why in backends:
        if not why:
            run(f"expanse/{name}", "expanse", big, useful, backend=name)


# ---- (e) ResNet-style CNN training step ------------------------------------------------
def sec_cnn(ctx):
    """A training step (forward, backward, AdamW) of the pytest-benchmark suite's
    ResNet-style CNN (expanse_fast.bench), widened 25% with 10 new classes, against the
    masked full-width model and fine-tuning the original, in NCHW as users get it.  One
    tile per Triton kernel (SECTION_ENV): no tuning of its many layer shapes."""
    from expanse_fast import bench as B
    channels, batch, hw = (8, 4, 8) if ctx.quick else (64, 128, 56)
    spec = B.ModelSpec("cnn", (channels, 10), batch, hw=hw)
    variant = f"train step {str(ctx.dtype).replace('torch.', '')}"
    backends = ctx.usable_backends("conv2d")
    for name, why in backends:
        if why:
            ctx.add(variant=variant, impl=f"expanse/{name}", kind="expanse", skipped=why)
    case = B.build_model_case(spec, ctx.dev, ctx.dtype,
                              backends=[n for n, why in backends if not why])
    ctx.res["config"] = dict(model=spec.group, dtype=str(ctx.dtype))
    impl = {B.MASKED: "peer/masked", B.FINETUNE: "peer/finetune"}
    impl.update({f"expanse_fast [{n}]": f"expanse/{n}" for n in BACKEND_NAMES})
    # torch, the peers, then the compiled backends (a sticky CUDA error ends the section)
    order = sorted(case.contenders, key=lambda c: (c.role == "subject" and "torch" not in c.name,
                                                   "cuda" in c.name))
    useful = None
    for c in order:
        kind = "expanse" if c.role == "subject" else "peer"
        try:
            macs = c.count()  # runs a forward (subjects) or one step (peers)
        except Exception as exc:  # noqa: BLE001 - the error is the row
            traceback.print_exc()
            ctx.add(variant=variant, impl=impl[c.name], kind=kind, error=_short_exc(exc))
            continue
        if c.role == "subject":
            useful = useful or 2 * macs
        ctx.measure(variant, impl[c.name], kind, [c.call], useful or 2 * macs, 2 * macs)
    # last, after every timed row: the host's ops of one eager step, expanded and fine-tuned
    _host_profiles(ctx, variant, [(impl[c.name], c.call) for c in order
                                  if c.name in ("expanse_fast [torch]", B.FINETUNE)])


# ---- (f) every widening ---------------------------------------------------------------------
# Issue 5's layer-level comparisons at the sizes of the linear and conv sections, at the
# widenings those sections leave out (they time 25%): 10%, 50%, 100%, and three groups (two
# expansions of 12.5%; linear only), fwd+bwd.  The expanded layer under "auto" against the
# package's own peers (expanse_fast.bench: the masked layer, the cat modules, fine-tuning the
# original), as `expanse-fast bench` builds them; no backend rows, no profiles.  Beside the
# 10% linear layer (4096+410: rows of 4506 bf16 values, not 16-byte aligned, ran cuBLAS at
# a third of its rate for every contender on 2026-12-01), the same widening rounded up to a
# multiple of 8 (`expand(multiple_of=8)`: 4096+416).
SWEEP_WIDENINGS = (0.10, 0.50, 1.00)


def _aligned_case(specs):
    """The first (10%) linear case with its new units rounded up to a multiple of 8."""
    first = specs[0]
    return dataclasses.replace(first, new=(-(-first.new[0] // 8) * 8,))


def _sweep_specs(quick):
    from expanse_fast import bench as B
    if quick:
        linear = B.layer_specs("linear", 16, 7, passes=("fwd+bwd",), widenings=SWEEP_WIDENINGS)
        conv = B.layer_specs("conv2d", 8, 2, passes=("fwd+bwd",), widenings=SWEEP_WIDENINGS,
                             three_groups=False, hw=5)
    else:
        linear = B.layer_specs("linear", 4096, 16384, passes=("fwd+bwd",),
                               widenings=SWEEP_WIDENINGS)
        conv = B.layer_specs("conv2d", 256, 64, passes=("fwd+bwd",), widenings=SWEEP_WIDENINGS,
                             three_groups=False, hw=56)
    # quick: the aligned case of a 16+2 layer would be 16+8, alike the 50% one: none
    return (linear[:1] + ([] if quick else [_aligned_case(linear)]) + linear[1:] + conv)


def sec_sweep(ctx):
    specs = _sweep_specs(ctx.quick)
    ctx.res["config"] = dict(cases=[s.group for s in specs], dtype=str(ctx.dtype),
                             backend="auto", skip_old_input_grad=True)
    for n, spec in enumerate(specs):
        if ctx.left() < 10:
            ctx.note(f"out of time: {len(specs) - n} of {len(specs)} cases not run, from "
                     f"{spec.group!r} on")
            break
        _sweep_case(ctx, spec)
        if ctx.cuda:
            ctx.torch.cuda.empty_cache()  # (the next case's sizes differ)


def _counted_backward(B, module, x, dy) -> int:
    """Multiply-adds of one forward and backward of ``module`` (torch's FLOP counter; with
    .backward(), which its module tracker supports, not autograd.grad), grads then cleared."""
    count = B.counted_macs(lambda: module(x).backward(dy))
    for t in [x] + list(module.parameters()):
        t.grad = None
    return count


def _sweep_case(ctx, spec):
    """One widening: the expanded layer under "auto", then each peer, on rotated inputs."""
    torch = ctx.torch
    from expanse_fast import bench as B
    dt, dev = ctx.dtype, ctx.dev
    torch.manual_seed(0)
    layer, shape = B.widened_layer(spec, dev, dt)
    lay = layer.layout
    k = ctx.n_sets(2 * math.prod(shape(lay.in_features)) * dt.itemsize)
    xs = [torch.randn(shape(lay.in_features), device=dev, dtype=dt).requires_grad_()
          for _ in range(k)]
    dys = [torch.randn(shape(lay.out_features), device=dev, dtype=dt) for _ in range(k)]
    # fine-tuning sees the original layer's input and output columns only
    x0s = [x.detach()[:, :spec.old].contiguous().requires_grad_() for x in xs]
    dy0s = [d[:, :spec.old].contiguous() for d in dys]

    def fwd_bwd(module, inputs, grads):
        params = [p for p in module.parameters() if p.requires_grad]
        return [lambda i=i: torch.autograd.grad(module(inputs[i]), [inputs[i]] + params,
                                                grads[i]) for i in range(k)]
    useful = 2 * B.useful_macs(layer, lambda: layer(xs[0]), "fwd+bwd")
    with ctx.backend("auto"):
        ctx.measure(spec.group, "expanse/auto", "expanse", fwd_bwd(layer, xs, dys), useful,
                    useful, profile=False)
    for impl, make, ins, outs in (("peer/masked", B.masked_dense, xs, dys),
                                  ("peer/cat", B.CatModules, xs, dys),
                                  ("peer/finetune", B.finetune_original, x0s, dy0s)):
        if ctx.left() < 6:
            ctx.add(variant=spec.group, impl=impl, kind="peer", skipped="out of time")
            continue
        try:
            peer = make(layer)
            executed = 2 * _counted_backward(B, peer, ins[0], outs[0])
            fns = fwd_bwd(peer, ins, outs)
        except Exception as exc:  # noqa: BLE001 - the row says why
            traceback.print_exc()
            ctx.add(variant=spec.group, impl=impl, kind="peer", error=_short_exc(exc))
            continue
        ctx.measure(spec.group, impl, "peer", fns, useful, executed)
