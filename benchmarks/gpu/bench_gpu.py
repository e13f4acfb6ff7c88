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

The parts, beside this entry point (each imported by name): gpu_setup.py (``env``, ``build``),
gpu_orchestrate.py (``section``, ``bench``, ``prewarm``), gpu_ctx.py and gpu_measure.py (a
section's timing, checks and profiles), sec_ceilings.py, sec_layers.py and sec_models.py (the
sections), gpu_report.py (``report``), gpu_profile.py and gpu_common.py (shared helpers), and
gpu_tests_plugin.py (the test stages' pytest plugin, ``-p gpu_tests_plugin``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# The modules beside this one, by name: run.sh sets PYTHONSAFEPATH=1, under which ``python
# bench_gpu.py`` does not put the script's directory on sys.path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_common import SECTIONS  # noqa: E402
from gpu_orchestrate import cmd_bench, cmd_prewarm, cmd_section  # noqa: E402
from gpu_report import cmd_report  # noqa: E402
from gpu_setup import cmd_build, cmd_env  # noqa: E402


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
