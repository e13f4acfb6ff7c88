"""Which backend runs an op: the user's choice (``set_backend``/``use_backend``) and, for
``auto``, the fastest usable one for the device."""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Dict, Tuple

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
# Process-wide, not thread-local: autograd runs CUDA backward on its own device threads.
# The ops also record the choice in force at forward time for their backward.
_choice = {"name": "auto"}
_modules: Dict[str, ModuleType] = {}


def _current() -> str:
    return _choice["name"]


class _BackendScope:
    """Returned by :func:`set_backend`; as a context manager it restores the previous choice."""

    def __init__(self, previous: str):
        self._previous = previous

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _choice["name"] = self._previous
        return False


def set_backend(name: str) -> _BackendScope:
    """Choose the backend for every expanded op: "auto", "torch", "triton" or "cuda".

    Usable as a plain call or as ``with xf.set_backend("triton"): ...``.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous = _current()
    _choice["name"] = name
    return _BackendScope(previous)


def use_backend(name: str) -> _BackendScope:
    """Context manager: ``with xf.use_backend("torch"): ...``."""
    return set_backend(name)


def get_backend() -> str:
    return _current()


def backend_module(name: str) -> ModuleType:
    if name not in _modules:
        _modules[name] = importlib.import_module(f"expanse_fast.backends.{name}" if name != "torch"
                                                 else "expanse_fast.backends.torch_ref")
    return _modules[name]


def availability(name: str, device: torch.device) -> Tuple[bool, str]:
    """(usable, reason) of one backend on one device; never raises."""
    try:
        module = backend_module(name)
    except Exception as exc:  # a missing optional dependency, say
        return False, f"cannot import backend {name!r}: {type(exc).__name__}: {exc}"
    try:
        return module.availability(device)
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


# (backend, device) pairs found usable: a backend stays usable for the process, so each
# op call need not ask the device again (resolve runs twice per layer and step).
_USABLE: set = set()


def resolve(device: torch.device, op: str, pinned: str = "") -> ModuleType:
    """The backend module that runs ``op`` ("linear" or "conv2d") on ``device`` now:
    ``pinned`` (a layer's own choice) if given, else the global choice."""
    name = pinned or _current()
    if name == "auto":
        name = _auto_choice(device, op)
    elif (name, device) not in _USABLE:
        ok, why = availability(name, device)
        if not ok:
            raise RuntimeError(f"backend {name!r} is not usable on {device}: {why}")
        _USABLE.add((name, device))
    return backend_module(name)


# The fastest backend per (device type, op), by measurement.  On an H200 (bf16, 16384 rows,
# 4096+1024 features; benchmarks/results/2026-11-28-h200-triton-linear-adhoc.md) the
# structured cuBLAS calls of the torch backend beat the current Triton kernels (forward
# 1.14 ms against 1.80 ms), so "auto" stays on torch until a kernel wins a measurement.
_FASTEST = {("cuda", "linear"): "torch", ("cuda", "conv2d"): "torch"}


def _auto_choice(device: torch.device, op: str) -> str:
    override = os.environ.get("EXPANSE_FAST_AUTO_" + op.upper())
    if override in BACKENDS[1:]:
        return override
    choice = _FASTEST.get((device.type, op), "torch")
    if choice != "torch" and not (availability(choice, device)[0]
                                  and hasattr(backend_module(choice), op + "_forward")):
        return "torch"
    return choice
