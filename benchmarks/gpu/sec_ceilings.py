"""Benchmark section ``ceilings``: the cuBLAS matmul rates, the copy bandwidth and the NCHW to
channels_last transpose, then whether a profiler session slows the launches after it."""
from __future__ import annotations

import math

from gpu_common import AFTER_EFFECT_LIMIT, _short_exc


# ---- (a) ceilings ------------------------------------------------------------------------
def _profiler_after_effect(ctx):
    """Whether a profiler session slows what runs after it (a CUPTI left attached costs
    every kernel launch): a launch-bound call timed before and after one session.  The
    expanse rows are profiled before later rows are timed, so this must be ~1."""
    torch = ctx.torch
    small = torch.zeros(256, device=ctx.dev)

    def launches():
        for _ in range(200):
            small.add_(1.0)
        return small

    before = ctx.time([launches])[0]
    prof = ctx.kernel_breakdown(launches, min_left=4.0)
    if isinstance(prof, str):
        ctx.res["profiler_after_effect"] = dict(before_ms=before, profiled=False, why=prof)
        ctx.note(f"profiler after-effect: not checked ({prof})")
        return
    after = ctx.time([launches])[0]
    ratio = after / before if before else float("nan")
    ctx.res["profiler_after_effect"] = dict(before_ms=before, after_ms=after, ratio=ratio,
                                            profiled=True)
    ctx.note(f"profiler after-effect: 200 launches {before:.3f} ms before one profiler "
             f"session, {after:.3f} ms after (x{ratio:.2f})"
             + ("" if ratio < AFTER_EFFECT_LIMIT else
                "; later sections profile nothing"))


def sec_ceilings(ctx):
    torch = ctx.torch
    n = 256 if ctx.quick else 8192
    for dt in (torch.bfloat16, torch.float32):
        name = str(dt).replace("torch.", "")
        try:
            k = ctx.n_sets(2 * n * n * dt.itemsize)
            sets = [(torch.randn(n, n, device=ctx.dev, dtype=dt),
                     torch.randn(n, n, device=ctx.dev, dtype=dt)) for _ in range(k)]
            c = torch.empty(n, n, device=ctx.dev, dtype=dt)
            fns = [lambda a=a, b=b, c=c: torch.mm(a, b, out=c) for a, b in sets]
            ctx.measure(f"matmul {n}^3 {name}", "cuBLAS" if ctx.cuda else "torch.mm",
                        "ceiling", fns, executed_flop=2 * n ** 3, dtype=name)
            del sets, c, fns
        except Exception as exc:
            ctx.res["errors"].append(f"matmul {name}: {_short_exc(exc)}")
    try:
        nbytes = (4 if ctx.quick else 512) * 2**20
        srcs = [torch.empty(nbytes, device=ctx.dev, dtype=torch.uint8).random_(0, 255)
                for _ in range(2)]
        dst = torch.empty_like(srcs[0])
        fns = [lambda s=s, dst=dst: dst.copy_(s) for s in srcs]
        # bytes moved: read + write
        ctx.measure(f"copy {nbytes // 2**20} MiB", "copy_", "ceiling", fns,
                    bytes_moved=2 * nbytes)
        del srcs, dst, fns
    except Exception as exc:
        ctx.res["errors"].append(f"copy: {_short_exc(exc)}")
    try:
        _transpose_rows(ctx)
    except Exception as exc:  # noqa: BLE001
        ctx.res["errors"].append(f"transpose: {_short_exc(exc)}")
    # Last: the ceilings are saved before the profiler is first tried in this run.
    try:
        _profiler_after_effect(ctx)
    except Exception as exc:  # noqa: BLE001
        ctx.res["errors"].append(f"profiler after-effect: {_short_exc(exc)}")


def _transpose_rows(ctx):
    """The copy of an NCHW conv input to channels_last that the Triton conv kernels read (the
    conv section's x: batch 64, 320 channels, 56 x 56): torch's copy against the tiled
    transpose the launchers make it with (kernels/transpose.py), at the copy row's rate."""
    torch = ctx.torch
    from expanse_fast import backend_choice
    shape = (2, 16, 8, 8) if ctx.quick else (64, 320, 56, 56)
    if not backend_choice.availability("triton", ctx.dev)[0]:
        return
    from expanse_fast.kernels import transpose
    k = ctx.n_sets(2 * math.prod(shape) * ctx.dtype.itemsize)
    xs = [torch.randn(shape, device=ctx.dev, dtype=ctx.dtype) for _ in range(k)]
    variant = f"NCHW to channels_last {'x'.join(map(str, shape))} {str(ctx.dtype)[6:]}"
    moved = 2 * math.prod(shape) * ctx.dtype.itemsize
    cl = torch.channels_last
    ctx.measure(variant, "torch copy", "ceiling",
                [lambda x=x: x.contiguous(memory_format=cl) for x in xs], bytes_moved=moved)
    ctx.measure(variant, "triton transpose", "ceiling",
                [lambda x=x: transpose.to_channels_last(x) for x in xs], bytes_moved=moved)
    del xs
