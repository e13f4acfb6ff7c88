"""`expanse-fast bench` at tiny sizes: the table and JSON structure, every peer computing the
same function as the expanded layer on the part they share, the useful-work limits of
DESIGN.md section 2, and the peak-memory probe.  No timing is asserted."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from expanse_fast import bench as B
from expanse_fast.cli import main

TINY = ["bench", "--size", "tiny", "--budget", "0", "--min-rounds", "1", "--max-rounds", "1",
        "--quiet"]
LAYER_PEERS = {B.MASKED, B.CAT, B.FINETUNE, B.LORA}
MODEL_PEERS = {B.MASKED, B.FINETUNE}


def _assert_peers(case: dict):
    names = [c["name"] for c in case["contenders"]]
    assert names[0] == "expanse_fast [torch]" and case["contenders"][0]["role"] == "subject"
    peers = [c for c in case["contenders"] if c["role"] == "peer"]
    skipped = {s["name"]: s["reason"] for s in case["skipped"]}
    expected = MODEL_PEERS if case["kind"] in ("mlp", "cnn") else LAYER_PEERS
    assert {p["name"] for p in peers} | set(skipped) == expected
    assert all(reason for reason in skipped.values())
    for p in peers:
        assert p["speedup"] > 0 and p["limit"] > 0 and p["macs"] > 0
        assert p["pct_of_limit"] == pytest.approx(100 * p["speedup"] / p["limit"])
        assert p["max_abs_diff"] < 1e-4, (case["group"], p["name"])
        assert p["vs"] == "expanse_fast [torch]"
    return {p["name"]: p for p in peers}


def test_json_structure(capsys):
    assert main(TINY + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"device", "dtype", "torch", "threads", "memory"} <= set(result["env"])
    assert [c["group"] for c in result["cases"]] == [s.group for s in B.plan("tiny")]
    for case in result["cases"]:
        peers = _assert_peers(case)
        assert all(c["rounds"] == 1 and c["median_s"] > 0 for c in case["contenders"])
        if case["group"].startswith("linear 16+4 (25%)") and case["passes"] == "fwd+bwd":
            # DESIGN.md section 2: a square layer widened by 25%, fwd+bwd
            assert round(peers[B.MASKED]["limit"], 2) == 2.78
            assert round(peers[B.FINETUNE]["limit"], 2) == 1.78
        if case["kind"] in ("mlp", "cnn"):
            for c in case["contenders"]:
                # at least its parameters, their gradients and two AdamW states
                assert c["peak_bytes"] >= 4 * 4 * c["grad_params"]
        else:
            assert all(c["peak_bytes"] is None for c in case["contenders"])


def test_table(capsys):
    group = "linear 16+4 (25%), 7 rows, fwd+bwd"
    assert main(TINY + ["--filter", group, "--no-memory"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert group in lines
    assert any("speed-up" in line and "% of limit" in line for line in lines)
    for name in ("expanse_fast [torch]", B.MASKED, B.CAT, B.FINETUNE):
        assert any(line.strip().startswith(name) for line in lines), name
    assert "1.78x" in out and "2.78x" in out


@pytest.mark.parametrize("argv,match", [
    (["--min-rounds", "3", "--max-rounds", "2"], "--max-rounds 2 is below --min-rounds 3"),
    (["--device", "meta"], "--device must be cpu or cuda"),
    (["--device", "tpu"], "--device must be cpu or cuda, got 'tpu'"),
])
def test_bad_settings_are_one_line_errors(argv, match, capsys):
    assert main(["bench", "--size", "tiny"] + argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err


def test_save_to_a_folder_is_refused_before_timing(tmp_path, capsys):
    assert main(["bench", "--size", "tiny", "--save", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "is a folder: give the JSON file's name" in captured.err
    assert "[bench]" not in captured.err and captured.out == ""  # nothing was timed


def test_table_warns_when_a_peer_computes_something_else():
    row = dict(role="peer", median_s=2.0, speedup=2.0, limit=2.5, pct_of_limit=80.0,
               grad_params=10, peak_bytes=None, detail="", max_abs_diff=0.5)
    result = {"env": B.environment("cpu", torch.float32), "cases": [{
        "group": "g", "skipped": [], "contenders": [
            dict(row, name="expanse_fast [torch]", role="subject", max_abs_diff=None),
            dict(row, name=B.MASKED), dict(row, name=B.CAT, max_abs_diff=1e-6)]}]}
    warnings = [line for line in B.format_table(result).splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and B.MASKED in warnings[0]
    # a subject on another backend is held to the first subject's output as well
    result["cases"][0]["contenders"][1:] = [
        dict(row, name="expanse_fast [triton]", role="subject", max_abs_diff=0.5)]
    warnings = [line for line in B.format_table(result).splitlines() if "WARNING" in line]
    assert warnings == ["  WARNING: expanse_fast [triton] differs from expanse_fast [torch] "
                        "by 5.00e-01 on their shared outputs"]


def test_every_contender_but_the_reference_reports_its_difference():
    spec = B.LayerSpec("linear", 13, (4,), 7, "fwd+bwd")
    case = B.build_case(spec, torch.device("cpu"), torch.float32)
    diffs = B.max_abs_diffs(case)
    B.count_macs(case)
    B.time_case(case, torch.device("cpu"), (1, 1), 0.0)
    diffs["expanse_fast [torch]"] = 123.0  # the reference's own entry is never reported
    rows = B.case_result(case, diffs)["contenders"]
    assert rows[0]["name"] == "expanse_fast [torch]" and rows[0]["max_abs_diff"] is None
    assert all(r["max_abs_diff"] == diffs[r["name"]] for r in rows[1:])


@pytest.mark.gpu
@pytest.mark.gpu_seconds(45)  # the tiny plan's Triton compiles, every backend
def test_bench_on_cuda_holds_every_backend_to_the_torch_backend(capsys):
    """`expanse-fast bench --device cuda` at tiny sizes in bfloat16: every usable backend is a
    subject, and its outputs (layers and whole widened models) and every peer's stay within
    the table's warning threshold of the torch backend's.  ("cuda" in its name: the GPU run
    tests it with the extension's tests, after the build, where the cuda backend is usable.)"""
    assert main(TINY + ["--json", "--device", "cuda", "--dtype", "bfloat16",
                        "--no-memory"]) == 0
    result = json.loads(capsys.readouterr().out)
    limit = B.DIFF_WARNING.get("bfloat16", 5e-2)
    usable = ["torch"] + [b for b in ("triton", "cuda")
                          if B.availability(b, torch.device("cuda"))[0]]
    for case in result["cases"]:
        names = [c["name"] for c in case["contenders"] if c["role"] == "subject"]
        assert names == [f"expanse_fast [{b}]" for b in usable], case["group"]
        for row in case["contenders"][1:]:
            assert row["max_abs_diff"] is not None, (case["group"], row["name"])
            assert row["max_abs_diff"] <= limit, (case["group"], row["name"],
                                                  row["max_abs_diff"])


def _layer_reference(layer, x):
    """float64 output of the staircase layer: plain dense weights, zeros in the upper blocks."""
    w, b = layer.dense_weight(), layer.dense_bias()
    if isinstance(layer, B.ExpandedLinear):
        return F.linear(x, w, b)
    return F.conv2d(x, w, b, layer.stride, layer.padding, layer.dilation)


LAYER_SPECS = [B.LayerSpec("linear", 13, (4,), 7, "fwd+bwd"),
               B.LayerSpec("linear", 11, (3, 2), 1, "fwd+bwd"),      # three groups, one row
               B.LayerSpec("linear", 8, (8,), 0, "fwd+bwd"),         # 100%, zero rows
               B.LayerSpec("conv2d", 5, (2,), 3, "fwd+bwd", hw=7),
               B.LayerSpec("conv2d", 6, (1, 2), 2, "fwd+bwd", hw=5)]


@pytest.mark.parametrize("spec", LAYER_SPECS, ids=lambda s: s.group)
def test_layer_peers_compute_the_same_function(spec):
    case = B.build_layer_case(spec, dtype=torch.float64)
    sub = case.subjects[0]
    names = {c.name for c in case.contenders} | {n for n, _ in case.skipped}
    assert names == {sub.name} | LAYER_PEERS
    with torch.no_grad():
        ref = _layer_reference(sub.module, sub.x)
        torch.testing.assert_close(sub.output(), ref)
        for c in case.contenders[1:]:
            n = ref.shape[1] if c.name in (B.MASKED, B.CAT) else spec.old
            assert n == (ref.shape[1] if c.shared is None else c.shared)
            torch.testing.assert_close(c.output()[:, :n], ref[:, :n], msg=c.name)
    assert max(B.max_abs_diffs(case).values()) < 1e-10
    _check_trainable_grads(case)


def _check_trainable_grads(case):
    """After one fwd+bwd with the same output gradient, the masked and cat peers hold the
    subject's trainable gradients and new-input gradient; the masked peer's frozen rows get
    a zero gradient."""
    sub = case.subjects[0]
    x = sub.x
    sub.call()
    layer = sub.module
    i_f = layer.layout.frozen_in
    w_grad, b_grad, dx_new = (layer.weight_new.grad.clone(), layer.bias_new.grad.clone(),
                              x.grad[:, i_f:].clone())
    n = layer.layout.new_out
    for name in (B.MASKED, B.CAT):
        c = case.get(name)
        c.call()
        torch.testing.assert_close(x.grad[:, i_f:], dx_new, msg=name)
        if name == B.MASKED:
            w, b = c.module.weight, c.module.bias
            assert not w.grad[:-n].any() and not b.grad[:-n].any()
            torch.testing.assert_close(w.grad[-n:], w_grad)
        else:
            w, b = c.module.parts[-1].weight, c.module.parts[-1].bias
            assert all(p.grad is None for part in c.module.parts[:-1]
                       for p in part.parameters())
            torch.testing.assert_close(w.grad, w_grad)
        torch.testing.assert_close(b.grad[-n:], b_grad)


MODEL_SPECS = [B.ModelSpec("mlp", (17, 12, 12, 5), 9, 0.25, 3),
               B.ModelSpec("cnn", (4, 3), 2, 0.5, 2, hw=6)]


@pytest.mark.parametrize("spec", MODEL_SPECS, ids=lambda s: s.kind)
def test_model_peers_compute_the_same_function(spec):
    case = B.build_model_case(spec, dtype=torch.float64)
    assert [c.name for c in case.contenders] == ["expanse_fast [torch]", B.MASKED, B.FINETUNE]
    diffs = B.max_abs_diffs(case)
    assert diffs[B.MASKED] < 1e-10 and diffs[B.FINETUNE] < 1e-10
    # the shared part is real: the fine-tuned original model has the old classes only
    assert case.get(B.FINETUNE).output().shape[1] == spec.widths[-1]
    assert case.subjects[0].output().shape[1] == spec.widths[-1] + spec.new_classes


@pytest.mark.parametrize("spec", MODEL_SPECS, ids=lambda s: s.kind)
def test_model_subjects_on_every_backend_share_their_new_units(spec):
    """Each backend's widened model has the same new weights (each was drawn afresh: the
    H200 run saw 0.44 between the torch and Triton MLPs' outputs, all of it the new units,
    and no output check could hold)."""
    two = B.build_model_case(spec, dtype=torch.float64, backends=["torch", "torch"])
    first, second = (c.module.state_dict() for c in two.subjects)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert B.max_abs_diffs(two)["expanse_fast [torch]"] == 0.0


def test_limits_of_the_design():
    """DESIGN.md section 2: MLP 1024-1024-1024-1024-10 widened by 25% with 10 new classes, fed
    by data: 2.43x under the masked full-width model and 1.63x under fine-tuning; a 1024-wide
    hidden layer (or 3x3 conv) widened by 25%: 2.78x and 1.78x.  Peer counts come from
    torch's FLOP counter, the subject's from the layouts; both scale with the rows alike."""
    case = B.build_model_case(B.ModelSpec("mlp", B.MLP_WIDTHS, 2))
    B.count_macs(case)
    sub = case.subjects[0].macs
    assert round(case.get(B.MASKED).macs / sub, 2) == 2.43
    assert round(case.get(B.FINETUNE).macs / sub, 2) == 1.63
    for spec in (B.LayerSpec("linear", 1024, (256,), 2, "fwd+bwd"),
                 B.LayerSpec("conv2d", 16, (4,), 2, "fwd+bwd", hw=5)):  # channels alike
        case = B.build_layer_case(spec, peers=(B.MASKED, B.FINETUNE))
        B.count_macs(case)
        sub = case.subjects[0].macs
        assert round(case.get(B.MASKED).macs / sub, 2) == 2.78, spec.group
        assert round(case.get(B.FINETUNE).macs / sub, 2) == 1.78, spec.group


def test_useful_macs_match_the_profiler():
    """The subject's useful work (limit denominator) is what the torch backend runs."""
    from torch.profiler import ProfilerActivity, profile

    case = B.build_model_case(B.ModelSpec("mlp", (20, 16, 16, 6), 5, 0.25, 2))
    sub = case.subjects[0]
    model = sub.module
    x = torch.randn(5, 20)
    useful = B.useful_macs(model, lambda: model(x), "step")
    model(x).sum().backward()  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        model(x).sum().backward()
    flops = sum(e.flops for e in prof.key_averages() if e.flops)
    assert flops == 2 * useful


def test_peak_memory_sees_a_step():
    """1024x1024 float32 weights and two AdamW states (12 MiB) persist; the step drops the
    old gradient, makes a 32 MiB temporary, a new 4 MiB gradient, and while the temporary
    lives AdamW's sqrt(v) and sqrt(v)/c (4 MiB each): 56 MiB.  The input batch and its views
    are not the step's."""
    batch = torch.ones(16 * 2**20)  # 64 MiB, allocated before the contender

    def build():
        lin = torch.nn.Linear(1024, 1024, bias=False)
        opt = torch.optim.AdamW(lin.parameters())

        def step():
            opt.zero_grad(set_to_none=True)
            big = torch.ones(8 * 2**20)  # 32 MiB
            lin(batch[:4096].view(4, 1024)).sum().backward()
            opt.step()
            del big
        step.state = (lin, opt)
        return step

    peak = B.peak_step_bytes(build, "cpu")
    assert 56 * 2**20 <= peak <= 56 * 2**20 + 2**16, peak / 2**20


def test_bench_does_not_import_pytest_benchmark():
    code = ("import sys, expanse_fast.bench, expanse_fast.cli; "
            "sys.exit('pytest_benchmark' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
