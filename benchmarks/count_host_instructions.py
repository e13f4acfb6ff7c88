"""Host instructions per call, counted by valgrind's callgrind: a measure of the Python,
autograd and dispatch work of a call that this machine's timing noise cannot move.

Each case runs twice under callgrind, once with no timed calls and once with N; the
difference divided by N is one call's cost (the import and the warm-up cancel out).

    python benchmarks/count_host_instructions.py [layer|mlp|cnn ...] [--calls N]

Cases (float32, one CPU thread): ``layer``, one forward+backward of an expanded 64+16
linear layer on 8 rows (the layer of benchmarks/test_bench_host_overhead.py) and of the
full-width ``nn.Linear``; ``mlp``, a training step (AdamW) of the MLP 64-64-64-64-10
widened 25% with 10 new classes and of the original MLP; ``cnn``, one of the ResNet-style
CNN at 8+2 channels (batch 4, 8x8) and of the original CNN.  About two minutes a run (most
of it importing torch under valgrind); the runs go two at a time.
"""
import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys

CASES = ("layer", "mlp", "cnn")


def _workload(case: str, peer: bool, calls: int) -> None:
    """Build ``case`` (the expanded model, or with ``peer`` its plain counterpart), warm it
    up, then run ``calls`` calls."""
    import torch
    from torch import nn

    import expanse_fast as xf
    from expanse_fast import bench as B
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if case == "layer":
        layer = (nn.Linear(80, 80) if peer
                 else xf.ExpandedLinear.from_linear(nn.Linear(64, 64), 16, 16))
        layer.skip_old_input_grad = True  # inside an expanded model
        x = torch.randn(8, 80, requires_grad=True)
        dy = torch.randn(8, 80)
        params = [p for p in layer.parameters() if p.requires_grad]

        def call():
            x.grad = None
            for p in params:
                p.grad = None
            layer(x).backward(dy)
    elif case == "mlp":
        base = B.mlp((64, 64, 64, 64, 10))
        big = xf.expand(base, width=0.25, new_classes=10)
        x = torch.randn(8, 64)
        y = torch.randint(0, 10, (8,)) if peer else torch.randint(10, 20, (8,))
        call = B._step_fn(B.finetune_original(big) if peer else big, x, y)
    elif case == "cnn":
        spec = B.ModelSpec("cnn", (8, 10), 4, hw=8)
        built = B.build_model_case(spec, "cpu", torch.float32, backends=["torch"])
        call = (built.get(B.FINETUNE) if peer else built.contenders[0]).call
    else:
        raise ValueError(f"case must be one of {CASES}, got {case!r}")
    for _ in range(10):
        call()
    for _ in range(calls):
        call()


def _count(case: str, peer: bool, calls: int) -> int:
    """Instructions of one run of ``_workload`` under callgrind."""
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
           os.path.abspath(__file__), "--run", case, "--calls", str(calls)]
    if peer:
        cmd.append("--peer")
    # The same dict layouts in every run; and numpy's OpenBLAS with no thread pool: its idle
    # threads spin, and callgrind counts the spinning (in one run of the layer case 63k
    # instructions a call, as much more as the run took longer: noise, not the call's).
    env = dict(os.environ, PYTHONHASHSEED="0", OPENBLAS_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in out.stderr.splitlines():
        if "Collected" in line:
            return int(line.split()[-1])
    raise RuntimeError(f"callgrind printed no count for {case}:\n{out.stderr[-2000:]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=list(CASES))
    parser.add_argument("--calls", type=int, default=0, help="timed calls (default per case)")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        _workload(args.run, args.peer, args.calls)
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: nothing counted", file=sys.stderr)
        return 1
    default_calls = {"layer": 600, "mlp": 100, "cnn": 30}
    jobs = {}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for case in args.cases:
            n = args.calls or default_calls[case]
            for peer in (False, True):
                for calls in (0, n):
                    jobs[(case, peer, calls)] = pool.submit(_count, case, peer, calls)
        for case in args.cases:
            n = args.calls or default_calls[case]
            per = {peer: (jobs[(case, peer, n)].result() - jobs[(case, peer, 0)].result()) / n
                   for peer in (False, True)}
            print(f"{case}: expanded {per[False]:,.0f} instructions per call, plain "
                  f"{per[True]:,.0f} ({per[False] / per[True]:.2f}x)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
