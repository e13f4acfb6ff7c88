"""Compile checks of csrc/ (CI has nvcc but no GPU; nothing runs here).

* every ``.cu`` file compiles standalone for sm_90 with nvcc (no torch headers involved), with
  the defines torch's extension build adds (no implicit half/bf16 conversions), so the kernels
  also build inside the extension;
* ``bindings.cpp`` passes a C++ syntax check against this torch's headers.  A CPU wheel of
  torch ships ATen's CUDA headers but neither the generated ``cuda_cmake_macros.h`` nor the
  cuBLAS/cuSPARSE/cuSOLVER headers they include; when those are missing the check defines the
  few opaque types they would declare (our code uses none of those libraries).
"""
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))


def _cuda_homes():
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if shutil.which("nvcc"):  # may be a wrapper script: then /usr/local/cuda below
        homes.append(str(Path(shutil.which("nvcc")).resolve().parent.parent))
    homes.append("/usr/local/cuda")
    return [Path(h) for h in homes if h]


def _nvcc():
    return shutil.which("nvcc") or next(
        (str(h / "bin/nvcc") for h in _cuda_homes() if (h / "bin/nvcc").exists()), None)


NVCC = _nvcc()
CUDA_INC = next((h / "include" for h in _cuda_homes()
                 if (h / "include/cuda_runtime_api.h").exists()), None)
# What torch.utils.cpp_extension passes to nvcc besides the arch.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                      "--expt-relaxed-constexpr"]


def test_csrc_has_cuda_sources():
    assert CU_FILES, f"no .cu files in {CSRC}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
@pytest.mark.parametrize("src", CU_FILES, ids=lambda p: p.name)
def test_cu_file_compiles_for_sm90(src, tmp_path):
    """Compiles for plain sm_90 (the portable path: what other GPUs run); the PTX nvcc keeps
    from that build issues no wgmma (sm_90a only)."""
    obj, kept = tmp_path / (src.stem + ".o"), tmp_path / "kept"
    kept.mkdir()
    cmd = [NVCC, "-c", "-std=c++17", "-O3", "-gencode=arch=compute_90,code=sm_90",
           *TORCH_NVCC_DEFINES, "-I", str(CSRC), str(src), "-o", str(obj),
           "--keep", "--keep-dir", str(kept)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    assert obj.stat().st_size > 0
    ptx = (kept / (src.stem + ".ptx")).read_text()
    assert ".entry " in ptx, f"no kernels in the PTX of {src.name}"
    assert "wgmma.mma_async" not in ptx, f"{src.name}: wgmma in the sm_90 build"


_STUBS = {  # header -> the declarations ATen's CUDA headers need from it
    "cublas_v2.h": "typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;\n"
                   "typedef struct cublasContext* cublasHandle_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusparse.h": "typedef enum { CUSPARSE_STATUS_SUCCESS = 0 } cusparseStatus_t;\n"
                  "typedef struct cusparseContext* cusparseHandle_t;\n",
    "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t;\n",
    "cusolver_common.h": "typedef enum { CUSOLVER_STATUS_SUCCESS = 0 } cusolverStatus_t;\n",
}


def test_bindings_raise_one_preformatted_message():
    """Every argument check in bindings.cpp goes through ``fail``, which builds its message
    without iostreams and hands TORCH_CHECK one string.  A TORCH_CHECK with several message
    arguments formats them with a std::ostringstream this library instantiates itself; on
    the GPU image (torch 2.11) that crashed the process (SIGSEGV) instead of raising."""
    code = re.sub(r"//[^\n]*", "", (CSRC / "bindings.cpp").read_text())
    calls = [" ".join(c.split()) for c in re.findall(r"TORCH_CHECK\s*\((.*?)\);", code, re.S)]
    assert calls == ["false, message"], calls
    assert "EXPANSE_CHECK(" in code


def test_bindings_cpp_syntax(tmp_path):
    torch = pytest.importorskip("torch")
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    torch_inc = Path(torch.__file__).parent / "include"
    if not (torch_inc / "ATen" / "cuda" / "CUDAContext.h").exists():
        pytest.skip(f"ATen CUDA headers missing from {torch_inc}")
    cuda_inc = CUDA_INC
    if cuda_inc is None:
        pytest.skip("CUDA runtime headers not found (CUDA_HOME, /usr/local/cuda)")
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in _STUBS.items():
        if not (cuda_inc / name).exists():
            (stubs / name).write_text("#pragma once\n" + text)
    cmd = [cxx, "-fsyntax-only", "-std=c++20", "-Wall", "-DTORCH_EXTENSION_NAME=_C",
           "-isystem", str(torch_inc), "-isystem", str(torch_inc / "torch/csrc/api/include"),
           "-isystem", str(cuda_inc), "-isystem", str(stubs),
           "-isystem", sysconfig.get_paths()["include"], "-I", str(CSRC)]
    if not (torch_inc / "c10/cuda/impl/cuda_cmake_macros.h").exists():
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # generated only in CUDA wheels
    cmd.append(str(CSRC / "bindings.cpp"))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-6000:]}"


def _ptx_entries(ptx: str) -> dict:
    """{mangled kernel name: its PTX body} of a .ptx file's entry functions."""
    parts = ptx.split(".entry ")[1:]
    return {p.split("(", 1)[0].strip(): p for p in parts}


def _ptx_of(src_name, arch, tmp_path):
    out = tmp_path / f"{Path(src_name).stem}_{arch}.ptx"
    cmd = [NVCC, "-ptx", "-std=c++17", "-O3", f"-arch={arch}", *TORCH_NVCC_DEFINES,
           "-I", str(CSRC), str(CSRC / src_name), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-6000:]}"
    return out


# Per kernel: the wgmma N, the instructions per k-tile (BK / 16) of its default variant, the
# operand majorness it hands wgmma (0 = K-major, 1 = M/N-major) and how many k-tiles' MMAs its
# main loop leaves in flight at the barrier (wgmma.wait_group N in the loop).  Linear: forward
# x.w^T (both K-major), input gradient dy.w (w N-major), weight gradient dy^T.x (both
# MN-major).  Conv: A is the gathered im2col / dy tile stored [k][m] (M-major) for forward and
# input gradient, [m][k] for dW; B is always stored [n][k].
# Per linear kernel: whether it has a K-major operand with 128-byte rows (BK = 64 of fp16 /
# bf16), which the swizzled variant stores with the 128-byte swizzle: the forward (x and w),
# the input gradient (dy); not dW (both operands MN-major).
SWIZZLED_K_MAJOR = {"expanded_linear_kernels.cu": {"linear_fwd_kernel": True,
                                                   "linear_dx_kernel": True,
                                                   "linear_dw_kernel": False}}
WGMMA_KERNELS = {
    "expanded_linear_kernels.cu": {"linear_fwd_kernel": ("256", 4, "0, 0", 1),
                                   "linear_dx_kernel": ("256", 4, "0, 1", 1),
                                   "linear_dw_kernel": ("256", 4, "1, 1", 1)},
    "expanded_conv_kernels.cu": {"conv_fwd_kernel": ("64", 2, "1, 0", 0),
                                 "conv_dx_kernel": ("64", 2, "1, 0", 0),
                                 "conv_dw_kernel": ("64", 2, "0, 0", 0)},
    # the channels_last forward, input and weight gradient on the linear kernels' pipeline:
    # gathered tiles, K-major (dW's, as the linear dW's, M/N-major); N: NHWC_TILES
    "expanded_conv_nhwc.cu": {"conv_nhwc_fwd_kernel": ("128", 4, "0, 0", 1),
                              "conv_nhwc_dx_kernel": ("128", 4, "0, 0", 1),
                              "conv_nhwc_dw_kernel": ("128", 4, "1, 1", 1)},
}
# The kernels on gemm_pipeline.cuh's cp.async main loop, and the cp.async.wait_group of their
# default variant (four stages: three k-tiles fetched ahead).
PIPELINE_FILES = {"expanded_linear_kernels.cu": "2", "expanded_conv_nhwc.cu": "2"}
# The linear WgmmaMath<T, SWIZZLE, BK, STAGES> instantiations, by their mangled template
# arguments: (swizzled, wgmmas per k-tile, the main loop's cp.async.wait_group).  Four stages
# keep three k-tiles fetched ahead (tile t is waited for with t + 1 and t + 2 in flight); two
# stages one (nothing newer in flight when tile t has landed).
LINEAR_VARIANTS = {"Lb0ELi64ELi4E": (False, 4, "2"), "Lb1ELi64ELi4E": (True, 4, "2"),
                   "Lb0ELi128ELi2E": (False, 8, "0")}
# The channels_last conv's tiles, by the mangled BN, BM of their WgmmaMath: the wgmma N each
# warpgroup issues, and the kernels built on each (128 x 128 all three; 128 x 64 for narrow
# forward segments and input gradients; 64 x 256, two warpgroups side by side, for weight
# gradients of few rows).
NHWC_TILES = {"Li128ELi128EE": ("128", {"conv_nhwc_fwd_kernel", "conv_nhwc_dx_kernel",
                                        "conv_nhwc_dw_kernel"}),
              "Li64ELi128EE": ("64", {"conv_nhwc_fwd_kernel", "conv_nhwc_dx_kernel"}),
              "Li256ELi64EE": ("128", {"conv_nhwc_dw_kernel"})}


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
@pytest.mark.parametrize("src_name", list(WGMMA_KERNELS))
def test_gemm_kernels_issue_wgmma_on_sm90a_only(src_name, tmp_path):
    """Built for sm_90a, the WgmmaMath instantiation of each GEMM kernel (fp16 and bf16) issues
    wgmma of its shape and operand majorness, with the proxy fence its copies need, and ptxas
    assembles it without serializing the wgmmas (its C7515 "Potential Performance Loss"
    notice: an accumulator register touched while they are in flight) and without waits of
    its own for them (C7517: at the linear main loop's back edge such a wait kept the next
    k-tile's MMAs from being queued while one tile's still run); the WMMA and SIMT kernels
    issue none (built for plain sm_90, nothing does: test_cu_file_compiles_for_sm90).  The loop of
    gemm_pipeline.cuh (the linear kernels and the channels_last conv forward) fences every
    k-tile's copies for the async proxy (no branch skips it) and keeps all stages but one
    fetched ahead.  The linear file's TMA forward: see
    _check_linear_tma_forward."""
    expect = WGMMA_KERNELS[src_name]
    ptx_path = _ptx_of(src_name, "compute_90a", tmp_path)
    entries = _ptx_entries(ptx_path.read_text())
    wg = {n: b for n, b in entries.items() if "WgmmaMath" in n}
    # the linear kernels come in three variants (LINEAR_VARIANTS): the default, with 128-byte
    # swizzled operand tiles, whose K-major operands' descriptors say so (layout type 1 in
    # bits 62-63), and with two stages of 128-wide k-tiles
    linear = src_name in SWIZZLED_K_MAJOR
    nhwc = src_name == "expanded_conv_nhwc.cu"
    if linear:
        want = 2 * len(LINEAR_VARIANTS) * len(expect)
    elif nhwc:
        want = 2 * sum(len(kernels) for _, kernels in NHWC_TILES.values())
    else:
        want = 2 * len(expect)
    assert len(wg) == want, f"expected {want} kernels (x 2 dtypes), got {sorted(wg)}"
    for name, body in wg.items():
        kernel = next(k for k in expect if k in name)
        n, per_tile, trans, in_flight = expect[kernel]
        sw, cp_wait = False, PIPELINE_FILES.get(src_name)
        if linear:
            (sw, per_tile, cp_wait), = [v for k, v in LINEAR_VARIANTS.items() if k in name]
        if nhwc:
            (n, kernels), = [v for k, v in NHWC_TILES.items() if k in name]
            assert kernel in kernels, f"{name}: {kernel} on an unexpected tile"
        masks = [int(c) for c in re.findall(r"or\.b64\s+%rd\d+, %rd\d+, (\d+);", body)]
        swizzled = {c for c in masks if c >> 62 == 1}
        if sw and SWIZZLED_K_MAJOR[src_name][kernel]:
            assert swizzled and all((c >> 32) & 0x3FFF == 1024 >> 4 for c in swizzled), \
                f"{name}: no 128-byte swizzled descriptor (SBO 1024) among {masks}"
        else:
            assert not swizzled, f"{name}: swizzled descriptors {swizzled}"
        calls = re.findall(rf"wgmma\.mma_async\.sync\.aligned\.m64n{n}k16\.f32\.(b?f16)\.\1 "
                           r"[^;]*p, 1, 1, (\d, \d);", body, flags=re.S)
        assert len(calls) == per_tile, f"{name}: {len(calls)} wgmma m64n{n}k16, expected {per_tile}"
        assert {t for _, t in calls} == {trans}, f"{name}: {calls}"
        assert "fence.proxy.async.shared::cta" in body, f"{name}: no proxy fence"
        if src_name in PIPELINE_FILES:
            code = [ln.strip() for ln in body.splitlines()
                    if ln.strip() and not ln.strip().startswith("//")]
            guarded = [code[i - 1] for i, ln in enumerate(code)
                       if ln.startswith("fence.proxy.async") and re.match(r"@!?%p\d+ bra\s", code[i - 1])]
            assert not guarded, f"{name}: proxy fence behind a branch {guarded}"
            # all stages but one fetched ahead (the stage of t - 1 is refilled once its MMAs
            # are done)
            cp_waits = set(re.findall(r"cp\.async\.wait_group (\d+);", body))
            assert cp_waits == {cp_wait}, f"{name}: cp.async.wait_group {cp_waits}"
        waits = {int(w) for w in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+);", body)}
        assert waits == ({0, in_flight} if in_flight else {0}), f"{name}: waits {waits}"
    for name, body in entries.items():
        if "WmmaMath" in name or "SimtMath" in name:
            assert "wgmma" not in body, f"{name} issues wgmma"
    if nhwc:  # the portable maths' three products: WMMA in fp16 and bf16, SIMT in fp32
        wmma = sorted(n for n in entries if "WmmaMath" in n)
        assert len(wmma) == 6 and all(any(k in n for n in wmma) for k in expect), wmma
        simt = sorted(n for n in entries if "SimtMath" in n)
        assert len(simt) == 3 and all(any(k in n for n in simt) for k in expect), simt
    if src_name == "expanded_linear_kernels.cu":
        _check_linear_tma_forward(entries)
    ptxas = shutil.which("ptxas") or next(
        (str(h / "bin/ptxas") for h in _cuda_homes() if (h / "bin/ptxas").exists()), None)
    if ptxas is not None:
        res = subprocess.run([ptxas, "-v", "-arch=sm_90a", str(ptx_path), "-o",
                              str(tmp_path / "kernels.cubin")],
                             capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-6000:]
        serialized = [ln for ln in (res.stdout + res.stderr).splitlines()
                      if "C7515" in ln or "wgmma.mma_async instructions are serialized" in ln
                      or "C7517" in ln or "warpgroup.wait is injected" in ln]
        assert not serialized, "\n".join(serialized)
        # and keeps the wgmma kernels' accumulators in registers: the linear ones hold 128 a
        # thread (their 128 x 256 tile) and run close to the 255-register limit
        spills = re.findall(r"Compiling entry function '(\w+)' for 'sm_90a'\n"
                            r"[^\n]*Function properties[^\n]*\n"
                            r"\s*(\d+) bytes stack frame, (\d+) bytes spill stores",
                            res.stdout + res.stderr)
        wg_spills = [(n, f, st) for n, f, st in spills if "WgmmaMath" in n]
        assert len(wg_spills) == len(wg), wg_spills
        assert all(f == "0" and st == "0" for _, f, st in wg_spills), wg_spills
        # (the NHWC weight gradient's WMMA kernel runs at about 254 registers)
        wmma_spills = [(n, f, st) for n, f, st in spills
                       if nhwc and ("WmmaMath" in n or "SimtMath" in n)]
        assert all(f == "0" and st == "0" for _, f, st in wmma_spills), wmma_spills


def _check_linear_tma_forward(entries):
    """The experimental forward (EXPANSE_FAST_CUDA_PIPELINE=tma), fp16 and bf16, built for
    sm_90a: each k-tile is two 2-D bulk tensor copies completing on an mbarrier, read by four
    wgmma m64n256k16 with 128-byte swizzled K-major descriptors; no cp.async, and the only
    proxy fence is the one after the barriers' initialisation (none per k-tile).  (Checked
    with the linear file's other kernels, which share its PTX build and ptxas's notices.)"""
    tma = {n: b for n, b in entries.items() if "linear_fwd_tma_kernel" in n}
    assert len(tma) == 2, sorted(tma)
    for name, body in tma.items():
        loads = re.findall(r"cp\.async\.bulk\.tensor\.2d\.shared::cluster\.global\."
                           r"mbarrier::complete_tx::bytes", body)
        assert loads and len(loads) % 2 == 0, f"{name}: {len(loads)} tensor copies"
        assert "mbarrier.try_wait.parity" in body and "mbarrier.arrive.expect_tx" in body, name
        assert "cp.async.cg" not in body and "cp.async.wait_group" not in body, name
        assert body.count("fence.proxy.async") == 1, f"{name}: proxy fences beyond the init's"
        calls = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n256k16\.f32\.(b?f16)\.\1 "
                           r"[^;]*p, 1, 1, (\d, \d);", body, flags=re.S)
        assert len(calls) == 4 and {t for _, t in calls} == {"0, 0"}, f"{name}: {calls}"
        masks = [int(c) for c in re.findall(r"or\.b64\s+%rd\d+, %rd\d+, (\d+);", body)]
        assert any(c >> 62 == 1 and (c >> 32) & 0x3FFF == 1024 >> 4 for c in masks), \
            f"{name}: no 128-byte swizzled descriptor (SBO 1024) among {masks}"
        waits = {int(w) for w in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+);", body)}
        assert waits == {0, 1}, f"{name}: waits {waits}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
def test_wgmma_operand_layout_on_the_host(tmp_path):
    """wgmma.cuh's tile copy, offsets and descriptor fields read back, through the PTX ISA's
    canonical layouts, the blocks each GEMM (linear and conv) hands wgmma; its accumulator
    maps are bijections.  Host code only: built with nvcc and run on the CPU."""
    exe = tmp_path / "wgmma_layout_check"
    src = Path(__file__).with_name("wgmma_layout_check.cu")
    cmd = [NVCC, "-std=c++17", "-O1", "-I", str(CSRC), str(src), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-6000:]}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "wgmma layout OK" in run.stdout, run.stdout[-3000:]
