"""Two-step training (Iman et al. 2022): learn the basics first (a few clean, prototypical
examples per class), then the full data with its complexities (optionally with Gaussian
input noise or an augmentation on top)."""
from __future__ import annotations

import hashlib
import math
import numbers
import os
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..files import ensure_writable_dir
from ..hashing import hash_tensor
from ..layout import width as whole
from .distributed import (all_gather, all_reduce_metrics, any_rank, has_sharded_parameters,
                          is_distributed, is_main_process, make_sampler, rank, unwrap,
                          world_size, wrap_ddp)
from .state import (TrainingState, TrainingStateError, check_rng_states, frozen_fingerprint,
                    rng_states, save_training_state, set_rng_states)

Pair = Tuple[Tensor, Tensor]
Record = Dict[str, object]
CHECKPOINT_NAME = "two_step.safetensors"


def _pair(data, name: str) -> Optional[Pair]:
    if data is None:
        return None
    if isinstance(data, Tensor) or not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"{name} must be an (X, y) pair, got {_kind(data)}")
    X, y = data
    if not isinstance(X, Tensor):
        X = torch.as_tensor(X)  # (a NumPy array or a list: the model reads tensors)
    if len(X) != len(y):
        raise ValueError(f"{name}: X has {len(X)} examples but y has {len(y)}")
    y = torch.as_tensor(y)
    # class indices: a float y would be truncated without a word
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name}: y must hold integer class indices, got {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"{name}: y must be a 1-d tensor of class indices, got shape "
                         f"{tuple(y.shape)}")
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"{name}: y must hold class indices >= 0, got {int(y.min())}")
    return X, y.long()


def _kind(value) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _slice_text(head: Optional[slice]) -> str:
    """``head`` as Python writes it in an index: ``:``, ``10:15``, ``::2``."""
    if head is None:
        return ":"
    text = ":".join("" if v is None else str(v) for v in (head.start, head.stop))
    return text + (f":{head.step}" if head.step is not None else "")


def _nonnegative(v) -> bool:
    """A finite real number >= 0 (not a bool)."""
    return (not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v)
            and v >= 0)


def _check_settings(epochs, lr, batch_size, noise, head, callbacks, replay,
                    weight_decay=0.0, seed=0, eval_fn=None):
    """Refuse arguments of the wrong kind before anything runs."""
    if not isinstance(epochs, (tuple, list)) or len(epochs) != 2:
        raise ValueError(f"epochs must be a pair (step one, step two), got {epochs!r}")
    if not isinstance(lr, (tuple, list)) or len(lr) != 2:
        raise ValueError(f"lr must be a pair (step one, step two), got {lr!r}")
    for k in range(2):
        whole(epochs[k], f"epochs[{k}]")
        if not _nonnegative(lr[k]):
            raise ValueError(f"lr[{k}] must be a finite number >= 0, got {lr[k]!r}")
    whole(batch_size, "batch_size", least=1)
    if not _nonnegative(noise):
        raise ValueError(f"noise must be a finite standard deviation >= 0, got {noise!r}")
    if not _nonnegative(weight_decay):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) \
            or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be a whole number in [0, 2**63), got {seed!r}")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"eval_fn must be a callable model -> dict, got {_kind(eval_fn)}")
    for what, h in (("head", head), ("replay's head", replay[2] if replay else None)):
        if h is not None and not isinstance(h, slice):
            raise TypeError(f"{what} must be a slice of the model's outputs (e.g. "
                            f"slice(10, 15)) or None, got {_kind(h)} {h!r}")
    if callable(callbacks) or not isinstance(callbacks, (tuple, list)):
        raise TypeError(f"callbacks must be a list of callables, got {_kind(callbacks)} (one "
                        "callback: callbacks=[fn])")
    for i, cb in enumerate(callbacks):
        if not callable(cb):
            raise TypeError(f"callbacks[{i}] is not callable: {_kind(cb)}")


def _check_data_fits(model: nn.Module, device, named_sets) -> None:
    """One eval-mode forward of each data set's first examples, before any training: a
    wrong width or dtype, or labels past the outputs ``head`` selects, are found before
    step one has changed a weight (not after it, when step two's data first runs).  Step
    two's sets go through ``augment`` first, as in training (a crop may change the shape)."""
    with torch.no_grad():
        for name, X, y, head, augment in named_sets:
            if not len(X):
                continue
            try:
                # (two examples where there are: training never forms a batch of one, and
                # a model may squeeze its batch dimension, or a BatchNorm need two)
                first = X[:2].to(device, copy=True)  # (an augment may work in place)
                out = model(augment(first) if augment is not None else first)
            except Exception as exc:
                raise ValueError(f"{name}: the model fails on its first examples (shape "
                                 f"{tuple(X.shape[1:])}, dtype {X.dtype}), before any "
                                 f"training: {type(exc).__name__}: {exc}") from exc
            if not isinstance(out, Tensor) or out.dim() != 2:
                raise ValueError(f"{name}: two_step needs logits of shape (batch, classes) "
                                 f"from the model, got {_kind(out)}")
            n_out = out[:, head if head is not None else slice(None)].shape[1]
            top = int(y.max()) if len(y) else -1
            if top >= n_out:
                raise ValueError(f"{name}: label {top} is past the {n_out} outputs of "
                                 f"model(X)[:, {_slice_text(head)}]")


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


def _run_epochs(model, opt, X, y, group, heads, epochs, step, batch_size, noise, augment,
                eval_fn, callbacks, history, progress, desc, seed, first=0, sched=None,
                checkpoint=None) -> bool:
    from tqdm.auto import tqdm

    bar = tqdm(range(first, epochs), desc=f"{desc}step {step}", leave=False,
               disable=not progress or not is_main_process(), initial=first, total=epochs)
    # Distributed: each rank trains on its share; DDP averages the gradients.
    sampler = make_sampler(X, shuffle=True, seed=seed) if is_distributed() else None
    for i in bar:
        model.train()
        start = time.perf_counter()
        if sampler is None:
            order = torch.randperm(len(X), device=X.device)
        else:
            sampler.set_epoch(len(history))
            order = torch.as_tensor(list(sampler), dtype=torch.long, device=X.device)
        total, correct = 0.0, 0
        for s, e in _batches(len(order), batch_size):
            idx = order[s:e]
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
        # Over all ranks (DistributedSampler repeats a few examples to even the shares).
        sums = all_reduce_metrics({"loss": total, "correct": correct, "seen": len(order),
                                   "seen_main": int((group[order] == 0).sum())})
        record: Record = {
            "step": step, "epoch": len(history) + 1, "step_epoch": i + 1,
            "loss": sums["loss"] / max(sums["seen"], 1),
            "train_acc": sums["correct"] / max(sums["seen_main"], 1),
            "lr": opt.param_groups[0]["lr"], "examples": len(X),
            "seconds": time.perf_counter() - start}
        if sched is not None:
            sched.step()
        if eval_fn is not None:  # evaluation time is not training time
            model.eval()
            with torch.no_grad():
                extra = eval_fn(unwrap(model))
            model.train()
            if extra is not None and not isinstance(extra, Mapping):
                raise TypeError(f"eval_fn must return a dict of metrics (or None), got "
                                f"{_kind(extra)} {extra!r}: e.g. {{'val_acc': {extra!r}}}")
            clash = sorted(set(extra or {}) & set(record))
            if clash:
                raise ValueError(f"eval_fn returned {clash}, which the epoch's record holds "
                                 f"already ({sorted(record)}): name them otherwise, e.g. "
                                 f"'val_{clash[0]}'")
            record.update(extra or {})
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['train_acc']:.3f}")
        # True: a callback asks to stop (on any rank: all ranks stop together); every
        # callback runs, whatever the ones before it said
        stops = [bool(cb(record, unwrap(model))) for cb in callbacks]
        stop = any_rank(any(stops))
        if checkpoint is not None:
            checkpoint(step, i + 1, stop, opt, sched)
        if stop:
            return True
    return False


def _batches(n: int, batch_size: int):
    """(start, end) of each batch of an epoch over n examples; a last batch of one example
    joins the one before it (a BatchNorm in training cannot normalise a single example)."""
    starts = list(range(0, n, batch_size))
    if batch_size > 1 and len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, starts[1:] + [n]))


def _digest(*tensors: Optional[Tensor]) -> str:
    h = hashlib.sha256()
    for i, t in enumerate(tensors):
        if t is None:
            h.update(b"none|")
        else:
            hash_tensor(h, str(i), t)
    return h.hexdigest()


def _check_resume_config(saved, config, path):
    if not isinstance(saved, dict):
        raise TrainingStateError(f"training checkpoint {path!r} holds no two_step settings")
    differ = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
    if differ:
        raise TrainingStateError(
            f"training checkpoint {path!r} is from a two_step run with other settings "
            f"({', '.join(f'{k}: {saved.get(k)!r} then, {config.get(k)!r} now' for k in differ)});"
            " resume with the same arguments, or start afresh in another checkpoint_dir")


def _checkpoint_paths(checkpoint_dir, checkpoint_every, resume, resume_from):
    """(where to save, what to resume from); refuses bad arguments before any training."""
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) \
            or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be an int >= 1 (epochs), got "
                         f"{checkpoint_every!r}")
    if resume and checkpoint_dir is None and resume_from is None:
        raise ValueError("resume=True needs checkpoint_dir (or resume_from=path)")
    save_path = None
    if checkpoint_dir is not None:
        checkpoint_dir = os.fspath(checkpoint_dir)
        try:
            ensure_writable_dir(checkpoint_dir)
        except OSError as exc:
            raise OSError(f"checkpoint_dir {checkpoint_dir!r} is not a writable folder: "
                          f"{exc.strerror or exc}") from exc
        save_path = os.path.join(checkpoint_dir, CHECKPOINT_NAME)
    load_path = None
    if resume_from is not None:
        load_path = os.fspath(resume_from)
        if os.path.isdir(load_path):
            load_path = os.path.join(load_path, CHECKPOINT_NAME)
        if not os.path.isfile(load_path):
            raise FileNotFoundError(f"resume_from: no training checkpoint at {load_path!r}")
    elif resume and os.path.isfile(save_path):
        load_path = save_path  # resume=True and nothing saved yet: start afresh
    return save_path, load_path


def two_step(model: nn.Module, basics: Optional[Pair], full: Pair,
             epochs: Tuple[int, int] = (10, 15), lr: Tuple[float, float] = (1e-3, 1e-3),
             batch_size: int = 64, weight_decay: float = 1e-4, noise: float = 0.0,
             augment: Optional[Callable[[Tensor], Tensor]] = None,
             head: Optional[slice] = None, seed: int = 0, progress: bool = True,
             callbacks: Sequence[Callable[[Record, nn.Module], Optional[bool]]] = (),
             eval_fn: Optional[Callable[[nn.Module], Dict[str, float]]] = None,
             replay: Optional[Tuple[Tensor, Tensor, Optional[slice]]] = None,
             desc: str = "", lr_schedule: Optional[Callable] = None,
             checkpoint_dir: Optional[str] = None, checkpoint_every: int = 1,
             resume: bool = False, resume_from: Optional[str] = None) -> List[Record]:
    """Train ``model`` in place: ``epochs[0]`` epochs on ``basics`` at ``lr[0]``, then
    ``epochs[1]`` epochs on ``full`` at ``lr[1]`` (``epochs=(0, e)``: ordinary one-step
    training).  Returns the history, one dict per epoch.

    basics, full: (X, y) pairs; ``y`` indexes the outputs ``model(X)[:, head]`` (all outputs
        when ``head`` is None).
    noise, augment: the "complexities" of step two: Gaussian input noise of that standard
        deviation, and/or ``augment(x_batch) -> x_batch``; step one sees clean inputs.
    Before anything trains, the first examples of each data set run once through the model
    (eval mode, no grad; step two's through ``augment``): data that do not fit the model
    (width, dtype, labels past its outputs) are refused before a weight has changed.
    replay: an extra (X, y, head) data set shuffled into step two's data (rehearsal); its
        labels index ``model(X)[:, head]``.  ``train_acc`` counts the main data only.
    Only parameters with ``requires_grad`` are optimised (AdamW, a fresh optimizer per step).
    An epoch's batches are ``batch_size`` examples; a last batch of one joins the batch
    before it (a BatchNorm in training mode cannot normalise one example).
    eval_fn(model) -> dict is merged into each epoch's record (model in eval mode, no grad;
    its time is not counted in ``seconds``); each callback(record, model) runs after it and
    stops training by returning True.  ``desc`` labels the progress bars.
    lr_schedule(optimizer, step, n_epochs) -> an LR scheduler, made for each step; its
        ``step()`` runs after every epoch (the record's ``lr`` is the epoch's own).
    Deterministic for a given ``seed``; the caller's random state is left as it was.

    Under torchrun (a process group of several ranks) each rank trains on its share of
    the data (DistributedSampler: pass the same data on every rank) under DDP (a model
    already wrapped by DDP or FSDP2 is used as it is); the history's loss and accuracy
    are over all ranks; only rank 0 shows progress and writes checkpoints.  eval_fn and
    the callbacks run on every rank: log and save on rank 0 only
    (``xf.train.distributed.is_main_process()``).

    Checkpoints: with ``checkpoint_dir``, the trainable tensors and buffers, the optimizer,
    the scheduler, the random state and the history are saved to
    ``checkpoint_dir/two_step.safetensors`` every ``checkpoint_every`` epochs, at the end of
    each step and when a callback stops training (atomically: a crash leaves the previous
    checkpoint whole).  ``resume=True`` continues from that file when it exists (else starts
    afresh); ``resume_from=path`` (a file or a folder) continues from another.  The resumed
    run ends with the same weights, bit for bit, as one never interrupted (same device),
    and returns the whole history.  A checkpoint of another model, other frozen weights,
    other data or other settings is refused (``TrainingStateError``) before anything is
    changed.  Randomness drawn by ``augment`` from Python's or NumPy's generators is not
    restored: draw from torch.
    """
    if replay is not None and (not isinstance(replay, (tuple, list)) or len(replay) != 3):
        raise ValueError(f"replay must be (X, y, head), got {_kind(replay)}"
                         + (f" of {len(replay)} items" if isinstance(replay, (tuple, list))
                            else ""))
    _check_settings(epochs, lr, batch_size, noise, head, callbacks, replay, weight_decay, seed,
                    eval_fn)
    seed = int(seed)
    basics, full = _pair(basics, "basics"), _pair(full, "full")
    if epochs[0] and basics is None:
        raise ValueError("epochs[0] > 0 needs basics (or pass epochs=(0, e) for one step)")
    if epochs[1] and full is None:
        raise ValueError("epochs[1] > 0 needs full, the data of step two")
    if replay is not None:
        replay = (*_pair(tuple(replay[:2]), "replay"), replay[2])
    # an epoch over no examples would report a loss and accuracy of 0 that measure nothing
    for k, (name, data) in enumerate((("basics", basics), ("full", full))):
        if epochs[k] and data is not None and len(data[1]) == 0:
            raise ValueError(f"{name} holds no examples, but epochs[{k}] = {epochs[k]} trains "
                             f"on it" + (" (pass epochs=(0, e) for one step)" if k == 0 else ""))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    save_path, load_path = _checkpoint_paths(checkpoint_dir, checkpoint_every, resume,
                                             resume_from)
    if (save_path or load_path) and has_sharded_parameters(model):
        raise ValueError("checkpoint_dir / resume_from with an FSDP2-sharded model: its "
                         "parameters are DTensor shards, which two_step's checkpoints do not "
                         "gather; train under DDP (two_step wraps the model itself) or save "
                         "with torch.distributed.checkpoint from a callback")
    train_model = wrap_ddp(model) if is_distributed() else model
    device = params[0].device
    heads = [head if head is not None else slice(None)]
    steps = [(1, basics, epochs[0], lr[0], 0.0, None), (2, full, epochs[1], lr[1], noise, augment)]
    history: List[Record] = []
    # what a checkpoint must match to be continued
    config = {"epochs": list(epochs), "lr": [float(v) for v in lr], "batch_size": batch_size,
              "weight_decay": float(weight_decay), "noise": float(noise), "seed": seed,
              "head": repr(head), "augment": augment is not None,
              "lr_schedule": lr_schedule is not None,
              "replay_head": repr(replay[2]) if replay is not None else None,
              "data": _digest(*(basics or (None, None)), *(full or (None, None)),
                              *(replay[:2] if replay is not None else (None, None)))}
    resumed: Optional[TrainingState] = None
    start = (0, 0)  # (step, epochs of that step) already done
    if load_path is not None:
        resumed = TrainingState.read(load_path)
        prog = resumed.progress if isinstance(resumed.progress, dict) else {}
        _check_resume_config(prog.get("config"), config, load_path)
        try:
            start = (int(prog["step"]), int(prog["step_epochs"]))
            stopped, saved_history = bool(prog["stopped"]), list(prog["history"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TrainingStateError(f"training checkpoint {load_path!r}: its progress is "
                                     f"malformed ({exc})") from exc
        if stopped:  # a callback had stopped that run: it is finished
            start = (3, 0)
        resumed.check_fits(model)  # (before the data's check: the clearer refusal)
    fingerprint = frozen_fingerprint(model) if save_path else None

    def checkpoint(step, step_epochs, stopped, opt, sched):
        if len(history) % checkpoint_every and step_epochs < epochs[step - 1] and not stopped:
            return
        # every rank's generators (its own noise, dropout and augmentation streams): the
        # file holds rank 0's as its own, and the others' here
        by_rank = all_gather(rng_states(model)) if is_distributed() else None
        if not is_main_process():
            return
        save_training_state(save_path, model, opt, sched, fingerprint=fingerprint, progress={
            "config": config, "step": step, "step_epochs": step_epochs, "stopped": stopped,
            "history": history, "rng_by_rank": by_rank})

    def own_rng(progress):
        """This rank's generators as the run saved them, where it saved every rank's."""
        by_rank = progress.get("rng_by_rank") if isinstance(progress, dict) else None
        if isinstance(by_rank, list) and len(by_rank) == world_size():
            set_rng_states(check_rng_states(by_rank[rank()],
                                            f"training checkpoint {load_path!r}, rank {rank()}"))

    modes = {m: m.training for m in model.modules()}  # each put back as it was, at the end
    fork = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork):
            model.eval()
            _check_data_fits(model, device, [
                (name, d[0], d[1], h, aug) for name, d, h, n, aug in (
                    ("basics", basics, head, epochs[0], None),
                    ("full", full, head, epochs[1], augment),
                    ("replay", replay[:2] if replay else None,
                     replay[2] if replay else None, epochs[1], augment))
                if d is not None and n])
            torch.manual_seed(seed + rank())  # noise, augmentation, dropout: new on each rank
            for step, data, n_epochs, step_lr, step_noise, step_aug in steps:
                first = start[1] if step == start[0] else 0
                if not n_epochs or step < start[0] or first >= n_epochs:
                    continue
                X, y, group, heads_now = _step_data(data, step, replay, heads, device)
                opt = torch.optim.AdamW(params, lr=step_lr, weight_decay=weight_decay)
                sched = lr_schedule(opt, step, n_epochs) if lr_schedule is not None else None
                if resumed is not None:
                    # mid-step: this step's optimizer and scheduler continue; at a step's
                    # start they are fresh, as in a run never interrupted
                    resumed.restore(model, opt if first else None, sched if first else None)
                    own_rng(resumed.progress)
                    history[:] = saved_history
                    resumed = None
                stop = _run_epochs(train_model, opt, X, y, group, heads_now, n_epochs, step,
                                   batch_size, step_noise, step_aug, eval_fn, list(callbacks),
                                   history, progress, f"{desc}: " if desc else "", seed, first,
                                   sched, checkpoint if save_path else None)
                if stop:
                    break
        if resumed is not None:  # the saved run had finished: its weights and history
            resumed.restore(model, rng=False)
            history[:] = saved_history
    finally:
        for m, training in modes.items():  # (after an error too)
            m.training = training
    return history


def _step_data(data, step, replay, heads, device):
    """(X, y, group, heads) of one step on ``device``: step two's data with the replay set
    shuffled in (group 1, scored on its own head)."""
    X, y = data
    group = torch.zeros(len(X), dtype=torch.long)
    if step == 2 and replay is not None:
        Xr, yr, hr = replay
        X, y = torch.cat([X, Xr.to(X)]), torch.cat([y, torch.as_tensor(yr).long()])
        group = torch.cat([group, torch.ones(len(Xr), dtype=torch.long)])
        heads = heads + [hr if hr is not None else slice(None)]
    return X.to(device), y.to(device), group.to(device), heads
