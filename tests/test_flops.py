"""The backward pass does no frozen-gradient work: the FLOPs the torch profiler sees for one
forward+backward equal the useful-work count of DESIGN.md section 2."""
import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import expanse_fast as xf


def _profiled_flops(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        fn()
    return sum(e.flops for e in prof.key_averages() if e.flops)


def _useful_flops(big, rows):
    total = 0
    for i, layer in enumerate(l for l in big.modules() if isinstance(l, xf.ExpandedLinear)):
        lay = layer.layout
        total += 2 * rows * lay.forward_macs()
        # the first layer reads data: no input gradient at all
        total += 2 * rows * lay.backward_macs(need_input_grad=i > 0,
                                              need_old_input_grad=not layer.skip_old_input_grad)
    return total


@pytest.mark.parametrize("mode", ["isolated", "coupled"])
def test_fwd_bwd_flops_equal_useful_work(mode):
    base = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                         nn.Linear(48, 10))
    big = xf.expand(base, width=0.25, new_classes=6, mode=mode)
    rows = 33
    x = torch.randn(rows, 64)

    def step():
        big(x).sum().backward()

    with xf.use_backend("torch"):
        step()  # warm-up outside the profile
        measured = _profiled_flops(step)
    useful = _useful_flops(big, rows)
    dense = sum(2 * rows * l.layout.dense_macs() for l in big.modules()
                if isinstance(l, xf.ExpandedLinear))
    assert measured == useful, f"profiler saw {measured} FLOPs, useful work is {useful}"
    assert measured < dense


def test_hidden_layer_ratio_matches_design():
    # DESIGN.md section 2: square hidden layer widened by 25%: 2.78x under the masked dense
    # layer and 1.78x under fine-tuning the original layer.
    lay = xf.Layout((1024, 256), (1024, 256))
    useful = lay.forward_macs() + lay.backward_macs(need_input_grad=True)
    assert round(lay.dense_macs() / useful, 2) == 2.78
    assert round(3 * 1024 * 1024 / useful, 2) == 1.78


def _counter_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("mode", ["isolated", "coupled"])
def test_flop_counter_mode_counts_the_useful_work(mode):
    """FlopCounterMode sees each expanded op as one unit with its own formula: eager (the
    ops go through the custom ops under a dispatch mode; before, the forward's GEMMs into
    column slices went uncounted and a shape's first call counted its bit-exactness
    probes) and through torch.compile."""
    base = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                         nn.Linear(48, 10))
    big = xf.expand(base, width=0.25, new_classes=6, mode=mode)
    rows = 33
    x = torch.randn(rows, 64)
    useful = _useful_flops(big, rows)
    assert _counter_flops(lambda: big(x).sum().backward()) == useful
    compiled = torch.compile(big, backend="aot_eager")  # (dynamo steps aside for the mode)
    compiled(x).sum().backward()
    assert _counter_flops(lambda: compiled(x).sum().backward()) == useful
    # a layer called on its own forms the whole input gradient, old columns too
    layer = xf.ExpandedLinear.from_linear(nn.Linear(7, 5), 3, 2, mode=mode)
    xi = torch.randn(4, 10, requires_grad=True)
    lay = layer.layout
    assert _counter_flops(lambda: layer(xi).sum().backward()) == 2 * 4 * (
        lay.forward_macs() + lay.backward_macs(need_input_grad=True, need_old_input_grad=True))


@pytest.mark.parametrize("depthwise", [False, True])
def test_flop_counter_mode_counts_a_conv(depthwise):
    torch.manual_seed(0)
    c = 6
    conv = nn.Conv2d(c, c * (2 if depthwise else 1), 3, stride=2, padding=2, dilation=2,
                     groups=c if depthwise else 1)
    layer = xf.ExpandedConv2d.from_conv(conv, 2, 4 if depthwise else 3)
    layer.skip_old_input_grad = True
    x = torch.randn(2, c + 2, 9, 11, requires_grad=True)
    y = layer(x)
    pixels, taps = y.shape[0] * y.shape[2] * y.shape[3], 9
    lay = layer.layout
    if depthwise:
        o_f, o_new = lay.frozen_out, lay.new_out
        expected = pixels * taps * ((o_f + o_new) + o_new + o_new)  # fwd, dW, dx_new
    else:
        expected = pixels * taps * (lay.forward_macs() + lay.backward_macs(need_input_grad=True))
    assert _counter_flops(lambda: layer(x).sum().backward()) == 2 * expected
