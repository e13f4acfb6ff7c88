"""The ``expanse-fast`` command line."""
from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional


def _info(args) -> int:
    import torch

    from . import __version__
    from .backend_choice import BACKENDS, availability

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
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(model=args.model, target=args.target, seeds=args.seeds, quick=args.quick,
             out=args.out, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    demo.add_argument("--seeds", type=int, default=1, help="repeat K times; mean and std")
    demo.add_argument("--quick", action="store_true", help="few epochs: a smoke test")
    demo.add_argument("--out", default="./expanse-demo-out",
                      help="folder for report.json and report.png (default: %(default)s)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
