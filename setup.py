"""Packaging: the Triton kernels (top-level ``kernels/``) install as ``expanse_fast.kernels``
and the CUDA sources (``csrc/``) ship as package data, compiled with ninja at first use.

Set ``EXPANSE_FAST_BUILD_CUDA=1`` and install with ``pip install --no-build-isolation .`` to
compile the CUDA extension ahead of time (needs a CUDA build of torch, nvcc, ninja and, since
that build uses the environment's own setuptools, setuptools>=77 as pyproject.toml asks).
Where the toolkit has nvcc and the runtime but not cuSPARSE's and cuBLAS's headers, which
ATen's CUDA headers include, point CPATH at the include folder of torch's nvidia wheels
(``.../site-packages/nvidia/cu13/include``); the build at first use finds that by itself.
"""
import os
import shutil

from setuptools import setup

packages = [
    "expanse_fast",
    "expanse_fast.backends",
    "expanse_fast.nn",
    "expanse_fast.train",
    "expanse_fast.kernels",
    "expanse_fast.csrc",
]
package_dir = {
    "expanse_fast.kernels": "kernels",
    "expanse_fast.csrc": "csrc",
}
package_data = {"expanse_fast.csrc": ["*.cu", "*.cpp", "*.h", "*.cuh"]}


def _cuda_home_past_nvcc_wrapper() -> None:
    """torch takes CUDA_HOME to be nvcc's grandparent; where nvcc is a wrapper script outside
    the toolkit (/usr/local/bin/nvcc) that directory has no CUDA headers and the build fails
    on cuda_runtime_api.h.  Point CUDA_HOME at /usr/local/cuda then (before torch reads it)."""
    nvcc = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or nvcc is None:
        return
    header = os.path.join("include", "cuda_runtime_api.h")
    guess = os.path.dirname(os.path.dirname(nvcc))
    if not os.path.exists(os.path.join(guess, header)) and os.path.exists(
            os.path.join("/usr/local/cuda", header)):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
        print(f"expanse_fast: CUDA_HOME=/usr/local/cuda ({nvcc} is outside the toolkit)")


ext_modules, cmdclass = [], {}
if os.environ.get("EXPANSE_FAST_BUILD_CUDA") == "1":
    _cuda_home_past_nvcc_wrapper()
    # Opt-in only: importing torch here needs --no-build-isolation.
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(
        os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith((".cu", ".cpp")))
    ext_modules = [CUDAExtension(
        "expanse_fast._C", sources,
        extra_compile_args={"cxx": ["-O3"],
                            # sm_90a: H100/H200 with wgmma; sm_80: Ampere and Ada;
                            # compute_80 PTX: newer GPUs (the WMMA path, JIT-compiled)
                            "nvcc": ["-O3", "-gencode=arch=compute_90a,code=sm_90a",
                                     "-gencode=arch=compute_80,code=sm_80",
                                     "-gencode=arch=compute_80,code=compute_80"]})]
    cmdclass = {"build_ext": BuildExtension}

setup(packages=packages, package_dir=package_dir, package_data=package_data,
      include_package_data=True, ext_modules=ext_modules, cmdclass=cmdclass)
