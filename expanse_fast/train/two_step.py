"""Two-step training (Iman et al. 2022): learn the basics first (a few clean, prototypical
examples per class), then the full data with its complexities (optionally with Gaussian
input noise or an augmentation on top)."""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Pair = Tuple[Tensor, Tensor]
Record = Dict[str, object]


def _pair(data, name: str) -> Optional[Pair]:
    if data is None:
        return None
    X, y = data
    if len(X) != len(y):
        raise ValueError(f"{name}: X has {len(X)} examples but y has {len(y)}")
    return X, torch.as_tensor(y).long()


def _loss_and_correct(logits: Tensor, y: Tensor, group: Tensor, heads: Sequence[slice]):
    # Every example is scored on its own data set's head; the loss is the batch mean.
    loss = logits.new_zeros(())
    correct = 0
    for g, head in enumerate(heads):
        m = group == g
        if not bool(m.any()):
            continue
        z = logits[m][:, head]
        loss = loss + F.cross_entropy(z, y[m], reduction="sum")
        if g == 0:
            correct += int((z.argmax(1) == y[m]).sum())
    return loss / len(y), correct


def _run_epochs(model, opt, X, y, group, heads, n_main, epochs, step, batch_size, noise,
                augment, eval_fn, callbacks, history, progress, desc) -> bool:
    from tqdm.auto import tqdm

    bar = tqdm(range(epochs), desc=f"{desc}step {step}", leave=False, disable=not progress)
    for i in bar:
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(X), device=X.device)
        total, correct = 0.0, 0
        for s in range(0, len(X), batch_size):
            idx = order[s:s + batch_size]
            xb = X[idx]
            if noise:
                xb = xb + noise * torch.randn_like(xb)
            if augment is not None:
                xb = augment(xb)
            loss, c = _loss_and_correct(model(xb), y[idx], group[idx], heads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            correct += c
        record: Record = {
            "step": step, "epoch": len(history) + 1, "step_epoch": i + 1,
            "loss": total / len(X), "train_acc": correct / max(n_main, 1),
            "lr": opt.param_groups[0]["lr"], "examples": len(X),
            "seconds": time.perf_counter() - start}
        if eval_fn is not None:  # evaluation time is not training time
            model.eval()
            with torch.no_grad():
                record.update(eval_fn(model))
            model.train()
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['train_acc']:.3f}")
        if any(cb(record, model) for cb in callbacks):
            return True  # a callback asked to stop
    return False


def two_step(model: nn.Module, basics: Optional[Pair], full: Pair,
             epochs: Tuple[int, int] = (10, 15), lr: Tuple[float, float] = (1e-3, 1e-3),
             batch_size: int = 64, weight_decay: float = 1e-4, noise: float = 0.0,
             augment: Optional[Callable[[Tensor], Tensor]] = None,
             head: Optional[slice] = None, seed: int = 0, progress: bool = True,
             callbacks: Sequence[Callable[[Record, nn.Module], Optional[bool]]] = (),
             eval_fn: Optional[Callable[[nn.Module], Dict[str, float]]] = None,
             replay: Optional[Tuple[Tensor, Tensor, Optional[slice]]] = None,
             desc: str = "") -> List[Record]:
    """Train ``model`` in place: ``epochs[0]`` epochs on ``basics`` at ``lr[0]``, then
    ``epochs[1]`` epochs on ``full`` at ``lr[1]`` (``epochs=(0, e)``: ordinary one-step
    training).  Returns the history, one dict per epoch.

    basics, full: (X, y) pairs; ``y`` indexes the outputs ``model(X)[:, head]`` (all outputs
        when ``head`` is None).
    noise, augment: the "complexities" of step two: Gaussian input noise of that standard
        deviation, and/or ``augment(x_batch) -> x_batch``; step one sees clean inputs.
    replay: an extra (X, y, head) data set shuffled into step two's data (rehearsal); its
        labels index ``model(X)[:, head]``.  ``train_acc`` counts the main data only.
    Only parameters with ``requires_grad`` are optimised (AdamW, a fresh optimizer per step).
    eval_fn(model) -> dict is merged into each epoch's record (model in eval mode, no grad;
    its time is not counted in ``seconds``); each callback(record, model) runs after it and
    stops training by returning True.  ``desc`` labels the progress bars.
    Deterministic for a given ``seed``; the caller's random state is left as it was.
    """
    if len(epochs) != 2 or len(lr) != 2 or min(epochs) < 0:
        raise ValueError(f"epochs and lr must be pairs (step one, step two), epochs >= 0; got "
                         f"epochs={epochs}, lr={lr}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    basics, full = _pair(basics, "basics"), _pair(full, "full")
    if epochs[0] and basics is None:
        raise ValueError("epochs[0] > 0 needs basics (or pass epochs=(0, e) for one step)")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    device = params[0].device
    heads = [head if head is not None else slice(None)]
    steps = [(1, basics, epochs[0], lr[0], 0.0, None), (2, full, epochs[1], lr[1], noise, augment)]
    history: List[Record] = []
    was_training = model.training
    fork = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(seed)
        for step, data, n_epochs, step_lr, step_noise, step_aug in steps:
            if not n_epochs:
                continue
            X, y = data
            group = torch.zeros(len(X), dtype=torch.long)
            if step == 2 and replay is not None:
                Xr, yr, hr = replay
                X, y = torch.cat([X, Xr.to(X)]), torch.cat([y, torch.as_tensor(yr).long()])
                group = torch.cat([group, torch.ones(len(Xr), dtype=torch.long)])
                heads_now = heads + [hr if hr is not None else slice(None)]
            else:
                heads_now = heads
            X, y, group = X.to(device), y.to(device), group.to(device)
            opt = torch.optim.AdamW(params, lr=step_lr, weight_decay=weight_decay)
            stop = _run_epochs(model, opt, X, y, group, heads_now, len(data[0]), n_epochs, step,
                               batch_size, step_noise, step_aug, eval_fn, list(callbacks),
                               history, progress, f"{desc}: " if desc else "")
            if stop:
                break
    model.train(was_training)
    return history
