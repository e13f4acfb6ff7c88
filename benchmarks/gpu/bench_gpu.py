"""One-call GPU check of expanse_fast: environment, CUDA build, benchmarks, report.

Sub-commands (``run.sh`` calls them in order; each can also run on its own):

``env``      versions, device, git commit and source fingerprint -> WORK/env.json
``build``    build/load the CUDA extension, print ``BUILD_RESULT {json}``
``bench``    every benchmark section, each in its own subprocess (a crash or a hung kernel
             costs one section, not the run) -> WORK/bench_<section>.json
``section``  one section in this process (used by ``bench``; ``--compile-only``: by ``prewarm``)
``prewarm``  the sections' Triton kernels compiled side by side, before they are timed
``report``   merge WORK/* (and OUT/junit.xml) into OUT/results.json and OUT/results.md and
             print the table

Timing: CUDA events around every call, median over calls that rotate among several input
sets (enough to exceed the L2 cache where the sizes allow), after warm-up calls that absorb
compilation, autotuning and cuDNN's algorithm search.  Only ``env``/``build``/``section``
import torch; ``report`` and ``bench`` (the orchestrator) never do, so they cannot crash on it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import glob
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECTIONS = ("ceilings", "linear", "conv", "mlp", "cnn", "sweep")
# Share of the time left that each section may use (the rest passes on if it ends early).
# conv: two layouts, each with its Triton tuning (and NCHW read in place with its own);
# the issue's targets are linear and conv, the MLP and CNN steps are model-level extras
# (the CNN last, on what is left).
# Shares of the bench stage's time, after the sections' times on the H200 (2026-12-01, 190 s
# for all): ceilings 10 s, linear 17 (out of time before the auto and cuda rows at 26), conv
# 37, mlp 25 (of 58), cnn out of time at 65, sweep 3 of 7 cases in 15.
SECTION_WEIGHT = {"ceilings": 0.08, "linear": 0.20, "conv": 0.26, "mlp": 0.16, "cnn": 0.22,
                  "sweep": 0.08}
# Environment of a section's process: the CNN's many layer shapes would each be tuned.
SECTION_ENV = {"cnn": {"EXPANSE_FAST_AUTOTUNE": "0"}}
PEERS = (("masked", "peer/masked"), ("cat", "peer/cat"), ("finetune", "peer/finetune"))
BACKEND_NAMES = ("torch", "triton", "cuda")
# Calls, each issued after the device has finished the one before, whose median issue time
# is a row's host ms.
HOST_TIMED_CALLS = 7
# Seconds a section may spend profiling (kernel_breakdown): the timings come first.  (At 6 s
# the conv section's NCHW rows, where issue 3's conv targets were missed, went unprofiled on
# 2026-12-01; the prewarm now spares the sections most of their compile time.)
PROFILE_BUDGET_S = 12.0
# Launches at most this much slower after a profiler session than before: still profiled
# (a CUPTI left attached costs each launch far more; below this is timing noise).
AFTER_EFFECT_LIMIT = 1.25
CHECK_TOL = {"bfloat16": 3e-2, "float16": 1e-2, "float32": 2e-3}


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dump(path: str, obj) -> None:
    """Write JSON atomically: a section killed mid-write leaves the previous version."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def _load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except Exception:
        return None


def _short_exc(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


# A device kernel's name, short enough for a table line and still telling apart what aten's
# generic kernels did: their template arguments name the functor (a copy, a fill, an add),
# which a cut after 60 characters lost ("elementwise_kernel<128, 4, at::native::gpu_" was
# every copy and every fill alike).
_NAMESPACES = re.compile(r"(?:\bat::native::|\bat::cuda::|\bc10::|\bstd::|\bexpanse_fast::"
                         r"|\(anonymous namespace\)::)")
_FUNCTOR = re.compile(r"[A-Za-z_]\w*(?:[Ff]unctor\w*|_kernel_cuda|Op|Math)\b")


def kernel_label(name: str, width: int = 72) -> str:
    """``name`` without ``void``, namespaces and template arguments, with the first functor
    of its template arguments in parentheses where it has one: ``elementwise_kernel
    (direct_copy_kernel_cuda)``, ``vectorized_elementwise_kernel(FillFunctor)``,
    ``reduce_kernel(sum_functor)``.  A name without a signature (``Memset (Device)``, a
    Triton or cuBLAS kernel) stays as it is."""
    text = _NAMESPACES.sub("", name.strip())
    if not text.startswith("void ") and "<" not in text:
        return text[:width]
    text = text[5:] if text.startswith("void ") else text
    head = re.match(r"[^<(]*", text).group(0).strip()
    found = _FUNCTOR.findall(text[len(head):])
    functors = [f for f in found if "unctor" in f] or found
    label = f"{head}({functors[0]})" if functors else head
    return label[:width]


def _profile_rows(recorded, by_shape, top):
    """(kernels, ops) of ``profile_call`` from a session's averaged events: with
    ``by_shape`` (a GPU session's events averaged per input shape) the device kernels and
    the aten ops that launched them, else (a CPU session) the aten ops' own time and None."""
    on_gpu = by_shape is not None
    kernels = []
    for e in recorded:
        if str(e.key).startswith("ProfilerStep") or (on_gpu and not _on_device(e)):
            continue  # (on a GPU the host's ops and runtime calls: in ``ops`` below)
        us = _device_us(e) if on_gpu else e.self_cpu_time_total
        if us and us > 0:
            kernels.append([kernel_label(str(e.key)), int(e.count), round(float(us), 1)])
    kernels.sort(key=lambda r: -r[2])
    if not on_gpu:
        return kernels[:top], None
    ops = [[str(e.key), _shapes_text(getattr(e, "input_shapes", None)), int(e.count),
            round(_device_us(e), 1)]
           for e in by_shape if str(e.key).startswith("aten::") and not _on_device(e)
           and _device_us(e) > 0]
    ops.sort(key=lambda r: -r[3])
    return kernels[:top], ops[:top]


def _on_device(event) -> bool:
    """Whether a profiler event is a device kernel, copy or memset: not a host op, nor the
    span a ``record_function`` range (an autograd Function's name, say) leaves on the
    device's timeline when the host is profiled too (torch's own totals skip those)."""
    kind = getattr(event, "device_type", None)
    return (getattr(kind, "name", str(kind)).upper().endswith("CUDA")
            and not getattr(event, "is_user_annotation", False))


def _device_us(event) -> float:
    return float(getattr(event, "self_device_time_total", None)
                 or getattr(event, "self_cuda_time_total", 0) or 0)


def _shapes_text(shapes, width: int = 90) -> str:
    """An op's input shapes, compactly: ``16384x4096, 4096x1024`` (scalars left out)."""
    parts = ["x".join(str(d) for d in s) for s in (shapes or [])
             if isinstance(s, (list, tuple)) and s]
    return ", ".join(parts)[:width]


# =========================================================================================
# env
# =========================================================================================
def _git_commit() -> str:
    for var in ("EXPANSE_GIT_COMMIT", "GIT_COMMIT", "GITHUB_SHA"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except Exception:
        pass
    return "unknown"


def _source_fingerprint() -> str:
    """sha256 over the package sources: ties results to code when .git did not travel."""
    h = hashlib.sha256()
    pats = ["expanse_fast/**/*.py", "kernels/**/*.py", "csrc/**/*.cu", "csrc/**/*.cuh",
            "csrc/**/*.h", "csrc/**/*.cpp", "csrc/**/*.py"]
    files = sorted({f for p in pats for f in glob.glob(os.path.join(REPO, p), recursive=True)})
    for f in files:
        h.update(os.path.relpath(f, REPO).encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:16]


def cmd_env(args) -> int:
    info = {"date": _now_iso(), "python": sys.version.split()[0],
            "platform": platform.platform(), "git_commit": _git_commit(),
            "source_sha256_16": _source_fingerprint(),
            "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES",
                                                   "TORCH_CUDA_ARCH_LIST", "MAX_JOBS",
                                                   "PYTHONPATH", "PYTHONSAFEPATH")}}
    try:
        import torch
        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
                    else None, cuda_available=torch.cuda.is_available(),
                    allow_tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                              "sm_count": p.multi_processor_count,
                              "memory_gib": round(p.total_memory / 2**30, 1),
                              "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
                              "count": torch.cuda.device_count()}
    except Exception as exc:
        info["torch_error"] = _short_exc(exc)
        info["cuda_available"] = False
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = None
        info["triton_error"] = _short_exc(exc)
    try:
        import expanse_fast
        import expanse_fast.kernels  # noqa: F401  (mapped from top-level kernels/)
        info["expanse_fast_file"] = expanse_fast.__file__
        info["import_ok"] = True
    except Exception as exc:
        info["import_ok"] = False
        info["import_error"] = _short_exc(exc)
        traceback.print_exc()
    if info.get("import_ok"):
        try:
            import torch
            from expanse_fast.backend_choice import availability
            dev = torch.device("cuda" if info.get("cuda_available") else "cpu")
            # Not "cuda" here: its availability may start the build (the next stage's job).
            info["backends"] = {n: list(availability(n, dev)) for n in ("torch", "triton")}
        except Exception as exc:
            info["backends_error"] = _short_exc(exc)
    _dump(args.out, info)
    print(json.dumps(info, indent=1, default=str))
    return 0


# =========================================================================================
# build
# =========================================================================================
def cmd_build(args) -> int:
    result = {"device": args.device}
    t0 = time.time()
    try:
        import torch
        dev = torch.device(args.device)
        from expanse_fast.backends import cuda as cuda_backend
        result["toolchain"] = _toolchain(cuda_backend)
        if dev.type == "cuda" and hasattr(cuda_backend, "load"):
            try:
                cuda_backend.load()
                result["load"] = "ok"
            except Exception as exc:
                traceback.print_exc()
                result["load"] = _short_exc(exc)
        ok, why = cuda_backend.availability(dev)
        result.update(available=bool(ok), reason=str(why))
        if ok:
            result["linear_math"] = cuda_backend.linear_maths(dev)
            result["sass"] = _sass_summary(cuda_backend)
    except Exception as exc:
        traceback.print_exc()
        result.update(available=False, reason=_short_exc(exc))
    result["seconds"] = round(time.time() - t0, 1)
    print("BUILD_RESULT " + json.dumps(result))
    return 0 if result["available"] else 1


def _toolchain(cuda_backend):
    """What the build at first use compiles with: a failed build's first question."""
    try:
        from torch.utils import cpp_extension
        home = cpp_extension.CUDA_HOME
        return {"cuda_home": home, "nvcc": shutil.which("nvcc"),
                "library_headers_from_wheels": cuda_backend._library_include_dirs(home),
                "ninja": cpp_extension.is_ninja_available()}
    except Exception as exc:  # noqa: BLE001 - a report, never a failure
        return {"error": _short_exc(exc)}


def _extension_path(cuda_backend):
    """The shared library the cuda backend loaded (prebuilt or JIT-built), or None."""
    pre = cuda_backend._prebuilt_path()
    if pre:
        return pre
    from torch.utils import cpp_extension
    d = cpp_extension._get_build_directory(cuda_backend.EXT_NAME, verbose=False)
    path = os.path.join(d, cuda_backend.EXT_NAME + ".so")
    return path if os.path.exists(path) else None


def _sass_summary(cuda_backend):
    """Tensor-core instructions in the built extension's machine code (cuobjdump): HGMMA is
    Hopper's warpgroup MMA, HMMA the older warp-level one."""
    import shutil
    path = _extension_path(cuda_backend)
    tool = shutil.which("cuobjdump")
    if path is None or tool is None:
        return f"not read (library {path}, cuobjdump {tool})"
    try:
        res = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True,
                             timeout=60)
    except Exception as exc:  # noqa: BLE001 - a diagnostic, never the stage's failure
        return f"cuobjdump failed: {_short_exc(exc)}"
    text = res.stdout
    counts = {op: len(re.findall(rf"\b{op}\.", text)) for op in ("HGMMA", "HMMA")}
    archs = sorted(set(re.findall(r"arch = (sm_\w+)", text)))
    return {"archs": archs, **counts, "rc": res.returncode}


# =========================================================================================
# section: the measurements (torch imported only here)
# =========================================================================================
class Ctx:
    """Device, timing and the section's result file."""

    checks = True  # rows are checked against the torch backend's results

    def __init__(self, args, section):
        import torch
        self.torch = torch
        self.section = section
        self.dev = torch.device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.quick = args.quick
        self.dtype = getattr(torch, args.dtype)
        self.deadline = args.deadline
        self.out = args.out
        self.min_reps, self.max_reps = (3, 200)
        self.target_s = 0.25 if self.quick else 0.5  # measured time per implementation
        self.l2 = 60 * 2**20
        if self.cuda:
            self.l2 = getattr(torch.cuda.get_device_properties(self.dev), "L2_cache_size",
                              self.l2) or self.l2
            torch.backends.cudnn.benchmark = True
        self.skip_cuda = os.environ.get("EXPANSE_BENCH_SKIP_CUDA", "")
        self.profile_s = 0.0  # spent in kernel_breakdown
        self.res = {"section": section, "device": args.device, "started": _now_iso(),
                    "quick": self.quick, "dtype": args.dtype, "rows": [], "notes": [],
                    "errors": [], "finished": False}
        if self.cuda:
            self.res["device_name"] = torch.cuda.get_device_name(self.dev)
            self.res["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        self.save()

    # ---- bookkeeping -------------------------------------------------------------------
    def save(self):
        _dump(self.out, self.res)

    def left(self) -> float:
        return self.deadline - time.time()

    def add(self, **row):
        self.res["rows"].append(row)
        self.save()
        ms = row.get("ms")
        flop = row.get("useful_flop") or row.get("executed_flop")
        rate = f"{flop / ms / 1e9:8.1f} TFLOP/s" if (ms and flop) else ""
        msg = f"{ms:10.4f} ms {rate}" if ms else f"-- {row.get('error') or row.get('skipped')}"
        spent = (f"  ({row['wall_s']:.1f} s, warm-up {row['warm_s']:.1f})"
                 if row.get("warm_s") is not None else "")
        print(f"  [{self.section}] {row.get('variant', ''):<22} {row.get('impl', ''):<16} {msg}"
              f"{'  check ' + row['check'] if row.get('check') else ''}{spent}", flush=True)

    def note(self, text):
        self.res["notes"].append(text)
        self.save()
        print(f"  [{self.section}] note: {text}", flush=True)

    def n_sets(self, bytes_per_set: int) -> int:
        """Input sets to rotate among so the working set exceeds twice the L2 cache."""
        want = math.ceil(2 * self.l2 / max(bytes_per_set, 1))
        return int(min(8, max(3, want)))

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.dev)

    # ---- timing --------------------------------------------------------------------------
    def time(self, fns):
        """(median ms, min ms, calls, peak MiB, host ms) of rotating calls of ``fns``; host ms:
        the CPU's time to issue one call (on a GPU: near ms means the host, not the device,
        sets the pace)."""
        torch = self.torch
        k = len(fns)
        t0 = time.perf_counter()
        for f in fns:  # warm-up: compile, autotune, cuDNN search, allocator
            f()
        self.sync()
        self.warm_s = time.perf_counter() - t0  # (the row's warm_s: where a section's time goes)
        t0 = time.perf_counter()
        for f in fns:
            f()
        self.sync()
        est = max((time.perf_counter() - t0) / k, 1e-6)
        budget = max(0.05, min(self.target_s, (self.left() - 5) / 3))
        reps = int(min(self.max_reps, max(self.min_reps, budget / est)))
        times = []
        if self.cuda:
            # host ms: the median issue time of a few calls, each issued into an idle launch
            # queue.  Timed over the event loop below it became the device's time wherever
            # the device was the slower: once the launch queue is full (about a thousand
            # launches), the host waits for the device.
            issue = []
            for r in range(HOST_TIMED_CALLS):
                t = time.perf_counter()
                keep = fns[r % k]()
                issue.append(time.perf_counter() - t)
                self.sync()
                del keep
            host_ms = statistics.median(issue) * 1e3
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
            for r in range(reps):
                ev[r][0].record()
                fns[r % k]()
                ev[r][1].record()
            torch.cuda.synchronize(self.dev)
            times = [a.elapsed_time(b) for a, b in ev]
        else:
            for r in range(reps):
                t = time.perf_counter()
                fns[r % k]()
                times.append((time.perf_counter() - t) * 1e3)
            host_ms = statistics.median(times)
        peak = None
        if self.cuda:
            torch.cuda.synchronize(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
            base = torch.cuda.memory_allocated(self.dev)
            keep = fns[0]()
            torch.cuda.synchronize(self.dev)
            peak = round((torch.cuda.max_memory_allocated(self.dev) - base) / 2**20, 1)
            del keep
        return statistics.median(times), min(times), reps, peak, host_ms

    def graphed(self, fns):
        """Each of ``fns`` captured in a CUDA graph of its own (after warm-up calls on a side
        stream, which also tune the Triton kernels), as callables that replay them: a step
        without the host's launch overhead.  Raises where a call cannot be captured."""
        torch = self.torch
        side = torch.cuda.Stream(self.dev)
        side.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                for f in fns:
                    f()
        torch.cuda.current_stream(self.dev).wait_stream(side)
        graphs = []
        for f in fns:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                f()
            graphs.append(g)
        return [g.replay for g in graphs]

    def measure(self, variant, impl, kind, fns, useful_flop=None, executed_flop=None,
                check=None, min_left=4.0, profile=True, **extra):
        """Time one implementation; never raises (the error is the row).  An expanse
        fwd+bwd row is then profiled too, unless ``profile`` is False."""
        row = dict(variant=variant, impl=impl, kind=kind, useful_flop=useful_flop,
                   executed_flop=executed_flop, **extra)
        if self.left() < min_left:
            row["skipped"] = "out of time"
            self.add(**row)
            return None
        t0 = time.time()
        try:
            ms, ms_min, reps, peak, host_ms = self.time(fns)
            row.update(ms=ms, ms_min=ms_min, calls=reps, sets=len(fns), peak_mib=peak,
                       host_ms=host_ms, warm_s=round(self.warm_s, 2))
            if check:
                row["check"] = check
            if profile and kind == "expanse" and "fwd+bwd" in variant:
                row["kernels"], ops = self.profile_call(fns[0])
                if ops:
                    row["kernel_ops"] = ops
        except Exception as exc:
            traceback.print_exc()
            row["error"] = _short_exc(exc)
        row["wall_s"] = round(time.time() - t0, 2)  # warm-up, timing and profile
        self.add(**row)
        return row.get("ms")

    def kernel_breakdown(self, fn, top=8, min_left=20.0):
        """Where one call of ``fn`` spends its time, longest first: [[name, calls, us]] of the
        device kernels (copies and memsets included) on a GPU, of the aten ops on a CPU: which
        of an expanded op's kernels is slow, and what its layout copies cost.  At most
        PROFILE_BUDGET_S a section.  A string where the profiler fails (never raises)."""
        return self.profile_call(fn, top, min_left)[0]

    def profile_call(self, fn, top=8, min_left=20.0):
        """(``kernel_breakdown``'s answer, the aten ops that launched the most device time:
        [[op, input shapes, calls, device us]], on a GPU only, else None).  A kernel's name
        does not say which copy or fill it was (aten's elementwise kernels serve every one);
        the op and its shapes do."""
        if os.environ.get("EXPANSE_BENCH_PROFILE") == "0":
            why = os.environ.get('EXPANSE_BENCH_PROFILE_WHY', 'disabled')
            return f"not profiled: {why}", None
        if self.left() < min_left or self.profile_s > PROFILE_BUDGET_S:
            return "not profiled: out of time", None
        t0 = time.time()
        try:
            try:
                return self._profiled(fn, top, with_ops=self.cuda)
            except Exception as exc:  # noqa: BLE001
                if not self.cuda:
                    raise
                # (the host ops' side of the session failed: the kernels alone, as before)
                kernels, _ = self._profiled(fn, top, with_ops=False)
                return kernels, f"ops not profiled: {_short_exc(exc)}"
        except Exception as exc:  # noqa: BLE001 - a diagnostic, never the row's failure
            return f"profiler failed: {_short_exc(exc)}", None
        finally:
            self.profile_s += time.time() - t0

    def _profiled(self, fn, top, with_ops):
        """``profile_call``'s session: the device's kernels on a GPU (with ``with_ops`` the
        host's ops and their shapes too), the aten ops on a CPU."""
        from torch.profiler import ProfilerActivity, profile, schedule
        acts = ([ProfilerActivity.CUDA] if self.cuda else []) + (
            [ProfilerActivity.CPU] if with_ops or not self.cuda else [])
        self.sync()
        # One call in the profiler's warm-up, whose records are dropped (a session's first
        # kernel records can carry bad timestamps), one recorded.  CUPTI is torn down after
        # the session (TEARDOWN_CUPTI=1, set by cmd_section), so the rows timed after this
        # one run unprofiled; sec_ceilings checks that.
        recorded, by_shape = [], []

        def keep_averages(p):
            recorded.extend(p.key_averages())
            if with_ops:
                by_shape.extend(p.key_averages(group_by_input_shape=True))
        with profile(activities=acts, record_shapes=with_ops,
                     schedule=schedule(wait=0, warmup=1, active=1, repeat=1),
                     on_trace_ready=keep_averages) as prof:
            for _ in range(2):
                keep = fn()
                self.sync()
                del keep
                prof.step()
        if self.cuda and not with_ops:
            return _profile_rows(recorded, [], top)[0], None
        return _profile_rows(recorded, by_shape if self.cuda else None, top)

    def host_breakdown(self, fn, top=10, min_left=10.0):
        """Where the host's time for one call of ``fn`` goes, from a profiler session of the
        CPU alone (no CUPTI, so no device kernels and no after-effect on later launches):
        {"wall_us", "aten_ops", "aten_self_us", "top": [[name, calls, self us]]}.  On a GPU
        this is what paces an eager step of small layers; ``wall_us`` minus
        ``aten_self_us`` is the Python around the ops.  A string where it cannot run."""
        if os.environ.get("EXPANSE_BENCH_PROFILE") == "0":
            return f"not profiled: {os.environ.get('EXPANSE_BENCH_PROFILE_WHY', 'disabled')}"
        if self.left() < min_left:
            return "not profiled: out of time"
        t0 = time.time()
        try:
            from torch.profiler import ProfilerActivity, profile
            keep = fn()  # warm: nothing first-call about the recorded one
            self.sync()
            del keep
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                keep = fn()
                wall = time.perf_counter() - start  # the host's issue time, not the device's
                self.sync()
                del keep
            events = [e for e in prof.key_averages() if str(e.key).startswith("aten::")]
            rows = sorted(([str(e.key)[:80], int(e.count), round(float(e.self_cpu_time_total), 1)]
                           for e in events), key=lambda r: -r[2])
            return dict(wall_us=round(wall * 1e6, 1), aten_ops=sum(r[1] for r in rows),
                        aten_self_us=round(sum(r[2] for r in rows), 1), top=rows[:top])
        except Exception as exc:  # noqa: BLE001 - a diagnostic, never the row's failure
            return f"profiler failed: {_short_exc(exc)}"
        finally:
            self.profile_s += time.time() - t0

    def record_autotune(self):
        """The tile each Triton autotuner chose, per key it tuned in this section."""
        import importlib
        chosen = {}
        for mod_name in ("expanded_linear", "expanded_linear_tma", "expanded_conv",
                         "expanded_conv_tma"):
            try:
                mod = importlib.import_module(f"expanse_fast.kernels.{mod_name}")
            except Exception:  # noqa: BLE001 - triton missing: nothing was tuned
                continue
            for name, obj in vars(mod).items():
                cache = getattr(obj, "cache", None)
                if isinstance(cache, dict) and cache and hasattr(obj, "configs"):
                    chosen[f"{mod_name}.{name}"] = {str(k): str(v) for k, v in cache.items()}
        if chosen:
            self.res["autotune"] = chosen
            self.save()

    # ---- backends --------------------------------------------------------------------------
    def usable_backends(self, op):
        """[(name, None)] for each usable backend of ``op``, [(name, why)] for the others."""
        from expanse_fast import backend_choice
        out = []
        for name in BACKEND_NAMES:
            if name == "cuda" and self.skip_cuda:
                out.append((name, f"skipped: {self.skip_cuda}"))
                continue
            ok, why = backend_choice.availability(name, self.dev)
            if ok and name != "torch":
                fn = getattr(backend_choice.backend_module(name), op + "_forward", None)
                if fn is None:
                    ok, why = False, f"backend has no {op}_forward"
                elif fn is getattr(backend_choice.backend_module("torch"), op + "_forward"):
                    ok, why = False, f"its {op} is the torch backend's (not timed twice)"
            out.append((name, None if ok else str(why)))
        return out

    def backend(self, name):
        """Run under backend ``name``: ``use_backend`` and, for any backward that resolves
        "auto" (a layer pinned to it), the ``EXPANSE_FAST_AUTO_<OP>`` variables.  A name
        "fwd+bwd" (say "triton+torch") runs "auto" steered per direction instead
        (``EXPANSE_FAST_AUTO_<OP>_FORWARD`` / ``_BACKWARD``); a suffix "/dx:<backend>" (say
        "auto/dx:triton") takes the input gradient from that backend
        (``EXPANSE_FAST_AUTO_CONV2D_DX``: the conv's)."""
        import contextlib
        import expanse_fast as xf

        name, _, dx = name.partition("/dx:")
        fwd, _, bwd = name.partition("+")
        values = {}
        for op in ("LINEAR", "CONV2D"):
            key = "EXPANSE_FAST_AUTO_" + op
            values.update({key: None if bwd or name == "auto" else name,
                           key + "_FORWARD": fwd if bwd else None,
                           key + "_BACKWARD": bwd or None})
        values["EXPANSE_FAST_AUTO_CONV2D_DX"] = dx or None  # (the conv's only)

        @contextlib.contextmanager
        def scope():
            saved = {k: os.environ.get(k) for k in values}
            for k, v in values.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            try:
                with xf.use_backend("auto" if bwd else name):
                    yield
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return scope()


class CompileOnlyCtx(Ctx):
    """A section run that only builds what the timed run of that section will launch (the
    prewarm, ``bench_gpu.py prewarm``): each expanse row's call runs once with every
    autotuned Triton launch compiling the configs its autotuner would try (compile_only.py),
    into the Triton cache the timed run then reads.  Nothing is timed, checked or profiled;
    the peers (no Triton) and the cuda backend (the build stage's) are left out, and a row
    records the seconds its call took."""

    checks = False  # no torch reference to compute: nothing is compared

    def measure(self, variant, impl, kind, fns, *args, **kwargs):
        if kind != "expanse" or self.left() < 2:
            return None
        t0 = time.time()
        row = dict(variant=variant, impl=impl, kind=kind)
        try:
            keep = fns[0]()
            self.sync()
            del keep
        except Exception as exc:  # noqa: BLE001 - the timed run will say it properly
            row["error"] = _short_exc(exc)
        row["wall_s"] = round(time.time() - t0, 2)
        self.res["rows"].append(row)
        self.save()
        return None

    def graphed(self, fns):
        return fns  # a capture would launch the same kernels: nothing more to compile

    def profile_call(self, fn, top=8, min_left=20.0):
        return "not profiled: compile only", None

    def host_breakdown(self, fn, top=10, min_left=10.0):
        return "not profiled: compile only"


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
            fns = [lambda a=a, b=b: torch.mm(a, b, out=c) for a, b in sets]
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
        fns = [lambda s=s: dst.copy_(s) for s in srcs]
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


# ---- (b) expanded linear -----------------------------------------------------------------
def sec_linear(ctx):
    torch = ctx.torch
    from torch import nn
    import expanse_fast as xf
    n_rows, i0, new = (64, 48, 12) if ctx.quick else (16384, 4096, 1024)
    dt, dev = ctx.dtype, ctx.dev
    width = i0 + new
    base = nn.Linear(i0, i0, device=dev, dtype=dt)
    layer = xf.ExpandedLinear.from_linear(base, new, new)
    layer.skip_old_input_grad = True  # as inside a model built by xf.expand()
    lay = layer.layout
    f_fwd = 2 * n_rows * lay.forward_macs()
    f_fb = f_fwd + 2 * n_rows * lay.backward_macs(need_input_grad=True, need_old_input_grad=False)
    ctx.res["config"] = dict(rows=n_rows, in_groups=lay.in_groups, out_groups=lay.out_groups,
                             dtype=str(dt), skip_old_input_grad=True,
                             useful_gflop_fwd=f_fwd / 1e9, useful_gflop_fwdbwd=f_fb / 1e9)
    k = ctx.n_sets(2 * n_rows * width * dt.itemsize)
    xs = [torch.randn(n_rows, width, device=dev, dtype=dt).requires_grad_() for _ in range(k)]
    dys = [torch.randn(n_rows, width, device=dev, dtype=dt) for _ in range(k)]
    params = [layer.weight_new, layer.bias_new]

    def exp_fb(i):
        y = layer(xs[i])
        return torch.autograd.grad(y, [xs[i]] + params, dys[i])

    def exp_f(i):
        with torch.no_grad():
            return layer(xs[i])

    # The torch backend first, then the peers (cuBLAS, quick), then the compiled backends,
    # whose first calls (compiling, autotuning) may use up the section's time.
    ref = _reference(ctx, exp_f, exp_fb, "linear")
    backends = ctx.usable_backends("linear")
    _measure_backends(ctx, backends[:1], exp_f, exp_fb, k, "fwd", "fwd+bwd", f_fwd, f_fb, ref)

    # (i) full-width dense Linear holding the staircase weights, frozen rows' grads masked.
    masked = nn.Linear(width, width, device=dev, dtype=dt)
    with torch.no_grad():
        masked.weight.copy_(layer.dense_weight())
        masked.bias.copy_(layer.dense_bias())
    row_mask = torch.zeros(width, device=dev, dtype=dt)
    row_mask[lay.frozen_out:] = 1
    masked.weight.register_hook(lambda g: g * row_mask[:, None])
    masked.bias.register_hook(lambda g: g * row_mask)
    mparams = [masked.weight, masked.bias]

    def masked_fb(i):
        return torch.autograd.grad(masked(xs[i]), [xs[i]] + mparams, dys[i])

    def masked_f(i):
        with torch.no_grad():
            return masked(xs[i])

    mac = width * width
    ctx.measure("fwd+bwd", "peer/masked", "peer", [lambda i=i: masked_fb(i) for i in range(k)],
                f_fb, 3 * 2 * n_rows * mac)
    ctx.measure("fwd", "peer/masked", "peer", [lambda i=i: masked_f(i) for i in range(k)],
                f_fwd, 2 * n_rows * mac)
    del masked_f  # (masked_fb holds the layer for the host profile at the end)

    # (ii) Progressive-Nets style: frozen old module (no grad) + new module, joined by cat.
    old = nn.Linear(i0, i0, device=dev, dtype=dt).requires_grad_(False)
    newm = nn.Linear(width, new, device=dev, dtype=dt)
    nparams = list(newm.parameters())

    def cat_fwd(x):
        with torch.no_grad():
            y0 = old(x[:, :i0])
        return torch.cat([y0, newm(x)], dim=1)

    def cat_fb(i):
        return torch.autograd.grad(cat_fwd(xs[i]), [xs[i]] + nparams, dys[i])

    def cat_f(i):
        with torch.no_grad():
            return cat_fwd(xs[i])

    cat_fwd_macs = i0 * i0 + new * width
    ctx.measure("fwd+bwd", "peer/cat", "peer", [lambda i=i: cat_fb(i) for i in range(k)],
                f_fb, 2 * n_rows * (cat_fwd_macs + 2 * new * width))
    ctx.measure("fwd", "peer/cat", "peer", [lambda i=i: cat_f(i) for i in range(k)],
                f_fwd, 2 * n_rows * cat_fwd_macs)
    del old, newm, nparams

    # (iii) fine-tuning the original, un-widened layer (its dx too).
    ft = nn.Linear(i0, i0, device=dev, dtype=dt)
    fparams = list(ft.parameters())
    x0s = [x.detach()[:, :i0].contiguous().requires_grad_() for x in xs]
    dy0s = [d[:, :i0].contiguous() for d in dys]

    def ft_fb(i):
        return torch.autograd.grad(ft(x0s[i]), [x0s[i]] + fparams, dy0s[i])

    def ft_f(i):
        with torch.no_grad():
            return ft(x0s[i])

    ctx.measure("fwd+bwd", "peer/finetune", "peer", [lambda i=i: ft_fb(i) for i in range(k)],
                f_fb, 3 * 2 * n_rows * i0 * i0)
    ctx.measure("fwd", "peer/finetune", "peer", [lambda i=i: ft_f(i) for i in range(k)],
                f_fwd, 2 * n_rows * i0 * i0)
    del ft, fparams, x0s, dy0s
    _measure_after_torch(ctx, backends, exp_f, exp_fb, k, "fwd", "fwd+bwd", f_fwd, f_fb, ref,
                         triton_variant=_measure_triton_without_tma, mixed=True, swizzle=True)
    # last, after every timed row: where the host's time for one call goes
    _expanse_host_profiles(ctx, backends, "fwd+bwd", exp_fb)
    _host_profiles(ctx, "fwd+bwd", [("peer/masked", lambda: masked_fb(0))])


def _measure_after_torch(ctx, backends, exp_f, exp_fb, k, v_f, v_fb, f_fwd, f_fb, ref,
                         triton_variant=None, mixed=False, dx_split=False, swizzle=False,
                         auto_variant=None):
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
    if swizzle:  # (the linear kernels' experiment: timed by default)
        _measure_cuda_swizzled(ctx, backends, exp_f, exp_fb, k, f_fwd, f_fb, ref, v_f, v_fb)
    if variants:
        _measure_cuda_without_wgmma(ctx, backends, exp_f, exp_fb, k, f_fwd, f_fb, ref, v_f,
                                    v_fb)


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


@contextlib.contextmanager
def _environment(name: str, value: str):
    """``name=value`` in os.environ within the block (the extension's launchers read their
    switches at every call), as it was after."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


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


# ---- (c) expanded conv2d -----------------------------------------------------------------
def sec_conv(ctx):
    torch = ctx.torch
    from torch import nn
    import expanse_fast as xf
    batch, hw, c0, new = (2, 8, 16, 4) if ctx.quick else (64, 56, 256, 64)
    dt, dev = ctx.dtype, ctx.dev
    width = c0 + new
    base = nn.Conv2d(c0, c0, 3, padding=1, device=dev, dtype=dt)
    pix = batch * hw * hw * 9  # output pixels times kernel area
    layer0 = xf.ExpandedConv2d.from_conv(base, new, new)
    lay = layer0.layout
    f_fwd = 2 * pix * lay.forward_macs()
    f_fb = f_fwd + 2 * pix * lay.backward_macs(need_input_grad=True, need_old_input_grad=False)
    ctx.res["config"] = dict(batch=batch, hw=hw, kernel=3, in_groups=lay.in_groups,
                             out_groups=lay.out_groups, dtype=str(dt),
                             skip_old_input_grad=True, useful_gflop_fwd=f_fwd / 1e9,
                             useful_gflop_fwdbwd=f_fb / 1e9)
    k = ctx.n_sets(2 * batch * width * hw * hw * dt.itemsize)
    backends = ctx.usable_backends("conv2d")
    for fmt_name, fmt in (("channels_last", torch.channels_last),
                          ("nchw", torch.contiguous_format)):
        if ctx.left() < 8:
            ctx.note(f"conv {fmt_name}: skipped, out of time")
            continue
        v_fb, v_f = f"{fmt_name} fwd+bwd", f"{fmt_name} fwd"

        def prep(m):
            return m.to(memory_format=fmt)

        layer = prep(xf.ExpandedConv2d.from_conv(base, new, new))
        layer.skip_old_input_grad = True
        with torch.no_grad():
            layer.weight_new.copy_(layer0.weight_new)
        xs = [torch.randn(batch, width, hw, hw, device=dev, dtype=dt)
              .contiguous(memory_format=fmt).requires_grad_() for _ in range(k)]
        dys = [torch.randn(batch, width, hw, hw, device=dev, dtype=dt)
               .contiguous(memory_format=fmt) for _ in range(k)]
        params = [layer.weight_new, layer.bias_new]

        def exp_fb(i, layer=layer, xs=xs, dys=dys, params=params):
            return torch.autograd.grad(layer(xs[i]), [xs[i]] + params, dys[i])

        def exp_f(i, layer=layer, xs=xs):
            with torch.no_grad():
                return layer(xs[i])

        ref = _reference(ctx, exp_f, exp_fb, fmt_name)
        _measure_backends(ctx, backends[:1], exp_f, exp_fb, k, v_f, v_fb, f_fwd, f_fb, ref)

        # (i) masked full-width conv (cuDNN), frozen output channels' grads zeroed.
        masked = prep(nn.Conv2d(width, width, 3, padding=1, device=dev, dtype=dt))
        with torch.no_grad():
            masked.weight.copy_(layer.dense_weight())
            masked.bias.copy_(layer.dense_bias())
        mask = torch.zeros(width, device=dev, dtype=dt)
        mask[lay.frozen_out:] = 1
        masked.weight.register_hook(lambda g, m=mask: g * m[:, None, None, None])
        masked.bias.register_hook(lambda g, m=mask: g * m)
        mp = [masked.weight, masked.bias]
        mac = width * width
        ctx.measure(v_fb, "peer/masked", "peer",
                    [lambda i=i: torch.autograd.grad(masked(xs[i]), [xs[i]] + mp, dys[i])
                     for i in range(k)], f_fb, 3 * 2 * pix * mac)
        with torch.no_grad():
            ctx.measure(v_f, "peer/masked", "peer", [lambda i=i: masked(xs[i]) for i in range(k)],
                        f_fwd, 2 * pix * mac)

        def masked_fb(masked=masked, mp=mp, xs=xs, dys=dys):  # for the host profile below
            return torch.autograd.grad(masked(xs[0]), [xs[0]] + mp, dys[0])
        del masked, mp

        # (ii) split convolutions joined with torch.cat.
        old = prep(nn.Conv2d(c0, c0, 3, padding=1, device=dev, dtype=dt)).requires_grad_(False)
        newc = prep(nn.Conv2d(width, new, 3, padding=1, device=dev, dtype=dt))
        npar = list(newc.parameters())

        def cat_fwd(x, old=old, newc=newc):
            with torch.no_grad():
                y0 = old(x[:, :c0])
            return torch.cat([y0, newc(x)], dim=1)

        cat_macs = c0 * c0 + new * width
        ctx.measure(v_fb, "peer/cat", "peer",
                    [lambda i=i: torch.autograd.grad(cat_fwd(xs[i]), [xs[i]] + npar, dys[i])
                     for i in range(k)], f_fb, 2 * pix * (cat_macs + 2 * new * width))
        with torch.no_grad():
            ctx.measure(v_f, "peer/cat", "peer", [lambda i=i: cat_fwd(xs[i]) for i in range(k)],
                        f_fwd, 2 * pix * cat_macs)
        del old, newc, npar

        # (iii) fine-tuning the original conv (its dx too).
        ft = prep(nn.Conv2d(c0, c0, 3, padding=1, device=dev, dtype=dt))
        fpar = list(ft.parameters())
        x0s = [x.detach()[:, :c0].contiguous(memory_format=fmt).requires_grad_() for x in xs]
        dy0s = [d[:, :c0].contiguous(memory_format=fmt) for d in dys]
        ctx.measure(v_fb, "peer/finetune", "peer",
                    [lambda i=i: torch.autograd.grad(ft(x0s[i]), [x0s[i]] + fpar, dy0s[i])
                     for i in range(k)], f_fb, 3 * 2 * pix * c0 * c0)
        with torch.no_grad():
            ctx.measure(v_f, "peer/finetune", "peer", [lambda i=i: ft(x0s[i]) for i in range(k)],
                        f_fwd, 2 * pix * c0 * c0)
        del ft, fpar, x0s, dy0s
        _measure_after_torch(ctx, backends, exp_f, exp_fb, k, v_f, v_fb, f_fwd, f_fb, ref,
                             triton_variant=(_measure_triton_nchw_direct
                                             if fmt_name == "nchw"
                                             else _measure_triton_conv_without_tma),
                             dx_split=True, auto_variant=(_measure_auto_y_transposed
                                                          if fmt_name == "nchw" else None))
        # last, after every timed row: where the host's time for one call goes
        _expanse_host_profiles(ctx, backends, v_fb, exp_fb)
        _host_profiles(ctx, v_fb, [("peer/masked", masked_fb)])
        del ref, layer, xs, dys, masked_fb
        if ctx.cuda:
            torch.cuda.empty_cache()


# ---- (d) MLP training step ---------------------------------------------------------------
def sec_mlp(ctx):
    torch = ctx.torch
    from torch import nn
    import torch.nn.functional as F
    import expanse_fast as xf
    rows, hidden, classes = (32, 32, 10) if ctx.quick else (4096, 1024, 10)
    dev = ctx.dev
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
        variant = f"train step {dname}"
        if ctx.left() < 6:
            ctx.note(f"mlp {dname}: skipped, out of time")
            continue
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
        if dt == dtypes[0]:  # last: after every timed row of the section's first dtype
            with ctx.backend("torch"):
                _host_profiles(ctx, variant, [("expanse/torch", lambda: step(big, opt, 0))])
            _host_profiles(ctx, variant, [("peer/finetune", lambda: step(ft, fopt, 0))])
        del big, masked, ft, opt, mopt, fopt, xs, ys
        if ctx.cuda:
            torch.cuda.empty_cache()


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


def _section_command(args, sec, out, deadline, compile_only=False):
    cmd = [sys.executable, os.path.abspath(__file__), "section", sec, "--device", args.device,
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


# =========================================================================================
# report (no torch)
# =========================================================================================
def _stages(work):
    rows = []
    try:
        with open(os.path.join(work, "stages.tsv")) as f:
            for line in f:
                p = line.rstrip("\n").split("\t")
                if len(p) >= 4:
                    rows.append({"stage": p[0], "rc": int(p[1]) if p[1].lstrip("-").isdigit()
                                 else p[1], "seconds": int(p[2]), "timeout_s": int(p[3]),
                                 "timed_out": p[1] in ("124", "137")})
    except FileNotFoundError:
        pass
    return rows


def _tail(path, n=25):
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-n:]
    except Exception:
        return []


# The test stages of run.sh: (stage name, junit file), the CUDA extension's tests first.
TEST_STAGES = (("tests_cuda", "junit_cuda.xml"), ("tests", "junit.xml"))


def _tests(work, out):
    """The GPU test stages' summaries and failures, and their junit counts summed."""
    import re
    import xml.etree.ElementTree as ET
    res = {"failed_tests": []}
    pat = re.compile(r"\d+ (passed|failed|skipped|error|errors|deselected|xfailed|xpassed)"
                     r"|no tests ran")
    summaries, counts, unreadable = [], {}, []
    for stage, junit in TEST_STAGES:
        lines = _tail(os.path.join(work, f"{stage}.log"), 400)
        summary = [ln for ln in lines if pat.search(ln)]
        if summary:
            summaries.append(f"{stage}: {summary[-1].strip('= ').strip()}")
        res["failed_tests"] += [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
        try:
            root = ET.parse(os.path.join(out, junit)).getroot()
        except Exception as exc:
            unreadable.append(f"{junit}: {_short_exc(exc)}")
            continue
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] = counts.get(key, 0) + sum(int(s.get(key, 0)) for s in suites)
        counts["time_s"] = round(counts.get("time_s", 0)
                                 + sum(float(s.get("time", 0)) for s in suites), 1)
    if summaries:
        res["summary"] = "; ".join(summaries)
    res["failed_tests"] = res["failed_tests"][:30]
    res.update(counts)
    if unreadable:
        res["junit"] = "unreadable: " + "; ".join(unreadable)
    return res


def _build(work):
    for ln in reversed(_tail(os.path.join(work, "build.log"), 400)):
        if ln.startswith("BUILD_RESULT "):
            try:
                return json.loads(ln[len("BUILD_RESULT "):])
            except Exception:
                break
    if not os.path.exists(os.path.join(work, "build.log")):
        return {"available": False, "reason": os.environ.get("EXPANSE_BENCH_SKIP_CUDA")
                or "the build stage did not run"}
    return {"available": False, "reason": "no BUILD_RESULT line (see log)",
            "log_tail": _tail(os.path.join(work, "build.log"), 15)}


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def _finish_rows(sections):
    """Add TFLOP/s, % of the cuBLAS rate, ideal rows and speed-ups vs each peer."""
    ceil = {}
    for r in sections.get("ceilings", {}).get("rows", []):
        if r.get("ms") and r.get("executed_flop"):
            ceil[r.get("dtype")] = r["executed_flop"] / r["ms"] / 1e9
        if r.get("ms") and r.get("bytes_moved"):
            r["gb_per_s"] = r["bytes_moved"] / r["ms"] / 1e6
    for sec, res in sections.items():
        rows = res.get("rows", [])
        sec_dtype = str(res.get("dtype", "bfloat16"))
        for r in rows:
            flop = r.get("useful_flop") if r.get("kind") == "expanse" else r.get("executed_flop")
            if r.get("ms") and flop:
                r["tflops"] = flop / r["ms"] / 1e9
                d = r.get("dtype") or ("float32" if "float32" in r.get("variant", "")
                                       else sec_dtype)
                if d in ceil and sec != "ceilings":
                    r["pct_cublas"] = 100.0 * r["tflops"] / ceil[d]
        extra = []
        for variant in dict.fromkeys(r.get("variant") for r in rows):
            group = [r for r in rows if r.get("variant") == variant]
            peer_ms = {key: next((r["ms"] for r in group if r.get("impl") == impl and r.get("ms")),
                                 None) for key, impl in PEERS}
            exp = [r for r in group if r.get("kind") == "expanse"]
            useful = next((r.get("useful_flop") for r in group if r.get("useful_flop")), None)
            d = "float32" if "float32" in str(variant) else sec_dtype
            if exp and useful and d in ceil:
                ideal = dict(variant=variant, impl="ideal@cuBLAS", kind="ideal",
                             ms=useful / ceil[d] / 1e9, useful_flop=useful)
                extra.append(ideal)
                exp = exp + [ideal]
            for r in exp:
                if r.get("ms"):
                    r["speedup"] = {key: (pm / r["ms"] if pm else None)
                                    for key, pm in peer_ms.items()}
        res["rows"] = rows + extra
    return ceil


def _table(sections):
    lines = []
    for sec in SECTIONS:
        res = sections.get(sec)
        if not res:
            continue
        cfg = res.get("config")
        lines.append(f"\n### {sec}")
        if cfg:
            lines.append(f"config: {json.dumps(cfg, default=str)}\n")
        if sec == "ceilings":
            lines.append("| what | impl | ms | TFLOP/s | GB/s |")
            lines.append("|---|---|---:|---:|---:|")
            for r in res.get("rows", []):
                lines.append(f"| {r.get('variant')} | {r.get('impl')} | {_fmt(r.get('ms'), '.4f')}"
                             f" | {_fmt(r.get('tflops'), '.1f')} | {_fmt(r.get('gb_per_s'), '.0f')}"
                             f" |" + (f" {r.get('error') or r.get('skipped')}" if not r.get('ms')
                                     else ""))
        else:
            lines.append("| variant | impl | ms | host ms | TFLOP/s | % cuBLAS | peak MiB "
                         "| x masked | x cat | x finetune | check / note |")
            lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
            order = {"expanse": 0, "ideal": 1, "peer": 2}
            variants = list(dict.fromkeys(r.get("variant") for r in res.get("rows", [])))
            for v in variants:
                group = sorted((r for r in res["rows"] if r.get("variant") == v),
                               key=lambda r: order.get(r.get("kind"), 3))
                for r in group:
                    sp = r.get("speedup") or {}
                    note = r.get("check") or r.get("error") or r.get("skipped") or ""
                    lines.append(
                        f"| {v} | {r.get('impl')} | {_fmt(r.get('ms'), '.4f')} | "
                        f"{_fmt(r.get('host_ms'), '.4f')} | "
                        f"{_fmt(r.get('tflops'), '.1f')} | {_fmt(r.get('pct_cublas'), '.0f')} | "
                        f"{_fmt(r.get('peak_mib'), '.0f')} | {_fmt(sp.get('masked'), '.2f')} | "
                        f"{_fmt(sp.get('cat'), '.2f')} | {_fmt(sp.get('finetune'), '.2f')} | "
                        f"{str(note)[:90]} |")
        for e in res.get("errors", []) + [f"note: {n}" for n in res.get("notes", [])]:
            lines.append(f"- {sec}: {e}")
        lines += _breakdown_lines(res)
    return lines


# The issues' H200 targets (bf16 fwd+bwd at the sections' sizes): section, what is compared,
# the row field or peer it reads, and the least value that meets the target.
TARGETS = (("linear", "% of the cuBLAS rate (useful FLOPs)", "pct_cublas", 85.0),
           ("linear", "x masked full-width layer", "masked", 2.4),
           ("linear", "x separate modules + torch.cat", "cat", 1.3),
           ("conv", "x masked full-width conv (cuDNN)", "masked", 2.0),
           ("conv", "x split convolutions + torch.cat", "cat", 1.2))


def _checked(row) -> bool:
    """Whether a row may stand for a target: not one whose results failed their check
    against the torch backend (a fast wrong kernel meets nothing); unchecked rows (the
    torch backend itself, the reference) may."""
    check = row.get("check")
    return check is None or str(check).startswith("ok")


def _targets(sections):
    """Per target and fwd+bwd variant: the best expanse row, its value, whether it meets the
    target, and the value of the ideal@cuBLAS row (the useful FLOPs at the measured cuBLAS
    rate: what a perfect kernel would give); then issue 6's cuda against triton.  Rows with
    no measurement say so."""
    out = []
    for sec, what, key, need in TARGETS:
        rows = (sections.get(sec) or {}).get("rows", [])
        # (the ideal row has no % of cuBLAS: its limit column stays empty there)
        value = (lambda r: r.get(key)) if key == "pct_cublas" else \
            (lambda r: (r.get("speedup") or {}).get(key))
        for variant in dict.fromkeys(r.get("variant") for r in rows):
            if not str(variant).endswith("fwd+bwd"):
                continue
            group = [r for r in rows if r.get("variant") == variant]
            got = [(value(r), r["impl"]) for r in group
                   if r.get("kind") == "expanse" and value(r) is not None and _checked(r)]
            ideal = next((value(r) for r in group if r.get("kind") == "ideal"), None)
            best = max(got) if got else (None, None)
            out.append(dict(section=sec, variant=variant, what=what, need=need,
                            best=best[0], impl=best[1], limit=ideal,
                            met=None if best[0] is None else best[0] >= need))
    rows = (sections.get("linear") or {}).get("rows", [])
    ms = {r.get("impl"): r.get("ms") for r in rows
          if r.get("variant") == "fwd+bwd" and _checked(r)}
    if ms.get("expanse/cuda") and ms.get("expanse/triton"):
        ratio = ms["expanse/triton"] / ms["expanse/cuda"]
        out.append(dict(section="linear", variant="fwd+bwd", what="x triton (cuda backend)",
                        need=1.0, best=ratio, impl="expanse/cuda", limit=None,
                        met=ratio >= 1.0))
    if ms.get("expanse/cuda-sw128") and ms.get("expanse/triton"):  # (the opt-in swizzle)
        ratio = ms["expanse/triton"] / ms["expanse/cuda-sw128"]
        out.append(dict(section="linear", variant="fwd+bwd",
                        what="x triton (cuda backend, swizzled tiles)", need=1.0, best=ratio,
                        impl="expanse/cuda-sw128", limit=None, met=ratio >= 1.0))
    return out


def _target_lines(targets):
    if not targets:
        return []
    lines = ["\n### targets\n", "| section | variant | target | needs | best | by | "
             "ideal@cuBLAS | met |", "|---|---|---|---:|---:|---|---:|---|"]
    for t in targets:
        met = "no measurement" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(f"| {t['section']} | {t['variant']} | {t['what']} | {t['need']:g} | "
                     f"{_fmt(t['best'], '.2f')} | {t['impl'] or ''} | "
                     f"{_fmt(t['limit'], '.2f')} | {met} |")
    return lines


def _breakdown_lines(res):
    """Each profiled row's kernels (one fwd+bwd call), then the autotuners' choices."""
    lines = []
    for r in res.get("rows", []):
        k = r.get("kernels")
        if not k:
            continue
        if not lines:
            lines.append("\nkernels of one fwd+bwd call (us, longest first):\n")
        body = k if isinstance(k, str) else "; ".join(
            f"{kernel_label(name)} {'x' + str(n) + ' ' if n > 1 else ''}{us:.0f}"
            for name, n, us in k)
        lines.append(f"- {r.get('variant')} {r.get('impl')}: {body}")
        ops = r.get("kernel_ops")
        if ops:
            lines.append("  - by the aten op that launched them: " + (ops if isinstance(
                ops, str) else "; ".join(
                f"{op.replace('aten::', '')} [{shapes}] {'x' + str(n) + ' ' if n > 1 else ''}"
                f"{us:.0f}" for op, shapes, n, us in ops)))
    hosts = [r for r in res.get("rows", []) if r.get("host_ops")]
    if hosts:
        lines.append("\nhost ops of one eager call or step (CPU-only profiler session, which "
                     "adds its own cost per op; us, longest first):\n")
    for r in hosts:
        h = r["host_ops"]
        if isinstance(h, str):
            lines.append(f"- {r.get('variant')} {r.get('impl')}: {h}")
            continue
        top = "; ".join(f"{name.replace('aten::', '')[:40]} x{n} {us:.0f}"
                        for name, n, us in h.get("top", []))
        lines.append(f"- {r.get('variant')} {r.get('impl')}: wall {h.get('wall_us', 0):.0f} us, "
                     f"{h.get('aten_ops')} aten ops, {h.get('aten_self_us', 0):.0f} us in them: "
                     f"{top}")
    for kernel, keys in (res.get("autotune") or {}).items():
        for key, cfg in keys.items():
            lines.append(f"- autotune {kernel} {key[:80]}: {cfg}")
    return lines


def _safe_targets(sections, env):
    try:
        return _targets(sections)
    except Exception as exc:  # the report never fails on a derived number
        traceback.print_exc()
        env.setdefault("report_errors", []).append(f"targets: {_short_exc(exc)}")
        return []


def _time_lines(prewarm, sections):
    """Where the run's time went: what the prewarm compiled; per timed section its seconds,
    those of its rows (their warm-ups: compiles, tuning, cuDNN's search), of its profiler
    sessions, and the Triton cache entries it still added (kernels the prewarm missed)."""
    lines = []
    if prewarm:
        per = ", ".join(f"{sec} {v.get('configs')} exit {v.get('exit')} at {v.get('seconds')} s"
                        for sec, v in prewarm.items() if isinstance(v, dict))
        lines.append(f"Prewarm: {prewarm.get('triton_cache_new')} new Triton cache entries "
                     f"({per})")
    for sec, res in sections.items():
        rows = res.get("rows", [])
        if res.get("seconds") is None:
            continue
        lines.append(
            f"- {sec}: {res['seconds']} s, rows {sum(r.get('wall_s') or 0 for r in rows):.0f} s "
            f"(warm-ups {sum(r.get('warm_s') or 0 for r in rows):.0f} s), profiles "
            f"{res.get('profile_s', 0)} s, {res.get('triton_cache_new', '?')} new Triton "
            f"cache entries")
    return (["", "Time:"] + lines) if lines else []


def cmd_report(args) -> int:
    work, out = args.work, args.out
    os.makedirs(out, exist_ok=True)
    env = _load(os.path.join(work, "env.json")) or {}
    sections = {}
    for sec in SECTIONS:
        res = _load(os.path.join(work, f"bench_{sec}.json"))
        if res is not None:
            sections[sec] = res
    ceil = {}
    try:
        ceil = _finish_rows(sections)
    except Exception as exc:
        traceback.print_exc()
        env.setdefault("report_errors", []).append(f"derived numbers: {_short_exc(exc)}")
    device = (env.get("device") or {}).get("name") or next(
        (s.get("device_name") for s in sections.values() if s.get("device_name")), "no GPU")
    result = {
        "device": device, "date": env.get("date") or _now_iso(),
        "git_commit": env.get("git_commit") or _git_commit(),
        "source_sha256_16": env.get("source_sha256_16"),
        "versions": {k: env.get(k) for k in ("python", "torch", "torch_cuda", "cudnn", "triton")},
        "environment": env, "stages": _stages(work), "build": _build(work),
        "tests": _tests(work, out), "prewarm": _load(os.path.join(work, "prewarm.json")),
        "cublas_tflops": ceil, "bench": sections,
        "targets": _safe_targets(sections, env),
        "useful_flops": "expanse rows: 2*N*(Layout.forward_macs() + Layout.backward_macs("
                        "need_input_grad, need_old_input_grad=False)); peers: FLOPs executed",
    }
    _dump(os.path.join(out, "results.json"), result)

    v = result["versions"]
    head = [f"# expanse_fast GPU run: {device}",
            f"date {result['date']}, commit {result['git_commit']}, source "
            f"{result['source_sha256_16']}, python {v.get('python')}, torch {v.get('torch')} "
            f"(CUDA {v.get('torch_cuda')}, cuDNN {v.get('cudnn')}), triton {v.get('triton')}",
            "", "| stage | rc | s | timeout s |", "|---|---:|---:|---:|"]
    for s in result["stages"]:
        head.append(f"| {s['stage']} | {s['rc']}{' (timed out)' if s['timed_out'] else ''} | "
                    f"{s['seconds']} | {s['timeout_s']} |")
    b, t = result["build"], result["tests"]
    head.append(f"\nCUDA extension: available={b.get('available')} ({b.get('reason')}"
                f"{', ' + str(b.get('seconds')) + ' s' if b.get('seconds') is not None else ''})")
    if b.get("toolchain"):
        head.append(f"CUDA toolchain: {json.dumps(b['toolchain'])}")
    if b.get("linear_math") or b.get("sass"):
        head.append(f"CUDA linear tile math: {b.get('linear_math')}; SASS: {b.get('sass')}")
    head.append(f"GPU tests: {t.get('summary', 'no summary')} (junit: tests={t.get('tests')} "
                f"failures={t.get('failures')} errors={t.get('errors')} "
                f"skipped={t.get('skipped')})")
    for ln in t.get("failed_tests", [])[:10]:
        head.append(f"- {ln[:160]}")
    head += _time_lines(result["prewarm"], sections)
    head.append("\nTFLOP/s: expanse rows count useful FLOPs only; peers count what they execute. "
                "x peer = peer ms / this ms (>1: faster). ideal@cuBLAS = useful FLOPs at the "
                "measured cuBLAS rate.")
    text = "\n".join(head + _target_lines(result["targets"]) + _table(sections)) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text, flush=True)
    return 0


# =========================================================================================
# pytest plugin (``-p bench_gpu``): past EXPANSE_TESTS_DEADLINE (epoch seconds) the remaining
# tests are skipped, so pytest still ends by itself and writes its junit file before the
# stage's hard timeout would kill it.  A test marked ``gpu_seconds(s)`` (a long one) is
# skipped already when fewer than s seconds are left before the deadline.  Each failure is
# also appended to EXPANSE_TESTS_FAILURES at once (junit is written only at the end, and
# not at all if the stage is killed), each pass to EXPANSE_TESTS_PASSED; with
# EXPANSE_TESTS_SKIP_PASSED=1 the tests that file names are deselected (a second call of the
# GPU run goes on where the first one's deadline stopped).
# =========================================================================================
def _hookimpl(**opts):
    try:
        import pytest
    except ImportError:  # the orchestrator imports this module without pytest
        return lambda fn: fn
    return pytest.hookimpl(**opts)


_PYTEST_CONFIG = {}


def pytest_configure(config):
    _PYTEST_CONFIG["config"] = config


def pytest_runtest_logreport(report):
    config = _PYTEST_CONFIG.get("config")
    if hasattr(config, "workerinput"):
        return  # (under xdist the controller writes what the workers report)
    path = os.environ.get("EXPANSE_TESTS_FAILURES")
    if path and report.failed:
        text = str(report.longrepr or "")
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{text[-3000:]}\n\n")
    passed = os.environ.get("EXPANSE_TESTS_PASSED")
    if passed and report.passed and report.when == "call":
        with open(passed, "a") as f:
            f.write(report.nodeid + "\n")


def _passed_before() -> set:
    """The tests EXPANSE_TESTS_PASSED names, where EXPANSE_TESTS_SKIP_PASSED=1 asks."""
    path = os.environ.get("EXPANSE_TESTS_PASSED")
    if os.environ.get("EXPANSE_TESTS_SKIP_PASSED") != "1" or not path:
        return set()
    try:
        with open(path) as f:
            return {line.strip() for line in f if line.strip()}
    except FileNotFoundError:
        return set()


@_hookimpl(tryfirst=True)  # before the test's fixtures are set up: a skip costs nothing
def pytest_runtest_setup(item):
    deadline = float(os.environ.get("EXPANSE_TESTS_DEADLINE") or 0)
    if not deadline:
        return
    mark = item.get_closest_marker("gpu_seconds")
    need = float(mark.args[0]) if mark is not None and mark.args else 0.0
    if time.time() + need > deadline:
        import pytest
        pytest.skip("GPU run: the tests stage ran out of time before this test"
                    + (f" (it needs about {need:g} s)" if need else ""))


# What only a GPU can check comes first, so that the deadline cuts the broad tests, not these:
# the CUDA extension's single checks that say the most (wgmma in use; every op against the
# torch backend), then its parametrized ops (1,100 cases), then the Triton kernels (bfloat16
# included; the conv tests that assert the descriptor kernels ran before the others), then
# the rest.
_CUDA_TESTS = "tests/backends/test_cuda_backend.py"
TEST_PRIORITY = (_CUDA_TESTS + "::test_hopper_multiplies_with_wgmma",
                 _CUDA_TESTS + "::test_agrees_with_torch_ref",
                 _CUDA_TESTS + "::test_conv_agrees_with_torch_ref",
                 _CUDA_TESTS, "tests/kernels/test_expanded_linear",
                 "tests/kernels/test_expanded_conv_tma", "tests/kernels/test_expanded_conv")


def test_rank(nodeid: str) -> int:
    return next((i for i, p in enumerate(TEST_PRIORITY) if nodeid.startswith(p)),
                len(TEST_PRIORITY))


# Within a rank, bfloat16 cases first: CI checks every kernel in float32 and float16 under
# the Triton interpreter on CPU, but bfloat16 only here (the interpreter's bf16 dot is wrong).
_DTYPE_RANK = {"bfloat16": 0, "float16": 2, "float32": 3}


def dtype_rank(params) -> int:
    """0 for a case with a bfloat16 parameter, 2 float16, 3 float32, 1 without a dtype."""
    ranks = [_DTYPE_RANK[str(v).replace("torch.", "")] for v in params.values()
             if str(v).replace("torch.", "") in _DTYPE_RANK]
    return min(ranks) if ranks else 1


def pytest_collection_modifyitems(session, config, items):
    done = _passed_before()
    if done:  # (every xdist worker reads the file before this stage has added to it)
        config.hook.pytest_deselected(items=[i for i in items if i.nodeid in done])
        items[:] = [i for i in items if i.nodeid not in done]
    # stable: file order within a rank (every xdist worker sorts alike)
    items.sort(key=lambda item: (test_rank(item.nodeid),
                                 dtype_rank(getattr(getattr(item, "callspec", None),
                                                    "params", {}))))


# =========================================================================================
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("env")
    p.add_argument("--out", required=True)
    p = sub.add_parser("build")
    p.add_argument("--device", default="cuda")
    for name in ("bench", "section", "prewarm"):
        p = sub.add_parser(name)
        if name == "section":
            p.add_argument("name", choices=SECTIONS)
            p.add_argument("--out", required=True)
            p.add_argument("--deadline", type=float, default=time.time() + 120)
            p.add_argument("--compile-only", action="store_true",
                           help="only compile what the section's timed run launches")
        else:
            p.add_argument("--work", required=True)
            p.add_argument("--budget", type=float, default=150)
            p.add_argument("--sections", default=",".join(SECTIONS))
        p.add_argument("--device", default="cuda")
        p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
        p.add_argument("--quick", action="store_true", help="tiny sizes (CPU plumbing check)")
    p = sub.add_parser("report")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    fn = {"env": cmd_env, "build": cmd_build, "bench": cmd_bench, "section": cmd_section,
          "prewarm": cmd_prewarm, "report": cmd_report}[args.cmd]
    return fn(args)


if __name__ == "__main__":
    sys.exit(main())
