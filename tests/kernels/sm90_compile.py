"""Compile the Triton kernels for Hopper (sm_90a) on a machine without a GPU, and report.

Run as a script (never with TRITON_INTERPRET set: the kernels must be real JIT functions):

    python tests/kernels/sm90_compile.py            # every autotune config, a table
    python tests/kernels/sm90_compile.py --json --first-config

The real launchers run on CPU tensors of the issue's shapes (a 4096-wide linear layer
widened by 1024, 16384 rows, isolated and coupled, whose dx reads the frozen rows; the 3x3
conv of a ResNet-50 stage, 256 + 64 channels, channels_last and NCHW, channels_last without
tensor descriptors, ResNet-50's stride-2 3x3, and a coupled layer, whose backward asks for
dx_old; the coupled linear and conv layers without descriptors too, whose dx kernels tile
the old columns in bands and read the frozen rows of dy), with a stand-in Triton driver that
names an sm_90 target.  Each launch compiles its kernel for every config the autotuner
would try (after pruning), through ``JITFunction.warmup``, and runs nothing (a kernel that
is not autotuned, the NCHW transpose, compiles once).  Per kernel and
config: registers, stack (spills), shared memory, and from the PTX the wgmma, TMA
(cp.async.bulk.tensor), 16-byte cp.async and 2-byte global loads.  test_sm90_compile.py
asserts on it.

It leans on Triton internals (the driver interface, Autotuner attributes, warmup); where
those differ it stops with a message saying so rather than report half a table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile


# The GPU run's helper (benchmarks/gpu/compile_only.py): autotuned launches as compiles.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                os.pardir, "benchmarks", "gpu"))
from compile_only import UnsupportedTriton, autotuned_launches_compile_only  # noqa: E402


def install_sm90_target(arch: int = 90):
    """Make Triton compile for sm_<arch> without a GPU (nothing can be launched after)."""
    try:
        import torch
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.backends.driver import DriverBase
        from triton.backends.nvidia.driver import ty_to_cpp
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedTriton(f"{type(exc).__name__}: {exc}") from exc

    class Sm90Target(DriverBase):
        @classmethod
        def is_active(cls):
            return True

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        def map_python_to_cpp_type(self, ty):
            return ty_to_cpp(ty)

        def get_benchmarker(self):
            raise RuntimeError("nothing runs: compile only")

        def get_empty_cache_for_benchmark(self):
            raise RuntimeError("nothing runs: compile only")

        def clear_cache(self, cache):
            """Nothing ran, so no benchmark cache was filled: nothing to clear."""

    triton.runtime.driver.set_active(Sm90Target())


def _resources(cubin: bytes) -> dict:
    """REG / STACK / SHARED of a cubin, read by the cuobjdump that Triton ships."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, timeout=60).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    if m is None:
        raise UnsupportedTriton(f"cuobjdump gave no resource usage: {out[:200]!r}")
    return dict(registers=int(m.group(1)), stack=int(m.group(2)))


def _ptx_counts(ptx: str) -> dict:
    return dict(
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        tma=len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
        cp_async_16=len(re.findall(
            r"\bcp\.async\.c[ag]\.shared\.global(\.[\w:]+)* \[[^\]]*\], \[[^\]]*\], (0x10|16)\b",
            ptx)),
        ld_global_b16=len(re.findall(r"\bld\.global(\.[a-z0-9:]+)*\.b16\b", ptx)),
        st_global_v4=len(re.findall(r"\bst\.global(\.[a-z0-9:]+)*\.v4\.", ptx)),
    )


def compile_launches(run, first_config: bool = False) -> list:
    """Call ``run()`` (which launches kernels) with every autotuned launch turned into
    compiles of its configs; the rows of the report."""
    rows = []

    def record(fn, cfg, compiled, error):
        row = dict(kernel=fn.__name__, config=_config_name(cfg) if cfg else "launch")
        if error is not None:  # a kernel that does not compile
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        else:
            row.update(_resources(compiled.asm["cubin"]), smem=compiled.metadata.shared,
                       fp_fusion=getattr(compiled.metadata, "enable_fp_fusion", None),
                       **_ptx_counts(compiled.asm["ptx"]))
        rows.append(row)

    with autotuned_launches_compile_only(first_config, on_config=record):
        run()
    return rows


def _config_name(cfg) -> str:
    kw = cfg.kwargs
    tile = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in kw)
    return f"{tile} w{cfg.num_warps} s{cfg.num_stages}"


# ---- the shapes of issue 3 ---------------------------------------------------------------
def linear_launches(rows=16384, old=4096, new=1024, coupled=False):
    import torch
    from expanse_fast.kernels import expanded_linear as L
    dt = torch.bfloat16
    # Rows only set the autotune keys and the grid; 256 are as good as 16384 for compiling,
    # but the dW split heuristic and the pruner see the real count through the key.
    n = min(rows, 256)
    x = torch.randn(n, old + new, dtype=dt)
    wf, wn = torch.randn(old, old, dtype=dt), torch.randn(new, old + new, dtype=dt)
    wc = torch.randn(old, new, dtype=dt) if coupled else None
    bf, bn = torch.randn(old, dtype=dt), torch.randn(new, dtype=dt)
    dy = torch.randn(n, old + new, dtype=dt)
    L.linear_forward(x, wf, bf, wn, bn, wc, [old], [old], "gelu" if coupled else None)
    L.grad_input(dy, wf, wn, wc, [old], [old], coupled)  # (coupled: dx_old too)
    L.grad_weight(dy[:, old:], x, with_colsum=True)


def conv_launches(old=256, new=64, hw=56, channels_last=True, stride=1, coupled=False):
    """The run's conv, fwd and the backward of an isolated hidden layer (no dx_old).  NCHW:
    the forward's channels_last copy of x, dy's trainable columns copied, dW reading x in
    place.
    stride 2: ResNet-50's downsampling 3x3 (128 + 32 channels, 56 -> 28).  coupled: a
    coupled layer's, whose backward asks for dx_old and dW_couple."""
    import torch
    from expanse_fast.kernels import expanded_conv as C
    dt = torch.bfloat16
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, old + new, hw, hw, dtype=dt).contiguous(memory_format=fmt)
    hwo = (hw - 1) // stride + 1
    dy = torch.randn(2, old + new, hwo, hwo, dtype=dt).contiguous(memory_format=fmt)
    wf, wn = torch.randn(old, old, 3, 3, dtype=dt), torch.randn(new, old + new, 3, 3, dtype=dt)
    wc = torch.randn(old, new, 3, 3, dtype=dt) if coupled else None
    C.expanded_conv2d_forward(x, wf, None, wn, None, wc, [old], [old], stride, 1, 1, False)
    C.expanded_conv2d_backward(dy, x, wf, wn, wc, [old], [old], stride, 1, 1, False,
                               True, coupled, True, True, coupled)


def report(first_config: bool = False) -> dict:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise UnsupportedTriton("TRITON_INTERPRET is set: the kernels would not be compiled")
    os.environ.setdefault("EXPANSE_FAST_TMA", "1")  # the descriptor kernels, as on an H200
    import triton
    install_sm90_target()
    from expanse_fast.kernels import expanded_linear_tma
    out = {"triton": triton.__version__, "target": "sm_90a", "rows": []}

    def without_tma(launches):  # the kernels for what TMA cannot describe, other GPUs
        def run():
            mode, expanded_linear_tma.MODE = expanded_linear_tma.MODE, "0"
            try:
                launches()
            finally:
                expanded_linear_tma.MODE = mode
        return run

    def nchw_y_transposed():  # y channels_last, handed back by the tiled transpose
        os.environ["EXPANSE_FAST_CONV_NCHW_Y"] = "transpose"
        try:
            conv_launches(channels_last=False)
        finally:
            del os.environ["EXPANSE_FAST_CONV_NCHW_Y"]

    for name, run in (("linear", linear_launches), ("linear", without_tma(linear_launches)),
                      ("linear-coupled", lambda: linear_launches(coupled=True)),
                      ("conv", conv_launches),
                      ("conv-nchw", lambda: conv_launches(channels_last=False)),
                      ("conv-pointer", without_tma(conv_launches)),
                      ("linear-pointer-coupled", without_tma(
                          lambda: linear_launches(coupled=True))),
                      ("conv-pointer-coupled", without_tma(
                          lambda: conv_launches(coupled=True))),
                      ("conv-stride2", lambda: conv_launches(128, 32, stride=2)),
                      ("conv-coupled", lambda: conv_launches(coupled=True)),
                      ("conv-nchw-yT", nchw_y_transposed)):
        for row in compile_launches(run, first_config):
            out["rows"].append(dict(row, layer=name))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--first-config", action="store_true",
                    help="only each kernel's first (default) config")
    args = ap.parse_args(argv)
    try:
        rep = report(args.first_config)
    except UnsupportedTriton as exc:
        print(json.dumps({"unsupported": str(exc)}) if args.json else f"unsupported: {exc}")
        return 3
    if args.json:
        print(json.dumps(rep))
        return 0
    print(f"Triton {rep['triton']}, {rep['target']}, compiled without a GPU")
    cols = ("registers", "stack", "smem", "wgmma", "tma", "cp_async_16", "ld_global_b16",
            "st_global_v4")
    print(f"{'kernel':<20} {'config':<16} " + " ".join(f"{c:>13}" for c in cols))
    for r in rep["rows"]:
        cells = [r.get("error", "")] if "error" in r else [f"{r[c]:>13}" for c in cols]
        print(f"{r['kernel']:<20} {r['config']:<16} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
