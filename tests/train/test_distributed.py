"""DDP and FSDP2 with 2 gloo processes on CPU (torch.multiprocessing.spawn).

Each rank trains on its own slice of every batch.  Checked: all ranks end with the same
parameters; frozen tensors are the pretrained ones bit for bit; the trainable tensors
match one process trained on the combined batch; no "unused parameters" error over several
steps without find_unused_parameters (isolated and coupled layouts, a head with new
classes, a BatchNorm left without new channels); a DDP step all-reduces exactly the
trainable bytes.  With sync_batchnorm the new BatchNorm channels take the statistics of
both ranks' slices together: the trainable tensors and running statistics then match one
process trained on the combined batch as it is.  One spawn for all DDP cases and one for FSDP2 keep the file fast.
"""
import importlib
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import expanse_fast as xf
from expanse_fast.train import distributed as xd

WORLD = 2
B = 5          # examples per rank per step (odd)
STEPS = 4      # DDP's unused-parameter error would show at the second step
LR = 0.1
CASES = ("mlp_isolated", "mlp_coupled", "cnn_bn", "cnn_bn_sync")
TWO_STEP = importlib.import_module("expanse_fast.train.two_step")
# two_step uses this module once the patch given with issue 7 is applied to two_step.py.
TWO_STEP_DISTRIBUTED = hasattr(TWO_STEP, "make_sampler")


# ---- models and data, built the same way in every process ------------------------------
def _source(case):
    torch.manual_seed(10 + CASES.index(case))
    if case.startswith("mlp"):
        return nn.Sequential(nn.Linear(13, 11), nn.ReLU(), nn.Linear(11, 7), nn.ReLU(),
                             nn.Linear(7, 5))
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3),
                        nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 3 * 3, 5))
    with torch.no_grad():  # pretrained statistics that are not the defaults
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
            bn.num_batches_tracked.fill_(7)
    return net


def _expanded(case):
    src = _source(case)
    torch.manual_seed(20 + CASES.index(case))
    if case == "mlp_isolated":
        return xf.expand(src, width=0.4, new_classes=3, mode="isolated")
    if case == "mlp_coupled":
        return xf.expand(src, width=3, new_classes=2, mode="coupled")
    # Only conv "3" grows: conv "0" and BatchNorm "1" keep empty trainable tensors.
    model = xf.expand(src, width={"3": 2}, new_classes=3, mode="isolated")
    return xd.sync_batchnorm(model) if case == "cnn_bn_sync" else model


def _batches(case, model):
    g = torch.Generator().manual_seed(30 + CASES.index(case))
    shape = (13,) if case.startswith("mlp") else (1, 7, 7)
    n_out = model[-1].out_features
    return [(torch.randn((WORLD * B,) + shape, generator=g),
             torch.randint(0, n_out, (WORLD * B,), generator=g)) for _ in range(STEPS)]


def _shard(t, r):
    return t[r * B:(r + 1) * B]


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _full_state(model):
    # FSDP2 parameters are DTensors: gather the whole tensor on every rank.
    out = {}
    for k, v in model.state_dict().items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k] = v.detach().clone()
    return out


def _reference(case):
    """One process, the combined batch of both ranks per step.  With BatchNorm in training
    mode each rank normalises its own slice, so there the reference averages the loss of
    the slices (the same gradient DDP averages); the MLPs, and the CNN whose new BatchNorm
    channels sync their statistics, use the plain combined batch."""
    model = _expanded(case)
    opt = torch.optim.SGD(_trainable(model), lr=LR, momentum=0.9)
    for X, y in _batches(case, model):
        if case == "cnn_bn":
            loss = sum(F.cross_entropy(model(_shard(X, r)), _shard(y, r))
                       for r in range(WORLD)) / WORLD
        else:
            loss = F.cross_entropy(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


# ---- the workers -------------------------------------------------------------------------
def _init(r, store):
    torch.set_num_threads(1)
    # FSDP2 notes, once per layer and rank, that a layer's output is a view (reshape).
    warnings.filterwarnings("ignore", message=".*returned a view tensor")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=r, world_size=WORLD)


def _train(model, wrapped, case, r, counter=None):
    opt = torch.optim.SGD(_trainable(wrapped), lr=LR, momentum=0.9)
    sent = []
    for X, y in _batches(case, model):
        loss = F.cross_entropy(wrapped(_shard(X, r)), _shard(y, r))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if counter is not None:
            sent.append((counter.bytes, counter.steps))
            counter.reset()
    return sent


def _ddp_worker(r, store, out):
    _init(r, store)
    res = {}
    for case in CASES:
        model = _expanded(case)
        ddp = xd.wrap_ddp(model)
        assert ddp.find_unused_parameters is False
        counter = xd.AllReduceCounter().attach(ddp)
        sent = _train(model, ddp, case, r, counter)
        res[case] = {"state": _full_state(model), "sent": sent,
                     "trainable_bytes": xd.trainable_bytes(model),
                     "all_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    # the helpers, inside a process group
    sampler = xd.make_sampler((torch.zeros(11), torch.zeros(11)), shuffle=True, seed=3)
    sampler.set_epoch(1)
    res["shares"] = list(sampler)
    res["sum"] = xd.all_reduce_metrics({"n": r + 1, "x": 0.5 * r, "name": "a"})
    res["mean"] = xd.all_reduce_metrics({"x": float(r)}, op="mean")
    res["any"] = (xd.any_rank(r == 1), xd.any_rank(False))
    if TWO_STEP_DISTRIBUTED:
        model = _expanded("mlp_isolated")
        X, y = _batches("mlp_isolated", model)[0]
        history = TWO_STEP.two_step(model, (X[:3], y[:3]), (X, y), epochs=(1, 2),
                                    lr=(0.05, 0.05), batch_size=2, progress=r == 0, seed=4)
        res["two_step"] = {"state": _full_state(model), "history": history}
        res["resumed_with_noise"] = _noisy_resume(out)
    torch.save(res, os.path.join(out, f"ddp{r}.pt"))
    dist.destroy_process_group()


class _Crash(Exception):
    pass


def _noisy_resume(out):
    """two_step with input noise (each rank draws its own): uninterrupted, then stopped by a
    crash after epoch 3 and resumed from its checkpoint; both final states."""
    def run(crash=False, resume=False):
        model = _expanded("mlp_isolated")
        X, y = _batches("mlp_isolated", model)[0]

        def crash_at_3(record, m):
            if crash and record["epoch"] == 3:
                raise _Crash
        try:
            TWO_STEP.two_step(model, (X[:4], y[:4]), (X, y), epochs=(2, 3), lr=(0.05, 0.05),
                              batch_size=2, noise=0.3, progress=False, seed=5,
                              checkpoint_dir=os.path.join(out, "noisy") if crash or resume
                              else None, resume=resume, callbacks=[crash_at_3])
        except _Crash:
            return None
        return _full_state(model)
    whole = run()
    run(crash=True)
    return whole, run(resume=True)


def _fsdp_worker(r, store, out):
    _init(r, store)
    res = {}
    for case, shard_frozen in (("mlp_isolated", True), ("cnn_bn", True), ("mlp_coupled", False)):
        model = xd.wrap_fsdp2(_expanded(case), shard_frozen=shard_frozen)
        # sharded parameters are DTensors; shard_frozen=False keeps frozen ones whole
        kinds = {n: type(p).__name__ for n, p in model.named_parameters() if p.numel()}
        _train(model, model, case, r)
        res[case] = {"state": _full_state(model), "kinds": kinds}
    if TWO_STEP_DISTRIBUTED:  # checkpoints of DTensor shards: refused before training
        model = xd.wrap_fsdp2(_expanded("mlp_isolated"))
        X, y = _batches("mlp_isolated", model)[0]
        try:
            TWO_STEP.two_step(model, None, (X, y), epochs=(0, 1), progress=False,
                              checkpoint_dir=os.path.join(out, "fsdp_ck"))
            res["checkpointed"] = "trained"
        except ValueError as exc:
            res["checkpointed"] = str(exc)
    torch.save(res, os.path.join(out, f"fsdp{r}.pt"))
    dist.destroy_process_group()


def _spawn(worker, tmp_path, prefix):
    mp.spawn(worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"{prefix}{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    return _spawn(_ddp_worker, tmp_path_factory.mktemp("ddp"), "ddp")


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    if xd._fully_shard() is None:
        pytest.skip(f"torch {torch.__version__} has no FSDP2 (fully_shard)")
    import inspect
    if "ignored_params" not in inspect.signature(xd._fully_shard()).parameters:
        pytest.skip(f"torch {torch.__version__}: fully_shard has no ignored_params, needed "
                    "for the empty trainable tensors of the cnn_bn case")
    return _spawn(_fsdp_worker, tmp_path_factory.mktemp("fsdp"), "fsdp")


# ---- the checks --------------------------------------------------------------------------
def _running_new(key):
    # New BatchNorm channels keep per-rank running statistics (DDP broadcasts rank 0's at
    # the start of each forward, then every rank updates them with its own slice).
    return key.endswith(("running_mean_new", "running_var_new"))


def _check_same_on_ranks(states, synced=False):
    for k in states[0]:
        if _running_new(k) and not synced:
            continue
        for s in states[1:]:
            assert torch.equal(states[0][k], s[k]), f"{k} differs between ranks"


def _check_frozen(state, case):
    pretrained = _expanded(case).state_dict()
    frozen = [k for k in pretrained if "_frozen" in k]
    assert frozen
    for k in frozen:
        assert torch.equal(state[k], pretrained[k]), f"frozen {k} changed"
    # and the task-0 model is the source model, bit for bit
    big = _expanded(case)
    big.load_state_dict(state)
    src = _source(case).state_dict()
    for k, v in xf.source_model(big, 0).state_dict().items():
        assert torch.equal(v, src[k]), f"source_model {k} differs from the pretrained model"


def _check_trainable(state, case):
    ref = _reference(case)
    init = _expanded(case)
    names = [n for n, p in ref.named_parameters() if p.requires_grad and p.numel()]
    # A conv bias right before a training-mode BatchNorm has zero gradient (the batch mean
    # absorbs it): it moves by roundoff only, so "it trained" cannot be asked of it.
    zero_grad = {"3.bias_new"} if case.startswith("cnn") else set()
    for n in names:
        want = ref.get_parameter(n).detach()
        if n not in zero_grad:
            assert not torch.allclose(want, init.get_parameter(n).detach()), f"{n} never trained"
        torch.testing.assert_close(state[n], want, rtol=1e-5, atol=1e-6, msg=f"trainable {n}")


@pytest.mark.parametrize("case", CASES)
def test_ddp_ranks_agree_frozen_exact_trainable_match_one_process(ddp_runs, case):
    states = [run[case]["state"] for run in ddp_runs]
    _check_same_on_ranks(states, synced=case == "cnn_bn_sync")
    _check_frozen(states[0], case)
    _check_trainable(states[0], case)


def test_ddp_synced_batchnorm_running_statistics_are_the_combined_batchs(ddp_runs):
    """The new channels' running statistics: the same on both ranks and those of one
    process on the combined batches when synced; each rank's own slices' otherwise."""
    keys = [k for k in ddp_runs[0]["cnn_bn_sync"]["state"] if _running_new(k)]
    assert keys and all(ddp_runs[0]["cnn_bn_sync"]["state"][k].numel() for k in keys
                        if k.startswith("4."))
    ref = _reference("cnn_bn_sync").state_dict()
    for k in keys:
        torch.testing.assert_close(ddp_runs[0]["cnn_bn_sync"]["state"][k], ref[k],
                                   rtol=1e-5, atol=1e-6, msg=k)
    per_rank = [run["cnn_bn"]["state"] for run in ddp_runs]
    assert not torch.equal(per_rank[0]["4.running_mean_new"], per_rank[1]["4.running_mean_new"])


@pytest.mark.parametrize("case", CASES)
def test_ddp_all_reduces_exactly_the_trainable_bytes(ddp_runs, case):
    for run in ddp_runs:
        r = run[case]
        assert r["sent"] == [(r["trainable_bytes"], 1)] * STEPS
        assert 0 < r["trainable_bytes"] < r["all_bytes"]


def test_helpers_in_a_process_group(ddp_runs):
    shares = [run["shares"] for run in ddp_runs]
    assert len(shares[0]) == len(shares[1]) == 6  # 11 examples: one repeats to even out
    assert set(shares[0]) | set(shares[1]) == set(range(11))
    for run in ddp_runs:
        assert run["sum"] == {"n": 3, "x": 0.5, "name": "a"} and isinstance(run["sum"]["n"], int)
        assert run["mean"] == {"x": 0.5}
        assert run["any"] == (True, False)


@pytest.mark.skipif(not TWO_STEP_DISTRIBUTED,
                    reason="two_step.py does not use expanse_fast.train.distributed yet "
                           "(the patch for issue 7 is not applied)")
def test_two_step_under_torchrun(ddp_runs):
    runs = [run["two_step"] for run in ddp_runs]
    _check_same_on_ranks([r["state"] for r in runs])
    _check_frozen(runs[0]["state"], "mlp_isolated")
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(runs[0]["history"]) == strip(runs[1]["history"])
    assert [e["step"] for e in runs[0]["history"]] == [1, 2, 2]
    # the reference: one process, the batches the two ranks' samplers formed together
    model = _expanded("mlp_isolated")
    X, y = _batches("mlp_isolated", model)[0]
    epoch = 0
    for data, n_epochs in (((X[:3], y[:3]), 1), ((X, y), 2)):
        opt = torch.optim.AdamW(_trainable(model), lr=0.05, weight_decay=1e-4)
        for _ in range(n_epochs):
            shares = []
            for r in range(WORLD):
                s = torch.utils.data.DistributedSampler(range(len(data[0])), WORLD, r,
                                                        shuffle=True, seed=4)
                s.set_epoch(epoch)
                shares.append(list(s))
            epoch += 1
            for k, e in TWO_STEP._batches(len(shares[0]), 2):  # (a last single joins)
                loss = sum(F.cross_entropy(model(data[0][sh[k:e]]), data[1][sh[k:e]])
                           for sh in shares) / WORLD
                opt.zero_grad()
                loss.backward()
                opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(runs[0]["state"][n], p.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not TWO_STEP_DISTRIBUTED, reason="two_step is not distributed here")
def test_two_step_resumes_every_ranks_random_stream(ddp_runs):
    """Each rank draws its own input noise; a resumed run gives each rank its own stream
    back (the checkpoint holds every rank's generators), so it ends as the uninterrupted
    run did, bit for bit, on every rank."""
    for run in ddp_runs:
        whole, resumed = run["resumed_with_noise"]
        assert resumed is not None and whole.keys() == resumed.keys()
        for k in whole:
            assert torch.equal(whole[k], resumed[k]), k
    assert not torch.equal(ddp_runs[0]["resumed_with_noise"][0]["4.weight_new"],
                           _expanded("mlp_isolated").state_dict()["4.weight_new"])


@pytest.mark.skipif(not TWO_STEP_DISTRIBUTED, reason="two_step is not distributed here")
def test_two_step_refuses_checkpoints_of_fsdp2_shards(fsdp_runs):
    for run in fsdp_runs:
        assert "FSDP2-sharded model" in run["checkpointed"]


@pytest.mark.parametrize("case", ("mlp_isolated", "cnn_bn", "mlp_coupled"))
def test_fsdp2_frozen_and_trainable_in_one_module(fsdp_runs, case):
    states = [run[case]["state"] for run in fsdp_runs]
    for name, kind in fsdp_runs[0][case]["kinds"].items():
        sharded = case != "mlp_coupled" or "_frozen" not in name
        assert (kind == "DTensor") == sharded, (name, kind)
    _check_same_on_ranks(states)
    _check_frozen(states[0], case)
    _check_trainable(states[0], case)


# ---- without a process group ---------------------------------------------------------------
def test_single_process_fallbacks():
    assert not xd.is_distributed() and xd.rank() == 0 and xd.is_main_process()
    assert list(xd.make_sampler(torch.zeros(7), shuffle=False)) == list(range(7))
    with pytest.raises(ValueError, match="different lengths"):
        xd.make_sampler((torch.zeros(3), torch.zeros(4)), shuffle=False)
    m = {"loss": 1.5, "n": 3}
    assert xd.all_reduce_metrics(m) == m and xd.all_reduce_metrics(m) is not m
    assert xd.any_rank(True) and not xd.any_rank(False)
    with pytest.raises(RuntimeError, match="init_process_group"):
        xd.wrap_ddp(_expanded("mlp_isolated"))
    with pytest.raises(RuntimeError, match="init_process_group|FSDP2"):
        xd.wrap_fsdp2(_expanded("mlp_isolated"))


def test_ddp_ignores_frozen_buffers_and_empty_trainables_only():
    model = _expanded("cnn_bn")
    ignored = set(xd.ddp_ignored_names(model))
    assert ignored == {"0.weight_new", "0.bias_new", "1.weight_new", "1.bias_new",
                       "1.running_mean_frozen", "1.running_var_frozen",
                       "1.num_batches_tracked_frozen", "4.running_mean_frozen",
                       "4.running_var_frozen", "4.num_batches_tracked_frozen"}
    assert xd.ddp_ignored_names(_expanded("mlp_isolated")) == []
