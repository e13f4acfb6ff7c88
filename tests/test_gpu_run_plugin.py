"""The GPU run's pytest plugin (benchmarks/gpu/bench_gpu.py, ``-p bench_gpu``): past the
stage's deadline tests skip, a test marked ``gpu_seconds(s)`` skips already when fewer than
s seconds are left, and the tests only a GPU can check run first."""
import importlib.util
import os
import time
import types

import pytest

PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "gpu", "bench_gpu.py")


@pytest.fixture(scope="module")
def plugin():
    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _item(seconds=None, nodeid="tests/test_x.py::test_y"):
    mark = None if seconds is None else types.SimpleNamespace(args=(seconds,))
    return types.SimpleNamespace(nodeid=nodeid, get_closest_marker=lambda name: (
        mark if name == "gpu_seconds" else None))


def _runs(plugin, item) -> bool:
    try:
        plugin.pytest_runtest_setup(item)
    except pytest.skip.Exception:
        return False
    return True


def test_deadline_and_expected_seconds(plugin, monkeypatch):
    monkeypatch.delenv("EXPANSE_TESTS_DEADLINE", raising=False)
    assert _runs(plugin, _item()) and _runs(plugin, _item(1e9))  # no deadline: all run
    monkeypatch.setenv("EXPANSE_TESTS_DEADLINE", str(time.time() + 30))
    assert _runs(plugin, _item()) and _runs(plugin, _item(20))
    assert not _runs(plugin, _item(45))  # would end past the deadline
    monkeypatch.setenv("EXPANSE_TESTS_DEADLINE", str(time.time() - 1))
    assert not _runs(plugin, _item())


def test_gpu_only_checks_run_first(plugin):
    ids = ["tests/test_bench_cli.py::test_a", "tests/kernels/test_expanded_conv_kernels.py::t",
           "tests/backends/test_cuda_backend.py::t", "tests/kernels/test_expanded_linear_x.py::t"]
    items = [_item(nodeid=i) for i in ids]
    plugin.pytest_collection_modifyitems(None, None, items)
    assert [i.nodeid for i in items] == [ids[2], ids[3], ids[1], ids[0]]
