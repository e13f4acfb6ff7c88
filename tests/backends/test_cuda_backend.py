"""The ``cuda`` backend (compiled csrc/ kernels) against a float64 dense staircase reference.

The GPU tests build the extension on first use and fail (not skip) if it cannot be built.
Weight columns that the staircase never reads are NaN, and outputs are allocated over freed
NaN memory where the caching allocator allows, so a stray read or an unwritten element fails.
"""
import math

import pytest
import torch

from expanse_fast.backends import cuda, torch_ref
from expanse_fast.layout import Layout

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES = list(TOL)

LAYOUTS = {
    "one_group": Layout((37,), (53,)),
    "two_groups": Layout((61, 13), (67, 1)),
    "three_groups": Layout((129, 31, 17), (130, 5, 131)),  # crosses the 128/64 tiles
    "first_layer": Layout((29, 0), (41, 17)),               # data input never grows
    "head_no_new_classes": Layout((37, 11), (10, 0)),
    "empty_frozen_group": Layout((23, 0, 9), (0, 7, 12)),
    "aligned": Layout((128, 64), (256, 64)),                # 16-byte vector copy path
    "coupled_three": Layout((45, 7, 23), (33, 11, 19), "coupled"),
    "coupled_aligned": Layout((64, 32), (96, 32), "coupled"),
    "coupled_no_new_inputs": Layout((19, 0), (8, 5), "coupled"),
}


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def make_params(layout, dtype, device, bias=True):
    """Weights as stored (layout.py); the never-read staircase zeros are NaN."""
    o_f, i_f, i = layout.frozen_out, layout.frozen_in, layout.in_features
    scale = 1.0 / math.sqrt(max(i, 1))
    w_frozen = torch.randn(o_f, i_f, dtype=torch.float64) * scale
    if layout.mode == "isolated":
        r0 = 0
        for rows, k in zip(layout.frozen_out_groups, layout.frozen_k_ends):
            w_frozen[r0:r0 + rows, k:] = float("nan")
            r0 += rows
    w_new = torch.randn(layout.new_out, i, dtype=torch.float64) * scale
    w_couple = (torch.randn(o_f, layout.new_in, dtype=torch.float64) * scale
                if layout.mode == "coupled" else None)
    b_frozen = torch.randn(o_f, dtype=torch.float64) if bias else None
    b_new = torch.randn(layout.new_out, dtype=torch.float64) if bias else None
    to = (lambda t: None if t is None else t.to(device=device, dtype=dtype))
    return dict(w_frozen=to(w_frozen), b_frozen=to(b_frozen), w_new=to(w_new),
                b_new=to(b_new), w_couple=to(w_couple))


def dense_weight(layout, p):
    """The full (O, I) staircase matrix in float64, built from the mask (not from torch_ref)."""
    w = torch.zeros(layout.out_features, layout.in_features, dtype=torch.float64)
    wf = p["w_frozen"].double().cpu()
    r0 = 0
    for rows, k in zip(layout.frozen_out_groups, layout.frozen_k_ends):
        w[r0:r0 + rows, :k] = wf[r0:r0 + rows, :k]
        r0 += rows
    if p["w_couple"] is not None:
        w[:layout.frozen_out, layout.frozen_in:] = p["w_couple"].double().cpu()
    w[layout.frozen_out:] = p["w_new"].double().cpu()
    return w


def dense_bias(layout, p):
    parts = [p["b_frozen"], p["b_new"]]
    if parts[0] is None:
        return torch.zeros(layout.out_features, dtype=torch.float64)
    return torch.cat([t.double().cpu() for t in parts])


def rel_err(out, ref):
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def assert_matches(out, ref, dtype, what):
    assert out is not None, f"{what}: got None"
    assert tuple(out.shape) == tuple(ref.shape), f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    if ref.numel() == 0:
        return
    if ref.norm() == 0:
        assert torch.equal(out.double().cpu(), ref), f"{what}: expected exact zeros"
        return
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{what}: rel err {err:.3g} >= {TOL[dtype]} ({dtype})"


def poison_allocator(device):
    """Leave NaN-filled freed blocks in both caching-allocator pools (best effort)."""
    for numel in (1 << 18, 1 << 24):  # 1 MiB (small pool), 64 MiB (large pool) of fp32
        torch.full((numel,), float("nan"), device=device)
    torch.cuda.synchronize(device)


def call_forward(layout, p, x):
    return cuda.linear_forward(x, p["w_frozen"], p["b_frozen"], p["w_new"], p["b_new"],
                               p["w_couple"], layout.frozen_out_groups, layout.frozen_k_ends)


def call_backward(layout, p, dy, x, need_dx_new=True, need_dx_old=True, need_dw=True,
                  need_db=True, need_dcouple=True):
    return cuda.linear_backward(dy, x, p["w_frozen"], p["w_new"], p["w_couple"],
                                layout.frozen_out_groups, layout.frozen_k_ends, need_dx_new,
                                need_dx_old, need_dw, need_db, need_dcouple)


def check_backward(layout, p, dy, x, dtype, grads, need_dx_old=True, need=None):
    """Compare (dx, dw, db, dcouple) with float64 dense products; None where not asked."""
    need = need or dict(dx=True, dw=True, db=True, dcouple=True)
    dx, dw, db, dcouple = grads
    w = dense_weight(layout, p)
    x64, dy64 = x.double().cpu(), dy.double().cpu()
    o_f, i_f = layout.frozen_out, layout.frozen_in
    dy_new = dy64[:, o_f:]
    if need["dx"]:
        ref = dy64 @ w
        if not need_dx_old:
            assert torch.equal(dx[:, :i_f].cpu(), torch.zeros_like(dx[:, :i_f].cpu())), \
                "dx_old must be zeros when not asked for"
            ref[:, :i_f] = 0
        assert_matches(dx, ref, dtype, "dx")
    else:
        assert dx is None
    if need["dw"]:
        assert_matches(dw, dy_new.t() @ x64, dtype, "dW_new")
    else:
        assert dw is None
    if need["db"]:
        assert_matches(db, dy_new.sum(0), dtype, "db_new")
    else:
        assert db is None
    if need["dcouple"] and p["w_couple"] is not None:
        assert_matches(dcouple, dy64[:, :o_f].t() @ x64[:, i_f:], dtype, "dW_couple")
    else:
        assert dcouple is None


@pytest.fixture(scope="module")
def dev():
    ok, why = cuda.availability(torch.device("cuda"))
    assert ok, f"cuda backend unavailable on this GPU machine: {why}"
    return torch.device("cuda")


# ---------------------------------------------------------------------------------------
# GPU: forward and every gradient against float64
# ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [0, 1, 7, 257])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_forward_matches_dense(dev, name, dtype, rows):
    layout = LAYOUTS[name]
    p = make_params(layout, dtype, dev)
    x = torch.randn(rows, layout.in_features).to(dev, dtype)
    poison_allocator(dev)
    y = call_forward(layout, p, x)
    ref = x.double().cpu() @ dense_weight(layout, p).t() + dense_bias(layout, p)
    assert_matches(y, ref, dtype, "y")


@pytest.mark.gpu
@pytest.mark.parametrize("need_dx_old", [True, False])
@pytest.mark.parametrize("rows", [0, 1, 7, 257])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_backward_matches_dense(dev, name, dtype, rows, need_dx_old):
    layout = LAYOUTS[name]
    p = make_params(layout, dtype, dev)
    x = torch.randn(rows, layout.in_features).to(dev, dtype)
    dy = torch.randn(rows, layout.out_features).to(dev, dtype)
    poison_allocator(dev)
    grads = call_backward(layout, p, dy, x, need_dx_old=need_dx_old)
    check_backward(layout, p, dy, x, dtype, grads, need_dx_old)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["three_groups", "coupled_aligned"])
def test_large_batch_split_reduction(dev, name, dtype):
    """Many rows, few output tiles: the weight gradient splits its reduction over blocks."""
    layout = LAYOUTS[name]
    rows = 4099  # prime
    p = make_params(layout, dtype, dev)
    x = torch.randn(rows, layout.in_features).to(dev, dtype)
    dy = torch.randn(rows, layout.out_features).to(dev, dtype)
    assert_matches(call_forward(layout, p, x),
                   x.double().cpu() @ dense_weight(layout, p).t() + dense_bias(layout, p),
                   dtype, "y")
    poison_allocator(dev)
    check_backward(layout, p, dy, x, dtype, call_backward(layout, p, dy, x))


NEED_SETS = [
    dict(dx=False, dw=False, db=False, dcouple=False),
    dict(dx=False, dw=True, db=False, dcouple=False),
    dict(dx=False, dw=False, db=True, dcouple=False),   # db alone: its own kernel
    dict(dx=True, dw=False, db=False, dcouple=False),
    dict(dx=False, dw=False, db=False, dcouple=True),
    dict(dx=True, dw=True, db=True, dcouple=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("need", NEED_SETS, ids=lambda n: "+".join(k for k, v in n.items() if v)
                         or "nothing")
@pytest.mark.parametrize("name", ["three_groups", "coupled_three"])
def test_backward_computes_only_what_is_asked(dev, name, need):
    layout, dtype, rows = LAYOUTS[name], torch.float16, 131
    p = make_params(layout, dtype, dev)
    x = torch.randn(rows, layout.in_features).to(dev, dtype)
    dy = torch.randn(rows, layout.out_features).to(dev, dtype)
    poison_allocator(dev)
    grads = call_backward(layout, p, dy, x, need_dx_new=need["dx"], need_dx_old=False,
                          need_dw=need["dw"], need_db=need["db"], need_dcouple=need["dcouple"])
    check_backward(layout, p, dy, x, dtype, grads, need_dx_old=False, need=need)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs_and_no_bias(dev, dtype):
    """Row strides that are not the width (column slices, misaligned), a transposed dy."""
    layout = LAYOUTS["coupled_three"]
    rows = 67
    p = make_params(layout, dtype, dev, bias=False)
    x = torch.randn(rows, layout.in_features + 5).to(dev, dtype)[:, 3:3 + layout.in_features]
    dy = torch.randn(layout.out_features, rows).to(dev, dtype).t()  # stride (1, rows)
    poison_allocator(dev)
    y = call_forward(layout, p, x)
    assert_matches(y, x.double().cpu() @ dense_weight(layout, p).t(), dtype, "y")
    check_backward(layout, p, dy, x, dtype, call_backward(layout, p, dy, x))


@pytest.mark.gpu
def test_agrees_with_torch_ref(dev):
    layout = LAYOUTS["three_groups"]
    p = make_params(layout, torch.float32, dev)
    p["w_frozen"] = torch.nan_to_num(p["w_frozen"])  # torch_ref never reads them either
    x = torch.randn(33, layout.in_features, device=dev)
    args = (p["w_frozen"], p["b_frozen"], p["w_new"], p["b_new"], p["w_couple"],
            layout.frozen_out_groups, layout.frozen_k_ends)
    torch.testing.assert_close(cuda.linear_forward(x, *args), torch_ref.linear_forward(x, *args),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_bad_arguments_name_expected_and_given(dev):
    layout = LAYOUTS["two_groups"]
    p = make_params(layout, torch.float16, dev)
    x = torch.randn(5, layout.in_features, device=dev)  # float32 against float16 weights
    with pytest.raises(RuntimeError, match=r"w_frozen must have dtype Float.*got Half"):
        call_forward(layout, p, x)
    x = torch.randn(5, layout.in_features + 1, device=dev, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"w_new must have 75 columns, got shape \[1, 74\]"):
        call_forward(layout, p, x)
    x = torch.randn(5, layout.in_features, device=dev, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"sum to 66 but w_frozen has 67 rows"):
        cuda.linear_forward(x, p["w_frozen"], None, p["w_new"], None, None, [66], [61])
    with pytest.raises(RuntimeError, match=r"expected CUDA tensors, got x on cpu"):
        call_forward(layout, p, x.cpu())


@pytest.mark.gpu
def test_fake_registrations(dev):
    layout = LAYOUTS["coupled_three"]
    p = make_params(layout, torch.float16, dev)
    x = torch.randn(9, layout.in_features, device=dev, dtype=torch.float16)
    args = (x, p["w_frozen"], p["b_frozen"], p["w_new"], p["b_new"], p["w_couple"],
            list(layout.frozen_out_groups), list(layout.frozen_k_ends))
    torch.library.opcheck(torch.ops.expanse_fast_cuda.linear_forward.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    dy = torch.randn(9, layout.out_features, device=dev, dtype=torch.float16)
    bargs = (dy, x, p["w_frozen"], p["w_new"], p["w_couple"], list(layout.frozen_out_groups),
             list(layout.frozen_k_ends), True, False, True, True, True)
    torch.library.opcheck(torch.ops.expanse_fast_cuda.linear_backward.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------
# CPU: importing never fails, availability explains itself
# ---------------------------------------------------------------------------------------
def test_unavailable_on_cpu_with_reason():
    ok, why = cuda.availability(torch.device("cpu"))
    assert ok is False
    assert isinstance(why, str) and why


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU build of torch")
def test_cpu_torch_says_so():
    ok, why = cuda.availability("cuda")
    assert not ok and "not built with CUDA" in why


def test_sources_found():
    files = cuda.source_files()
    assert [f.rsplit("/", 1)[-1] for f in files] == ["bindings.cpp", "expanded_linear_kernels.cu"]
    for f in files:
        with open(f) as fh:
            assert fh.read(100)


def test_conv_delegates_to_torch_ref():
    assert cuda.conv2d_forward is torch_ref.conv2d_forward
    assert cuda.conv2d_backward is torch_ref.conv2d_backward
