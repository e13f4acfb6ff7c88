"""kernels/transpose.py: the NCHW -> channels_last copy the conv kernels' launchers make of
x and dy, as a tiled transpose.  A copy, so checked bit for bit against torch's own
(``contiguous(memory_format=torch.channels_last)``) on fresh random inputs of odd sizes:
1 and primes, channel and pixel counts off the 64 x 64 tile, channel slices and strided
rows (the views the launchers hand it).  No product: bfloat16 runs under the interpreter
too."""
import pytest
import torch

from expanse_fast.kernels import transpose

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the GPU run selects the "cuda" cases (marked gpu); CI runs the "cpu" ones interpreted
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 8, 1, 1), (2, 13, 5, 7), (3, 67, 9, 11), (1, 130, 13, 5), (2, 64, 8, 8)]


def _check(t):
    want = t.contiguous(memory_format=torch.channels_last)
    got = transpose.to_channels_last(t)
    assert got.shape == t.shape and got.dtype == t.dtype
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want)
    assert got.stride() == want.stride()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nchw_input_copies_exactly(shape, dtype, device):
    t = torch.randn(shape, device=device).to(dtype)
    assert transpose.usable(t)
    _check(t)


@pytest.mark.gpu
def test_a_resnet_stage_input_copies_exactly():
    """The GPU run's conv input (batch 64, 320 channels, 56 x 56, bf16): grids past one
    tile in every dimension, 64-bit offsets of a 128 MB tensor."""
    _check(torch.randn(64, 320, 56, 56, device="cuda", dtype=torch.bfloat16)[:, 256:])
    _check(torch.randn(64, 320, 56, 56, device="cuda", dtype=torch.bfloat16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_views_the_launchers_hand_it(dtype, device):
    base = torch.randn(3, 75, 11, 9, device=device).to(dtype)
    _check(base[:, 13:])          # dy's trainable channels: a channel slice
    _check(base[1:, 5:70])        # both ends cut, an image offset
    _check(base[:, :, ::2])       # rows two apart: H's stride is not W
    _check(base[:, :, 2:9, 1:8])  # a window: every stride but W's off the shape


def test_the_fallbacks_are_torch_copies(monkeypatch):
    few = torch.randn(2, transpose.MIN_CHANNELS - 1, 5, 5, device=DEVICE)
    assert not transpose.usable(few)  # the data layer's colour channels
    _check(few)
    w_strided = torch.randn(2, 16, 5, 10, device=DEVICE)[..., ::2]
    assert not transpose.usable(w_strided)
    _check(w_strided)
    monkeypatch.setenv("EXPANSE_FAST_CONV_TRANSPOSE", "torch")
    t = torch.randn(2, 16, 5, 5, device=DEVICE)
    assert not transpose.usable(t)
    _check(t)
    monkeypatch.setenv("EXPANSE_FAST_CONV_TRANSPOSE", "numpy")
    with pytest.raises(ValueError, match="EXPANSE_FAST_CONV_TRANSPOSE='numpy'"):
        transpose.to_channels_last(t)


def test_channels_last_input_is_returned_as_is():
    t = torch.randn(2, 16, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    assert transpose.to_channels_last(t) is t


def test_empty_input():
    t = torch.randn(0, 16, 5, 5, device=DEVICE)
    got = transpose.to_channels_last(t)
    assert got.shape == t.shape and got.is_contiguous(memory_format=torch.channels_last)


def _check_back(dst, src):
    want = dst.clone().copy_(src)
    got = transpose.copy_to_nchw_(dst, src)
    assert got is dst and torch.equal(dst, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_channels_last_results_go_back_to_nchw_exactly(shape, dtype, device):
    """The other way: the kernels' channels_last y (whole) and dx (into the caller's NCHW dx
    past the old channels) handed back to an NCHW caller."""
    src = torch.randn(shape, device=device).to(dtype).contiguous(
        memory_format=torch.channels_last)
    y = transpose.to_nchw(src)
    assert y.is_contiguous() and torch.equal(y, src)
    n, c, h, w = shape
    dx = torch.zeros(n, c + 5, h, w, device=device, dtype=dtype)
    _check_back(dx[:, 5:], src)
    assert torch.equal(dx[:, :5], torch.zeros_like(dx[:, :5]))  # the old channels untouched


def test_the_way_back_falls_back_to_torch_and_refuses_other_shapes():
    src = torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    _check_back(torch.empty(2, 16, 5, 5).contiguous(memory_format=torch.channels_last), src)
    _check_back(torch.empty(2, 16, 5, 10)[..., ::2], src)  # W not unit-stride
    _check_back(torch.empty(2, 16, 5, 5), src.contiguous())  # src not channels_last
    with pytest.raises(ValueError, match=r"shapes differ, \(2, 16, 5, 4\) and \(2, 16, 5, 5\)"):
        transpose.copy_to_nchw_(torch.empty(2, 16, 5, 4), src)
    t = torch.randn(2, 16, 5, 5)
    assert transpose.to_nchw(t) is t
