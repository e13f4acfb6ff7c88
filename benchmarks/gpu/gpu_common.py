"""What the GPU run's modules share: its constants (the sections, their shares of the time,
the check tolerances), small JSON and error-text helpers, the sources' identity (git commit,
fingerprint) and an environment variable set within a block."""
from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import hashlib
import json
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECTIONS = ("ceilings", "linear", "conv", "mlp", "cnn", "sweep")
# Share of the time left that each section may use (the rest passes on if it ends early).
# conv: two layouts, each with its Triton tuning (and NCHW read in place with its own);
# the targets are linear and conv, the MLP and CNN steps are model-level extras
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
