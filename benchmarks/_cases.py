"""What the benchmark files share: the device, building a case once for all its contenders,
and one pytest-benchmark run of one contender.  The peers themselves live in
``expanse_fast/bench.py`` (one implementation, also used by ``expanse-fast bench``).

``EXPANSE_BENCH_DEVICE=cuda`` runs the suite on a GPU (default: cpu).
"""
import functools
import os

import pytest
import torch

from expanse_fast import bench as B

DEVICE = torch.device(os.environ.get("EXPANSE_BENCH_DEVICE", "cpu"))
# Largest |peer - subject| on their shared outputs (float32 sums over ~1k terms of O(1)).
TOLERANCE = 1e-3


def contender_names():
    return ([f"expanse_fast [{b}]" for b in B.subject_backends(DEVICE)]
            + [B.MASKED, B.CAT, B.FINETUNE, B.LORA])


@functools.lru_cache(maxsize=1)  # one case alive at a time: tests run grouped by case
def built(spec):
    """The case of ``spec``, its outputs checked and its work counted."""
    case = B.build_case(spec, DEVICE)
    for name, diff in B.max_abs_diffs(case).items():
        assert diff < TOLERANCE, f"{spec.group}: {name} differs from expanse_fast by {diff}"
    B.count_macs(case)
    return case


def run(benchmark, spec, name, rounds):
    """Time contender ``name`` of ``spec``'s case; label it for the ratio table."""
    case = built(spec)
    reason = dict(case.skipped).get(name)
    if reason:
        pytest.skip(reason)
    try:
        c = case.get(name)
    except StopIteration:
        pytest.skip(f"{name} is not part of {spec.group} on {DEVICE}")
    subject = case.subjects[0]
    benchmark.group = spec.group
    benchmark.extra_info.update(role=c.role, macs=c.macs, grad_params=c.grad_params)
    if c.role == "peer":
        benchmark.extra_info["limit"] = c.macs / subject.macs

    def call():
        c.call()
        if DEVICE.type == "cuda":  # time the kernels, not their launch
            torch.cuda.synchronize(DEVICE)
    benchmark.pedantic(call, setup=c.setup, rounds=rounds, warmup_rounds=1)
    return case, c


def case_id(spec) -> str:
    if isinstance(spec, B.LayerSpec):
        grown = "x".join(str(n) for n in spec.new)
        return f"{spec.op}-{spec.old}+{grown}-{spec.passes}"
    return spec.kind


def name_id(name: str) -> str:
    for a, b in (("expanse_fast [", "xf-"), ("]", ""), ("(", ""), (")", ""), (" ", "-")):
        name = name.replace(a, b)
    return name
