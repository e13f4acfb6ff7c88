"""Measuring helpers the benchmark sections share: a row's results checked against the torch
backend's, an expanded op timed under each backend and its variants (Triton without TMA, the
extension's swizzled tiles, ...), and the host's ops of one call."""
from __future__ import annotations

import math
import os
import traceback

from gpu_common import CHECK_TOL, _environment, _short_exc


def _rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def _check_against(ctx, got, ref, names) -> str:
    """'ok 1.2e-03' or 'MISMATCH dx 4.1e-01' (largest relative error over the outputs)."""
    tol = CHECK_TOL.get(str(ctx.dtype).replace("torch.", ""), 1e-2)
    worst, worst_name = 0.0, ""
    for n, a, b in zip(names, got, ref):
        if a is None or b is None:
            continue
        e = _rel_err(a, b)
        if not math.isfinite(e) or e > worst:
            worst, worst_name = (float("inf") if not math.isfinite(e) else e), n
    return f"ok {worst:.1e}" if worst <= tol else f"MISMATCH {worst_name} {worst:.1e}"


def _measure_backends(ctx, backends, exp_f, exp_fb, k, v_f, v_fb, f_fwd, f_fb, ref,
                      label=""):
    """Time the expanded op under each of ``backends`` ([(name, why-not or None)]); each
    backend but torch is first checked against the torch backend's results ``ref``.
    ``label`` is appended to the implementation's name (a variant of the backend)."""
    for name, why in backends:
        impl = f"expanse/{name}{label}"
        if why:
            for v in (v_fb, v_f):
                ctx.add(variant=v, impl=impl, kind="expanse", skipped=why)
            continue
        if ctx.left() < 6:
            for v in (v_fb, v_f):
                ctx.add(variant=v, impl=impl, kind="expanse", skipped="out of time")
            continue
        check = None
        with ctx.backend(name):
            if ref is not None and name != "torch":
                try:
                    got = (exp_f(0),) + tuple(exp_fb(0))
                    check = _check_against(ctx, got, ref, ("y", "dx", "dW", "db"))
                    del got
                except Exception as exc:
                    traceback.print_exc()
                    check = f"ERROR {_short_exc(exc)}"
            ctx.measure(v_fb, impl, "expanse", [lambda i=i: exp_fb(i) for i in range(k)],
                        f_fb, f_fb, check)
            ctx.measure(v_f, impl, "expanse", [lambda i=i: exp_f(i) for i in range(k)],
                        f_fwd, f_fwd, check)


def _reference(ctx, exp_f, exp_fb, what):
    """The torch backend's forward output and gradients on input set 0 (None on failure, and
    where the section checks nothing)."""
    if not ctx.checks:
        return None
    try:
        with ctx.backend("torch"):
            return (exp_f(0),) + tuple(exp_fb(0))
    except Exception as exc:
        traceback.print_exc()
        ctx.res["errors"].append(f"torch reference {what}: {_short_exc(exc)}")
        return None


def _measure_after_torch(ctx, backends, exp_f, exp_fb, k, v_f, v_fb, f_fwd, f_fb, ref,
                         triton_variant=None, mixed=False, dx_split=False, swizzle=False,
                         auto_variant=None, conv=False):
    """Every backend after the first (torch, measured before the peers), the compiled
    extension last, so that a faulty kernel's sticky CUDA error ends the section and not the
    other rows; then the extension on its WMMA path.  ``triton_variant`` (a _measure_triton_*
    function) times a Triton variant right after Triton, before the section's time runs
    short; ``auto_variant`` one of "auto" right after it (always)."""
    _measure_backends(ctx, [b for b in backends[1:] if b[0] != "cuda"], exp_f, exp_fb, k,
                      v_f, v_fb, f_fwd, f_fb, ref)
    # EXPANSE_BENCH_VARIANTS=1 adds the diagnostic variants (Triton without TMA, on NCHW in
    # place; the extension without wgmma).  Off by default: one call must hold every section,
    # and those rows were measured on 2026-11-30 (benchmarks/results/).
    variants = os.environ.get("EXPANSE_BENCH_VARIANTS", "0") == "1"
    if triton_variant is not None and variants:
        triton_variant(ctx, backends, exp_f, exp_fb, k, v_f, v_fb, f_fwd, f_fb, ref)
    _measure_auto(ctx, backends, exp_f, exp_fb, k, v_f, v_fb, f_fwd, f_fb, ref, mixed,
                  dx_split)
    if auto_variant is not None:
        auto_variant(ctx, backends, exp_f, exp_fb, k, v_f, v_fb, f_fwd, f_fb, ref)
    _measure_backends(ctx, [b for b in backends if b[0] == "cuda"], exp_f, exp_fb, k,
                      v_f, v_fb, f_fwd, f_fb, ref)
    if swizzle:  # (the linear kernels' experiments: timed by default)
        _measure_cuda_swizzled(ctx, backends, exp_f, exp_fb, k, f_fwd, f_fb, ref, v_f, v_fb)
        _measure_cuda_deep_k(ctx, backends, exp_f, exp_fb, k, f_fwd, f_fb, ref, v_f, v_fb)
    if conv:  # (the conv kernels' narrow tiles, untimed before: by default too)
        _measure_cuda_conv_wide_tiles(ctx, backends, exp_f, exp_fb, k, f_fwd, f_fb, ref, v_f,
                                      v_fb)
    if variants:
        _measure_cuda_without_wgmma(ctx, backends, exp_f, exp_fb, k, f_fwd, f_fb, ref, v_f,
                                    v_fb)
        if conv:
            _measure_cuda_conv_pixel_gathers(ctx, backends, exp_f, exp_fb, k, f_fwd, f_fb, ref,
                                             v_f, v_fb)


def _expanse_host_profiles(ctx, backends, variant, exp_fb):
    """The host's ops of one eager fwd+bwd call of the expanded layer on the torch backend and
    under "auto" (when Triton is usable): in f0ce6a0's run the conv's "auto" call took the
    host 1.32 ms to issue against 1.25 ms on the device, so its eager time may be the host's;
    this says which ops it goes to (the masked peer's row has the same, for comparison)."""
    names = ["torch"] + (["auto"] if dict(backends).get("triton", "absent") is None else [])
    for name in names:
        with ctx.backend(name):
            _host_profiles(ctx, variant, [(f"expanse/{name}", lambda: exp_fb(0))])


def _measure_auto(ctx, backends, exp_f, exp_fb, k, v_f, v_fb, f_fwd, f_fb, ref,
                  mixed=False, dx_split=False):
    """``backend="auto"``, the package's default (backend_choice: the Triton forward of a
    large fp16/bf16 conv on CUDA, the torch backend otherwise).  ``mixed``: also the Triton
    forward with the torch backward (``triton+torch``), which "auto" runs for the conv but
    not for the linear layer: the pair that decides it, measured in the same run.
    ``dx_split``: also "auto" with the input gradient from the Triton kernel (one pass that
    writes the widened gradient, zeros included) and the weight gradients from cuDNN
    (``auto/dx:triton``): the torch backward's copies and fills around cuDNN's dgrad took
    more device time than its convolutions in 14609cb's profile."""
    if dict(backends).get("triton", "absent") is not None:
        return  # auto is the torch backend here: not timed twice
    names = [("auto", None)] + ([("triton+torch", None)] if mixed else []) + (
        [("auto/dx:triton", None)] if dx_split else [])
    _measure_backends(ctx, names, exp_f, exp_fb, k, v_f, v_fb, f_fwd, f_fb, ref)


def _measure_auto_y_transposed(ctx, backends, exp_f, exp_fb, k, v_f, v_fb, f_fwd, f_fb, ref):
    """``auto`` on NCHW input with the Triton forward's y written channels_last and handed
    back by the tiled transpose (``EXPANSE_FAST_CONV_NCHW_Y=transpose``, ``expanse/auto-yT``),
    beside its default store of NCHW in place, in 16-byte box rows: on 2026-12-01 the NCHW
    forward took 1.04 ms against 0.63 on channels_last input; which of the two pays."""
    if dict(backends).get("triton", "absent") is not None:
        return
    with _environment("EXPANSE_FAST_CONV_NCHW_Y", "transpose"):
        _measure_backends(ctx, [("auto", None)], exp_f, exp_fb, k, v_f, v_fb, f_fwd, f_fb,
                          ref, label="-yT")


def _measure_triton_without_tma(ctx, backends, exp_f, exp_fb, k, v_f, v_fb, f_fwd, f_fb, ref):
    """The Triton kernels with plain pointer loads, beside their default tensor-descriptor
    (TMA) loads on sm_90: which one pays, measured in the same run.  Untuned (the first
    fitting tile), so that the section's time goes to one tuning only."""
    if dict(backends).get("triton", "absent") is not None:
        return
    from expanse_fast.kernels import expanded_linear as kernels
    from expanse_fast.kernels import expanded_linear_tma as tma
    state = f"off: {tma.disabled_reason}" if tma.disabled_reason else "on where usable"
    ctx.note(f"triton TMA kernels: {state} (EXPANSE_FAST_TMA={tma.MODE}); "
             "expanse/triton-noTMA: pointer loads, untuned")
    saved = tma.MODE, kernels.AUTOTUNE
    tma.MODE, kernels.AUTOTUNE = "0", False
    try:
        _measure_backends(ctx, [("triton", None)], exp_f, exp_fb, k, v_f, v_fb, f_fwd,
                          f_fb, ref, label="-noTMA")
    finally:
        tma.MODE, kernels.AUTOTUNE = saved


def _measure_cuda_variant(ctx, backends, exp_f, exp_fb, k, f_fwd, f_fb, ref, v_f, v_fb,
                          label: str, switch: str, value: str, what: str):
    """The extension's kernels once more with ``switch=value`` (``expanse/cuda<label>``)
    beside their default, in the same run, where the default runs wgmma (the sm_90a build on
    an H100/H200); a note says which math ran."""
    if dict(backends).get("cuda", "absent") is not None:
        return
    from expanse_fast.backends import cuda
    try:
        math = cuda.linear_math(ctx.dtype, ctx.dev)
    except Exception as exc:  # noqa: BLE001 - report, go on
        math = f"unknown ({_short_exc(exc)})"
    note = (f"cuda kernels: {math} for {str(ctx.dtype).replace('torch.', '')}; "
            f"expanse/cuda{label}: {switch}={value} ({what})")
    if note not in ctx.res.get("notes", []):
        ctx.note(note)
    if math != "wgmma":
        return
    with _environment(switch, value):
        _measure_backends(ctx, [("cuda", None)], exp_f, exp_fb, k, v_f, v_fb, f_fwd, f_fb,
                          ref, label=label)


def _measure_cuda_without_wgmma(ctx, backends, exp_f, exp_fb, k, f_fwd, f_fb, ref,
                                v_f="fwd", v_fb="fwd+bwd"):
    """The compiled kernels on their portable WMMA path beside the default."""
    _measure_cuda_variant(ctx, backends, exp_f, exp_fb, k, f_fwd, f_fb, ref, v_f, v_fb,
                          "-noWGMMA", "EXPANSE_FAST_CUDA_WGMMA", "0", "WMMA fragments")


def _measure_cuda_swizzled(ctx, backends, exp_f, exp_fb, k, f_fwd, f_fb, ref, v_f="fwd",
                           v_fb="fwd+bwd"):
    """The linear wgmma kernels with 128-byte swizzled operand tiles beside their default
    unswizzled tiles: the cuda linear ran at a quarter of Triton's rate on 2026-12-01, and
    whether its shared-memory layout is why is what this row says."""
    _measure_cuda_variant(ctx, backends, exp_f, exp_fb, k, f_fwd, f_fb, ref, v_f, v_fb,
                          "-sw128", "EXPANSE_FAST_CUDA_SWIZZLE", "1",
                          "128-byte swizzled operand tiles")


def _measure_cuda_deep_k(ctx, backends, exp_f, exp_fb, k, f_fwd, f_fb, ref, v_f="fwd",
                         v_fb="fwd+bwd"):
    """The linear wgmma kernels with two stages of 128-wide k-tiles beside their default four
    of 64: each k-tile's proxy fence (MEMBAR.ALL.CTA in SASS) then comes with no newer copies
    in flight.  If the fence waits for in-flight copies, this row is the faster one."""
    _measure_cuda_variant(ctx, backends, exp_f, exp_fb, k, f_fwd, f_fb, ref, v_f, v_fb,
                          "-k128x2", "EXPANSE_FAST_CUDA_PIPELINE", "k128x2",
                          "two stages of 128-wide k-tiles")


def _measure_cuda_conv_pixel_gathers(ctx, backends, exp_f, exp_fb, k, f_fwd, f_fb, ref,
                                     v_f="fwd", v_fb="fwd+bwd"):
    """The conv's NCHW kernels (pixel-by-pixel gathers, channels_last operands copied to
    NCHW) beside the default NHWC implicit GEMMs on the linear kernels' pipeline: what the
    NHWC rewrite gained, in the same run."""
    _measure_cuda_variant(ctx, backends, exp_f, exp_fb, k, f_fwd, f_fb, ref, v_f, v_fb,
                          "-pixelgathers", "EXPANSE_FAST_CUDA_CONV_NHWC", "0",
                          "the NCHW kernels' pixel-by-pixel gathers")


def _measure_cuda_conv_wide_tiles(ctx, backends, exp_f, exp_fb, k, f_fwd, f_fb, ref,
                                  v_f="fwd", v_fb="fwd+bwd"):
    """The NHWC conv kernels on 128 x 128 tiles only, beside their default narrow tiles where
    a wide one would idle (the ResNet stage's 64 new channels: a 128 x 64 forward segment
    and dx, a 64 x 256 dW): what the narrow tiles gain, in the same run."""
    _measure_cuda_variant(ctx, backends, exp_f, exp_fb, k, f_fwd, f_fb, ref, v_f, v_fb,
                          "-wide", "EXPANSE_FAST_CUDA_CONV_NARROW", "0",
                          "128 x 128 tiles only")


def _measure_triton_conv_without_tma(ctx, backends, exp_f, exp_fb, k, v_f, v_fb, f_fwd, f_fb,
                                    ref):
    """The Triton conv kernels with pointer gathers beside their default tensor-descriptor
    (TMA) kernels on sm_90 (channels_last input): which pay, in the same run.  Untuned
    (their first tiles), as the linear layer's noTMA row, so that the section's time goes
    to the defaults' tuning."""
    if dict(backends).get("triton", "absent") is not None:
        return
    from expanse_fast.kernels import expanded_conv
    from expanse_fast.kernels import expanded_linear_tma as tma
    state = f"off: {tma.disabled_reason}" if tma.disabled_reason else "on where usable"
    ctx.note(f"triton conv forward, dW and dx: TMA boxes of pixels {state} "
             f"(EXPANSE_FAST_TMA={tma.MODE}); expanse/triton-noTMA: pointer gathers, untuned")
    kernels = (expanded_conv._conv_fwd_kernel, expanded_conv._conv_wgrad_kernel,
               expanded_conv._conv_dx_kernel)
    saved = [(kern.configs, dict(kern.cache)) for kern in kernels]
    saved_mode, tma.MODE = tma.MODE, "0"
    for kern in kernels:
        kern.configs = kern.configs[:1]
    try:
        _measure_backends(ctx, [("triton", None)], exp_f, exp_fb, k, v_f, v_fb, f_fwd,
                          f_fb, ref, label="-noTMA")
    finally:
        tma.MODE = saved_mode
        for kern, (configs, cache) in zip(kernels, saved):
            kern.configs = configs
            kern.cache.clear()  # an untuned choice must not stand for a tuned one later
            kern.cache.update(cache)


def _measure_triton_nchw_direct(ctx, backends, exp_f, exp_fb, k, v_f, v_fb, f_fwd, f_fb, ref):
    """The Triton conv kernels reading NCHW in place (2-byte gathers), beside their default
    of copying x and dy to channels_last first: which one pays, in the same run.  Tuned on
    its own (the autotune keys hold the channel stride)."""
    if dict(backends).get("triton", "absent") is not None:
        return
    from expanse_fast.kernels import expanded_conv
    ctx.note(f"triton conv on NCHW input: EXPANSE_FAST_CONV_NCHW={expanded_conv.NCHW_MODE} "
             "(x, dy copied to channels_last); expanse/triton-direct: NCHW read in place")
    saved = expanded_conv.NCHW_MODE
    expanded_conv.NCHW_MODE = "direct"
    try:
        _measure_backends(ctx, [("triton", None)], exp_f, exp_fb, k, v_f, v_fb, f_fwd, f_fb,
                          ref, label="-direct")
    finally:
        expanded_conv.NCHW_MODE = saved


def _host_profiles(ctx, variant, calls):
    """Each (impl, fn): the host's ops of one eager call (``Ctx.host_breakdown``), kept on
    that impl's row of ``variant``: why an expanded model's eager step may cost the host
    more than fine-tuning's (on the H200 the MLP's took 3.9 ms of host time against 2.0)."""
    for impl, fn in calls:
        rows = [r for r in ctx.res["rows"] if r.get("variant") == variant
                and r.get("impl") == impl and r.get("ms")]
        if rows:
            rows[-1]["host_ops"] = ctx.host_breakdown(fn)
            ctx.save()
