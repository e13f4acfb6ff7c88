"""The GPU run's prewarm compiles autotuned launches without running them
(benchmarks/gpu/compile_only.py); a timed run must then find every kernel it launches in
Triton's cache, or the prewarm spares nothing.  compile_only_check.py (in subprocesses: the
test session's kernels are interpreted) compiles an expanded layer's forward and backward
that way into an empty cache, then calls them for real with launches stubbed, on the
stand-in sm_90a target: the call must compile nothing more."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
import triton_versions  # noqa: E402

SCRIPT = Path(__file__).with_name("compile_only_check.py")


def _cache_entries(mode, case, cache, triton_path=None):
    env = triton_versions.subprocess_env(triton_path)
    env["TRITON_CACHE_DIR"] = str(cache)
    res = subprocess.run([sys.executable, str(SCRIPT), mode, case], capture_output=True,
                         text=True, timeout=600, env=env)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 and "unsupported" in res.stderr.lower():
        pytest.skip(f"this Triton cannot compile for sm_90 here: {res.stderr[-300:]}")
    assert res.returncode == 0 and lines, f"exit {res.returncode}\n{res.stderr[-4000:]}"
    return json.loads(lines[-1])["entries"]


@pytest.mark.parametrize("triton_path", triton_versions.PATHS, ids=triton_versions.label)
@pytest.mark.parametrize("case", ["linear", "conv"])
def test_a_call_after_compile_only_finds_every_kernel_in_the_cache(case, triton_path,
                                                                   tmp_path):
    compiled = _cache_entries("compile", case, tmp_path, triton_path)
    assert compiled, "compile-only built nothing"
    assert _cache_entries("call", case, tmp_path, triton_path) == compiled


def test_a_call_on_an_empty_cache_compiles(tmp_path):
    """The check above could not fail if the stubbed call never compiled: on an empty cache
    it must add what compile-only would have."""
    called = _cache_entries("call", "linear", tmp_path / "called")
    assert called == _cache_entries("compile", "linear", tmp_path / "compiled")
