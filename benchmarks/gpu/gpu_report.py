"""The ``report`` stage (torch never imported): the stages, the build, the tests and the
sections' results merged into results.json and results.md, with the issues' targets."""
from __future__ import annotations

import json
import os
import traceback

from gpu_common import PEERS, SECTIONS, _dump, _git_commit, _load, _now_iso, _short_exc
from gpu_profile import kernel_label


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
    for impl, what in (("expanse/cuda-sw128", "swizzled tiles"),  # (the opt-in experiments)
                       ("expanse/cuda-k128x2", "two stages of 128-wide k-tiles")):
        if ms.get(impl) and ms.get("expanse/triton"):
            ratio = ms["expanse/triton"] / ms[impl]
            out.append(dict(section="linear", variant="fwd+bwd",
                            what=f"x triton (cuda backend, {what})", need=1.0, best=ratio,
                            impl=impl, limit=None, met=ratio >= 1.0))
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
