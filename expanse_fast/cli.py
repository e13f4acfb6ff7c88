"""The ``expanse-fast`` command line."""
from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import List, Optional

from .files import ensure_writable_dir

DEBUG_ENV = "EXPANSE_FAST_DEBUG"  # set to 1: errors end with their full traceback


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):  # (also refuses nan)
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _writable_dir(path: str) -> str:
    """Create ``path`` if needed and prove it writable now, not after an hour of training."""
    try:
        ensure_writable_dir(path)
    except OSError as exc:
        raise OSError(f"cannot write to the output folder {path!r}: "
                      f"{exc.strerror or exc}") from None
    return path


def _info(args) -> int:
    import torch

    from . import __version__
    from .backend_choice import BACKENDS, availability, describe_auto

    print(f"expanse_fast {__version__}")
    print(f"python       {platform.python_version()} ({sys.executable})")
    print(f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    try:
        import triton
        print(f"triton       {triton.__version__}")
    except Exception as exc:  # noqa: BLE001 - report, never crash
        print(f"triton       not importable ({type(exc).__name__}: {exc})")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        print(f"gpu          {torch.cuda.get_device_name(0)}")
    else:
        print("gpu          none visible to torch")
    for device in devices:
        print(f"\nbackends on {device}:")
        for name in BACKENDS[1:]:
            ok, why = availability(name, device)
            print(f"  {name:7} {'usable' if ok else 'unusable':9} {why}")
            if name == "triton" and ok and device.type == "cuda":
                print(f"          {_tma_state(device)}")
            if name == "cuda" and ok:
                print(f"          {_cuda_math_state(device)}")
        for line in describe_auto(device):
            print(f"  auto    {line}")
    return 0


def _cuda_math_state(device) -> str:
    """Which tile math the compiled linear kernels use on ``device``."""
    try:
        from .backends import cuda
        maths = cuda.linear_maths(device)
    except Exception as exc:  # noqa: BLE001 - report, never crash
        return f"linear kernels: unknown ({type(exc).__name__}: {exc})"
    return "linear kernels: " + ", ".join(f"{dt} {m}" for dt, m in maths.items())


def _tma_state(device) -> str:
    """How the Triton linear and conv kernels load their tiles on ``device``."""
    import torch
    try:
        from .kernels import expanded_linear_tma as tma
    except Exception as exc:  # noqa: BLE001 - report, never crash
        return f"tensor-descriptor (TMA) loads: unavailable ({type(exc).__name__}: {exc})"
    if tma.disabled_reason:
        return f"tensor-descriptor (TMA) loads: off ({tma.disabled_reason})"
    if tma.MODE == "0":
        return "tensor-descriptor (TMA) loads: off (EXPANSE_FAST_TMA=0)"
    cap = torch.cuda.get_device_capability(device)
    if tma.MODE != "1" and cap < (9, 0):
        return f"tensor-descriptor (TMA) loads: off (compute capability {cap[0]}.{cap[1]} < 9.0)"
    return ("tensor-descriptor (TMA) loads: on for 16-byte aligned fp16/bf16 linear layers "
            "and convs"
            if tma.MODE != "1" else "tensor-descriptor (TMA) loads: on (EXPANSE_FAST_TMA=1)")


def _demo(args) -> int:
    from .demo import run_demo

    if args.out:
        _writable_dir(args.out)
    run_demo(model=args.model, target=args.target, seeds=args.seeds, quick=args.quick,
             out=args.out, progress=not args.no_progress)
    return 0


def _bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="expanse-fast",
        description="EXPANSE progressive transfer learning with fused kernels.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions, device, which backends are usable and why not")
    info.set_defaults(func=_info)
    demo = sub.add_parser(
        "demo", help="the main job: source digits 0-4, target 5-9; EXPANSE against baselines")
    demo.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                      help="mlp: 784-150-80-5 widened to 784-256-128-10; cnn: a small conv net")
    demo.add_argument("--target", choices=("default", "distant"), default="default",
                      help="distant: the target digits under a fixed random pixel permutation")
    demo.add_argument("--seeds", type=_positive_int, default=1,
                      help="repeat K times; mean and std")
    demo.add_argument("--quick", action="store_true", help="few epochs: a smoke test")
    demo.add_argument("--out", default="./expanse-demo-out",
                      help="folder for report.json and report.png (default: %(default)s)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    bench = sub.add_parser(
        "bench", help="expanse_fast against masked dense, torch.cat modules, fine-tuning the "
                      "original and LoRA: speed-ups beside the useful-work limits")
    bench.add_argument("--size", choices=("tiny", "default", "full"), default="default",
                       help="default: about a minute on 2 CPU cores; full: every widening "
                            "(10/25/50/100%%, three groups) and pass; tiny: a smoke test")
    bench.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    bench.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       default="float32")
    bench.add_argument("--json", action="store_true", help="print JSON instead of the table")
    bench.add_argument("--save", metavar="PATH", help="also write the JSON to PATH")
    bench.add_argument("--filter", default="", metavar="TEXT",
                       help="only groups whose name contains TEXT")
    bench.add_argument("--threads", type=_positive_int, default=None,
                       help="torch CPU threads (default: torch's choice)")
    bench.add_argument("--budget", type=_seconds, default=3.0, metavar="SECONDS",
                       help="timing budget per group, rounds permitting (default: %(default)s)")
    bench.add_argument("--min-rounds", type=_positive_int, default=5,
                       help="timed rounds per group at least (default: %(default)s)")
    bench.add_argument("--max-rounds", type=_positive_int, default=30,
                       help="and at most (default: %(default)s)")
    bench.add_argument("--no-memory", action="store_true",
                       help="skip the peak-memory measurement of model steps")
    bench.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        print(f"{parser.prog}: error: choose a command (see above)", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``| head``): stop quietly
        try:  # and keep Python's exit-time flush of stdout from failing again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except Exception as exc:  # one line, never a bare traceback (unless asked for)
        if os.environ.get(DEBUG_ENV):
            raise
        text = " ".join(str(exc).split()) or "(no message)"
        kind = "" if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: "
        print(f"{parser.prog} {args.command}: error: {kind}{text} (set {DEBUG_ENV}=1 for the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
