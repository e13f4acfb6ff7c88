"""A benchmark section's context (``Ctx``: device, timing, profiling, backends and the section's
result file; torch imported only when one is made), and the prewarm's ``CompileOnlyCtx``."""
from __future__ import annotations

import math
import os
import statistics
import time
import traceback

from gpu_common import (BACKEND_NAMES, HOST_TIMED_CALLS, PROFILE_BUDGET_S, _dump, _now_iso,
                        _short_exc)
from gpu_profile import _profile_rows


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
                outputs = [fns[r % k]()]  # freed after the sync, not while timed
                issue.append(time.perf_counter() - t)
                self.sync()
                outputs.clear()
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
            outputs = [fns[0]()]  # held until the peak is read
            torch.cuda.synchronize(self.dev)
            peak = round((torch.cuda.max_memory_allocated(self.dev) - base) / 2**20, 1)
            outputs.clear()
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
