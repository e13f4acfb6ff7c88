"""The cuda backend's experimental TMA forward beside its default, on issue 3's linear layer.

    python benchmarks/gpu/tma_forward.py [--out DIR]

run.sh's opt-in ``tma`` stage (EXPANSE_GPU_STAGES=build,tma): a process of its own, since
the experiment's kernel traps (a sticky CUDA error) if a copy never lands.  The bf16 layer
(16384 rows, 4096+1024 in and out, no old input gradient), forward and forward+backward,
on cuda (four stages of cp.async, a proxy fence per k-tile), cuda with
EXPANSE_FAST_CUDA_PIPELINE=tma (the copy engine) and Triton: CUDA-event medians and each
output's error against the torch backend's, as a table and tma_forward.json.
"""
import argparse
import json
import os
import statistics
from pathlib import Path

import torch
from torch import nn

import expanse_fast as xf


def timed(fn, dev, reps=20):
    """Median ms of fn over reps calls after two warm-ups (CUDA events)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize(dev)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--old", type=int, default=4096)
    p.add_argument("--new", type=int, default=1024)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    layer = xf.ExpandedLinear.from_linear(nn.Linear(args.old, args.old, device=dev, dtype=dt),
                                          args.new, args.new)
    layer.skip_old_input_grad = True
    width = args.old + args.new
    x = torch.randn(args.rows, width, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(args.rows, width, device=dev, dtype=dt)
    flops = 2.0 * args.rows * (args.old * args.old + args.new * width)  # useful, forward

    def run(backend, env):
        os.environ.pop("EXPANSE_FAST_CUDA_PIPELINE", None)
        os.environ.update(env)
        layer.backend = backend
        with torch.no_grad():
            y = layer(x)

        def fwd():
            with torch.no_grad():
                layer(x)

        def fwd_bwd():
            layer(x).backward(dy)
            layer.weight_new.grad = None
            x.grad = None

        return y, timed(fwd, dev), timed(fwd_bwd, dev)

    ref, _, _ = run("torch", {})
    rows = []
    # the experiment last: a trap in it leaves the rows before it written
    for name, backend, env in (("triton", "triton", {}), ("cuda", "cuda", {}),
                               ("cuda-tma", "cuda", {"EXPANSE_FAST_CUDA_PIPELINE": "tma"})):
        from expanse_fast.backends import cuda
        math = cuda.linear_math(dt, dev) if backend == "cuda" else ""
        try:
            y, fwd_ms, fb_ms = run(backend, env)
            err = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
            rows.append(dict(impl=name, math=math, fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms,
                             fwd_tflops=flops / fwd_ms / 1e9, rel_err=err))
        except Exception as exc:  # noqa: BLE001 - report, go on
            rows.append(dict(impl=name, math=math, error=f"{type(exc).__name__}: {exc}"[:300]))
        print(json.dumps(rows[-1]), flush=True)
        Path(args.out, "tma_forward.json").write_text(json.dumps(rows, indent=1))
    print(f"\nbf16 {args.rows} x ({args.old}+{args.new}), no old input gradient")
    print("| impl | tile math | fwd ms | fwd TFLOP/s | fwd+bwd ms | rel err vs torch |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | {r['math']} | {r['error']} | | | |")
        else:
            print(f"| {r['impl']} | {r['math']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} | "
                  f"{r['fwd_bwd_ms']:.3f} | {r['rel_err']:.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
