"""torch backend, conv2d backward: an input gradient alone reads only the input's shape, so
a channel slice of x goes to aten as an uninitialized stand-in of its shape and layout
(aten would first copy the slice dense).  The gradients must stay bit for bit what the
real slice gives, in every layout, mode and on every path that takes an input gradient."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from expanse_fast.backends import torch_ref
from expanse_fast.layout import Layout
from reference import random_blocks

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [pytest.mark.gpu] if DEVICE.type == "cuda" else []

LAYOUTS = {
    "two_groups": Layout((5, 3), (4, 3)),
    "three_groups": Layout((3, 2, 3), (2, 3, 2)),
    "coupled": Layout((4, 3), (3, 2), "coupled"),
}


class _ConvBackwardInputs(TorchDispatchMode):
    """Records (input is dense, dW asked) of each aten convolution_backward call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            x, mask = args[1], args[-1]
            dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
            self.calls.append((dense, mask[1]))
        return func(*args, **(kwargs or {}))


def _backward(lay, fmt, need_dx_old, dtype=torch.float32):
    torch.manual_seed(0)
    w_f, _, w_n, _, w_c = random_blocks(lay, tail=(3, 3), dtype=dtype, device=DEVICE)
    x = torch.randn(2, lay.in_features, 7, 6, dtype=dtype, device=DEVICE)
    x = x.contiguous(memory_format=fmt)
    dy = torch.randn(2, lay.out_features, 7, 6, dtype=dtype, device=DEVICE)
    dy = dy.contiguous(memory_format=fmt)
    return lambda: torch_ref.conv2d_backward(
        dy, x, w_f, w_n, w_c, lay.frozen_out_groups, lay.frozen_k_ends, [1, 1], [1, 1], [1, 1],
        False, True, need_dx_old, True, True, w_c is not None)


@pytest.mark.parametrize("need_dx_old", [False, True])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_gradients_bit_identical_to_the_real_slice(monkeypatch, name, fmt, need_dx_old):
    run = _backward(LAYOUTS[name], fmt, need_dx_old)
    with _ConvBackwardInputs() as seen:
        got = run()
    # every input-gradient-only call got a dense input (no copy of a slice inside aten)
    assert seen.calls and all(dense for dense, dw in seen.calls if not dw)
    monkeypatch.setattr(torch_ref, "_shape_of", lambda x: x)
    want = run()
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert torch.equal(g, w)
            assert g.stride() == w.stride()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
def test_stand_in_keeps_shape_dtype_device_and_layout(fmt):
    x = torch.randn(2, 9, 5, 4, device=DEVICE).contiguous(memory_format=fmt)
    part = x[:, 4:]
    stand_in = torch_ref._shape_of(part)
    assert stand_in.shape == part.shape and stand_in.dtype == part.dtype
    assert stand_in.device == part.device
    assert stand_in.is_contiguous(memory_format=fmt)
    assert torch_ref._shape_of(x) is x  # dense already: the input itself
