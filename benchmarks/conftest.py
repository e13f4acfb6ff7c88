"""Benchmarks report ratios against their peers in the same run, not absolute times.

Each benchmark sets ``benchmark.group`` (the comparison) and ``benchmark.extra_info``:
``role`` ("subject" or "peer") and ``limit`` (the useful-work ratio of DESIGN.md section 2
against that peer, when one exists).  At the end a table prints, per group, every peer's
median time over the subject's, beside the limit.
"""
import os

if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


def ratio_rows(benchmarks):
    """(group, subject, peer, ratio, limit) for every peer of every group."""
    groups = {}
    for b in benchmarks:
        groups.setdefault(b.group, []).append(b)
    rows = []
    for group, items in sorted(groups.items(), key=lambda kv: str(kv[0])):
        subjects = [b for b in items if b.extra_info.get("role") == "subject"]
        for s in subjects:
            for p in items:
                if p.extra_info.get("role") != "peer":
                    continue
                ratio = p.stats.median / s.stats.median
                rows.append((group, s.name, p.name, ratio, p.extra_info.get("limit")))
    return rows


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    rows = ratio_rows(session.benchmarks)
    if not rows:
        return
    tr = terminalreporter
    tr.write_sep("=", "speed-up of expanse_fast over each peer (median time ratio)")
    tr.write_line(f"{'group':34} {'peer':44} {'speed-up':>9} {'limit':>7} {'% of limit':>10}")
    for group, subject, peer, ratio, limit in rows:
        lim = f"{limit:.2f}x" if limit else "-"
        pct = f"{100 * ratio / limit:.0f}%" if limit else "-"
        tr.write_line(f"{str(group):34} {peer:44} {ratio:8.2f}x {lim:>7} {pct:>10}")
