"""Test set-up shared by every test file.

Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a kernel, so on a machine
without a GPU it must be set before any kernel module is imported: here, first.
"""
import os

import pytest

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # torch missing: tests will fail loudly on import anyway
    _HAS_CUDA = False

# Tests check values, not speed: on a GPU, compile one tile per Triton kernel specialisation
# instead of autotuning every config (minutes of compiles); the benchmarks tune.
os.environ.setdefault("EXPANSE_FAST_AUTOTUNE", "0")

if _HAS_CUDA:
    # The tests hold float32 to float64 references: IEEE float32 on the GPU too.  cuDNN's
    # convolutions, and the Triton conv kernels that follow its switch, would otherwise round
    # their inputs to TF32 (torch's default for cuDNN), 1e-3 off.
    torch.backends.cudnn.allow_tf32 = False
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The tests' tensors are tiny: one thread avoids OpenMP spin-waits that made small
    # convolutions 20-60x slower whenever another process held a core.
    torch.set_num_threads(1)


def _interpret_without_overflow_checks():
    """The interpreter checks every int32 add, sub and mul for overflow (widen to int64,
    compare, assert): half the time of the kernel tests, and it cannot fire on their tensors
    of a few thousand elements.  Compiled kernels skip the check too (it needs debug=True).
    Private interpreter state: where a Triton lacks it, the tests only run slower."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import dataclasses
        from triton.runtime import interpreter
        builder = interpreter.interpreter_builder
        builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)
    except Exception:  # no Triton, or its interpreter changed
        pass


_interpret_without_overflow_checks()


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

# Let every test file, in any sub-folder, import the shared float64 reference.
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
