"""The ``cuda`` backend: the compiled kernels of ``csrc/`` (expanded linear and conv2d).

The extension is either prebuilt (``expanse_fast._C``, from ``EXPANSE_FAST_BUILD_CUDA=1 pip
install --no-build-isolation .``) or compiled with ninja at first use by
``torch.utils.cpp_extension.load`` (cached on disk by torch).  Loading it registers the ops
``torch.ops.expanse_fast_cuda.linear_forward`` / ``linear_backward`` and ``conv2d_forward`` /
``conv2d_backward`` (C++, CUDA dispatch key); their fake implementations, for torch.compile,
are registered here.  Depthwise convolutions stay on the torch backend.

The functions mirror ``torch_ref`` exactly (see its docstring for the interface).  On an
H100/H200 the fp16/bf16 linear and conv kernels multiply with wgmma (``linear_math`` says
which path runs; ``EXPANSE_FAST_CUDA_WGMMA=0`` selects the portable WMMA kernels instead).
Importing this module never fails, nor builds anything: that happens in ``load()``, unless
``EXPANSE_FAST_CUDA=0``, which keeps the backend unusable without building or loading it.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import shutil
import threading
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import torch_ref

Maybe = Optional[Tensor]

EXT_NAME = "expanse_fast_cuda_ext"
PREBUILT = "expanse_fast._C"
_SOURCES = ("bindings.cpp", "expanded_linear_kernels.cu", "expanded_conv_kernels.cu",
            "expanded_conv_nhwc.cu")

_lock = threading.Lock()
_state = {"loaded": False, "error": None, "how": None}


# ---------------------------------------------------------------------------------------
# Finding, building and loading the extension
# ---------------------------------------------------------------------------------------
def source_dir() -> str:
    """The CUDA sources: ``expanse_fast.csrc`` when installed, else the checkout's ``csrc/``."""
    try:
        spec = importlib.util.find_spec("expanse_fast.csrc")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "csrc")


def source_files() -> list:
    return [os.path.join(source_dir(), f) for f in _SOURCES]


def _prebuilt_path() -> Optional[str]:
    """Where ``expanse_fast._C`` lies, if setup.py built it (found without importing it)."""
    try:
        spec = importlib.util.find_spec(PREBUILT)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin else None


def _arch_flags() -> list:
    """-gencode for the running GPU: sm_90a on an H100/H200 (the arch-specific target that
    has wgmma, which the linear kernels use there), else sm_XY."""
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def _short_error(exc: BaseException, lines: int = 6) -> str:
    """The compiler's error lines (or the message's first lines) of a failed build."""
    text = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in text if "error" in ln.lower()]
    return " | ".join((errors or text)[:lines]) or type(exc).__name__


def _toolchain_missing() -> Optional[str]:
    from torch.utils import cpp_extension
    home = cpp_extension.CUDA_HOME
    if home is None and shutil.which("nvcc") is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if home is not None and not os.path.exists(os.path.join(home, "include",
                                                            "cuda_runtime_api.h")):
        # torch guesses CUDA_HOME as nvcc's grandparent; an nvcc wrapper script elsewhere
        # (/usr/local/bin/nvcc, say) makes that a directory without the toolkit's headers.
        hint = next((h for h in ("/usr/local/cuda", "/opt/cuda") if os.path.exists(
            os.path.join(h, "include", "cuda_runtime_api.h"))), None)
        return (f"CUDA headers not found under CUDA_HOME={home} ("
                + ("set" if os.environ.get("CUDA_HOME") else "torch's guess from nvcc") + "); "
                + (f"set CUDA_HOME={hint}" if hint else "set CUDA_HOME to the CUDA toolkit"))
    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja)"
    return None


# What ATen's CUDA headers include from CUDA's libraries (bindings.cpp includes them).
_LIBRARY_HEADERS = ("cublas_v2.h", "cusparse.h", "cusolverDn.h")


def _library_include_dirs(cuda_home: Optional[str]) -> list:
    """Include folders for the library headers ATen's CUDA headers need, where the toolkit
    at ``cuda_home`` lacks them (one with nvcc and the runtime only): the ``include``
    folders of torch's ``nvidia-*`` wheels that hold them.  Empty when the toolkit has them."""
    if cuda_home and all(os.path.exists(os.path.join(cuda_home, "include", h))
                         for h in _LIBRARY_HEADERS):
        return []
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        spec = None
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    return sorted({os.path.dirname(path) for root in roots for header in _LIBRARY_HEADERS
                   for path in glob.glob(os.path.join(root, "*", "include", header))})


def load(verbose: bool = False) -> str:
    """Load the extension once per process (prebuilt, else JIT-built); returns how it was loaded.

    Raises RuntimeError with the reason when it cannot be loaded; the failure is remembered,
    so a broken build is not retried on every call.
    """
    with _lock:
        if _state["loaded"]:
            return _state["how"]
        if _state["error"] is not None:
            raise RuntimeError(_state["error"])
        try:
            how = _load_unlocked(verbose)
        except Exception as exc:  # noqa: BLE001 -- reported through availability()
            _state["error"] = exc.args[0] if isinstance(exc, _LoadError) else \
                f"build failed: {_short_error(exc)}"
            raise RuntimeError(_state["error"]) from exc
        _register_fakes()
        _state.update(loaded=True, how=how)
        if torch.cuda.is_available():
            # The kernels' one-time wgmma probe (a malloc, a launch, a copy) runs now, for the
            # current device, rather than at a first call that might sit in a graph capture.
            try:
                torch.ops.expanse_fast_cuda.linear_math(torch.bfloat16)
            except Exception:  # noqa: BLE001 -- the launchers probe at first use instead
                pass
        return how


class _LoadError(Exception):
    pass


def _load_unlocked(verbose: bool) -> str:
    if os.environ.get("EXPANSE_FAST_CUDA") == "0":
        # (a build known to fail, or one there is no time for, is not started)
        raise _LoadError("turned off by EXPANSE_FAST_CUDA=0 (neither built nor loaded)")
    prebuilt = _prebuilt_path()
    if prebuilt is not None:
        try:
            importlib.import_module(PREBUILT)  # its static initialisers register the ops
        except Exception as exc:  # noqa: BLE001
            raise _LoadError(f"loading the prebuilt {PREBUILT} ({prebuilt}) failed: "
                             f"{_short_error(exc)}") from exc
        return f"prebuilt {prebuilt}"
    missing = _toolchain_missing()
    if missing:
        raise _LoadError(missing)
    from torch.utils import cpp_extension
    srcs = source_files()
    for path in srcs:
        if not os.path.exists(path):
            raise _LoadError(f"CUDA source missing: {path}")
    cpp_extension.load(
        name=EXT_NAME, sources=srcs,
        extra_include_paths=[source_dir()],
        # searched after the toolkit's own headers: only what it lacks comes from the wheels
        extra_cflags=["-O3"] + [f"-idirafter{d}" for d in
                                _library_include_dirs(cpp_extension.CUDA_HOME)],
        extra_cuda_cflags=["-O3"] + _arch_flags(),
        with_cuda=True, is_python_module=False, verbose=verbose)
    return f"built {EXT_NAME} with ninja"


def availability(device) -> Tuple[bool, str]:
    """(usable, reason) for this backend on ``device``; may build the extension (once)."""
    device = torch.device(device)
    if torch.version.cuda is None:
        return False, "torch is not built with CUDA (torch.version.cuda is None)"
    if device.type != "cuda":
        return False, f"the cuda backend runs on CUDA devices, not {device.type!r}"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"needs compute capability 8.0+ (bf16 tensor cores), got {major}.{minor}"
    try:
        with torch.cuda.device(device):
            how = load()
    except RuntimeError as exc:
        return False, str(exc)
    return True, f"compiled CUDA kernels ({how})"


# ---------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes only, for torch.compile / FakeTensor
# ---------------------------------------------------------------------------------------
_fakes_registered = False


def _fake_grads(x: Tensor, w_new: Tensor, w_couple: Maybe, need_dx: bool, need_dw: bool,
                need_db: bool, need_dcouple: bool):
    """The gradients a backward op returns, as empty tensors of their shapes (None if unasked);
    dx in x's memory format, as the conv op returns it (a linear x's is always contiguous)."""
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device,
                     memory_format=torch_ref.conv_memory_format(x)) if need_dx else None
    return (dx,
            x.new_empty(w_new.shape) if need_dw else None,
            x.new_empty((w_new.shape[0],)) if need_db else None,
            x.new_empty(w_couple.shape) if (need_dcouple and w_couple is not None) else None)


def _register_fakes():
    global _fakes_registered
    if _fakes_registered:
        return

    @torch.library.register_fake("expanse_fast_cuda::linear_forward")
    def _fwd_fake(x, w_frozen, b_frozen, w_new, b_new, w_couple, frozen_out_groups,
                  frozen_k_ends, activation=0, pre=None):
        return x.new_empty((x.shape[0], w_frozen.shape[0] + w_new.shape[0]))

    @torch.library.register_fake("expanse_fast_cuda::linear_backward")
    def _bwd_fake(dy, x, w_frozen, w_new, w_couple, frozen_out_groups, frozen_k_ends,
                  need_dx_new, need_dx_old, need_dw, need_db, need_dcouple):
        return _fake_grads(x, w_new, w_couple, need_dx_new or need_dx_old, need_dw, need_db,
                           need_dcouple)

    _register_conv_fakes()
    _fakes_registered = True


def _ops():
    load()
    return torch.ops.expanse_fast_cuda


def linear_math(dtype: torch.dtype, device=None) -> str:
    """The tile math of the linear kernels for ``dtype`` on ``device``, now: ``"wgmma"``
    (Hopper warpgroup MMA, from an sm_90a build; ``EXPANSE_FAST_CUDA_WGMMA=0`` turns it off;
    ``"wgmma-sw128"`` with ``EXPANSE_FAST_CUDA_SWIZZLE=1``: 128-byte swizzled operand tiles;
    else ``"wgmma-k128x2"`` with ``EXPANSE_FAST_CUDA_PIPELINE=k128x2``: two stages of 128-wide
    k-tiles, ``"wgmma-tma"`` with ``EXPANSE_FAST_CUDA_PIPELINE=tma``: the forward's tiles
    loaded by the copy engine; all experiments),
    ``"wmma"`` (portable tensor-core fragments) or ``"simt"`` (fp32).  The conv kernels follow
    the same choice."""
    ops = _ops()
    with torch.cuda.device(device if device is not None else torch.cuda.current_device()):
        return ops.linear_math(dtype)


def linear_maths(device=None) -> dict:
    """``linear_math`` of each dtype the kernels take: {"bfloat16": ..., "float16": ...,
    "float32": ...}."""
    return {str(dt).replace("torch.", ""): linear_math(dt, device)
            for dt in (torch.bfloat16, torch.float16, torch.float32)}


# ---------------------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------------------
# The kernels' activation codes (csrc/expanded_linear.h, enum Activation).
_ACTIVATION_CODES = {"": 0, "relu": 1, "gelu_tanh": 2, "silu": 3, "gelu": 4}

def linear_forward(x: Tensor, w_frozen: Tensor, b_frozen: Maybe, w_new: Tensor, b_new: Maybe,
                   w_couple: Maybe, frozen_out_groups: Sequence[int],
                   frozen_k_ends: Sequence[int], activation: str = "",
                   pre: Maybe = None) -> Tensor:
    torch_ref.check_activation(activation)
    # bias, the store of pre and the activation run in the kernel's epilogue
    return _ops().linear_forward(x, w_frozen, b_frozen, w_new, b_new, w_couple,
                                 [int(g) for g in frozen_out_groups],
                                 [int(k) for k in frozen_k_ends], _ACTIVATION_CODES[activation],
                                 pre if pre is not None and pre.shape[1] else None)


def linear_backward(dy: Tensor, x: Tensor, w_frozen: Tensor, w_new: Tensor, w_couple: Maybe,
                    frozen_out_groups: Sequence[int], frozen_k_ends: Sequence[int],
                    need_dx_new: bool, need_dx_old: bool, need_dw: bool, need_db: bool,
                    need_dcouple: bool, saved: Maybe = None, activation: str = ""):
    if activation:
        old_too = torch_ref.reads_frozen_dy(w_couple, need_dx_new, need_dx_old, need_dcouple)
        dy = torch_ref.activation_grad_full(dy, activation, saved, w_frozen.shape[0], old_too)
    dx, dw, db, dcouple = _ops().linear_backward(
        dy, x, w_frozen, w_new, w_couple, [int(g) for g in frozen_out_groups],
        [int(k) for k in frozen_k_ends], bool(need_dx_new), bool(need_dx_old), bool(need_dw),
        bool(need_db), bool(need_dcouple))
    return dx, dw, db, dcouple


# ---------------------------------------------------------------------------------------
# Conv2d: implicit-GEMM kernels (csrc/expanded_conv_kernels.cu) for groups=1 convolutions,
# ops expanse_fast_cuda::conv2d_forward / conv2d_backward.  Depthwise convolutions have no
# kernels of their own, and empty shapes (no rows, channels, filters or pixels) need none:
# both go to the structured PyTorch path (cuDNN), which already skips every frozen block and
# frozen gradient.
# The ops take x and dy as they are and return y and dx in x's memory format
# (torch_ref.conv_memory_format, the fakes' rule too): the forward and gradients run as NHWC
# implicit GEMMs (csrc/expanded_conv_nhwc.cu; fp16/bf16 with wgmma on an H100/H200, WMMA
# elsewhere, fp32 with FMA) where the channel (and, for dx, row) counts are multiples of 8,
# NCHW operands through channels_last copies;
# the NCHW kernels, for the rest, get NCHW copies of channels_last operands.
# A folded BatchNorm of the frozen channels (``frozen_bn``) runs in the forward kernel's
# epilogue (an fp32 per-channel scale and shift); in the backward its dy scale moves onto the
# frozen weight rows (for dx) and the rows of dW_couple, so dy itself is never copied.
# ---------------------------------------------------------------------------------------
def _conv_pair(v) -> list:
    if isinstance(v, int):
        return [int(v), int(v)]
    v = [int(a) for a in v]
    return v * 2 if len(v) == 1 else v


def _conv_to_torch_ref(x: Tensor, w_frozen: Tensor, w_new: Tensor, depthwise: bool) -> bool:
    if depthwise:
        return True
    if x.dim() != 4 or w_new.dim() != 4:
        return False  # the op's checks name the problem
    return (x.numel() == 0 or w_frozen.shape[0] + w_new.shape[0] == 0
            or w_new.shape[2] == 0 or w_new.shape[3] == 0)


def _register_conv_fakes():
    @torch.library.register_fake("expanse_fast_cuda::conv2d_forward")
    def _conv_fwd_fake(x, w_frozen, b_frozen, w_new, b_new, w_couple, frozen_out_groups,
                       frozen_k_ends, stride, padding, dilation, bn_scale=None,
                       bn_shift=None):
        (sh, sw), (ph, pw), (dh, dw) = (_conv_pair(stride), _conv_pair(padding),
                                        _conv_pair(dilation))
        kh, kw = w_new.shape[2], w_new.shape[3]
        return torch.empty((x.shape[0], w_frozen.shape[0] + w_new.shape[0],
                            torch_ref.conv_out_size(x.shape[2], kh, sh, ph, dh),
                            torch_ref.conv_out_size(x.shape[3], kw, sw, pw, dw)),
                           dtype=x.dtype, device=x.device,
                           memory_format=torch_ref.conv_memory_format(x))

    @torch.library.register_fake("expanse_fast_cuda::conv2d_backward")
    def _conv_bwd_fake(dy, x, w_frozen, w_new, w_couple, frozen_out_groups, frozen_k_ends,
                       stride, padding, dilation, need_dx_new, need_dx_old, need_dw, need_db,
                       need_dcouple):
        return _fake_grads(x, w_new, w_couple, need_dx_new or need_dx_old, need_dw, need_db,
                           need_dcouple)


def conv2d_forward(x: Tensor, w_frozen: Tensor, b_frozen: Maybe, w_new: Tensor, b_new: Maybe,
                   w_couple: Maybe, frozen_out_groups: Sequence[int],
                   frozen_k_ends: Sequence[int], stride, padding, dilation,
                   depthwise: bool, frozen_bn=None) -> Tensor:
    if _conv_to_torch_ref(x, w_frozen, w_new, depthwise):
        return torch_ref.conv2d_forward(x, w_frozen, b_frozen, w_new, b_new, w_couple,
                                        frozen_out_groups, frozen_k_ends, stride, padding,
                                        dilation, depthwise, frozen_bn=frozen_bn)
    scale, shift = (_bn_scale_shift(frozen_bn) if frozen_bn is not None and w_frozen.shape[0]
                    else (None, None))
    # y comes back in x's memory format: a channels_last x goes to the NHWC implicit GEMM
    # where it qualifies (csrc/expanded_conv_nhwc.cu), else the op copies it to NCHW itself.
    return _ops().conv2d_forward(x, w_frozen, b_frozen, w_new, b_new, w_couple,
                                 [int(g) for g in frozen_out_groups],
                                 [int(k) for k in frozen_k_ends], _conv_pair(stride),
                                 _conv_pair(padding), _conv_pair(dilation), scale, shift)


def _bn_scale_shift(frozen_bn):
    """fp32 (scale, shift) of the eval-mode BatchNorm (mean, var, weight, bias, eps):
    y = x * scale + shift, per channel."""
    mean, var, weight, bias, eps = frozen_bn
    scale = torch_ref.bn_scale(var.float(), None if weight is None else weight.float(), eps)
    shift = -mean.float() * scale
    if bias is not None:
        shift = shift + bias.float()
    return scale.contiguous(), shift.contiguous()


def conv2d_backward(dy: Tensor, x: Tensor, w_frozen: Tensor, w_new: Tensor, w_couple: Maybe,
                    frozen_out_groups: Sequence[int], frozen_k_ends: Sequence[int], stride,
                    padding, dilation, depthwise: bool, need_dx_new: bool, need_dx_old: bool,
                    need_dw: bool, need_db: bool, need_dcouple: bool,
                    frozen_dy_scale: Maybe = None):
    if _conv_to_torch_ref(x, w_frozen, w_new, depthwise):
        return torch_ref.conv2d_backward(dy, x, w_frozen, w_new, w_couple, frozen_out_groups,
                                         frozen_k_ends, stride, padding, dilation, depthwise,
                                         need_dx_new, need_dx_old, need_dw, need_db,
                                         need_dcouple, frozen_dy_scale=frozen_dy_scale)
    o_f = w_frozen.shape[0]
    scale = None
    if frozen_dy_scale is not None and o_f and torch_ref.reads_frozen_dy(
            w_couple, need_dx_new, need_dx_old, need_dcouple):
        # The frozen dy channels are read scaled by the folded BatchNorm.  The scale is per
        # frozen output channel, so it moves onto what meets those channels: the frozen rows of
        # the weights for dx (dy.(s w) = (s dy).w) and the rows of dW_couple afterwards.
        # Both are weight-sized; dy (batch x channels x H x W) is never scaled in a copy.
        scale = frozen_dy_scale.float().view(-1, 1, 1, 1)
        if need_dx_new or need_dx_old:
            w_frozen = (w_frozen.float() * scale).to(w_frozen.dtype)
            if w_couple is not None:
                w_couple = (w_couple.float() * scale).to(w_couple.dtype)
    # The op takes dy and x as they are: a channels_last dy goes to the NHWC input gradient
    # where it qualifies, and whatever runs on the NCHW kernels gets an NCHW copy there.
    dx, dw, db, dcouple = _ops().conv2d_backward(
        dy, x, w_frozen, w_new, w_couple,
        [int(g) for g in frozen_out_groups], [int(k) for k in frozen_k_ends],
        _conv_pair(stride), _conv_pair(padding), _conv_pair(dilation), bool(need_dx_new),
        bool(need_dx_old), bool(need_dw), bool(need_db), bool(need_dcouple))
    if scale is not None and dcouple is not None:
        dcouple = (dcouple.float() * scale).to(dcouple.dtype)
    return dx, dw, db, dcouple
