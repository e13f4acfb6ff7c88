"""Profiler rows of the GPU run: a device kernel's short label, and a profiler session's events
as rows of kernels and of the aten ops that launched them."""
from __future__ import annotations

import re


# A device kernel's name, short enough for a table line and still telling apart what aten's
# generic kernels did: their template arguments name the functor (a copy, a fill, an add),
# which a cut after 60 characters lost ("elementwise_kernel<128, 4, at::native::gpu_" was
# every copy and every fill alike).
_NAMESPACES = re.compile(r"(?:\bat::native::|\bat::cuda::|\bc10::|\bstd::|\bexpanse_fast::"
                         r"|\(anonymous namespace\)::)")
_FUNCTOR = re.compile(r"[A-Za-z_]\w*(?:[Ff]unctor\w*|_kernel_cuda|Op|Math)\b")


def kernel_label(name: str, width: int = 72) -> str:
    """``name`` without ``void``, namespaces and template arguments, with the first functor
    of its template arguments in parentheses where it has one: ``elementwise_kernel
    (direct_copy_kernel_cuda)``, ``vectorized_elementwise_kernel(FillFunctor)``,
    ``reduce_kernel(sum_functor)``.  A name without a signature (``Memset (Device)``, a
    Triton or cuBLAS kernel) stays as it is."""
    text = _NAMESPACES.sub("", name.strip())
    if not text.startswith("void ") and "<" not in text:
        return text[:width]
    text = text[5:] if text.startswith("void ") else text
    head = re.match(r"[^<(]*", text).group(0).strip()
    found = _FUNCTOR.findall(text[len(head):])
    functors = [f for f in found if "unctor" in f] or found
    label = f"{head}({functors[0]})" if functors else head
    return label[:width]


def _profile_rows(recorded, by_shape, top):
    """(kernels, ops) of ``profile_call`` from a session's averaged events: with
    ``by_shape`` (a GPU session's events averaged per input shape) the device kernels and
    the aten ops that launched them, else (a CPU session) the aten ops' own time and None."""
    on_gpu = by_shape is not None
    kernels = []
    for e in recorded:
        if str(e.key).startswith("ProfilerStep") or (on_gpu and not _on_device(e)):
            continue  # (on a GPU the host's ops and runtime calls: in ``ops`` below)
        us = _device_us(e) if on_gpu else e.self_cpu_time_total
        if us and us > 0:
            kernels.append([kernel_label(str(e.key)), int(e.count), round(float(us), 1)])
    kernels.sort(key=lambda r: -r[2])
    if not on_gpu:
        return kernels[:top], None
    ops = [[str(e.key), _shapes_text(getattr(e, "input_shapes", None)), int(e.count),
            round(_device_us(e), 1)]
           for e in by_shape if str(e.key).startswith("aten::") and not _on_device(e)
           and _device_us(e) > 0]
    ops.sort(key=lambda r: -r[3])
    return kernels[:top], ops[:top]


def _on_device(event) -> bool:
    """Whether a profiler event is a device kernel, copy or memset: not a host op, nor the
    span a ``record_function`` range (an autograd Function's name, say) leaves on the
    device's timeline when the host is profiled too (torch's own totals skip those)."""
    kind = getattr(event, "device_type", None)
    return (getattr(kind, "name", str(kind)).upper().endswith("CUDA")
            and not getattr(event, "is_user_annotation", False))


def _device_us(event) -> float:
    return float(getattr(event, "self_device_time_total", None)
                 or getattr(event, "self_cuda_time_total", 0) or 0)


def _shapes_text(shapes, width: int = 90) -> str:
    """An op's input shapes, compactly: ``16384x4096, 4096x1024`` (scalars left out)."""
    parts = ["x".join(str(d) for d in s) for s in (shapes or [])
             if isinstance(s, (list, tuple)) and s]
    return ", ".join(parts)[:width]
