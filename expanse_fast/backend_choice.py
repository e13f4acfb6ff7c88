"""Which backend runs an op: the user's choice (``set_backend``/``use_backend``) and, for
``auto``, the fastest usable one for the device."""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Dict, List, Optional, Tuple

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


def _usable(name: str, device: torch.device) -> Tuple[bool, str]:
    if (name, device) in _USABLE:
        return True, ""
    ok, why = availability(name, device)
    if ok:
        _USABLE.add((name, device))
    return ok, why


def resolve(device: torch.device, op: str, pinned: str = "", backward: bool = False,
            dtype: Optional[torch.dtype] = None, macs: int = 0) -> ModuleType:
    """The backend module that runs ``op`` ("linear" or "conv2d") on ``device`` now:
    ``pinned`` (a layer's own choice) if given, else the global choice.  For "auto", the
    forward's ``dtype`` and ``macs`` (multiply-adds of the dense product) say which backend
    is faster (``_auto_choice``); the backward needs neither."""
    name = pinned or _choice["name"]
    if name == "auto":
        name = _auto_choice(device, op, backward, dtype, macs)
        if name != "torch" and (name, device) not in _USABLE:  # (named by the environment)
            ok, why = _usable(name, device)
            if not ok:
                key = next(k for k in _OVERRIDE_KEYS[(op, backward)] if _getenv(k) == name)
                raise RuntimeError(f"{key}={name}: backend {name!r} is not usable on "
                                   f"{device}: {why}")
    elif (name, device) not in _USABLE:
        ok, why = _usable(name, device)
        if not ok:
            raise RuntimeError(f"backend {name!r} is not usable on {device}: {why}")
    module = _modules.get(name)  # (resolve runs twice per layer and step)
    return module if module is not None else backend_module(name)


# "auto" on CUDA, by measurement on an H200 (bf16; benchmarks/results/*-h200-*):
# - conv2d forward: the Triton kernels for large fp16/bf16 calls.  One pass writes every
#   group's channels with their bias, where the torch backend runs a cuDNN call per group and
#   copies their outputs into one tensor: the 3x3 conv of a ResNet-50 stage (256+64
#   channels, batch 64, 56x56) took 0.63 ms against 0.91 (channels_last) and 1.04 against
#   1.14 (NCHW); fwd+bwd with the torch backward, 1.25 ms against 1.44 and 1.58 against 1.68.
#   Small calls are host-bound, and a Triton launch costs the host more than a cuDNN one:
#   the ResNet-style CNN step at 80 channels took 16.7 ms in Triton against 9.8 (torch), so
#   the bar lies between the measured sizes (1.9e11 and 2.3e10 multiply-adds).
# - linear: the torch backend both ways.  The Triton forward (16384 x (4096+1024)) won three
#   of four runs (1.13 ms against 1.20 and 1.13 against 1.19 and 1.14 against 1.17; lost 1.24
#   against 1.22 with another tile tuned); with the torch backward it took 1.75 ms against
#   1.57 on 2026-11-30 and 1.49 against 1.60 on 2026-12-01.  Too close to call yet.
# - every backward: the torch backend (cuBLAS, cuDNN), whose weight gradients ran at about
#   twice the Triton kernels' rate (linear dW 216 us against 441, conv 188 us against 704).
#   The saved tensors are the same whichever backend ran the forward.
_TRITON_FORWARD_OPS = ("conv2d",)
_TRITON_FORWARD_DEVICE_TYPES = ("cuda",)
_TRITON_FORWARD_DTYPES = (torch.float16, torch.bfloat16)
_TRITON_FORWARD_MIN_MACS = 1 << 36


def _override(op: str, backward: bool) -> Optional[str]:
    """The backend the environment names for one direction of ``op``, or None:
    EXPANSE_FAST_AUTO_<OP>_FORWARD / _BACKWARD for one direction, EXPANSE_FAST_AUTO_<OP> for
    both (benchmarks and experiments steer "auto" with them)."""
    data = getattr(os.environ, "_data", None)  # CPython's mapping behind os.environ
    if data is not None and _ENCODED_OVERRIDE_KEYS:
        one_way, both_ways = _ENCODED_OVERRIDE_KEYS[(op, backward)]
        if one_way not in data and both_ways not in data:
            return None  # (the common case: neither is set; two dict lookups)
    for key in _OVERRIDE_KEYS[(op, backward)]:
        value = _getenv(key)
        if value in BACKENDS[1:]:
            return value
        if value not in _NO_OVERRIDE:
            raise ValueError(_names_no_backend(key, value))
    return None


_NO_OVERRIDE = (None, "", "auto")


def _names_no_backend(key: str, value: str) -> str:
    # (a typo must not leave "auto" choosing silently what the variable meant to pin)
    return (f"{key}={value!r} names no backend: set it to one of "
            f"{', '.join(BACKENDS[1:])}, or unset it")


_OVERRIDE_KEYS = {(op, backward): ("EXPANSE_FAST_AUTO_" + op.upper()
                                   + ("_BACKWARD" if backward else "_FORWARD"),
                                   "EXPANSE_FAST_AUTO_" + op.upper())
                  for op in ("linear", "conv2d") for backward in (False, True)}
_ENCODED_KEYS: Dict[str, object] = {}


# The override keys as os.environ's own mapping stores them (bytes on POSIX), for the
# lookup that finds them absent; none where os.environ has no such mapping (then _getenv).
_ENCODE_KEY = getattr(os.environ, "encodekey", None)
_ENCODED_OVERRIDE_KEYS = ({k: tuple(_ENCODE_KEY(key) for key in keys)
                           for k, keys in _OVERRIDE_KEYS.items()} if _ENCODE_KEY else {})


def _getenv(key: str) -> Optional[str]:
    """``os.environ.get(key)`` read live, without the KeyError that os.environ raises and
    catches inside for every name it lacks (this runs twice per op call)."""
    env = os.environ
    data = getattr(env, "_data", None)  # CPython's mapping behind os.environ
    if data is None or not hasattr(env, "encodekey"):
        return env.get(key)
    encoded = _ENCODED_KEYS.get(key)
    if encoded is None:
        encoded = _ENCODED_KEYS[key] = env.encodekey(key)
    raw = data.get(encoded)
    return None if raw is None else env.decodevalue(raw)


def _triton_forwards(op: str, device: torch.device) -> bool:
    """Whether "auto" may run ``op``'s forward in Triton on ``device`` (sizes aside)."""
    return (op in _TRITON_FORWARD_OPS and device.type in _TRITON_FORWARD_DEVICE_TYPES
            and _usable("triton", device)[0]
            and hasattr(backend_module("triton"), op + "_forward"))


def _auto_choice(device: torch.device, op: str, backward: bool = False,
                 dtype: Optional[torch.dtype] = None, macs: int = 0) -> str:
    override = _override(op, backward)
    if override is not None:
        return override
    if (not backward and dtype in _TRITON_FORWARD_DTYPES and macs >= _TRITON_FORWARD_MIN_MACS
            and _triton_forwards(op, device)):
        return "triton"
    return "torch"


def input_grad_backend(device: torch.device, op: str, pinned: str = "") -> Optional[ModuleType]:
    """The backend that computes ``op``'s input gradient apart from its weight gradients,
    or None (one backend computes all): ``EXPANSE_FAST_AUTO_CONV2D_DX`` names it for the
    conv's calls that resolve "auto" (an experiment the GPU run times: the weight gradient
    in cuDNN, the input gradient in a kernel that writes the widened gradient, zeros
    included, in one pass; the linear layer's cuBLAS backward needs no such split)."""
    if (pinned or _current()) != "auto" or op not in _DX_KEYS:
        return None
    name = _getenv(_DX_KEYS[op])
    if name in _NO_OVERRIDE:
        return None
    if name not in BACKENDS[1:]:
        raise ValueError(_names_no_backend(_DX_KEYS[op], name))
    ok, why = _usable(name, device)
    if not ok:
        raise RuntimeError(f"{_DX_KEYS[op]}={name}: backend {name!r} is not usable on {device}: "
                           f"{why}")
    return backend_module(name)


_DX_KEYS = {"conv2d": "EXPANSE_FAST_AUTO_CONV2D_DX"}  # (the conv's only: see above)


def describe_auto(device: torch.device) -> List[str]:
    """What "auto" runs on ``device``, one line per op (``expanse-fast info``)."""
    device = torch.device(device)
    dtypes = "/".join(str(d).replace("torch.", "") for d in _TRITON_FORWARD_DTYPES)
    lines = []
    for op in ("linear", "conv2d"):
        forward, backward = "torch", "torch"
        if _triton_forwards(op, device):
            forward = (f"triton for {dtypes} calls of at least "
                       f"2^{_TRITON_FORWARD_MIN_MACS.bit_length() - 1} multiply-adds, else torch")
        if _override(op, False) is not None:
            forward = _override(op, False) + " (set by the environment)"
        if _override(op, True) is not None:
            backward = _override(op, True) + " (set by the environment)"
        if op in _DX_KEYS and _getenv(_DX_KEYS[op]) in BACKENDS[1:]:
            backward += f", its input gradient {_getenv(_DX_KEYS[op])} (set by the environment)"
        lines.append(f"{op}: forward {forward}; backward {backward}")
    return lines
