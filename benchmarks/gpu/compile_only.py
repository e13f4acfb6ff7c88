"""Autotuned Triton launches turned into compiles of the configs they would try; nothing runs.

Used where kernels must be built but not run: ``tests/kernels/sm90_compile.py`` (no GPU
there; a stand-in target) and the GPU run's prewarm (``bench_gpu.py prewarm``: the timed
sections' kernels compiled side by side on the host's idle cores, into the Triton cache the
timed run then reads, so its autotuning only times).

Inside :func:`autotuned_launches_compile_only`, ``Autotuner.run`` prunes its configs as a
real call would (its ``early_config_prune`` sees the call's arguments), runs each config's
pre-hook (the descriptors' boxes) and compiles it through ``JITFunction.warmup``, whose
cache key is the one a real launch computes.  The autotuner records no choice
(``best_config`` stays unset), so ``kernels/launch.py`` never caches one, and the outputs of
those launches stay unwritten: a caller must not use them.  Kernels that are not autotuned
launch as usual.  It leans on Triton internals (Autotuner.prune_configs, .nargs,
JITFunction.warmup; Triton 3.6 to 3.9); :class:`UnsupportedTriton` says where they differ.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional


class UnsupportedTriton(RuntimeError):
    """This Triton lacks what compiling without running needs."""


@contextlib.contextmanager
def autotuned_launches_compile_only(first_config: bool = False,
                                    on_config: Optional[Callable] = None):
    """Within the block, each autotuned launch compiles its pruned configs (only the first
    with ``first_config``) and runs nothing.  ``on_config(autotuner, config, compiled, exc)``
    is called per config, with the compiled kernel or the exception that stopped it; without
    it an exception propagates."""
    from triton.runtime.autotuner import Autotuner

    def compile_configs(self, *args, grid, warmup=False, **kwargs):
        if not hasattr(self, "prune_configs"):
            raise UnsupportedTriton("Autotuner.prune_configs is missing")
        nargs = dict(zip(self.arg_names, args), **kwargs)
        self.nargs = nargs  # what prune_configs reads during a real run
        try:
            configs = self.prune_configs(kwargs)
        finally:
            self.nargs = None
        for cfg in configs[:1] if first_config else configs:
            compiled, error = None, None
            try:
                if cfg.pre_hook:
                    cfg.pre_hook(dict(nargs, **cfg.all_kwargs()))
                compiled = self.fn.warmup(*args, grid=grid, **kwargs, **cfg.all_kwargs())
            except UnsupportedTriton:
                raise
            except Exception as exc:  # noqa: BLE001 - the caller's to report
                if on_config is None:
                    raise
                error = exc
            if on_config is not None:
                on_config(self, cfg, compiled, error)

    saved = Autotuner.run
    Autotuner.run = compile_configs
    try:
        yield
    finally:
        Autotuner.run = saved
