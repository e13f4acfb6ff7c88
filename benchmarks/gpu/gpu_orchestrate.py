"""The benchmark stages' processes: ``section`` (one section in this process), ``bench`` (each
section in a subprocess of its own, within its share of the budget) and ``prewarm`` (the
sections' Triton kernels compiled side by side before they are timed)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import traceback

from gpu_common import (AFTER_EFFECT_LIMIT, SECTION_ENV, SECTION_WEIGHT, _dump, _load, _now_iso,
                        _short_exc)
from gpu_ctx import CompileOnlyCtx, Ctx
from sec_ceilings import sec_ceilings
from sec_layers import sec_conv, sec_linear
from sec_models import sec_cnn, sec_mlp, sec_sweep


SECTION_FN = {"ceilings": sec_ceilings, "linear": sec_linear, "conv": sec_conv, "mlp": sec_mlp,
              "cnn": sec_cnn, "sweep": sec_sweep}


def _compile_only_launches(ctx):
    """The prewarm's launches: each compiles its kernel (every config an autotuner would try)
    and loads it into the device (which also builds Triton's launcher for its signature,
    cached beside it); nothing runs."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from compile_only import autotuned_launches_compile_only
    counts = ctx.res.setdefault("configs", {"compiled": 0, "failed": 0})

    def loaded(fn, cfg, compiled, error):
        if error is None and hasattr(compiled, "_init_handles"):
            try:
                compiled._init_handles()
            except Exception as exc:  # noqa: BLE001 - e.g. too much shared memory
                error = exc
        counts["failed" if error is not None else "compiled"] += 1
    return autotuned_launches_compile_only(on_config=loaded)


def cmd_section(args) -> int:
    # a profiler session (kernel_breakdown) must not leave CUPTI attached to the kernels
    # timed after it; torch's default depends on its kineto
    os.environ.setdefault("TEARDOWN_CUPTI", "1")
    ctx = (CompileOnlyCtx if args.compile_only else Ctx)(args, args.name)
    if ctx.cuda and os.environ.get("TRITON_INTERPRET"):
        ctx.note("TRITON_INTERPRET is set on a GPU run: Triton timings are meaningless")
    ctx.torch.manual_seed(0)
    try:
        with _compile_only_launches(ctx) if args.compile_only else contextlib.nullcontext():
            SECTION_FN[args.name](ctx)
    except Exception as exc:
        traceback.print_exc()
        ctx.res["errors"].append(f"section aborted: {_short_exc(exc)}")
    try:
        if not args.compile_only:
            ctx.record_autotune()
    except Exception as exc:  # noqa: BLE001
        ctx.res["errors"].append(f"autotune record: {_short_exc(exc)}")
    ctx.res["profile_s"] = round(ctx.profile_s, 1)
    ctx.res["finished"] = True
    ctx.res["ended"] = _now_iso()
    ctx.save()
    return 0


# =========================================================================================
# bench: one subprocess per section
# =========================================================================================
# The ceilings section's process spends about 5 s starting and initialising CUDA before its
# first measurement, and the cuBLAS bfloat16 rate it measures first is what the linear
# target counts against: a short run must not starve it (11 s measured nothing on the H200).
CEILINGS_SECONDS = (18.0, 25.0)


def section_budget(sec: str, left: float, rest) -> float:
    """Seconds for section ``sec`` out of ``left``, ``rest`` being it and those after it:
    a share by SECTION_WEIGHT, the last one all that is left, the ceilings within
    CEILINGS_SECONDS."""
    share = SECTION_WEIGHT.get(sec, 0.25) / sum(SECTION_WEIGHT.get(s, 0.25) for s in rest)
    budget = left * share if len(rest) > 1 else left
    if sec == "ceilings":
        low, high = CEILINGS_SECONDS
        budget = min(max(budget, low), high, left)
    return budget


def cmd_bench(args) -> int:
    os.makedirs(args.work, exist_ok=True)
    end = time.time() + args.budget
    todo = [s for s in args.sections.split(",") if s]
    for idx, sec in enumerate(todo):
        if sec not in SECTION_FN:
            print(f"unknown section {sec!r}", flush=True)
            continue
        budget = section_budget(sec, end - time.time(), todo[idx:])
        out = os.path.join(args.work, f"bench_{sec}.json")
        if budget < 8:
            _dump(out, {"section": sec, "rows": [], "errors": [],
                        "notes": [f"not run: {budget:.0f}s left"], "finished": False})
            print(f"=== bench section {sec}: not run, {budget:.0f}s left", flush=True)
            continue
        # The section stops starting measurements a little before its hard limit.
        cmd = _section_command(args, sec, out, time.time() + budget - 4)
        print(f"=== bench section {sec}: budget {budget:.0f}s", flush=True)
        t0 = time.time()
        compiled_before = _triton_cache_entries()
        rc = None
        try:
            proc = subprocess.Popen(cmd, start_new_session=True,
                                    env=dict(os.environ, **SECTION_ENV.get(sec, {})))
            try:
                rc = proc.wait(timeout=budget)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # its own session: only what it started
                proc.wait()
                rc = "timeout"
        except Exception as exc:
            rc = _short_exc(exc)
        res = _load(out) or {"section": sec, "rows": [], "errors": [], "notes": []}
        res.update(exit=rc, seconds=round(time.time() - t0, 1),
                   triton_cache_new=_triton_cache_entries() - compiled_before)
        if rc != 0:
            res.setdefault("errors", []).append(
                f"section process ended with {rc} after {res['seconds']}s "
                f"({'partial results' if res.get('rows') else 'no results'})")
        _dump(out, res)
        print(f"=== bench section {sec}: exit {rc} in {res['seconds']}s, "
              f"{res['triton_cache_new']} new Triton cache entries", flush=True)
        if sec == "ceilings":
            _gate_profiling(res)
    return 0


# The script a section's process runs: the GPU run's entry point, beside this module.
BENCH_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_gpu.py")


def _section_command(args, sec, out, deadline, compile_only=False):
    cmd = [sys.executable, BENCH_SCRIPT, "section", sec, "--device", args.device,
           "--dtype", args.dtype, "--out", out, "--deadline", f"{deadline:.1f}"]
    return cmd + (["--quick"] if args.quick else []) + (
        ["--compile-only"] if compile_only else [])


def _triton_cache_dir() -> str:
    """Where Triton keeps compiled kernels (its default: TRITON_CACHE_DIR, else
    $TRITON_HOME or ~, then .triton/cache); read without importing Triton."""
    home = os.environ.get("TRITON_HOME") or os.path.expanduser("~")
    return os.environ.get("TRITON_CACHE_DIR") or os.path.join(home, ".triton", "cache")


def _triton_cache_entries() -> int:
    """Entries of the Triton cache: one per compiled kernel (and per launcher built for a
    kernel signature), so their growth over a section counts what it compiled."""
    try:
        return len(os.listdir(_triton_cache_dir()))
    except OSError:
        return 0


# Sections whose kernels the prewarm compiles (the ceilings launch no Triton kernel).
PREWARM_SECTIONS = ("linear", "conv", "mlp", "cnn", "sweep")


def cmd_prewarm(args) -> int:
    """Compile, before the timed run and side by side (a process per section), every Triton
    kernel config the timed sections will launch or tune (``CompileOnlyCtx``): the timed
    run then finds them in Triton's cache and its autotuning only times.  On the H200 the
    host compiles one config at a time while its other cores idle; here the build and the
    tests hold the GPU, and the prewarm runs beside them (run.sh starts it niced, in the
    background).  Each section process stops at the budget."""
    os.makedirs(args.work, exist_ok=True)
    end = time.time() + args.budget
    before = _triton_cache_entries()
    env = dict(os.environ, EXPANSE_FAST_CUDA="0",
               EXPANSE_BENCH_SKIP_CUDA="compile only (prewarm)")
    procs, summary = {}, {}
    t0 = time.time()

    def finish(sec, rc):
        out = procs.pop(sec)[0]
        res = _load(out) or {}
        summary[sec] = dict(exit=rc, seconds=round(time.time() - t0, 1),
                            configs=res.get("configs"), errors=res.get("errors", [])[:3])
        print(f"=== prewarm {sec}: exit {rc} at {summary[sec]['seconds']}s, configs "
              f"{res.get('configs')}", flush=True)

    def report():
        summary["triton_cache_new"] = _triton_cache_entries() - before
        _dump(os.path.join(args.work, "prewarm.json"), summary)
        print(f"=== prewarm: {summary['triton_cache_new']} new Triton cache entries in "
              f"{time.time() - t0:.0f}s ({_triton_cache_dir()})", flush=True)

    def stop_all(why):
        for sec in list(procs):
            with contextlib.suppress(OSError):
                os.killpg(procs[sec][1].pid, 9)  # (each section process leads its session)
            procs[sec][1].wait()
            finish(sec, why)

    def stopped(signum, frame):  # run.sh stops the prewarm when the timed run begins
        stop_all("stopped")
        report()
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, stopped)
    for sec in [s for s in args.sections.split(",") if s in PREWARM_SECTIONS]:
        out = os.path.join(args.work, f"prewarm_{sec}.json")
        procs[sec] = (out, subprocess.Popen(
            _section_command(args, sec, out, end - 3, compile_only=True),
            start_new_session=True, env=dict(env, **SECTION_ENV.get(sec, {}))))
    while procs and time.time() < end:
        for sec in list(procs):
            rc = procs[sec][1].poll()
            if rc is not None:
                finish(sec, rc)
        time.sleep(0.2)
    stop_all("timeout")
    report()
    return 0


def _gate_profiling(ceilings):
    """Let the later sections profile only if the ceilings section showed that a profiler
    session ran and left later launches as fast as before (a crash there costs only the
    check, which runs after the ceilings are saved)."""
    check = ceilings.get("profiler_after_effect") or {}
    ratio = check.get("ratio")
    why = None
    if not check:
        why = "the ceilings section's profiler check did not finish"
    elif not check.get("profiled"):
        why = f"the ceilings section's profiler check: {check.get('why')}"
    elif not (isinstance(ratio, (int, float)) and ratio < AFTER_EFFECT_LIMIT):
        why = f"a profiler session slowed later launches (x{ratio})"
    if why:
        os.environ["EXPANSE_BENCH_PROFILE"] = "0"
        os.environ["EXPANSE_BENCH_PROFILE_WHY"] = why
        print(f"=== kernel breakdowns off: {why}", flush=True)
