"""Float64 reference for every backend: the dense staircase matrix built from the blocks."""
from __future__ import annotations

import pytest
import torch

from expanse_fast.layout import Layout

# The device the backend-sweeping tests run on: the GPU where there is one.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_blocks(lay: Layout, tail=(), dtype=torch.float32, bias=True, device="cpu"):
    """Random frozen / new / coupling blocks of a layout (frozen upper blocks are zeros)."""
    g = dict(dtype=dtype, device=device)
    w_frozen = torch.randn((lay.frozen_out, lay.frozen_in) + tuple(tail), **g)
    # zero what isolated frozen rows must never read (columns past their k_end)
    start = 0
    for rows, k in zip(lay.frozen_out_groups, lay.frozen_k_ends):
        w_frozen[start:start + rows, k:] = 0
        start += rows
    w_new = torch.randn((lay.new_out, lay.in_features) + tuple(tail), **g)
    w_couple = (torch.randn((lay.frozen_out, lay.new_in) + tuple(tail), **g)
                if lay.mode == "coupled" else None)
    b_frozen = torch.randn(lay.frozen_out, **g) if bias else None
    b_new = torch.randn(lay.new_out, **g) if bias else None
    return w_frozen, b_frozen, w_new, b_new, w_couple


def dense64(lay: Layout, w_frozen, w_new, w_couple):
    """The full weight in float64, zeros in the blocks old units must not read."""
    tail = tuple(w_new.shape[2:])
    full = torch.zeros((lay.out_features, lay.in_features) + tail, dtype=torch.float64)
    full[: lay.frozen_out, : lay.frozen_in] = w_frozen.detach().double().cpu()
    if w_couple is not None:
        full[: lay.frozen_out, lay.frozen_in:] = w_couple.detach().double().cpu()
    full[lay.frozen_out:] = w_new.detach().double().cpu()
    return full


def rel_err(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if b.numel() == 0:
        return 0.0 if a.numel() == 0 else float("inf")
    denom = b.norm().item()
    err = (a - b).norm().item()
    return err / denom if denom else err


def usable_backends(device: torch.device, names=("torch", "triton", "cuda")):
    """The backends of ``names`` usable on ``device``."""
    from expanse_fast import backend_choice
    return [b for b in names if backend_choice.availability(b, device)[0]]


def on_device(cases, device: torch.device = DEVICE):
    """pytest params of ``cases`` (values or tuples), gpu-marked on a GPU: there they are part
    of the GPU run's `-m gpu` set."""
    marks = [pytest.mark.gpu] if device.type == "cuda" else []
    return [pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=marks) for c in cases]


def backend_dtype_cases(device: torch.device):
    """(backend, dtype) for every usable backend on ``device`` and the dtypes it is checked
    in: all three on a GPU; on CPU no bfloat16 for Triton (the interpreter's bf16 dot is
    wrong, so bf16 is checked on the GPU)."""
    cases = []
    for backend in usable_backends(device):
        dtypes = [torch.float32, torch.float16, torch.bfloat16]
        if device.type != "cuda" and backend == "triton":
            dtypes.remove(torch.bfloat16)
        cases += [(backend, d) for d in dtypes]
    return cases


# float64 references of the smooth activations the expanded linear can fuse
SMOOTH_ACTIVATIONS = {
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
    "silu": torch.nn.functional.silu,
}


def assert_same_training_state(model, twin, rtol, atol):
    """``model`` and ``twin`` (the same architecture) after the same backward: every trainable
    parameter's gradient and every buffer (running statistics) close, named after ``model``'s
    entries; ``twin``'s values are the expected ones."""
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol, msg=name)
    for (name, a), b in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, msg=name)


def assert_close_on_device(got: torch.Tensor, want: torch.Tensor):
    """``got`` (float32, on DEVICE) within 1e-4 of float64 ``want``'s largest magnitude on a
    CPU, 2e-2 on a GPU (TF32)."""
    tol = 1e-4 if DEVICE.type == "cpu" else 2e-2
    scale = want.abs().max().clamp_min(1e-6)
    err = ((got.double().cpu() - want).abs().max() / scale).item()
    assert err < tol, f"relative error {err:.3g} over {tol}"
