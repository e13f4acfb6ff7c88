"""Training checkpoints: atomic, pickle-free, refused when they do not fit.

One safetensors file holds what a run needs to continue exactly where it stopped:

* the model's trainable parameters and its (persistent) buffers -- the frozen parameters
  are not stored, only a fingerprint of them, so resuming on another base is refused;
* the optimizer's and the LR scheduler's ``state_dict`` (tensors as tensors, the rest as
  JSON), the torch random generators (CPU, and CUDA when the model lives there);
* ``progress``: anything JSON-like the training loop wants back (epoch counters, history).

The file is written to a temporary name, flushed to disk, then renamed over the old one, so a
crash leaves the previous checkpoint or the new one, never half a file.  A digest over the
whole payload makes a truncated or modified file fail before anything is changed; reading
never unpickles anything.
"""
from __future__ import annotations

import hashlib
import json
import numbers
import os
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..hashing import hash_tensor as _hash_tensor

FORMAT = "expanse_fast.training_state"
VERSION = 1


class TrainingStateError(ValueError):
    """The training checkpoint does not fit the model / optimizer, or is damaged."""


# ---- hashing ---------------------------------------------------------------------------


def frozen_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's frozen parameters (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if not p.requires_grad:
            _hash_tensor(h, name, p)
    return h.hexdigest()


def _digest(state_json: str, tensors: Dict[str, Tensor]) -> str:
    h = hashlib.sha256(state_json.encode())
    for name, t in sorted(tensors.items()):
        _hash_tensor(h, name, t)
    return h.hexdigest()


# ---- nested state dicts as JSON + tensors -----------------------------------------------
def _encode(obj, key: str, tensors: Dict[str, Tensor]):
    """JSON for ``obj``; its tensors go to ``tensors`` under ``key``-derived names."""
    if isinstance(obj, Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()  # own storage: no aliasing
        return {"$tensor": key}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"$tuple": items}
    if isinstance(obj, dict):
        return {"$dict": [[_encode(k, f"{key}/k{i}", tensors), _encode(v, f"{key}/{i}", tensors)]
                          for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"a training checkpoint cannot store {type(obj).__name__} (at {key!r}); "
                    "only tensors, numbers, strings, None, lists, tuples and dicts")


def _decode(obj, tensors: Dict[str, Tensor]):
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict) and len(obj) == 1:
        (tag, val), = obj.items()
        if tag == "$tensor" and isinstance(val, str) and val in tensors:
            return tensors[val]
        if tag == "$tuple" and isinstance(val, list):
            return tuple(_decode(v, tensors) for v in val)
        if tag == "$dict" and isinstance(val, list) and all(
                isinstance(kv, list) and len(kv) == 2 for kv in val):
            out = {}
            for k, v in val:
                k = _decode(k, tensors)
                if isinstance(k, (list, dict, Tensor)):
                    break
                out[k] = _decode(v, tensors)
            else:
                return out
    raise TrainingStateError(f"unexpected entry in the checkpoint's state: {str(obj)[:80]}")


# ---- what is stored of the model --------------------------------------------------------
def _model_tensors(model: nn.Module) -> Dict[str, Tensor]:
    """Trainable parameters and persistent buffers, by state_dict name."""
    params = dict(model.named_parameters())
    all_params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    out = {n: p for n, p in params.items() if p.requires_grad}
    for name, t in model.state_dict(keep_vars=True).items():
        if name not in all_params and t is not None:
            out[name] = t
    return out


def rng_states(model: nn.Module) -> Dict[str, Tensor]:
    """This process's torch random generators: the CPU's, and each CUDA device's that holds
    a parameter of ``model``."""
    return _rng_states(model)


def set_rng_states(states: Dict[str, Tensor]) -> None:
    """Set the generators ``states`` names (as :func:`rng_states` returns them); a CUDA
    device this machine lacks is skipped."""
    for name, t in states.items():
        if name == "cpu":
            torch.set_rng_state(t)
        elif torch.cuda.is_available():
            index = int(name.split(":")[1])
            if index < torch.cuda.device_count():
                torch.cuda.set_rng_state(t, index)


def check_rng_states(states, what: str) -> Dict[str, Tensor]:
    """``states`` if it is a {generator name: uint8 state} dict this process can set, else
    a :class:`TrainingStateError` naming ``what``."""
    if not isinstance(states, dict):
        raise TrainingStateError(f"{what} is not a set of random states")
    for name, t in states.items():
        if not (isinstance(t, Tensor) and t.dtype == torch.uint8 and t.dim() == 1):
            raise TrainingStateError(f"{what}: its random state {name!r} is malformed")
        if name == "cpu":
            if t.numel() != torch.get_rng_state().numel():
                raise TrainingStateError(f"{what}: its CPU random state has the wrong size")
        elif not (isinstance(name, str) and name.startswith("cuda:") and name[5:].isdigit()):
            raise TrainingStateError(f"{what}: unknown random generator {name!r}")
    return states


def _rng_states(model: nn.Module) -> Dict[str, Tensor]:
    states = {"cpu": torch.get_rng_state()}
    cuda = {p.device for p in model.parameters() if p.device.type == "cuda"}
    for dev in sorted(cuda, key=str):
        states[f"cuda:{dev.index or 0}"] = torch.cuda.get_rng_state(dev)
    return states


# ---- writing ----------------------------------------------------------------------------
def save_training_state(path: str, model: nn.Module, optimizer=None, scheduler=None,
                        progress=None, *, fingerprint: Optional[str] = None) -> None:
    """Write a training checkpoint to ``path`` atomically (temporary file, fsync, rename).

    ``progress``: JSON-like data (and tensors) returned by :func:`load_training_state`.
    ``fingerprint``: :func:`frozen_fingerprint` of the model, if already known (it does not
    change while training; hashing a large frozen model at every save costs time).
    """
    from safetensors.torch import save_file

    tensors: Dict[str, Tensor] = {}
    model_part = _model_tensors(model)
    for name, t in model_part.items():
        tensors[f"model/{name}"] = t.detach().cpu().contiguous().clone()
    rng = _rng_states(model)
    for name, t in rng.items():
        tensors[f"rng/{name}"] = t.clone()
    state = {
        "model": sorted(model_part),
        "frozen_fingerprint": fingerprint or frozen_fingerprint(model),
        "rng": sorted(rng),
        "optimizer": (_encode(optimizer.state_dict(), "optimizer", tensors)
                      if optimizer is not None else None),
        "scheduler": (_encode(scheduler.state_dict(), "scheduler", tensors)
                      if scheduler is not None else None),
        "progress": _encode(progress, "progress", tensors),
    }
    state_json = json.dumps(state, sort_keys=True)
    header = {"format": FORMAT, "version": str(VERSION), "state": state_json,
              "payload_digest": _digest(state_json, tensors)}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=header)
        with open(tmp, "rb+") as f:  # on disk before the rename makes it the checkpoint
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _fsync_dir(directory: str):
    """Make the rename itself durable (best effort: not every system opens directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- reading ----------------------------------------------------------------------------
class TrainingState:
    """A checkpoint read and verified (format, version, digest), not yet applied.

    ``progress`` is available at once; :meth:`restore` checks that everything fits the model
    (and optimizer, scheduler) and only then changes them.
    """

    def __init__(self, path: str, state: dict, tensors: Dict[str, Tensor]):
        self.path, self._state, self._tensors = path, state, tensors
        try:
            self.progress = _decode(state["progress"], tensors)
            self.has_optimizer = state["optimizer"] is not None
            self.has_scheduler = state["scheduler"] is not None
            self._model_names = list(state["model"])
            self._rng_names = list(state["rng"])
            self._fingerprint = str(state["frozen_fingerprint"])
        except (KeyError, TypeError) as exc:
            raise self._error(f"its state lacks an entry ({exc})") from exc

    def _error(self, what: str) -> TrainingStateError:
        return TrainingStateError(f"training checkpoint {self.path!r}: {what}")

    @classmethod
    def read(cls, path: str) -> "TrainingState":
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise FileNotFoundError(f"no training checkpoint at {path!r}")
        try:
            with safe_open(path, framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # truncated, or not safetensors at all (a pickle, say)
            raise TrainingStateError(
                f"{path!r} is not a readable training checkpoint (truncated or corrupt?): "
                f"{type(exc).__name__}: {exc}") from exc
        if header.get("format") != FORMAT:
            raise TrainingStateError(f"{path!r} is not an expanse_fast training checkpoint")
        if header.get("version") != str(VERSION):
            raise TrainingStateError(f"{path!r} has format version {header.get('version')}; "
                                     f"this expanse_fast reads version {VERSION}")
        state_json = header.get("state", "")
        if _digest(state_json, tensors) != header.get("payload_digest"):
            raise TrainingStateError(f"{path!r} was modified after it was written: its "
                                     "contents do not match its digest")
        try:
            state = json.loads(state_json)
        except ValueError as exc:
            raise TrainingStateError(f"{path!r}: its state is not JSON ({exc})") from exc
        if not isinstance(state, dict):
            raise TrainingStateError(f"{path!r}: its state is not a JSON object")
        return cls(path, state, tensors)

    # ---- checks ----------------------------------------------------------------------
    def _check_model(self, model: nn.Module) -> Dict[str, Tuple[Tensor, Tensor]]:
        have = _model_tensors(model)
        if sorted(have) != sorted(self._model_names):
            missing = sorted(set(have) - set(self._model_names))
            extra = sorted(set(self._model_names) - set(have))
            raise self._error(
                "it was saved from a model with other trainable tensors or buffers "
                f"(the model has {missing[:4]} that the file lacks, the file has {extra[:4]} "
                "that the model lacks)")
        pairs = {}
        for name, dst in have.items():
            src = self._tensors.get(f"model/{name}")
            if src is None:
                raise self._error(f"it lacks tensor {name!r}")
            if tuple(src.shape) != tuple(dst.shape) or src.dtype != dst.dtype:
                raise self._error(f"tensor {name!r} is {src.dtype} {tuple(src.shape)} in the "
                                  f"file but {dst.dtype} {tuple(dst.shape)} in the model")
            pairs[name] = (dst, src)
        if frozen_fingerprint(model) != self._fingerprint:
            raise self._error("it was saved on other frozen (pretrained) weights: the "
                              "model's frozen-weight fingerprint differs")
        return pairs

    def check_fits(self, model: nn.Module) -> None:
        """Raise :class:`TrainingStateError` where the checkpoint does not fit ``model`` (its
        trainable tensors, buffers and frozen weights); change nothing."""
        self._check_model(model)

    def _optimizer_state(self, optimizer) -> dict:
        if not self.has_optimizer:
            raise self._error("it holds no optimizer state")
        sd = _decode(self._state["optimizer"], self._tensors)
        try:
            groups, state = sd["param_groups"], sd["state"]
            saved = [list(g["params"]) for g in groups]
        except (KeyError, TypeError) as exc:
            raise self._error(f"its optimizer state is malformed ({exc})") from exc
        current = [list(g["params"]) for g in optimizer.param_groups]
        if [len(g) for g in saved] != [len(g) for g in current]:
            raise self._error(f"its optimizer has parameter groups of sizes "
                              f"{[len(g) for g in saved]}, this one {[len(g) for g in current]}")
        by_id = {i: p for ids, ps in zip(saved, current) for i, p in zip(ids, ps)}
        for i, per_param in state.items():
            p = by_id.get(i)
            if p is None or not isinstance(per_param, dict):
                raise self._error(f"its optimizer state names an unknown parameter {i!r}")
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
                t = per_param.get(key)
                if isinstance(t, Tensor) and tuple(t.shape) != tuple(p.shape):
                    raise self._error(f"optimizer state {key!r} has shape {tuple(t.shape)} for "
                                      f"a parameter of shape {tuple(p.shape)}")
        return sd

    def _scheduler_state(self, scheduler) -> dict:
        if not self.has_scheduler:
            raise self._error("it holds no LR scheduler state")
        sd = _decode(self._state["scheduler"], self._tensors)
        if not isinstance(sd, dict) or set(sd) != set(scheduler.state_dict()):
            raise self._error(f"its LR scheduler state does not fit a "
                              f"{type(scheduler).__name__}")
        return sd

    def _check_rng(self) -> Dict[str, Tensor]:
        return check_rng_states({name: self._tensors.get(f"rng/{name}")
                                 for name in self._rng_names},
                                f"training checkpoint {self.path!r}")

    # ---- apply -----------------------------------------------------------------------
    def restore(self, model: nn.Module, optimizer=None, scheduler=None, rng: bool = True):
        """Check that the checkpoint fits, then load it into ``model`` (trainable tensors and
        buffers) and the optimizer / scheduler given, and set the random generators.  On any
        mismatch a :class:`TrainingStateError` is raised and nothing is changed."""
        pairs = self._check_model(model)
        opt_sd = self._optimizer_state(optimizer) if optimizer is not None else None
        sched_sd = self._scheduler_state(scheduler) if scheduler is not None else None
        rng_states = self._check_rng() if rng else {}
        if opt_sd is not None:
            # load_state_dict checks the groups again and may still refuse: do it first,
            # while the model is untouched (it replaces the state, never edits it in place)
            try:
                optimizer.load_state_dict(opt_sd)
            except (ValueError, KeyError, TypeError) as exc:
                raise self._error(f"its optimizer state does not fit ({exc})") from exc
        with torch.no_grad():
            for dst, src in pairs.values():
                dst.copy_(src)
        if sched_sd is not None:
            scheduler.load_state_dict(sched_sd)
        set_rng_states(rng_states)
        return self.progress


def load_training_state(path: str, model: nn.Module, optimizer=None, scheduler=None,
                        rng: bool = True):
    """Read the checkpoint at ``path``, check that it fits, restore it (see
    :meth:`TrainingState.restore`) and return its ``progress``."""
    return TrainingState.read(path).restore(model, optimizer, scheduler, rng)
