"""Launching an autotuned kernel without the autotuner's per-call work once it has chosen.

Triton's ``Autotuner.run`` rebuilds its key on every call (a dict of every argument, the
``str`` of every tensor's dtype), then builds its config's keyword arguments twice more, for
the config's pre-hook and for the launch.  On the 2-core CI machine that was 25-38 us of a
launch's host time and 12% of the host instructions of a Triton layer's forward+backward
(three launches) with the kernels' device work taken out (benchmarks/triton_host_time.py).
Where the GPU finishes a step's kernels sooner than the host issues them (small layers, or a
slow host: the H200 machine's Triton layer rows were host-bound at issue 3's shapes), that
host time is the step's time.

:func:`launch` calls the autotuner the first time for each key (tuning, pruning and its cache
behave as before) and records the config it chose.  Later calls with the same key arguments
and argument dtypes launch the kernel with that config directly, once they have checked that
the autotuner would still choose it (its cache holds that very config object, or it still has
that one config alone).  Code that swaps an autotuner's configs or clears its cache (the GPU
benchmark's untuned rows, tests) is thereby seen, and the call goes through the autotuner
again.  Where this Triton's key were built otherwise than :func:`_autotuner_key` builds it,
the check would always fail and every call would take the autotuner: slower, never wrong.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from triton.runtime.autotuner import Autotuner

# Compile options every kernel of the package asks for.  Fused multiply-adds: Triton 3.9 warns
# at each process's first compile that its default (fusion on) becomes off in 3.10, which
# would change the epilogues' rounding (and slow them) under the same code.
# TRITON_FORCE_DISABLE_FP_FUSION still turns it off.
COMPILE_OPTIONS = {"enable_fp_fusion": True}

# (autotuner, key-argument values, argument dtypes) -> (autotuner key or None, config,
# config.all_kwargs())
_CHOSEN: Dict[tuple, Tuple[Optional[tuple], Any, Dict[str, Any]]] = {}
# autotuner -> ((index among the arguments, name), ...) of its key arguments
_KEY_SLOTS: Dict[Autotuner, Tuple[Tuple[int, str], ...]] = {}


def _key_slots(kernel: Autotuner) -> Tuple[Tuple[int, str], ...]:
    names = list(kernel.arg_names)
    slots = tuple((names.index(k), k) for k in kernel.keys if k in names)
    _KEY_SLOTS[kernel] = slots
    return slots


def _autotuner_key(kernel: Autotuner, args: tuple, meta: dict) -> tuple:
    """The key ``Autotuner.run`` files this call's config under (Triton 3.6 to 3.9)."""
    named = {**dict(zip(kernel.arg_names, args)), **meta}
    named = {k: v for k, v in named.items() if k in kernel.arg_names}
    key = [named[k] for k in kernel.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


def _still_chosen(kernel: Autotuner, auto_key: Optional[tuple], config) -> bool:
    if auto_key is None:  # a single config: the autotuner takes it without a cache
        return len(kernel.configs) == 1 and kernel.configs[0] is config
    return len(kernel.configs) > 1 and kernel.cache.get(auto_key) is config


def launch(kernel, grid, *args, **meta):
    """``kernel[grid](*args, **meta)``, through the autotuner only until it has chosen, with
    :data:`COMPILE_OPTIONS`."""
    meta = {**COMPILE_OPTIONS, **meta}
    if not isinstance(kernel, Autotuner):
        return kernel[grid](*args, **meta)
    slots = _KEY_SLOTS.get(kernel)
    if slots is None:
        slots = _key_slots(kernel)
    n = len(args)
    key = (kernel, tuple(args[i] if i < n else meta.get(name) for i, name in slots),
           tuple(getattr(a, "dtype", None) for a in args))
    hit = _CHOSEN.get(key)
    if hit is not None:
        auto_key, config, config_kwargs = hit
        if _still_chosen(kernel, auto_key, config):
            if config.pre_hook is not None:  # (the descriptors' boxes, say)
                config.pre_hook({**dict(zip(kernel.arg_names, args)), **meta, **config_kwargs})
            return kernel.fn.run(*args, grid=grid, warmup=False, **meta, **config_kwargs)
    result = kernel[grid](*args, **meta)
    config = getattr(kernel, "best_config", None)
    if config is not None:  # (None: Autotuner.run replaced, as sm90_compile.py does)
        auto_key = _autotuner_key(kernel, args, meta) if len(kernel.configs) > 1 else None
        _CHOSEN[key] = (auto_key, config, config.all_kwargs())
    return result
