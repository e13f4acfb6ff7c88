"""The GPU test stages' pytest plugin (run.sh: ``-p gpu_tests_plugin``, its directory on
PYTHONPATH): tests skip past the stage's deadline, failures and passes are written down as
they happen, and the tests only a GPU can check run first.  No torch, no sibling module."""
from __future__ import annotations

import os
import time


# =========================================================================================
# pytest plugin (``-p gpu_tests_plugin``): past EXPANSE_TESTS_DEADLINE (epoch seconds) the
# remaining tests are skipped, so pytest still ends by itself and writes its junit file before
# the stage's hard timeout would kill it.  A test marked ``gpu_seconds(s)`` (a long one) is
# skipped already when fewer than s seconds are left before the deadline.  Each failure is
# also appended to EXPANSE_TESTS_FAILURES at once (junit is written only at the end, and
# not at all if the stage is killed), each pass to EXPANSE_TESTS_PASSED; with
# EXPANSE_TESTS_SKIP_PASSED=1 the tests that file names are deselected (a second call of the
# GPU run goes on where the first one's deadline stopped).
# =========================================================================================
def _hookimpl(**opts):
    try:
        import pytest
    except ImportError:  # (imported where pytest is not installed)
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
                 _CUDA_TESTS, "tests/backends/test_cuda_conv_nhwc.py",
                 "tests/kernels/test_expanded_linear",
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
