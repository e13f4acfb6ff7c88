"""pyflakes (through flake8, which honours ``# noqa``) over every Python source of the repo.

Much of the code runs only where CI cannot: the GPU run's sections, the CUDA-only branches of
the backends.  An undefined name there would surface in a rare GPU session; here it fails at
once."""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flake8")

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["expanse_fast", "kernels", "csrc", "benchmarks", "tests", "examples", "setup.py"]


def test_pyflakes_finds_nothing():
    paths = [p for p in SOURCES if (ROOT / p).exists()]
    assert "benchmarks" in paths and "expanse_fast" in paths
    run = subprocess.run([sys.executable, "-m", "flake8", "--select=F", "--isolated", *paths],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and not run.stdout, run.stdout + run.stderr


def test_pyflakes_reports_an_undefined_name(tmp_path):
    # (the check above can fail: the same command flags a closure over a deleted name, the
    # pattern the GPU sections once used)
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    x = 1\n    g = lambda: x\n    del x\n    return g\n")
    run = subprocess.run([sys.executable, "-m", "flake8", "--select=F", "--isolated", str(bad)],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "F821 undefined name 'x'" in run.stdout, run.stdout
