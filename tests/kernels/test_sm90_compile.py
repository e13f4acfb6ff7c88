"""The Triton kernels as Triton compiles them for an H100/H200 (sm_90a), checked without one.

sm90_compile.py (run in a subprocess: the test session's kernels are interpreted) drives the
real launchers at the shapes of issue 3 and compiles each kernel's default config, the
linear layer's with and without tensor descriptors, the conv's on channels_last and NCHW
input, without descriptors and at stride 2.  What the interpreter cannot show is asserted
here: every kernel compiles, none spills registers, the GEMMs use wgmma, the descriptor
kernels use TMA, and the conv kernels move their operands in 16-byte pipelined copies (or
TMA) and store 16 bytes at a time (a mask the compiler cannot prove aligned once made them
2-byte accesses, 255 registers and spills).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
import triton_versions  # noqa: E402
from expanse_fast.kernels import expanded_conv  # noqa: E402

SCRIPT = Path(__file__).with_name("sm90_compile.py")
KERNELS = ("_fwd_tma_kernel", "_dx_tma_kernel", "_dw_tma_kernel", "_fwd_kernel", "_dx_kernel",
           "_dw_kernel", "_conv_fwd_tma_kernel", "_conv_fwd_kernel", "_conv_wgrad_tma_kernel",
           "_conv_wgrad_kernel", "_conv_wgrad_nchw_tma_kernel", "_conv_dx_tma_kernel",
           "_conv_dx_kernel")


@pytest.fixture(scope="module", params=triton_versions.PATHS, ids=triton_versions.label)
def compiled(request):
    # The installed package (as the test session imports it: the checkout's expanse_fast/
    # lacks the kernels, which setup.py maps in), never the interpreter; under the installed
    # Triton, then each of triton_versions.PATHS (the GPU machine's, in CI).
    env = triton_versions.subprocess_env(request.param)
    env.pop("EXPANSE_FAST_TMA", None)
    env.pop("EXPANSE_FAST_CONV_NCHW", None)  # the defaults, as users get them
    # Triton's default without fused multiply-adds (3.10's): the kernels must ask for them
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    res = subprocess.run([sys.executable, str(SCRIPT), "--json", "--first-config"],
                         capture_output=True, text=True, timeout=900, env=env)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode == 3 and lines:
        pytest.skip(f"this Triton cannot compile for sm_90 here: "
                    f"{json.loads(lines[-1])['unsupported']}")
    assert res.returncode == 0 and lines, f"exit {res.returncode}\n{res.stderr[-4000:]}"
    report = json.loads(lines[-1])
    rows = {}
    for r in report["rows"]:  # conv kernels per layout, and without descriptors
        rows.setdefault(r["kernel"], []).append(r)
    return rows


# no product: the NCHW input's (and dy's) transpose to channels_last for the conv kernels
COPY_KERNELS = ("_nchw_to_nhwc_kernel", "_nhwc_to_nchw_kernel")
CONV_KERNELS = ("_conv_fwd_kernel", "_conv_wgrad_kernel", "_conv_dx_kernel")
# which conv launches compile each kernel: the descriptor kernels on both layouts, the
# pointer ones where descriptors are off; at stride 2 the descriptor kernels again (x's
# phase view for the forward and dW, one program per input phase for dx), and for a coupled
# layer (the coupling block, dW_couple, dx_old's staircase; the pointer kernels too, whose dx
# tiles the old channels in bands).  On NCHW input dW reads x in place through its own
# kernel.
CONV_LAYERS = {f"_conv_{k}{tma}_kernel": (["conv", "conv-coupled", "conv-nchw", "conv-nchw-yT",
                                           "conv-stride2"]
                                          if tma else ["conv-pointer", "conv-pointer-coupled"])
               for k in ("fwd", "wgrad", "dx") for tma in ("_tma", "")}
CONV_LAYERS["_conv_wgrad_tma_kernel"] = ["conv", "conv-coupled", "conv-stride2"]
CONV_LAYERS["_conv_wgrad_nchw_tma_kernel"] = ["conv-nchw", "conv-nchw-yT"]


def test_every_kernel_compiles(compiled):
    assert sorted(compiled) == sorted(KERNELS + COPY_KERNELS)
    for kernel, layers in CONV_LAYERS.items():
        assert sorted({r["layer"] for r in compiled[kernel]}) == layers, kernel
    errors = {k: r["error"] for k, rs in compiled.items() for r in rs if "error" in r}
    assert not errors


@pytest.mark.parametrize("kernel", KERNELS + COPY_KERNELS)
def test_kernels_ask_for_fused_multiply_adds(compiled, kernel):
    """kernels/launch.py's COMPILE_OPTIONS: compiled with FMA under a Triton whose default
    has none (Triton 3.9 warned at every first compile that 3.10's would have none)."""
    assert all(r["fp_fusion"] is True for r in compiled[kernel]), compiled[kernel]


@pytest.mark.parametrize("kernel", KERNELS)
def test_no_spills_and_wgmma(compiled, kernel):
    for r in compiled[kernel]:
        assert r["stack"] == 0, f"{kernel} {r['config']} ({r['layer']}): {r['registers']} " \
                                f"registers, {r['stack']} bytes of stack (spills)"
        assert r["wgmma"] > 0, f"{kernel} {r['config']} ({r['layer']}): no wgmma"


@pytest.mark.parametrize("kernel", ["_fwd_tma_kernel", "_dx_tma_kernel", "_dw_tma_kernel",
                                    "_conv_fwd_tma_kernel", "_conv_wgrad_tma_kernel",
                                    "_conv_wgrad_nchw_tma_kernel", "_conv_dx_tma_kernel"])
def test_descriptor_kernels_load_through_tma(compiled, kernel):
    assert all(r["tma"] > 0 for r in compiled[kernel])


@pytest.mark.parametrize("kernel", ["_conv_fwd_tma_kernel", "_conv_wgrad_tma_kernel",
                                    "_conv_wgrad_nchw_tma_kernel", "_conv_dx_tma_kernel"])
def test_conv_descriptor_kernels_make_no_2_byte_loads(compiled, kernel):
    assert all(r["ld_global_b16"] == 0 for r in compiled[kernel])


@pytest.mark.parametrize("kernel", CONV_KERNELS)
def test_conv_operands_move_in_16_byte_copies(compiled, kernel):
    # NCHW input too: the launchers hand the kernels channels_last copies
    if kernel == "_conv_fwd_kernel" and not expanded_conv._FWD_VECTOR_MASK:
        pytest.skip("Triton 3.8 cannot compile the forward's vector mask: 2-byte loads there")
    for r in compiled[kernel]:
        assert r["cp_async_16"] > 0 and r["ld_global_b16"] == 0, r


@pytest.mark.parametrize("kernel", ["_fwd_kernel", "_dx_kernel", "_dw_kernel"])
def test_pointer_kernels_copy_operands_16_bytes_at_a_time(compiled, kernel):
    # (2-byte loads may remain in the forward: its bias vectors, one element a thread.  dx
    # has none, with dx_old too: the frozen groups' dy rows start at row bounds it is shown
    # are vector multiples; once they were 2-byte loads and 255 registers with spills.)
    assert all(r["cp_async_16"] > 0 for r in compiled[kernel]), compiled[kernel]
    if kernel != "_fwd_kernel":
        assert all(r["ld_global_b16"] == 0 for r in compiled[kernel]), compiled[kernel]
    assert {r["layer"] for r in compiled[kernel]} == {"linear", "linear-pointer-coupled"}


@pytest.mark.parametrize("kernel", ["_fwd_tma_kernel", "_fwd_kernel", "_conv_fwd_tma_kernel",
                                    "_conv_fwd_kernel", "_conv_dx_tma_kernel", "_conv_dx_kernel"])
def test_outputs_stored_16_bytes_at_a_time(compiled, kernel):
    assert all(r["st_global_v4"] > 0 for r in compiled[kernel]), compiled[kernel]


@pytest.mark.parametrize("kernel", COPY_KERNELS)
def test_nchw_transposes_move_16_bytes_at_a_time(compiled, kernel):
    """kernels/transpose.py on the NCHW layer's x and dy, and back on its y (with
    EXPANSE_FAST_CONV_NCHW_Y=transpose): whole rows both ways (no 2-byte loads, 16-byte
    stores), the transpose through shared memory, no spills."""
    rows = compiled[kernel]
    assert {r["layer"] for r in rows} == ({"conv-nchw-yT"} if "nhwc_to" in kernel
                                          else {"conv-nchw", "conv-nchw-yT"})
    for r in rows:
        assert r["stack"] == 0 and r["ld_global_b16"] == 0 and r["st_global_v4"] > 0, r
        assert r["smem"] > 0, r
