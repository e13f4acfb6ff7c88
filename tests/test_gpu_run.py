"""Parts of the GPU run (benchmarks/gpu/bench_gpu.py and its modules) that need no GPU: its
pytest plugin (gpu_tests_plugin.py, ``-p gpu_tests_plugin``: past the stage's deadline tests
skip, a test marked ``gpu_seconds(s)`` skips already when fewer than s seconds are left, the
tests only a GPU can check run first) and the report's table of the issues' targets."""
import glob
import importlib
import os
import sys
import time
import types

import pytest

GPU_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "gpu")
PATH = os.path.join(GPU_DIR, "bench_gpu.py")


def _gpu_module(name):
    """benchmarks/gpu/<name>.py, imported by name as the GPU run imports it (bench_gpu.py puts
    its directory on sys.path; run.sh puts it on PYTHONPATH for the plugin), so that its
    sibling modules, imported by name too, are the same module objects."""
    sys.path.insert(0, GPU_DIR)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(GPU_DIR)


@pytest.fixture(scope="module")
def plugin():
    return _gpu_module("gpu_tests_plugin")


@pytest.fixture(scope="module")
def gpu():
    """The run's other modules, by their names less the prefix: gpu.report is gpu_report.py."""
    return types.SimpleNamespace(**{name.split("_", 1)[1]: _gpu_module(name) for name in (
        "gpu_common", "gpu_profile", "gpu_ctx", "gpu_orchestrate", "gpu_report", "sec_models")})


def _item(seconds=None, nodeid="tests/test_x.py::test_y"):
    mark = None if seconds is None else types.SimpleNamespace(args=(seconds,))
    return types.SimpleNamespace(nodeid=nodeid, get_closest_marker=lambda name: (
        mark if name == "gpu_seconds" else None))


def _runs(plugin, item) -> bool:
    try:
        plugin.pytest_runtest_setup(item)
    except pytest.skip.Exception:
        return False
    return True


def test_deadline_and_expected_seconds(plugin, monkeypatch):
    monkeypatch.delenv("EXPANSE_TESTS_DEADLINE", raising=False)
    assert _runs(plugin, _item()) and _runs(plugin, _item(1e9))  # no deadline: all run
    monkeypatch.setenv("EXPANSE_TESTS_DEADLINE", str(time.time() + 30))
    assert _runs(plugin, _item()) and _runs(plugin, _item(20))
    assert not _runs(plugin, _item(45))  # would end past the deadline
    monkeypatch.setenv("EXPANSE_TESTS_DEADLINE", str(time.time() - 1))
    assert not _runs(plugin, _item())


def test_gpu_only_checks_run_first(plugin):
    ids = ["tests/test_bench_cli.py::test_a", "tests/kernels/test_expanded_conv_kernels.py::t",
           "tests/backends/test_cuda_backend.py::t", "tests/kernels/test_expanded_linear_x.py::t",
           "tests/backends/test_cuda_backend.py::test_hopper_multiplies_with_wgmma"]
    items = [_item(nodeid=i) for i in ids]
    plugin.pytest_collection_modifyitems(None, None, items)
    assert [i.nodeid for i in items] == [ids[4], ids[2], ids[3], ids[1], ids[0]]


def test_bfloat16_cases_first_within_a_file_rank(plugin):
    """The interpreter on CPU checks float32 and float16; bfloat16 only a GPU can check, so
    under the stage's deadline those cases go first (file ranks still come before)."""
    import torch

    def case(nodeid, **params):
        item = _item(nodeid=nodeid)
        item.callspec = types.SimpleNamespace(params=params)
        return item

    sweep = "tests/backends/test_conv_bn_fold.py::test_folded_conv_matches_float64"
    items = [case(sweep + "[a]", backend="triton", dtype=torch.float32),
             case(sweep + "[b]", backend="torch", dtype=torch.float16),
             case(sweep + "[c]", backend="triton", dtype=torch.bfloat16),
             case("tests/nn/test_x.py::test_no_dtype[1]", n=1),
             _item(nodeid="tests/test_plain.py::test_unparametrized"),
             case("tests/kernels/test_expanded_conv_kernels.py::test_k", dtype=torch.float32)]
    plugin.pytest_collection_modifyitems(None, None, items)
    assert [i.nodeid.rsplit("::", 1)[-1] for i in items] == [
        "test_k", "test_folded_conv_matches_float64[c]", "test_no_dtype[1]",
        "test_unparametrized", "test_folded_conv_matches_float64[b]",
        "test_folded_conv_matches_float64[a]"]


def test_the_prioritized_tests_exist(plugin):
    """Each priority is the start of a test file's path, or names one test in that file."""
    root = os.path.join(os.path.dirname(__file__), os.pardir)
    for prefix in plugin.TEST_PRIORITY:
        path, _, name = prefix.partition("::")
        files = glob.glob(os.path.join(root, path + "*"))
        assert files, prefix
        if name:
            with open(files[0]) as fh:
                assert f"def {name}(" in fh.read(), prefix


def _row(variant, impl, kind, ms, **extra):
    return dict(variant=variant, impl=impl, kind=kind, ms=ms, **extra)


def test_targets_take_the_best_backend_per_variant(gpu):
    linear = [_row("fwd+bwd", "expanse/torch", "expanse", 2.0, pct_cublas=70.0,
                   speedup={"masked": 2.0, "cat": 1.1}),
              _row("fwd+bwd", "expanse/triton", "expanse", 1.5, pct_cublas=90.0,
                   speedup={"masked": 2.5, "cat": 1.2}),
              _row("fwd+bwd", "expanse/cuda", "expanse", 1.6, pct_cublas=80.0,
                   speedup={"masked": 2.45, "cat": 1.35}),
              _row("fwd+bwd", "expanse/cuda-sw128", "expanse", 1.4, pct_cublas=85.0,
                   speedup={"masked": 2.4, "cat": 1.3}),
              _row("fwd+bwd", "expanse/cuda-k128x2", "expanse", 1.7, pct_cublas=75.0,
                   speedup={"masked": 2.3, "cat": 1.2}),
              _row("fwd+bwd", "ideal@cuBLAS", "ideal", 1.2, speedup={"masked": 3.0, "cat": 1.4}),
              _row("fwd", "expanse/triton", "expanse", 0.5, pct_cublas=99.0)]
    conv = [_row("nchw fwd+bwd", "expanse/torch", "expanse", None, error="boom"),
            _row("nchw fwd+bwd", "peer/masked", "peer", 3.0)]
    got = {(t["section"], t["variant"], t["what"]): t
           for t in gpu.report._targets({"linear": {"rows": linear}, "conv": {"rows": conv}})}
    pct = got[("linear", "fwd+bwd", "% of the cuBLAS rate (useful FLOPs)")]
    assert (pct["best"], pct["impl"], pct["met"], pct["limit"]) == (
        90.0, "expanse/triton", True, None)
    cat = got[("linear", "fwd+bwd", "x separate modules + torch.cat")]
    assert (cat["best"], cat["impl"], cat["met"], cat["limit"]) == (1.35, "expanse/cuda", True, 1.4)
    cuda = got[("linear", "fwd+bwd", "x triton (cuda backend)")]
    assert cuda["best"] == pytest.approx(1.5 / 1.6) and cuda["met"] is False
    swizzled = got[("linear", "fwd+bwd", "x triton (cuda backend, swizzled tiles)")]
    assert swizzled["best"] == pytest.approx(1.5 / 1.4) and swizzled["met"] is True
    deep = got[("linear", "fwd+bwd", "x triton (cuda backend, two stages of 128-wide k-tiles)")]
    assert deep["best"] == pytest.approx(1.5 / 1.7) and deep["met"] is False
    unmeasured = got[("conv", "nchw fwd+bwd", "x masked full-width conv (cuDNN)")]
    assert unmeasured["best"] is None and unmeasured["met"] is None
    assert not any(t["variant"] == "fwd" for t in got.values())
    table = "\n".join(gpu.report._target_lines(list(got.values())))
    assert "| NO |" in table and "no measurement" in table and "| yes |" in table


def test_the_ceilings_get_their_floor_and_the_rest_their_shares(gpu):
    # the f0ce6a0 run gave the ceilings 11 of 92 s: too few to measure the cuBLAS rate
    low, high = gpu.orchestrate.CEILINGS_SECONDS
    sections = list(gpu.common.SECTIONS)
    assert gpu.orchestrate.section_budget("ceilings", 92.0, sections) == low
    assert gpu.orchestrate.section_budget("ceilings", 400.0, sections) == high
    assert gpu.orchestrate.section_budget("ceilings", 10.0, sections) == 10.0  # never past the end
    weights = [gpu.common.SECTION_WEIGHT[s] for s in sections[1:]]
    linear = gpu.orchestrate.section_budget("linear", 74.0, sections[1:])
    assert abs(linear - 74.0 * weights[0] / sum(weights)) < 1e-9
    # the last takes what is left
    assert gpu.orchestrate.section_budget("cnn", 30.0, ["cnn"]) == 30.0


def test_a_row_that_failed_its_check_meets_no_target(gpu):
    """A fast kernel with wrong results (its check against the torch backend says MISMATCH
    or ERROR) is timed and shown, but stands for no target."""
    linear = [_row("fwd+bwd", "expanse/torch", "expanse", 2.0, pct_cublas=70.0,
                   speedup={"masked": 1.5, "cat": 0.75}),
              _row("fwd+bwd", "expanse/triton", "expanse", 1.0, pct_cublas=95.0,
                   speedup={"masked": 3.0, "cat": 1.5}, check="MISMATCH dx 4.1e-01"),
              _row("fwd+bwd", "expanse/cuda", "expanse", 0.9, pct_cublas=99.0,
                   speedup={"masked": 3.3, "cat": 1.6}, check="ERROR RuntimeError: boom")]
    got = {t["what"]: t for t in gpu.report._targets({"linear": {"rows": linear}})}
    masked = got["x masked full-width layer"]
    assert (masked["best"], masked["impl"], masked["met"]) == (1.5, "expanse/torch", False)
    assert got["% of the cuBLAS rate (useful FLOPs)"]["best"] == 70.0
    assert "x triton (cuda backend)" not in got
    ok = dict(linear[1], check="ok 4.9e-03")
    got = {t["what"]: t for t in gpu.report._targets({"linear": {"rows": [linear[0], ok]}})}
    assert got["x masked full-width layer"]["impl"] == "expanse/triton"


def _both_ops(**suffixes):
    return {f"EXPANSE_FAST_AUTO_{op}{s}": v for op in ("LINEAR", "CONV2D")
            for s, v in suffixes.items()}


@pytest.mark.parametrize("name, env, global_choice", [
    ("auto/dx:triton", {"EXPANSE_FAST_AUTO_CONV2D_DX": "triton"}, "auto"),
    ("triton+torch", _both_ops(_FORWARD="triton", _BACKWARD="torch"), "auto"),
    ("torch", _both_ops(**{"": "torch"}), "torch"),
    ("auto", {}, "auto"),
])
def test_backend_scopes_steer_auto_and_put_the_environment_back(gpu, monkeypatch, name, env,
                                                                 global_choice):
    """The GPU run's rows per backend: "auto/dx:triton" (the conv's input gradient from the
    Triton kernel, its weight gradients from cuDNN) sets only the conv's _DX variable."""
    import expanse_fast as xf
    keys = list(_both_ops(**{s: "" for s in ("", "_FORWARD", "_BACKWARD", "_DX")}))
    for k in keys:
        monkeypatch.delenv(k, raising=False)
    with gpu.ctx.Ctx.backend(None, name):
        assert {k: os.environ[k] for k in keys if k in os.environ} == env
        assert xf.backend_choice.get_backend() == global_choice
    assert not [k for k in keys if k in os.environ]
    assert xf.backend_choice.get_backend() == "auto"


# Kernel names as the H200's profiler gave them (14609cb), cut where its JSON cut them.
KERNEL_NAMES = {
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native"
    "::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}": (
        "elementwise_kernel(direct_copy_kernel_cuda)"),
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native"
    "::FillFunctor<c10::BFloat16> >(at::TensorIteratorBase&": "elementwise_kernel(FillFunctor)",
    "void at::native::vectorized_elementwise_kernel<8, at::native::FillFunctor<c10::BFloat16>,"
    " std::array<char*, 1ul> >": "vectorized_elementwise_kernel(FillFunctor)",
    "void at::native::reduce_kernel<128, 4, at::native::ReduceOp<c10::BFloat16, at::native::"
    "func_wrapper_t<float, at::native::sum_functor<c10::BFloat16, float, float>":
        "reduce_kernel(sum_functor)",
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native"
    "::CUDAFunctor_add<c10::BFloat16> >": "elementwise_kernel(CUDAFunctor_add)",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy_alignedK_contig<at::native::"
    "(anonymous namespace)::OpaqueType<2u>, unsigned int": "CatArrayBatchedCopy_alignedK_contig",
    "void expanse_fast::(anonymous namespace)::conv_fwd_kernel<__nv_bfloat16, expanse_fast::"
    "(anonymous namespace)::WgmmaMath>(expanse_fast::ConvParams)": "conv_fwd_kernel(WgmmaMath)",
}
KERNEL_NAMES.update((name, name) for name in (  # no signature: kept whole
    "nvjet_sm90_tst_320x128_64x3_1x2_h_badd_coopB_TNT", "_conv_wgrad_tma_kernel",
    "Memset (Device)"))


@pytest.mark.parametrize("name", list(KERNEL_NAMES))
def test_kernel_labels_keep_what_tells_kernels_apart(gpu, name):
    assert gpu.profile.kernel_label(name) == KERNEL_NAMES[name]
    assert gpu.profile.kernel_label(KERNEL_NAMES[name]) == KERNEL_NAMES[name]  # (older results)


def _event(key, device, us, count=1, shapes=None, cpu_us=0.0, annotation=False):
    kind = types.SimpleNamespace(name="CUDA" if device else "CPU")
    return types.SimpleNamespace(key=key, device_type=kind, self_device_time_total=us,
                                 count=count, input_shapes=shapes, self_cpu_time_total=cpu_us,
                                 is_user_annotation=annotation)


def test_profile_rows_put_device_time_on_the_ops_that_launched_it(gpu):
    fill = ("void at::native::vectorized_elementwise_kernel<8, at::native::FillFunctor<float>,"
            " std::array<char*, 1ul> >")
    recorded = [_event("ProfilerStep#1", False, 500.0), _event("aten::zero_", False, 39.0),
                _event(fill, True, 39.0), _event("_conv_fwd_tma_kernel", True, 566.4),
                _event("cudaLaunchKernel", False, 0.0, count=3),
                # a record_function range's span on the device timeline: no kernel
                _event("_Conv2dFunctionBackward", True, 700.0, annotation=True)]
    by_shape = [_event("aten::zero_", False, 39.0, shapes=[[64, 320, 56, 56]]),
                _event("aten::copy_", False, 20.5, count=2,
                       shapes=[[64, 64, 56, 56], [64, 64, 56, 56], []]),
                _event("aten::empty", False, 0.0, shapes=[[]]),
                _event(fill, True, 39.0)]
    kernels, ops = gpu.profile._profile_rows(recorded, by_shape, top=8)
    assert kernels == [["_conv_fwd_tma_kernel", 1, 566.4],
                       ["vectorized_elementwise_kernel(FillFunctor)", 1, 39.0]]
    assert ops == [["aten::zero_", "64x320x56x56", 1, 39.0],
                   ["aten::copy_", "64x64x56x56, 64x64x56x56", 2, 20.5]]
    lines = gpu.report._breakdown_lines({"rows": [dict(variant="fwd+bwd", impl="expanse/triton",
                                                       kernels=kernels, kernel_ops=ops)]})
    assert any("zero_ [64x320x56x56] 39" in ln and "copy_ [64x64x56x56, 64x64x56x56] x2 20"
               in ln for ln in lines), lines
    # on a CPU (no per-shape events): the aten ops' own time, no op lines
    kernels, ops = gpu.profile._profile_rows([_event("aten::mm", False, 0.0, cpu_us=12.0)], None,
                                             8)
    assert kernels == [["aten::mm", 1, 12.0]] and ops is None
    # a session whose host side failed names why, beside the kernels
    lines = gpu.report._breakdown_lines({"rows": [dict(
        variant="fwd+bwd", impl="expanse/torch", kernels=[["mm", 1, 5.0]],
        kernel_ops="ops not profiled: RuntimeError: x")]})
    assert "  - by the aten op that launched them: ops not profiled: RuntimeError: x" in lines


def test_sweep_section_times_every_widening_against_the_peers(gpu, tmp_path):
    """The sweep section at its CPU sizes (--quick): every case it plans has the expanded
    layer under "auto" and the three peers timed, and the report puts the speed-ups on it."""
    import subprocess
    import sys
    out = tmp_path / "sweep.json"
    proc = subprocess.run(
        [sys.executable, PATH, "section", "sweep", "--device", "cpu", "--dtype", "float32",
         "--quick", "--out", str(out), "--deadline", str(time.time() + 120)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = gpu.common._load(str(out))
    cases = res["config"]["cases"]
    assert len(cases) == 7 and res["finished"], res.get("notes")
    assert any("3 groups" in c for c in cases)
    for case in cases:
        rows = {r["impl"]: r for r in res["rows"] if r["variant"] == case}
        assert set(rows) == {"expanse/auto", "peer/masked", "peer/cat", "peer/finetune"}, case
        assert all(r.get("ms", 0) > 0 for r in rows.values()), rows
        # where the section's time went: each row's seconds, its warm-up's among them
        assert all(r["wall_s"] >= r["warm_s"] >= 0 for r in rows.values()), rows
        assert rows["peer/masked"]["executed_flop"] > rows["expanse/auto"]["useful_flop"] > 0
    gpu.report._finish_rows({"sweep": res})
    exp = [r for r in res["rows"] if r["impl"] == "expanse/auto"]
    assert all(set(r["speedup"]) == {"masked", "cat", "finetune"} for r in exp)


def test_prewarm_runs_the_sections_expanse_calls_with_compiles_only(gpu, tmp_path):
    """``bench_gpu.py prewarm`` at CPU sizes (the Triton kernels interpreted; on the GPU they
    compile): a process per section, each expanse row's call made once with the autotuned
    launches turned into compiles of their configs, nothing timed, no peer, no cuda row."""
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, PATH, "prewarm", "--device", "cpu", "--dtype", "float32", "--quick",
         "--work", str(tmp_path), "--budget", "200", "--sections", "ceilings,linear,conv"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = gpu.common._load(str(tmp_path / "prewarm.json"))
    assert set(summary) == {"linear", "conv", "triton_cache_new"}  # (no Triton in ceilings)
    for sec in ("linear", "conv"):
        assert summary[sec]["exit"] == 0 and not summary[sec]["errors"], summary[sec]
        assert summary[sec]["configs"]["compiled"] > 0 and not summary[sec]["configs"]["failed"]
        rows = gpu.common._load(str(tmp_path / f"prewarm_{sec}.json"))["rows"]
        called = [r for r in rows if "wall_s" in r]
        assert {r["impl"] for r in called} >= {"expanse/torch", "expanse/triton"}, rows
        assert all(r["kind"] == "expanse" and "ms" not in r and "error" not in r
                   for r in called), called
        assert all(r.get("skipped") for r in rows if r["impl"] == "expanse/cuda")
        if sec == "conv":  # the NCHW layout's A/B row of "auto" (y through the transpose)
            assert {r["variant"] for r in called if r["impl"] == "expanse/auto-yT"} == {
                "nchw fwd+bwd", "nchw fwd"}, called


def test_a_resumed_stage_skips_what_passed_before(tmp_path):
    """The plugin notes each passed test in EXPANSE_TESTS_PASSED; a second run with
    EXPANSE_TESTS_SKIP_PASSED=1 deselects those and runs the rest (the failed one, the
    one the first run's deadline skipped)."""
    import subprocess
    import sys
    (tmp_path / "test_three.py").write_text(
        "import os, pytest\n"
        "def test_passes():\n    pass\n"
        "def test_fails():\n    assert False\n"
        "def test_late():\n"
        "    if os.environ.get('FIRST'):\n        pytest.skip('deadline')\n")
    passed = tmp_path / "passed.txt"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(PATH) + os.pathsep
               + os.environ.get("PYTHONPATH", ""), EXPANSE_TESTS_PASSED=str(passed))

    def run(**extra):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "gpu_tests_plugin",
                               "-p", "no:cacheprovider", str(tmp_path / "test_three.py")],
                              capture_output=True, text=True, timeout=120,
                              env=dict(env, **extra), cwd=tmp_path)
    first = run(FIRST="1")
    assert "1 failed, 1 passed, 1 skipped" in first.stdout, first.stdout[-1500:]
    assert passed.read_text().split() == ["test_three.py::test_passes"]
    again = run(EXPANSE_TESTS_SKIP_PASSED="1")
    assert "1 failed, 1 passed, 1 deselected" in again.stdout, again.stdout[-1500:]
    assert passed.read_text().split() == ["test_three.py::test_passes",
                                          "test_three.py::test_late"]
    assert "1 failed, 2 passed" in run().stdout  # without the switch: all of them


def test_run_sh_runs_its_stages_side_by_side_and_reports_them(tmp_path):
    """benchmarks/gpu/run.sh with a stand-in nvidia-smi on PATH (a "GPU" machine whose torch
    has no CUDA): the Triton tests and the prewarm start in the background beside the build,
    the CUDA tests follow it, both background stages are done (the prewarm stopped, if still
    running) before the benchmarks, and the report lists every stage with its Time block.
    The one place the script's own logic runs before a GPU session."""
    import shutil
    import subprocess
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\ncase \"$*\" in\n  *noheader*) echo 9.0 ;;\n"
                   "  *query-gpu*) echo name, compute_cap; echo Stand-in, 9.0 ;;\n"
                   "  *) echo stand-in nvidia-smi ;;\nesac\n")
    smi.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", OUT=str(out),
               EXPANSE_GPU_STATE_DIR=str(tmp_path / "state"), EXPANSE_GPU_SECTIONS="ceilings",
               EXPANSE_GPU_TESTS_K="no_test_has_this_name", EXPANSE_GPU_BUDGET_S="300")
    env.pop("TRITON_INTERPRET", None)
    script = os.path.join(os.path.dirname(PATH), "run.sh")
    proc = subprocess.run(["bash", script], capture_output=True, text=True, timeout=600,
                          env=env)
    log = proc.stdout
    assert proc.returncode == 0, log[-3000:] + proc.stderr[-2000:]
    for line in ("=== stage tests (in the background, nice 5)",
                 "=== stage prewarm (in the background, nice 5)", "=== stage build:",
                 "=== stage tests_cuda:", "=== stage bench:"):
        assert line in log, line
    # the background stages are started before the build, finished before the benchmarks
    assert log.index("stage tests (in the background") < log.index("=== stage build:")
    assert log.index("=== stage prewarm (background) output") < log.index("=== stage bench:")
    assert log.index("=== stage tests (background) output") < log.index("=== stage bench:")
    report = (out / "results.md").read_text()
    for stage in ("env", "prewarm", "build", "tests", "tests_cuda", "bench"):
        assert f"| {stage} |" in report, stage
    assert "Time:" in report and "- ceilings:" in report
    assert (tmp_path / "state" / "triton_cache").is_dir()


def test_sweep_sizes_are_the_sections_sizes_at_the_other_widenings(gpu):
    specs = gpu.models._sweep_specs(quick=False)
    linear = [s for s in specs if s.op == "linear"]
    conv = [s for s in specs if s.op == "conv2d"]
    assert {(s.old, s.rows) for s in linear} == {(4096, 16384)}
    assert sorted(s.new for s in linear) == [(410,), (416,), (512, 512), (2048,), (4096,)]
    assert [s.new for s in linear[:2]] == [(410,), (416,)]  # the aligned 10% right after
    assert {(s.old, s.rows, s.hw) for s in conv} == {(256, 64, 56)}
    assert sorted(s.new for s in conv) == [(26,), (128,), (256,)]


def test_the_ncu_stage_script_runs_the_layer(tmp_path):
    """benchmarks/gpu/ncu_linear.py (run under ncu by run.sh's opt-in ncu stage) at tiny sizes
    on the CPU: its forward and backward calls run, and it names what it ran."""
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(PATH), "ncu_linear.py")
    proc = subprocess.run(
        [sys.executable, script, "--device", "cpu", "--backend", "torch", "--rows", "3",
         "--old", "5", "--new", "2", "--dtype", "float32"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 forward+backward calls on torch, float32, 3 x (5+2)" in proc.stdout


def test_environment_switch_is_put_back(gpu, monkeypatch):
    """The cuda variant rows flip the extension's switches through _environment: set within
    the block, as before after it (unset, or its old value), an exception included."""
    monkeypatch.delenv("EXPANSE_TEST_SWITCH", raising=False)
    with gpu.common._environment("EXPANSE_TEST_SWITCH", "1"):
        assert os.environ["EXPANSE_TEST_SWITCH"] == "1"
    assert "EXPANSE_TEST_SWITCH" not in os.environ
    monkeypatch.setenv("EXPANSE_TEST_SWITCH", "old")
    with pytest.raises(RuntimeError):
        with gpu.common._environment("EXPANSE_TEST_SWITCH", "new"):
            assert os.environ["EXPANSE_TEST_SWITCH"] == "new"
            raise RuntimeError("a failed row")
    assert os.environ["EXPANSE_TEST_SWITCH"] == "old"
