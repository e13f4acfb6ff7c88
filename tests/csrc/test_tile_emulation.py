"""The CUDA kernels' tile index logic, run on the host (CI has nvcc but no GPU).

Each ``*_tile_emulation.cu`` here includes a real kernel file of csrc/ and, on the CPU, walks
every block of every launch the host code would make: the launch parameters and grid, each
block's phases and k-tiles, the operand masks and the epilogue's bounds, in fp32 and fp16, and
compares the results with a float64 reference of the expanded layer (see the files' headers).
"""
import subprocess
from pathlib import Path

import pytest

from test_compile import CSRC, NVCC, TORCH_NVCC_DEFINES

HERE = Path(__file__).resolve().parent
# The device code is compiled but never runs: PTX for one virtual arch (no ptxas) without
# device optimisation (-G) builds in about half the time of an sm_80 cubin.  compute_80 is the
# oldest arch the kernels' bf16 WMMA fragments compile for (nvcc's default is older).
DEVICE_FLAGS = ["-gencode=arch=compute_80,code=compute_80", "-G"]
# The kernels copy 16-byte chunks through uint4/float4 casts; on the GPU a barrier orders each
# copy before the reads of its elements, here nothing does, and GCC at -O2 and above (its
# strict-aliasing rule) reorders them: the linear emulation fails at -O3 without this flag.
HOST_FLAGS = ["-O1", "-Xcompiler=-fno-strict-aliasing"]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
@pytest.mark.parametrize("name", ["conv_nhwc_emulation", "conv_tile_emulation",
                                  "linear_tile_emulation"])
def test_tile_emulation(name, tmp_path):
    exe = tmp_path / name
    cmd = [NVCC, "-std=c++17", *HOST_FLAGS, *DEVICE_FLAGS, *TORCH_NVCC_DEFINES, "-I", str(CSRC),
           str(HERE / f"{name}.cu"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "tile emulation OK" in run.stdout, (
        f"exit {run.returncode}\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}")
