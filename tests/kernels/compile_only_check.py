"""Whether compiling an autotuned launch without running it (benchmarks/gpu/compile_only.py,
the GPU run's prewarm) builds the very kernels a real call then looks up in Triton's cache.

    python tests/kernels/compile_only_check.py compile linear   # compile-only, nothing runs
    python tests/kernels/compile_only_check.py call linear      # a real call, launches stubbed

Each prints one JSON line: the entries of Triton's cache (TRITON_CACHE_DIR) after it.  Run
both, each in a fresh process on one cache directory: the call must add none.  No GPU is
needed: benchmarks/triton_host_time.py's stand-in sm_90a target (kernels compile, launches
do nothing), the triton backend's forward and backward of an expanded layer on CPU tensors.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, os.pardir, "benchmarks"))
sys.path.insert(0, os.path.join(HERE, os.pardir, os.pardir, "benchmarks", "gpu"))


def main(mode: str, case: str) -> int:
    import triton_host_time as host
    host._stand_in_gpu()
    import triton
    # the autotuner's timing calls each config once (compiling it), then reads zeros
    triton.runtime.driver.active.get_benchmarker = lambda: (
        lambda fn, quantiles=None, **kw: (fn(), [0.0] * len(quantiles or [0]))[1])
    call = host._case(case)
    if mode == "compile":
        from compile_only import autotuned_launches_compile_only
        with autotuned_launches_compile_only():
            call()
    else:
        call()
    cache = os.environ["TRITON_CACHE_DIR"]
    print(json.dumps({"entries": sorted(os.listdir(cache))}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
