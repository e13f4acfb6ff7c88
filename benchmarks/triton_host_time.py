"""Host time of the Triton path without a GPU: the kernels compiled for sm_90a on the CPU,
every launch stubbed out at Triton's launcher, so what is timed is the Python of a layer's
forward+backward (module, op, launchers, Triton's JIT dispatch), which paces a GPU step
whenever the device finishes first.

    python benchmarks/triton_host_time.py [linear|conv ...] [--rounds R]
    valgrind --tool=callgrind python benchmarks/triton_host_time.py linear --mode autotuner --calls N

Each case is timed in two modes, in interleaved rounds (this machine's noise moves both
alike): ``launch``, the package as it is (``kernels/launch.py`` skips the autotuner once it
has chosen), and ``autotuner``, every launch through ``Autotuner.run`` as a plain
``kernel[grid](...)`` would go.  ``--mode M --calls N`` runs N calls in one mode and times
nothing: run it under callgrind with N = 0 and N, and divide the difference by N.

Cases (bfloat16, descriptor kernels on, one tile per kernel): ``linear``, a 1024+256 layer
on 64 rows; ``conv``, a 3x3 conv of 64+16 channels on 2 x 8 x 8 (channels_last, weights
too).  The first
run compiles each kernel for sm_90a (seconds to minutes, cached by Triton afterwards).
Needs a real Triton (TRITON_INTERPRET unset); leans on Triton internals like
tests/kernels/sm90_compile.py, whose stand-in target it uses.
"""
import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _stand_in_gpu():
    """Compile for sm_90a, tune nothing, launch nothing."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled")
    os.environ.setdefault("EXPANSE_FAST_TMA", "1")
    os.environ["EXPANSE_FAST_AUTOTUNE"] = "0"
    sys.path.insert(0, os.path.join(HERE, "..", "tests", "kernels"))
    import sm90_compile
    sm90_compile.install_sm90_target()
    import triton
    from triton.compiler.compiler import CompiledKernel
    active = triton.runtime.driver.active
    active.get_benchmarker = lambda: (lambda fn, quantiles=None, **kw: [0.0] * len(quantiles))

    def no_launch(self):
        if self.module is None:  # (what _init_handles would load onto a GPU)
            self.module, self.function = "stub", 0
            self._run = lambda *args, **kwargs: None
    CompiledKernel._init_handles = no_launch
    from expanse_fast.backends import triton as triton_backend
    triton_backend.availability = lambda device: (True, "stand-in sm_90a target")


def _case(name):
    """A forward+backward call of an expanded layer on the triton backend."""
    import torch
    from torch import nn

    import expanse_fast as xf
    from expanse_fast import bench
    dt = torch.bfloat16
    torch.manual_seed(0)
    if name == "linear":
        layer = xf.ExpandedLinear.from_linear(nn.Linear(1024, 1024).to(dt), 256, 256)
        x = torch.randn(64, 1280, dtype=dt, requires_grad=True)
        dy = torch.randn(64, 1280, dtype=dt)
    elif name == "conv":
        fmt = torch.channels_last  # weights too, as the GPU run's channels_last rows
        layer = xf.ExpandedConv2d.from_conv(nn.Conv2d(64, 64, 3, padding=1).to(dt), 16, 16)
        layer = layer.to(memory_format=fmt)
        x = torch.randn(2, 80, 8, 8, dtype=dt).contiguous(memory_format=fmt).requires_grad_()
        dy = torch.randn(2, 80, 8, 8, dtype=dt).contiguous(memory_format=fmt)
    else:
        raise SystemExit(f"case must be linear or conv, got {name!r}")
    layer.skip_old_input_grad = True  # a hidden layer of an expanded model
    layer.backend = "triton"
    return bench._layer_calls(layer, x, dy, "fwd+bwd")[0]  # as `expanse-fast bench` times it


def _use(mode):
    """Route the kernel modules' launches: as they are, or through the autotuner."""
    from expanse_fast.kernels import expanded_conv, expanded_linear, expanded_linear_tma
    from expanse_fast.kernels.launch import launch

    def through_autotuner(kernel, grid, *args, **meta):
        return kernel[grid](*args, **meta)
    for module in (expanded_linear, expanded_linear_tma, expanded_conv):
        module.launch = launch if mode == "launch" else through_autotuner


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", default=["linear", "conv"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--mode", choices=("launch", "autotuner"))
    ap.add_argument("--calls", type=int, default=0)
    args = ap.parse_args(argv)
    _stand_in_gpu()
    for name in args.cases:
        call = _case(name)
        t0 = time.perf_counter()
        call()  # compiles (or loads from Triton's cache)
        first = time.perf_counter() - t0
        if args.mode:
            _use(args.mode)
            for _ in range(30 + args.calls):
                call()
            continue
        rounds = {"launch": [], "autotuner": []}
        for _ in range(args.rounds):
            for mode in rounds:
                _use(mode)
                for _ in range(5):
                    call()
                times = []
                for _ in range(60):
                    t = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - t)
                rounds[mode].append(statistics.median(times) * 1e6)
        ratio = statistics.median(a / b for a, b in zip(rounds["autotuner"], rounds["launch"]))
        print(f"{name}: first call {first:.1f} s; forward+backward host time, median of "
              f"{args.rounds} round medians: launch {statistics.median(rounds['launch']):.0f} us, "
              f"through the autotuner {statistics.median(rounds['autotuner']):.0f} us "
              f"(x{ratio:.2f} per round)")


if __name__ == "__main__":
    main()
