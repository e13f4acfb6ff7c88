"""The GPU run's ``env`` and ``build`` stages: versions, device, git commit and source
fingerprint; the CUDA extension built and loaded, with its toolchain and its SASS."""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback

from gpu_common import _dump, _git_commit, _now_iso, _short_exc, _source_fingerprint


# =========================================================================================
# env
# =========================================================================================
def cmd_env(args) -> int:
    info = {"date": _now_iso(), "python": sys.version.split()[0],
            "platform": platform.platform(), "git_commit": _git_commit(),
            "source_sha256_16": _source_fingerprint(),
            "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES",
                                                   "TORCH_CUDA_ARCH_LIST", "MAX_JOBS",
                                                   "PYTHONPATH", "PYTHONSAFEPATH")}}
    try:
        import torch
        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
                    else None, cuda_available=torch.cuda.is_available(),
                    allow_tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                              "sm_count": p.multi_processor_count,
                              "memory_gib": round(p.total_memory / 2**30, 1),
                              "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
                              "count": torch.cuda.device_count()}
    except Exception as exc:
        info["torch_error"] = _short_exc(exc)
        info["cuda_available"] = False
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = None
        info["triton_error"] = _short_exc(exc)
    try:
        import expanse_fast
        import expanse_fast.kernels  # noqa: F401  (mapped from top-level kernels/)
        info["expanse_fast_file"] = expanse_fast.__file__
        info["import_ok"] = True
    except Exception as exc:
        info["import_ok"] = False
        info["import_error"] = _short_exc(exc)
        traceback.print_exc()
    if info.get("import_ok"):
        try:
            import torch
            from expanse_fast.backend_choice import availability
            dev = torch.device("cuda" if info.get("cuda_available") else "cpu")
            # Not "cuda" here: its availability may start the build (the next stage's job).
            info["backends"] = {n: list(availability(n, dev)) for n in ("torch", "triton")}
        except Exception as exc:
            info["backends_error"] = _short_exc(exc)
    _dump(args.out, info)
    print(json.dumps(info, indent=1, default=str))
    return 0


# =========================================================================================
# build
# =========================================================================================
def cmd_build(args) -> int:
    result = {"device": args.device}
    t0 = time.time()
    try:
        import torch
        dev = torch.device(args.device)
        from expanse_fast.backends import cuda as cuda_backend
        result["toolchain"] = _toolchain(cuda_backend)
        if dev.type == "cuda" and hasattr(cuda_backend, "load"):
            try:
                cuda_backend.load()
                result["load"] = "ok"
            except Exception as exc:
                traceback.print_exc()
                result["load"] = _short_exc(exc)
        ok, why = cuda_backend.availability(dev)
        result.update(available=bool(ok), reason=str(why))
        if ok:
            result["linear_math"] = cuda_backend.linear_maths(dev)
            result["sass"] = _sass_summary(cuda_backend)
    except Exception as exc:
        traceback.print_exc()
        result.update(available=False, reason=_short_exc(exc))
    result["seconds"] = round(time.time() - t0, 1)
    print("BUILD_RESULT " + json.dumps(result))
    return 0 if result["available"] else 1


def _toolchain(cuda_backend):
    """What the build at first use compiles with: a failed build's first question."""
    try:
        from torch.utils import cpp_extension
        home = cpp_extension.CUDA_HOME
        return {"cuda_home": home, "nvcc": shutil.which("nvcc"),
                "library_headers_from_wheels": cuda_backend._library_include_dirs(home),
                "ninja": cpp_extension.is_ninja_available()}
    except Exception as exc:  # noqa: BLE001 - a report, never a failure
        return {"error": _short_exc(exc)}


def _extension_path(cuda_backend):
    """The shared library the cuda backend loaded (prebuilt or JIT-built), or None."""
    pre = cuda_backend._prebuilt_path()
    if pre:
        return pre
    from torch.utils import cpp_extension
    d = cpp_extension._get_build_directory(cuda_backend.EXT_NAME, verbose=False)
    path = os.path.join(d, cuda_backend.EXT_NAME + ".so")
    return path if os.path.exists(path) else None


def _sass_summary(cuda_backend):
    """Tensor-core instructions in the built extension's machine code (cuobjdump): HGMMA is
    Hopper's warpgroup MMA, HMMA the older warp-level one."""
    import shutil
    path = _extension_path(cuda_backend)
    tool = shutil.which("cuobjdump")
    if path is None or tool is None:
        return f"not read (library {path}, cuobjdump {tool})"
    try:
        res = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True,
                             timeout=60)
    except Exception as exc:  # noqa: BLE001 - a diagnostic, never the stage's failure
        return f"cuobjdump failed: {_short_exc(exc)}"
    text = res.stdout
    counts = {op: len(re.findall(rf"\b{op}\.", text)) for op in ("HGMMA", "HMMA")}
    archs = sorted(set(re.findall(r"arch = (sm_\w+)", text)))
    return {"archs": archs, **counts, "rc": res.returncode}
