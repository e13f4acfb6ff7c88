"""Triton kernels of the expanded linear layer, and the ``triton`` backend's linear functions.

Every result is checked against a float64 dense reference: the full (O, I) matrix is built
from the blocks with the staircase mask (zeros right of each frozen group's k_end) and
multiplied with plain matmul.  The zero block handed to the kernels is poisoned with NaN, so
reading it anywhere shows up as NaN in the output; every ``torch.empty`` during a test is
NaN-filled too, so an output element the kernels forget to write fails the comparison.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py): float32 and float16
only (bfloat16 ``tl.dot`` is wrong under the interpreter).  ``gpu`` tests add bfloat16 and
large shapes against the ``torch`` backend.
"""
import itertools
import math

import pytest
import torch

pytest.importorskip("triton")

from expanse_fast.backends import torch_ref  # noqa: E402
from expanse_fast.backends import triton as triton_backend  # noqa: E402
# Imported directly: a kernel module that fails to import must fail loudly, not skip.
from expanse_fast.kernels import expanded_linear as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_OK, _WHY = triton_backend.availability(DEVICE)
pytestmark = pytest.mark.skipif(not _OK, reason=f"triton backend unavailable: {_WHY}")

# (in_groups, out_groups): 2 and 3 groups, widths 1 and primes, groups wider than one
# interpreter tile (32), k_ends off the tile grid, 0-width new input / middle output
# group, and a plain layer (one group: nothing frozen).
LAYOUTS = {
    "2g": ((40, 7), (33, 13)),
    "3g": ((20, 7, 13), (17, 1, 19)),
    "3g-zero": ((13, 7, 0), (5, 0, 7)),
    "1g": ((13,), (7,)),
}
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """Uninitialised float memory reads as NaN: unwritten outputs cannot pass."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


class Case:
    """Random blocks of one expanded layer, plus its float64 dense reference."""

    def __init__(self, in_groups, out_groups, mode="isolated", n=37, dtype=torch.float32,
                 bias=True, device=DEVICE):
        self.i_f, self.o_f = sum(in_groups[:-1]), sum(out_groups[:-1])
        self.i, self.o = sum(in_groups), sum(out_groups)
        self.groups = list(out_groups[:-1])
        if mode == "coupled":
            self.k_ends = [self.i_f] * len(self.groups)
        else:
            self.k_ends = list(itertools.accumulate(in_groups))[:len(self.groups)]
        o_new, i_new = out_groups[-1], in_groups[-1]
        scale = 1 / math.sqrt(max(self.i, 1))

        def rand(*shape, s=1.0):
            return (torch.randn(*shape, dtype=torch.float64) * s).to(dtype)

        self.x = rand(n, self.i)
        wf = rand(self.o_f, self.i_f, s=scale)
        self.w_new = rand(o_new, self.i, s=scale)
        self.w_couple = rand(self.o_f, i_new, s=scale) if mode == "coupled" else None
        self.b_frozen = rand(self.o_f) if bias else None
        self.b_new = rand(o_new) if bias else None

        # Dense float64 reference with the staircase mask.
        w = torch.zeros(self.o, self.i, dtype=torch.float64)
        r = 0
        for rows, k in zip(self.groups, self.k_ends):
            w[r:r + rows, :k] = wf[r:r + rows, :k].double()
            wf[r:r + rows, k:] = float("nan")  # the zero block: must never be read
            r += rows
        if self.w_couple is not None:
            w[:self.o_f, self.i_f:] = self.w_couple.double()
        w[self.o_f:] = self.w_new.double()
        self.w_frozen = wf
        self.w_dense = w
        b = torch.zeros(self.o, dtype=torch.float64)
        if bias:
            b[:self.o_f], b[self.o_f:] = self.b_frozen.double(), self.b_new.double()
        self.b_dense = b
        self.dy = rand(n, self.o)
        for name in ("x", "w_frozen", "w_new", "w_couple", "b_frozen", "b_new", "dy"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))

    def blocks(self):
        return (self.w_frozen, self.b_frozen, self.w_new, self.b_new, self.w_couple,
                self.groups, self.k_ends)

    def ref_forward(self, activation=None):
        y = self.ref_pre()
        if activation == "relu":
            y = torch.relu(y)
        elif activation == "gelu":
            y = torch.nn.functional.gelu(y)
        elif activation == "gelu_tanh":
            y = torch.nn.functional.gelu(y, approximate="tanh")
        elif activation == "silu":
            y = torch.nn.functional.silu(y)
        return y

    def ref_pre(self):
        return self.x.double().cpu() @ self.w_dense.t() + self.b_dense

    def ref_backward(self, need_dx_old):
        x, dy = self.x.double().cpu(), self.dy.double().cpu()
        dx = dy @ self.w_dense
        if not need_dx_old:
            dx[:, :self.i_f] = 0
        dw_full = dy.t() @ x
        return (dx, dw_full[self.o_f:], dy[:, self.o_f:].sum(0),
                dw_full[:self.o_f, self.i_f:] if self.w_couple is not None else None)

    def backward(self, backend, need_dx_new=True, need_dx_old=True, need_dw=True,
                 need_db=True, need_dcouple=True):
        return backend.linear_backward(
            self.dy, self.x, self.w_frozen, self.w_new, self.w_couple, self.groups,
            self.k_ends, need_dx_new, need_dx_old, need_dw, need_db, need_dcouple)


def assert_close(out, ref, dtype, what):
    assert out.dtype == dtype, what
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out = out.double().cpu()
    assert not out.isnan().any(), f"{what}: NaN (read the zero block or left unwritten)"
    tol = TOL[dtype] * max(1.0, ref.abs().max().item() if ref.numel() else 1.0)
    err = (out - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------
# One group has nothing frozen, so nothing to couple.
LAYOUT_MODES = [(lay, mode) for lay in LAYOUTS for mode in ("isolated", "coupled")
                if (lay, mode) != ("1g", "coupled")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout,mode", LAYOUT_MODES)
def test_forward(layout, mode, dtype):
    bias = (layout, mode) != ("2g", "isolated")  # one layout runs without any bias
    c = Case(*LAYOUTS[layout], mode=mode, dtype=dtype, bias=bias)
    assert_close(K.linear_forward(c.x, *c.blocks()), c.ref_forward(), dtype, "y")


@pytest.mark.parametrize("n", [0, 1, 70])
def test_forward_rows(n):
    # 70 rows: three row tiles, the last GROUP_M band holding one.
    c = Case(*LAYOUTS["3g"], mode="coupled", n=n)
    assert_close(triton_backend.linear_forward(c.x, *c.blocks()), c.ref_forward(),
                 torch.float32, f"y, n={n}")


@pytest.mark.parametrize("activation,dtype", [("relu", torch.float32), ("gelu", torch.float32),
                                              ("gelu_tanh", torch.float32),
                                              ("silu", torch.float32), ("gelu", torch.float16)])
def test_forward_activation(activation, dtype):
    c = Case(*LAYOUTS["3g"], mode="coupled", dtype=dtype)
    assert_close(K.linear_forward(c.x, *c.blocks(), activation=activation),
                 c.ref_forward(activation), dtype, activation)


@pytest.mark.parametrize("columns", ["new", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_forward_stores_pre_activation_of_last_columns(columns, dtype):
    # The epilogue writes y = silu(z) and, for the last P columns, z itself (what the
    # activation's backward reads); columns before them are never written to pre.
    c = Case(*LAYOUTS["3g"], mode="isolated", dtype=dtype)
    p = c.o - c.o_f if columns == "new" else c.o
    pre = torch.full((c.x.shape[0], p), float("nan"), dtype=dtype, device=DEVICE)
    y = K.linear_forward(c.x, *c.blocks(), activation="silu", pre=pre)
    assert_close(y, c.ref_forward("silu"), dtype, "y")
    assert_close(pre, c.ref_pre()[:, c.o - p:], dtype, "pre")


@pytest.mark.parametrize("kernel", ["tma", "pointer"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
def test_forward_activation_keeps_nan_and_inf(tma_launches, monkeypatch, kernel, activation):
    # A diverged new unit must show as what torch's activation makes of it: NaN stays NaN
    # (relu's maximum once returned 0 and hid it); relu(+inf) = inf, relu(-inf) = 0.  (At
    # +-inf torch's smooth activations give NaN in places, e.g. its exact gelu(+inf): not
    # asked of the kernels.)
    if kernel == "pointer":
        monkeypatch.setattr(T, "MODE", "0")
    c = Case(*TMA_LAYOUTS["2g"], mode="isolated", n=5, dtype=torch.float16)
    c.x[1, -1] = float("nan")
    if activation == "relu":
        c.w_new[0] = 0.0
        c.w_new[0, -1], c.w_new[1, -1] = float("inf"), float("-inf")
        c.x[2, -1] = 1.0
    y = K.linear_forward(c.x, *c.blocks(), activation=activation)
    assert tma_launches == ([("forward", True)] if kernel == "tma" else [])
    ref = triton_backend.torch_ref.linear_forward(c.x, *c.blocks(), activation=activation)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    assert y[1, c.o_f:].isnan().all() and not y[:, :c.o_f].isnan().any()
    fin = ref.isfinite()
    assert torch.equal(y[~fin & ~ref.isnan()], ref[~fin & ~ref.isnan()])  # the same infinities
    assert_close(y[fin], ref[fin].double().cpu(), torch.float16, activation)


def test_forward_rejects_bad_pre():
    c = Case(*LAYOUTS["1g"], n=3)
    with pytest.raises(ValueError, match="pre must be"):
        K.linear_forward(c.x, *c.blocks(), activation="gelu",
                         pre=torch.empty(2, c.o, device=DEVICE))


def test_forward_mixed_bias_and_strided_input():
    # Only the new group has a bias; x is a non-contiguous view.
    c = Case(*LAYOUTS["2g"], mode="isolated")
    c.b_frozen = None
    c.b_dense[:c.o_f] = 0
    wide = torch.randn(c.x.shape[0], 2 * c.i, device=DEVICE)
    wide[:, ::2] = c.x
    c.x = wide[:, ::2]
    assert not c.x.is_contiguous()
    assert_close(K.linear_forward(c.x, *c.blocks()), c.ref_forward(), torch.float32, "y")


def test_forward_rejects_bad_activation():
    c = Case(*LAYOUTS["1g"], n=1)
    with pytest.raises(ValueError):
        K.linear_forward(c.x, *c.blocks(), activation="tanh")


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,need_dx_old", [(torch.float32, False), (torch.float32, True),
                                               (torch.float16, True)],
                         ids=["fp32-dx_new", "fp32-dx_all", "fp16-dx_all"])
@pytest.mark.parametrize("layout,mode", LAYOUT_MODES)
def test_backward(layout, mode, dtype, need_dx_old):
    c = Case(*LAYOUTS[layout], mode=mode, dtype=dtype)
    out = c.backward(triton_backend, need_dx_old=need_dx_old)
    for name, o, r in zip(("dx", "dw_new", "db_new", "dcouple"), out, c.ref_backward(need_dx_old)):
        if r is None:
            assert o is None, name
        else:
            assert_close(o, r, dtype, name)


@pytest.mark.parametrize("n", [0, 1])
def test_backward_few_rows(n):
    c = Case(*LAYOUTS["3g"], mode="coupled", n=n)
    for name, o, r in zip(("dx", "dw_new", "db_new", "dcouple"), c.backward(triton_backend),
                          c.ref_backward(True)):
        assert_close(o, r, torch.float32, f"{name}, n={n}")


def test_grad_weight_launcher():
    # dW = a^T b with the fused column sum, on strided views (the slices of dy and x).
    a = torch.randn(37, 50, device=DEVICE)[:, 7:20]
    b = torch.randn(37, 45, device=DEVICE)[:, 3:44]
    dw, db = K.grad_weight(a, b, with_colsum=True)
    assert_close(dw, a.double().cpu().t() @ b.double().cpu(), torch.float32, "dw")
    assert_close(db, a.double().cpu().sum(0), torch.float32, "db")
    dw, db = K.grad_weight(a, b[:, :0], with_colsum=True)  # column sum only
    assert dw.shape == (13, 0)
    assert_close(db, a.double().cpu().sum(0), torch.float32, "db only")


def test_grad_weight_split_k():
    # The row reduction split in 3 (256, 256, 88 rows): fp32 partials, summed.
    a = torch.randn(600, 13, device=DEVICE, dtype=torch.float16)
    b = torch.randn(600, 41, device=DEVICE, dtype=torch.float16)
    dw, db = K.grad_weight(a, b, with_colsum=True, split_k=3)
    assert_close(dw, a.double().cpu().t() @ b.double().cpu(), torch.float16, "dw")
    assert_close(db, a.double().cpu().sum(0), torch.float16, "db")


@pytest.mark.parametrize("mode", ["isolated", "coupled"])
def test_backward_flags_match_torch_ref(mode):
    """Every combination of the five flags: same None pattern, shapes and values as torch."""
    c = Case(*LAYOUTS["3g"], mode=mode, n=5)
    ref_blocks = (c.w_frozen.nan_to_num(0.0), c.w_new, c.w_couple, c.groups, c.k_ends)
    for flags in itertools.product([False, True], repeat=5):
        out = c.backward(triton_backend, *flags)
        ref = torch_ref.linear_backward(c.dy, c.x, *ref_blocks, *flags)
        for name, o, r in zip(("dx", "dw_new", "db_new", "dcouple"), out, ref):
            what = f"{name} with flags {flags}"
            assert (o is None) == (r is None), what
            if r is not None:
                assert_close(o, r.double().cpu(), torch.float32, what)


def test_forward_matches_torch_ref_structure():
    c = Case(*LAYOUTS["3g-zero"], mode="coupled")
    y = triton_backend.linear_forward(c.x, *c.blocks())
    w_frozen, *rest = c.blocks()
    ref = torch_ref.linear_forward(c.x, w_frozen.nan_to_num(0.0), *rest)
    assert y.shape == ref.shape and y.dtype == ref.dtype and y.device == ref.device
    assert_close(y, ref.double().cpu(), torch.float32, "y")


def test_availability():
    ok, reason = triton_backend.availability(DEVICE)
    assert ok and isinstance(reason, str)
    if K.INTERPRET:
        return
    ok, reason = triton_backend.availability("cpu")
    assert not ok and "TRITON_INTERPRET" in reason


# ---------------------------------------------------------------------------------------
# GPU: bfloat16, tuned tiles, large shapes
# ---------------------------------------------------------------------------------------
def _rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _check_against_torch_ref(c, need_dx_old, tol):
    """Triton in c's dtype vs torch_ref on the same values in float32."""
    blocks32 = [t.float() if isinstance(t, torch.Tensor) else t for t in c.blocks()]
    blocks32[0] = blocks32[0].nan_to_num(0.0)
    y = triton_backend.linear_forward(c.x, *c.blocks())
    y_ref = torch_ref.linear_forward(c.x.float(), *blocks32)
    assert y.dtype == c.x.dtype and _rel(y, y_ref) < tol, ("y", _rel(y, y_ref))
    w_frozen, _, w_new, _, w_couple, groups, k_ends = blocks32
    out = c.backward(triton_backend, need_dx_old=need_dx_old)
    ref = torch_ref.linear_backward(c.dy.float(), c.x.float(), w_frozen, w_new, w_couple, groups,
                                    k_ends, True, need_dx_old, True, True, True)
    for name, o, r in zip(("dx", "dw_new", "db_new", "dcouple"), out, ref):
        assert (o is None) == (r is None), name
        if r is not None:
            assert not o.isnan().any(), name
            assert _rel(o, r) < tol, (name, _rel(o, r))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["isolated", "coupled"])
def test_gpu_bf16_odd_shapes(mode):
    c = Case((300, 77, 131), (257, 1, 190), mode=mode, n=1037, dtype=torch.bfloat16,
             device="cuda")
    _check_against_torch_ref(c, need_dx_old=True, tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_gpu_tuned_tiles_vs_float64(dtype):
    # The GPU-sized (large) tiles on odd shapes, checked elementwise like the CPU tests;
    # float32 in full ieee precision (tf32 off, the torch default).
    assert not torch.backends.cuda.matmul.allow_tf32
    c = Case((300, 77, 131), (257, 1, 190), mode="isolated", n=1037, dtype=dtype,
             device="cuda")
    tol = {torch.float32: 1e-4, torch.float16: 3e-3}[dtype]
    y = K.linear_forward(c.x, *c.blocks(), activation="gelu_tanh")
    ref = c.ref_forward("gelu_tanh")
    assert (y.double().cpu() - ref).abs().max() <= tol * ref.abs().max()
    for name, o, r in zip(("dx", "dw_new", "db_new", "dcouple"), c.backward(triton_backend),
                          c.ref_backward(True)):
        if r is None:
            assert o is None
        else:
            assert (o.double().cpu() - r).abs().max() <= tol * r.abs().max(), name


@pytest.mark.gpu
@pytest.mark.parametrize("need_dx_old", [False, True])
def test_gpu_bf16_large(need_dx_old):
    c = Case((4096, 1024), (4096, 1024), n=16384, dtype=torch.bfloat16, device="cuda")
    _check_against_torch_ref(c, need_dx_old=need_dx_old, tol=1e-2)


@pytest.mark.gpu
def test_gpu_bf16_split_k():
    # Few new units over many rows: dW_new has too few tiles, the reduction is split.
    c = Case((1024, 256), (1024, 256), n=8192, dtype=torch.bfloat16, device="cuda")
    assert K._auto_split(256, 1280, 8192, torch.device("cuda")) > 1
    _check_against_torch_ref(c, need_dx_old=False, tol=1e-2)


# ---------------------------------------------------------------------------------------
# Autotuning: which configs a GPU run would compile (checked without a GPU)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("autotune", [True, False])
def test_config_pruning_fits_shape_and_shared_memory(monkeypatch, autotune):
    monkeypatch.setattr(K, "INTERPRET", False)
    monkeypatch.setattr(K, "AUTOTUNE", autotune)
    configs = K._configs()
    prune = K._pruner("M", "O")
    tiny = prune(configs, {"x": torch.empty(1, dtype=torch.float16), "M": 37, "O": 19})
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in tiny] == [(64, 64)]
    big = {"x": torch.empty(1, dtype=torch.bfloat16), "M": 16384, "O": 5120}

    def fits(c):  # the pipelined bf16 operand tiles fit in shared memory
        k = c.kwargs
        return c.num_stages * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * 2 <= 200 * 1024

    fitting = [c for c in configs if fits(c)
               and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 128 * 128]  # a large problem
    assert 1 < len(fitting) < len(configs)
    # tuning compiles every fitting config; without it, only the first (largest) one
    assert prune(configs, big) == (fitting if autotune else fitting[:1])


def test_config_pruning_follows_the_devices_shared_memory(monkeypatch):
    # A 99 KB GPU keeps only configs whose pipelined tiles fit in 88% of it.
    assert K.smem_budget(torch.device("cpu")) == 200 * 1024  # the interpreter's (no limit)
    monkeypatch.setattr(K, "INTERPRET", False)
    monkeypatch.setattr(K, "AUTOTUNE", True)
    monkeypatch.setattr(K, "smem_budget", lambda device: int(99 * 1024 * 0.88))
    kept = K._pruner("M", "O")(K._configs(), {"x": torch.empty(1, dtype=torch.bfloat16),
                                             "M": 16384, "O": 5120})
    sizes = [c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * 2
             for c in kept]
    assert kept and max(sizes) <= 99 * 1024 * 0.88


# ---------------------------------------------------------------------------------------
# The forward with tensor-descriptor (TMA) loads
# ---------------------------------------------------------------------------------------
from expanse_fast.kernels import expanded_linear_tma as T  # noqa: E402

# Widths whose rows (and column offsets into dy and x) are 16-byte aligned in fp32 and
# fp16, as descriptors need, with k_ends and output widths off the interpreter's 32-wide
# tiles: partial tiles, and the NaN-poisoned zero block shows any read past k_end.
# "4g": two frozen groups end inside the first 32 inputs (k_ends 8 and 16), so dx_old's
# masked rows of one tile hold groups cut at different columns.
TMA_LAYOUTS = {"2g": ((40, 24), (40, 16)), "3g": ((24, 8, 16), (16, 8, 24)),
               "4g": ((8, 8, 16, 8), (8, 8, 8, 16))}


@pytest.fixture
def tma_launches(monkeypatch):
    """Force the descriptor kernel (the interpreter too) and record each launch's outcome."""
    if T.TensorDescriptor is None:
        pytest.skip(f"this Triton has no tensor descriptors: {T._IMPORT_ERROR}")
    monkeypatch.setattr(T, "MODE", "1")
    monkeypatch.setattr(T, "disabled_reason", None)
    launches = []

    def spy(name, launch):
        def run(*args, **kwargs):
            launches.append((name, launch(*args, **kwargs)))
            return launches[-1][1]
        return run

    for name in ("forward", "grad_weight", "grad_input"):
        monkeypatch.setattr(T, name, spy(name, getattr(T, name)))
    return launches


@pytest.mark.parametrize("name", list(TMA_LAYOUTS))
@pytest.mark.parametrize("mode", ["isolated", "coupled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_tma_forward_matches_float64(tma_launches, name, mode, dtype):
    c = Case(*TMA_LAYOUTS[name], mode=mode, n=37, dtype=dtype)
    assert T.usable(c.x, c.w_frozen, c.w_new, c.w_couple)
    p = c.o - c.o_f
    pre = torch.empty((c.x.shape[0], p), dtype=dtype, device=DEVICE)
    y = K.linear_forward(c.x, *c.blocks(), activation="silu", pre=pre)
    assert tma_launches == [("forward", True)] and T.disabled_reason is None
    assert_close(y, c.ref_forward("silu"), dtype, "y")
    assert_close(pre, c.ref_pre()[:, c.o_f:], dtype, "pre")
    assert_close(K.linear_forward(c.x, *c.blocks()), c.ref_forward(), dtype, "y, no activation")


@pytest.mark.parametrize("name", list(TMA_LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
# (the other groups do read the inf columns: inf - inf in their sums is expected there)
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_tma_forward_first_group_never_reads_later_inputs(tma_launches, name, dtype):
    """The partial tile at a group's k_end is loaded whole: what lies past k_end (here inf in
    every later input column) must still not reach that group's outputs."""
    c = Case(*TMA_LAYOUTS[name], mode="isolated", n=37, dtype=dtype)
    k0, rows0 = c.k_ends[0], c.groups[0]
    x = c.x.clone()
    x[:, k0:] = float("inf")
    y = K.linear_forward(x, *c.blocks())
    assert tma_launches == [("forward", True)]
    clean = c.x.double().cpu()
    clean[:, k0:] = 0
    ref = clean @ c.w_dense[:rows0].t() + c.b_dense[:rows0]
    assert_close(y[:, :rows0], ref, dtype, "first group's y")


def test_tma_not_used_where_rows_are_unaligned(tma_launches):
    c = Case(*LAYOUTS["3g"], mode="isolated")  # I_f = 27: w_frozen rows of 108 bytes
    assert not T.usable(c.x, c.w_frozen, c.w_new, c.w_couple)
    assert_close(K.linear_forward(c.x, *c.blocks()), c.ref_forward(), torch.float32, "y")
    assert tma_launches == []


@pytest.mark.parametrize("need_dx_old", [False, True])
def test_tma_dx_not_used_where_the_new_inputs_start_off_16_bytes(tma_launches, need_dx_old):
    """I_f = 4 (fp16: 8 bytes) beside 16-byte rows of w_new and dy: dx's new tiles would
    start at column 4 of w_new, which a descriptor cannot address; the pointer kernel runs,
    nothing is switched off."""
    c = Case((4, 12), (8, 8), mode="isolated", n=37, dtype=torch.float16)
    assert not T.grad_input_usable(c.dy, c.w_frozen, c.w_new, None, c.groups, c.k_ends,
                                   need_dx_old, K.band_ends(c.groups, c.k_ends, c.i_f,
                                                            need_dx_old))
    got = c.backward(triton_backend, need_dx_old=need_dx_old)
    for g, ref, what in zip(got, c.ref_backward(need_dx_old), ("dx", "dw", "db", "dc")):
        if ref is not None:
            assert_close(g, ref, torch.float16, what)
    assert ("grad_input", True) not in tma_launches and ("grad_input", False) not in \
        tma_launches
    assert T.disabled_reason is None


def test_tma_failure_switches_to_the_pointer_kernel(tma_launches, monkeypatch):
    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("no descriptors on this Triton")
            return launch

    monkeypatch.setattr(T, "_fwd_tma_kernel", Broken())
    c = Case(*TMA_LAYOUTS["2g"], mode="isolated")
    with pytest.warns(RuntimeWarning, match="TMA kernels are off"):
        y = K.linear_forward(c.x, *c.blocks())
    assert_close(y, c.ref_forward(), torch.float32, "y")
    assert tma_launches == [("forward", False)] and "no descriptors" in T.disabled_reason
    assert not T.usable(c.x, c.w_frozen, c.w_new, c.w_couple)  # off for the process
    # the backward kernels are off too, and still right
    for got, ref in zip(c.backward(triton_backend), c.ref_backward(True)):
        if ref is not None:
            assert_close(got, ref, torch.float32, "grad")
    assert len(tma_launches) == 1


@pytest.mark.parametrize("name", list(TMA_LAYOUTS))
@pytest.mark.parametrize("mode", ["isolated", "coupled"])
def test_pointer_kernels_with_vector_bounds(monkeypatch, name, mode):
    """Every width, k_end and the row count multiples of 8 (TMA off): the pointer kernels'
    K-tail, column and frozen-group masks then compare whole vectors (K_VEC, COL_VEC > 1)."""
    monkeypatch.setattr(T, "MODE", "0")
    c = Case(*TMA_LAYOUTS[name], mode=mode, n=48, dtype=torch.float16)
    assert_close(K.linear_forward(c.x, *c.blocks(), activation="relu"), c.ref_forward("relu"),
                 torch.float16, "y")
    names = ("dx", "dW", "db", "dcouple")
    for what, got, ref in zip(names, c.backward(triton_backend), c.ref_backward(True)):
        if ref is not None:
            assert_close(got, ref, torch.float16, what)


@pytest.mark.parametrize("name", list(TMA_LAYOUTS))
@pytest.mark.parametrize("mode", ["isolated", "coupled"])
@pytest.mark.parametrize("need_dx_old", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_tma_backward_matches_float64(tma_launches, name, mode, need_dx_old, dtype):
    # dW, db, dcouple and dx through descriptor loads (dx's frozen groups too, cut at k_end).
    c = Case(*TMA_LAYOUTS[name], mode=mode, n=37, dtype=dtype)
    got = c.backward(triton_backend, need_dx_old=need_dx_old)
    want = c.ref_backward(need_dx_old)
    for what, g, r in zip(("dx", "dw_new", "db_new", "dcouple"), got, want):
        if r is None:
            assert g is None, what
        else:
            assert_close(g, r, dtype, what)
    expected = [("grad_weight", True)] * (2 if mode == "coupled" else 1) + [("grad_input", True)]
    assert sorted(tma_launches) == sorted(expected)


@pytest.mark.parametrize("layout,tma", [
    # a group of no rows cuts no band: its k_end (3: 6 bytes) is never a tile's start
    (((3, 5, 8), (0, 8, 8)), True),
    # dy's frozen columns are read from each group's first row on: row 3 is off 16 bytes
    (((8, 8, 8), (3, 5, 8)), False)], ids=["empty-group-odd-k_end", "odd-group-rows"])
def test_tma_dx_old_starts_every_load_on_16_bytes(tma_launches, layout, tma):
    # Descriptor loads must start on 16 bytes (the interpreter asserts it, and the failed
    # launch would switch every descriptor kernel off): either the launch needs no such
    # start, or the pointer kernel runs from the first call.
    c = Case(*layout, mode="isolated", n=37, dtype=torch.float16)
    got = c.backward(triton_backend, need_dx_old=True)
    for g, ref, what in zip(got, c.ref_backward(True), ("dx", "dw", "db", "dc")):
        if ref is not None:
            assert_close(g, ref, torch.float16, what)
    assert (("grad_input", True) in tma_launches) == tma
    assert ("grad_input", False) not in tma_launches and T.disabled_reason is None


def nan_isolated_dx(c):
    """Float64 dx of ``c`` summed group by group over the columns each reads: a NaN or Inf
    in a group's dy reaches those columns only (what dy @ w_dense, whose zeros would
    multiply it, cannot show)."""
    dy, dx = c.dy.double().cpu(), torch.zeros(c.x.shape[0], c.i, dtype=torch.float64)
    r = 0
    for rows, k in zip(c.groups, c.k_ends):
        dx[:, :k] += dy[:, r:r + rows] @ c.w_dense[r:r + rows, :k]
        r += rows
    dx += dy[:, c.o_f:] @ c.w_dense[c.o_f:]
    return dx


@pytest.mark.parametrize("kernel", ["tma", "pointer"])
@pytest.mark.parametrize("name", ["3g", "4g"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dx_keeps_a_groups_nan_out_of_columns_it_does_not_read(tma_launches, monkeypatch,
                                                                 kernel, name, dtype):
    # A NaN and an Inf in the first group's dy (a diverged old task) belong in dx_old's
    # columns that group reads, [0, k_end_0), and nowhere else: the later groups' columns
    # and the new inputs' stay finite and right.  The old columns are tiled in bands cut at
    # each k_end; a tile across k_end_0 once multiplied that dy by the zeroed weights.
    if kernel == "pointer":
        monkeypatch.setattr(T, "MODE", "0")
    c = Case(*TMA_LAYOUTS[name], mode="isolated", n=37, dtype=dtype)
    c.dy[3, 0] = float("nan")
    c.dy[30, c.groups[0] - 1] = float("inf")
    dx = K.grad_input(c.dy, c.w_frozen, c.w_new, None, c.groups, c.k_ends, True)
    assert tma_launches == ([("grad_input", True)] if kernel == "tma" else [])
    ref, k0 = nan_isolated_dx(c), c.k_ends[0]
    assert not ref[:, k0:].isnan().any() and ref[3, :k0].isnan().all()
    fin = dx.isfinite().cpu()
    assert torch.equal(fin, ref.isfinite()), \
        f"non-finite dx at {(fin != ref.isfinite()).nonzero()[:4].tolist()}"
    assert_close(dx.cpu()[fin], ref[fin], dtype, "dx where finite")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["isolated", "coupled"])
def test_gpu_tma_kernels_bf16(mode):
    # On a Hopper GPU the default (auto) mode takes the descriptor kernels for bf16.
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("tensor-descriptor loads need compute capability 9.0")
    c = Case((320, 64, 128), (256, 8, 96), mode=mode, n=1031, dtype=torch.bfloat16,
             device="cuda")
    assert T.usable(c.x, c.w_frozen, c.w_new, c.w_couple), T.disabled_reason
    y = K.linear_forward(c.x, *c.blocks(), activation="gelu")
    assert T.disabled_reason is None
    ref = c.ref_forward("gelu")
    assert (y.double().cpu() - ref).abs().max() <= 1.6e-2 * ref.abs().max()
    for what, g, r in zip(("dx", "dw_new", "db_new", "dcouple"), c.backward(triton_backend),
                          c.ref_backward(True)):
        if r is not None:
            assert (g.double().cpu() - r).abs().max() <= 1.6e-2 * r.abs().max(), what
    assert T.disabled_reason is None
