"""Autotuned Triton launches turned into compiles of the configs they would try; nothing runs.

Used where kernels must be built but not run: ``tests/kernels/sm90_compile.py`` (no GPU
there; a stand-in target) and the GPU run's prewarm (``bench_gpu.py prewarm``: the timed
sections' kernels compiled side by side on the host's idle cores, into the Triton cache the
timed run then reads, so its autotuning only times).

Inside :func:`autotuned_launches_compile_only`, ``Autotuner.run`` prunes its configs as a
real call would (its ``early_config_prune`` sees the call's arguments), runs each config's
pre-hook (the descriptors' boxes) and compiles it through ``JITFunction.warmup``, whose
cache key is the one a real launch computes.  The autotuner records no choice
(``best_config`` stays unset), so ``kernels/launch.py`` never caches one.  A kernel that is
not autotuned (the NCHW transpose) compiles the same way instead of launching.  The outputs
of every launch stay unwritten: a caller must not use them.  It leans on Triton internals
(Autotuner.prune_configs, .nargs, JITFunction.run's warmup flag; Triton 3.6 to 3.9);
:class:`UnsupportedTriton` says where they differ.
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
    with ``first_config``), any other launch its kernel, and nothing runs.
    ``on_config(jit_function, config, compiled, exc)`` is called per compile (config None
    for a kernel that is not autotuned), with the compiled kernel or the exception that
    stopped it; without it an exception propagates."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    jit_run = JITFunction.run

    def compile_plain(self, *args, grid, warmup=False, **kwargs):
        if warmup:  # (the autotuner's compiles below come through here)
            return jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled, error = None, None
        try:
            compiled = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the caller's to report
            if on_config is None:
                raise
            error = exc
        if on_config is not None:
            on_config(self, None, compiled, error)
        return compiled

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
                on_config(self.fn, cfg, compiled, error)

    saved = Autotuner.run
    Autotuner.run, JITFunction.run = compile_configs, compile_plain
    try:
        yield
    finally:
        Autotuner.run, JITFunction.run = saved, jit_run
