"""Training checkpoints: an interrupted two_step run resumed ends bit-identical to one never
interrupted; saving is atomic; every checkpoint that does not fit (or is damaged, or is a
pickle) is refused with a clear error and changes nothing."""
import copy
import glob
import json
import os
import pickle
import re
import struct

import pytest
import torch
from torch import nn

import expanse_fast as xf
from expanse_fast.train import state as state_mod
from expanse_fast.train import two_step
from expanse_fast.train.state import (TrainingState, TrainingStateError, load_training_state,
                                      save_training_state)

HEAD = slice(3, 5)


# ---- a small expanded model with BatchNorm (buffers) and Dropout (randomness) ------------
def _base():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(7, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(12, 3)).eval()


def _model(base=None):
    return xf.expand(base if base is not None else _base(), width=0.5, new_classes=2)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 7, generator=g), torch.randint(0, 2, (n,), generator=g)


BASICS, FULL = _data(6, 1), _data(29, 2)


def _step_lr(opt, step, n_epochs):
    # step_size 2: the scheduler has memory (a fresh one would decay at other epochs)
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


KW = dict(epochs=(2, 3), lr=(0.05, 0.02), batch_size=8, noise=0.3, head=HEAD, seed=3,
          progress=False, lr_schedule=_step_lr)


def _run(model, **kw):
    return two_step(model, BASICS, FULL, **{**KW, **kw})


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _strip(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def reference():
    """One run never interrupted: (initial model, final state, history)."""
    start = _model()
    model = copy.deepcopy(start)
    hist = _run(model)
    return start, _state(model), hist


# ---- resume is exact ---------------------------------------------------------------------
@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("crash_after", [1, 2, 3, 4])  # 2: at the step boundary
def test_resumed_run_is_bit_identical(reference, tmp_path, every, crash_after):
    start, want, want_hist = reference

    def crash(record, model):
        if record["epoch"] == crash_after + 1:
            raise Crash

    model = copy.deepcopy(start)
    with pytest.raises(Crash):
        _run(model, checkpoint_dir=tmp_path, checkpoint_every=every, callbacks=[crash])
    # saved every `every` epochs and at the end of step one (epoch 2)
    last = max([e for e in range(1, crash_after + 1) if e % every == 0 or e == 2], default=0)
    path = tmp_path / "two_step.safetensors"
    if last:
        assert len(TrainingState.read(str(path)).progress["history"]) == last
    else:
        assert not path.exists()  # nothing saved yet: resume=True starts afresh

    resumed = copy.deepcopy(start)  # a fresh process: the initial model again
    hist = _run(resumed, checkpoint_dir=tmp_path, checkpoint_every=every, resume=True)
    _assert_same_state(_state(resumed), want)
    assert _strip(hist) == _strip(want_hist)
    assert [r["lr"] for r in hist] == [0.05, 0.05, 0.02, 0.02, 0.01]


def test_crash_in_the_middle_of_an_epoch(reference, tmp_path):
    """The process dies inside an epoch (here: in the 13th forward): the epochs already
    saved are kept and the rest is redone, to the same bits."""
    start, want, want_hist = reference
    model = copy.deepcopy(start)
    calls = []

    def hook(module, inputs):
        calls.append(1)
        if len(calls) == 13:  # epoch 5 (batches per epoch: 1, 1, 4, 4, 4)
            raise Crash

    handle = model.register_forward_pre_hook(hook)
    with pytest.raises(Crash):
        _run(model, checkpoint_dir=tmp_path)
    handle.remove()
    assert TrainingState.read(str(tmp_path / "two_step.safetensors")).progress[
        "step_epochs"] == 2 and not glob.glob(str(tmp_path / "*.tmp-*"))
    resumed = copy.deepcopy(start)
    hist = _run(resumed, checkpoint_dir=tmp_path, resume=True)
    _assert_same_state(_state(resumed), want)
    assert _strip(hist) == _strip(want_hist)


def test_resume_without_checkpoint_starts_afresh_and_saves(reference, tmp_path):
    start, want, want_hist = reference
    model = copy.deepcopy(start)
    hist = _run(model, checkpoint_dir=tmp_path / "new" / "dir", resume=True)
    _assert_same_state(_state(model), want)
    assert _strip(hist) == _strip(want_hist)
    assert os.listdir(tmp_path / "new" / "dir") == ["two_step.safetensors"]


def test_resume_of_a_finished_run_trains_nothing(reference, tmp_path):
    start, want, want_hist = reference
    _run(copy.deepcopy(start), checkpoint_dir=tmp_path)
    model, calls = copy.deepcopy(start), []
    hist = _run(model, resume_from=tmp_path / "two_step.safetensors",
                callbacks=[lambda r, m: calls.append(r)])
    assert calls == []  # not one more epoch
    _assert_same_state(_state(model), want)  # the trained weights, from the file
    assert _strip(hist) == _strip(want_hist)


def test_a_callback_stop_is_remembered(tmp_path):
    start = _model()
    a = copy.deepcopy(start)
    hist = _run(a, checkpoint_dir=tmp_path, callbacks=[lambda r, m: r["epoch"] == 3])
    assert len(hist) == 3
    b, calls = copy.deepcopy(start), []
    hist_b = _run(b, checkpoint_dir=tmp_path, resume=True,
                  callbacks=[lambda r, m: calls.append(r)])
    assert calls == [] and _strip(hist_b) == _strip(hist)
    _assert_same_state(_state(b), _state(a))


def test_plain_model_without_schedule_and_one_step(tmp_path):
    """Any model (no expanded layer), one-step training, no scheduler, resume_from a folder."""
    torch.manual_seed(0)
    start = nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 2))
    kw = dict(epochs=(0, 4), batch_size=5, noise=0.1, progress=False)
    want = copy.deepcopy(start)
    two_step(want, None, FULL, **kw)

    def crash(r, m):
        if r["epoch"] == 3:
            raise Crash

    with pytest.raises(Crash):
        two_step(copy.deepcopy(start), None, FULL, checkpoint_dir=tmp_path, callbacks=[crash],
                 **kw)
    got = copy.deepcopy(start)
    hist = two_step(got, None, FULL, resume_from=tmp_path, **kw)
    assert len(hist) == 4
    _assert_same_state(_state(got), _state(want))


def test_callers_random_state_is_unchanged_by_a_resume(reference, tmp_path):
    start, _, _ = reference

    def crash(r, m):
        if r["epoch"] == 3:
            raise Crash

    with pytest.raises(Crash):
        _run(copy.deepcopy(start), checkpoint_dir=tmp_path, callbacks=[crash])
    torch.manual_seed(11)
    want = torch.rand(3)
    torch.manual_seed(11)
    assert len(_run(copy.deepcopy(start), checkpoint_dir=tmp_path, resume=True)) == 5
    assert torch.equal(torch.rand(3), want)


# ---- atomic saving -------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["write", "rename"])
def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    start = _model()
    path = str(tmp_path / "two_step.safetensors")
    import safetensors.torch as st

    saves, real_save, real_replace = [], st.save_file, os.replace

    def save_file(tensors, filename, metadata=None):
        saves.append(filename)
        if len(saves) == 3 and where == "write":
            with open(filename, "wb") as f:  # half a file, then the "power cut"
                f.write(b"\x00" * 100)
            raise Crash
        return real_save(tensors, filename, metadata=metadata)

    def replace(src, dst):
        if len(saves) == 3 and where == "rename":
            raise Crash
        return real_replace(src, dst)

    monkeypatch.setattr(st, "save_file", save_file)
    monkeypatch.setattr(state_mod.os, "replace", replace)
    with pytest.raises(Crash):
        _run(copy.deepcopy(start), checkpoint_dir=tmp_path)
    assert all(f != path for f in saves)  # never written in place
    assert os.listdir(tmp_path) == ["two_step.safetensors"]  # no temporary file left
    progress = TrainingState.read(path).progress  # epoch 2's checkpoint, whole
    assert progress["step_epochs"] == 2 and len(progress["history"]) == 2


# ---- refusals: nothing changes ---------------------------------------------------------------
def _snapshot(model, opt=None):
    return (_state(model), torch.get_rng_state().clone(),
            copy.deepcopy(opt.state_dict()) if opt is not None else None)


def _assert_unchanged(model, snap, opt=None):
    state, rng, opt_state = snap
    _assert_same_state(_state(model), state)
    assert torch.equal(torch.get_rng_state(), rng)
    if opt is not None:
        now = opt.state_dict()
        assert now["param_groups"] == opt_state["param_groups"]
        assert now["state"].keys() == opt_state["state"].keys()
        for i, s in opt_state["state"].items():
            for k, v in s.items():
                assert torch.equal(now["state"][i][k], v)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint of a run stopped after 3 epochs; its bytes; the initial model."""
    d = tmp_path_factory.mktemp("ckpt")
    start = _model()
    _run(copy.deepcopy(start), checkpoint_dir=d, callbacks=[lambda r, m: r["epoch"] == 3])
    path = str(d / "two_step.safetensors")
    with open(path, "rb") as f:
        blob = f.read()
    return start, path, blob


def _refused(model, path, match, exc=TrainingStateError, **kw):
    snap = _snapshot(model)
    with pytest.raises(exc, match=match):
        _run(model, resume_from=path, **kw)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("change,match", [
    (dict(lr=(0.05, 0.03)), r"other settings.*lr"),
    (dict(batch_size=7), r"other settings.*batch_size"),
    (dict(epochs=(2, 4)), r"other settings.*epochs"),
    (dict(seed=4), r"other settings.*seed"),
    (dict(noise=0.0), r"other settings.*noise"),
    (dict(lr_schedule=None), r"other settings.*lr_schedule"),
    (dict(head=slice(2, 4)), r"other settings.*head"),
])
def test_refuses_other_settings(saved, change, match):
    start, path, _ = saved
    _refused(copy.deepcopy(start), path, match, **change)


def test_refuses_other_data(saved):
    start, path, _ = saved
    model = copy.deepcopy(start)
    snap = _snapshot(model)
    X, y = FULL
    X = X.clone()
    X[3, 2] += 1e-3
    with pytest.raises(TrainingStateError, match=r"other settings.*data"):
        two_step(model, BASICS, (X, y), resume_from=path, **KW)
    _assert_unchanged(model, snap)


def test_refuses_other_frozen_weights(saved):
    start, path, _ = saved
    base = _base()
    with torch.no_grad():
        base[0].weight[0, 0] += 1e-6
    _refused(_model(base), path, r"frozen-weight fingerprint")


def test_refuses_other_layout(saved):
    start, path, _ = saved
    wider = xf.expand(_base(), width=0.75, new_classes=2)
    _refused(wider, path, r"tensor '.*' is torch.float32 \(.*\) in the file but "
                          r"torch.float32 \(.*\) in the model")
    _refused(_base(), path, r"other trainable tensors")  # the plain model: other names


def test_refuses_other_dtype(saved):
    start, path, _ = saved
    _refused(copy.deepcopy(start).double(), path,
             r"torch.float32 .* in the file but torch.float64")


def test_refuses_missing_checkpoint_and_bad_arguments(tmp_path):
    model = _model()
    snap = _snapshot(model)
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        _run(model, resume_from=tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="checkpoint_every"):
        _run(model, checkpoint_dir=tmp_path, checkpoint_every=0)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        _run(model, resume=True)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OSError, match="not a writable folder"):
        _run(model, checkpoint_dir=a_file / "sub")
    _assert_unchanged(model, snap)


def _write(tmp_path, blob, name="bad.safetensors"):
    p = str(tmp_path / name)
    with open(p, "wb") as f:
        f.write(blob)
    return p


def test_refuses_truncated_files(saved, tmp_path):
    start, _, blob = saved
    n = struct.unpack("<Q", blob[:8])[0]
    for cut in [0, 7, 8 + n // 2, 8 + n, (8 + n + len(blob)) // 2, len(blob) - 1]:
        _refused(copy.deepcopy(start), _write(tmp_path, blob[:cut]),
                 r"(?i)not a readable training checkpoint|modified")


@pytest.mark.parametrize("where", [0.0, 0.5, 1.0])
def test_refuses_a_flipped_byte(saved, tmp_path, where):
    start, _, blob = saved
    n = struct.unpack("<Q", blob[:8])[0]
    data = bytearray(blob)
    i = 8 + n + int(where * (len(blob) - 9 - n))
    data[i] ^= 0x01
    _refused(copy.deepcopy(start), _write(tmp_path, bytes(data)), r"modified")


def _split(blob):
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _join(header, data):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _edit_state(fn, redigest):
    """Edit the JSON state; with ``redigest`` also recompute the digest (a deliberate
    forgery, or a file written by a buggy tool): the content checks must still refuse it."""
    def edit(header, tensors):
        meta = header["__metadata__"]
        state = json.loads(meta["state"])
        fn(state)
        meta["state"] = json.dumps(state, sort_keys=True)
        if redigest:
            meta["payload_digest"] = state_mod._digest(meta["state"], tensors)
    return edit


def _set_meta(key, value):
    def edit(header, tensors):
        header["__metadata__"][key] = value
    return edit


def _swap_progress_step(state):
    state["progress"] = {"$dict": [[k, v if k != "step" else 99] for k, v in
                                   state["progress"]["$dict"]]}


EDITS = {
    "progress edited": (_edit_state(_swap_progress_step, False), r"modified"),
    "format": (_set_meta("format", "other"), r"not an expanse_fast training checkpoint"),
    "version": (_set_meta("version", "7"), r"version 7"),
    "no metadata": (lambda h, t: h.pop("__metadata__"),
                    r"not an expanse_fast training checkpoint"),
    "forged: unknown tag": (_edit_state(lambda s: s.update(progress={"$eval": "1"}), True),
                            r"unexpected entry"),
    "forged: missing entry": (_edit_state(lambda s: s.pop("frozen_fingerprint"), True),
                              r"lacks an entry"),
    "forged: fingerprint": (_edit_state(lambda s: s.update(frozen_fingerprint="0" * 64), True),
                            r"fingerprint"),
    "forged: empty state": (_edit_state(lambda s: s.clear(), True), r"lacks an entry"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_refuses_edited_headers(saved, tmp_path, edit):
    start, _, blob = saved
    header, data = _split(blob)
    from safetensors.torch import load
    tensors = load(blob)
    fn, match = EDITS[edit]
    fn(header, tensors)
    _refused(copy.deepcopy(start), _write(tmp_path, _join(header, data)), match)


def test_never_unpickles(saved, tmp_path):
    """A pickle that would create a file when loaded: refused, and the file never appears."""
    start, _, _ = saved
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    p = str(tmp_path / "evil.safetensors")
    with open(p, "wb") as f:
        pickle.dump({"model": Payload()}, f)
    _refused(copy.deepcopy(start), p, r"not a readable training checkpoint")
    torch.save({"x": torch.ones(2)}, str(tmp_path / "plain.pt"))
    _refused(copy.deepcopy(start), str(tmp_path / "plain.pt"), r"not a readable")
    assert not marker.exists()


# ---- the state API on its own ------------------------------------------------------------------
def _trained_opt(model, sched_cls=torch.optim.lr_scheduler.StepLR, **sched_kw):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = sched_cls(opt, **(sched_kw or {"step_size": 1, "gamma": 0.5}))
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 7)).square().mean().backward()
        opt.step()
        sched.step()
    return opt, sched


def test_state_round_trip(tmp_path):
    model = _model()
    opt, sched = _trained_opt(model)
    progress = {"epoch": 3, "nested": [(1, 2.5), {"a": None, 4: "x"}], "t": torch.arange(3),
                "nan": float("nan")}
    path = str(tmp_path / "s.safetensors")
    save_training_state(path, model, opt, sched, progress)
    want_rng = torch.rand(4)  # the draws that follow the save

    other = _model()  # the same frozen part; other trainable tensors and BN statistics
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.add_(1.0)
    opt2 = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=0.1)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    got = load_training_state(path, other, opt2, sched2)
    assert torch.equal(torch.rand(4), want_rng)
    _assert_same_state(_state(other), _state(model))
    assert got["epoch"] == 3 and got["nested"] == [(1, 2.5), {"a": None, 4: "x"}]
    assert torch.equal(got["t"], torch.arange(3)) and got["nan"] != got["nan"]
    assert sched2.state_dict() == sched.state_dict()
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k, v in s1["state"][i].items():
            assert torch.equal(s2["state"][i][k], v), (i, k)


def test_state_refuses_misfits_and_changes_nothing(tmp_path):
    model = _model()
    opt, sched = _trained_opt(model)
    path = str(tmp_path / "s.safetensors")
    save_training_state(path, model, opt, sched, {"k": 1})
    target = copy.deepcopy(model)
    params = [p for p in target.parameters() if p.requires_grad]

    two_groups = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    snap = _snapshot(target, two_groups)
    with pytest.raises(TrainingStateError, match="parameter groups of sizes"):
        load_training_state(path, target, two_groups)
    _assert_unchanged(target, snap, two_groups)

    opt3 = torch.optim.AdamW(params, lr=0.1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt3, T_max=5)
    snap = _snapshot(target, opt3)
    with pytest.raises(TrainingStateError, match="does not fit a CosineAnnealingLR"):
        load_training_state(path, target, opt3, cosine)
    _assert_unchanged(target, snap, opt3)

    # optimizer state of the wrong shapes (a forged file with a valid digest)
    bad = str(tmp_path / "bad.safetensors")
    shuffled = torch.optim.AdamW(params[::-1], lr=0.1)
    save_training_state(bad, model, opt, None, {})
    snap = _snapshot(target, shuffled)
    with pytest.raises(TrainingStateError, match=r"'exp_avg' has shape"):
        load_training_state(bad, target, shuffled)
    _assert_unchanged(target, snap, shuffled)

    # a checkpoint saved without optimizer or scheduler cannot fill one
    none = str(tmp_path / "none.safetensors")
    save_training_state(none, model, None, None, {})
    with pytest.raises(TrainingStateError, match="no optimizer state"):
        load_training_state(none, target, opt3)
    with pytest.raises(TrainingStateError, match="no LR scheduler state"):
        load_training_state(none, target, None, sched)


def test_state_refuses_what_it_cannot_store(tmp_path):
    with pytest.raises(TypeError, match="cannot store object"):
        save_training_state(str(tmp_path / "x.safetensors"), _model(), progress={"o": object()})
    assert os.listdir(tmp_path) == []


# ---- no pickle anywhere a user's file is read ------------------------------------------------
FORBIDDEN = [r"^\s*(import|from)\s+(pickle|cPickle|dill|cloudpickle|joblib)\b",
             r"\bpickle\.loads?\(", r"allow_pickle\s*=\s*True", r"\bjoblib\.load\("]


def _call_text(text, start):
    """The argument text of a call whose '(' ends at ``start``."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return text[start:]


def test_no_pickle_in_the_package():
    root = os.path.dirname(os.path.abspath(xf.__file__))
    offenders = []
    for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
        with open(path) as f:
            text = f.read()
        rel = os.path.relpath(path, root)
        offenders += [f"{rel}: {p}" for p in FORBIDDEN if re.search(p, text, re.M)]
        for m in re.finditer(r"\btorch\.load\(", text):
            if "weights_only=True" not in _call_text(text, m.end()):
                offenders.append(f"{rel}: torch.load without weights_only=True")
    assert not offenders
