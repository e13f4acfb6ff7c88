"""Packaging: the Triton kernels (top-level ``kernels/``) install as ``expanse_fast.kernels``
and the CUDA sources (``csrc/``) ship as package data, compiled with ninja at first use.

Set ``EXPANSE_FAST_BUILD_CUDA=1`` and install with ``pip install --no-build-isolation .`` to
compile the CUDA extension ahead of time (needs a CUDA build of torch and nvcc).
"""
import os

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

ext_modules, cmdclass = [], {}
if os.environ.get("EXPANSE_FAST_BUILD_CUDA") == "1":
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
