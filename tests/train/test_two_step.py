"""two_step: the step schedule, what trains and what must not, determinism, history."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import expanse_fast as xf
from expanse_fast.train import two_step


def _data(n, d=7, classes=3):
    return torch.randn(n, d), torch.randint(0, classes, (n,))


def _mlp(d=7, out=3):
    return nn.Sequential(nn.Linear(d, 11), nn.ReLU(), nn.Linear(11, out))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run(model, seed=0, **kw):
    torch.manual_seed(123)  # the data never depends on the training seed
    basics, full = _data(6), _data(29)
    kw = {"epochs": (2, 3), "batch_size": 8, "progress": False, "seed": seed, **kw}
    return two_step(model, basics, full, **kw)


def test_deterministic_for_a_seed():
    base = _mlp()
    a, b, c = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    ha = _run(a, seed=1, noise=0.3)
    hb = _run(b, seed=1, noise=0.3)
    hc = _run(c, seed=2, noise=0.3)
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r["loss"] for r in ha] == [r["loss"] for r in hb]
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert [r["loss"] for r in ha] != [r["loss"] for r in hc]


def test_callers_random_state_is_unchanged():
    torch.manual_seed(7)
    _mlp(), _data(9)
    want = torch.rand(4)
    torch.manual_seed(7)
    m, d = _mlp(), _data(9)
    two_step(m, None, d, epochs=(0, 2), noise=0.1, progress=False)
    assert torch.equal(torch.rand(4), want)


def test_only_trainable_parameters_change_and_reach_the_optimizer(monkeypatch):
    model = _mlp()
    model[0].weight.requires_grad_(False)
    seen = []
    real = torch.optim.AdamW

    def spy(params, **kw):
        params = list(params)
        seen.append({id(p) for p in params})
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    before = _state(model)
    _run(model, weight_decay=0.1)
    after = _state(model)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert seen == [trainable, trainable]  # one fresh optimizer per step
    assert torch.equal(before["0.weight"], after["0.weight"])
    for k in ("0.bias", "2.weight", "2.bias"):
        assert not torch.equal(before[k], after[k])


def test_expanded_model_keeps_frozen_weights_and_source_outputs():
    src = _mlp()
    big = xf.expand(src, width={"0": 5}, new_classes=3)
    frozen = {n: p.detach().clone() for n, p in big.named_parameters() if not p.requires_grad}
    new = {n: p.detach().clone() for n, p in big.named_parameters() if p.requires_grad}
    X = torch.randn(13, 7)
    with torch.no_grad():
        old_out = big(X)[:, :3].clone()
    hist = _run(big, head=slice(3, 6))
    assert frozen and new
    for n, p in big.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, new[n]), n
    with torch.no_grad():
        assert torch.equal(big(X)[:, :3], old_out)
    assert len(hist) == 5


def test_history_shape_eval_fn_and_callbacks():
    calls = []
    hist = _run(_mlp(), eval_fn=lambda m: {"val": float(not m.training)},
                callbacks=[lambda r, m: calls.append(r["epoch"])])
    assert [r["step"] for r in hist] == [1, 1, 2, 2, 2]
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4, 5]
    assert [r["step_epoch"] for r in hist] == [1, 2, 1, 2, 3]
    assert [r["examples"] for r in hist] == [6, 6, 29, 29, 29]
    assert all(r["val"] == 1.0 for r in hist)  # eval_fn sees the model in eval mode
    assert calls == [1, 2, 3, 4, 5]
    for r in hist:
        assert {"loss", "train_acc", "lr", "seconds"} <= set(r)
        assert 0.0 <= r["train_acc"] <= 1.0 and r["loss"] > 0


def test_a_callback_stops_training():
    hist = _run(_mlp(), callbacks=[lambda r, m: r["epoch"] == 3])
    assert len(hist) == 3


def test_every_callback_runs_in_the_epoch_one_stops():
    seen = []
    hist = _run(_mlp(), callbacks=[lambda r, m: seen.append("stop") or r["epoch"] == 2,
                                   lambda r, m: seen.append("log")])
    assert len(hist) == 2 and seen == ["stop", "log"] * 2


def test_eval_fn_may_not_overwrite_the_record():
    with pytest.raises(ValueError, match=r"eval_fn returned \['loss'\].* 'val_loss'"):
        _run(_mlp(), eval_fn=lambda m: {"loss": 0.0})


def test_one_step_and_learning_rates():
    hist = two_step(_mlp(), None, _data(10), epochs=(0, 2), lr=(0.5, 0.02), progress=False)
    assert [r["step"] for r in hist] == [2, 2] and hist[0]["lr"] == 0.02
    hist = _run(_mlp(), lr=(0.03, 0.01))
    assert [r["lr"] for r in hist] == [0.03, 0.03, 0.01, 0.01, 0.01]


def test_one_full_batch_epoch_is_one_adamw_step_on_the_head():
    # batch >= N: one epoch is one optimizer step, its loss the initial model's loss.
    torch.manual_seed(3)
    model = _mlp(out=5)
    X, y = _data(17, classes=2)
    ref = copy.deepcopy(model).double()
    hist = two_step(model, None, (X, y), epochs=(0, 1), lr=(0.0, 0.01), batch_size=64,
                    weight_decay=0.05, head=slice(3, 5), progress=False)
    loss = F.cross_entropy(ref(X.double())[:, 3:5], y)
    assert hist[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.05)
    loss.backward()
    opt.step()
    for (k, v), (_, w) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(v.double(), w, rtol=1e-5, atol=1e-6, msg=k)
    # outputs outside the head got no gradient: only weight decay moved their rows
    assert torch.allclose(model[2].weight[:3].double(), ref[2].weight[:3], atol=1e-7)


def test_head_outside_rows_untouched_without_weight_decay():
    model = _mlp(out=6)
    before = model[2].weight.detach().clone()
    _run(model, head=slice(3, 6), weight_decay=0.0)
    assert torch.equal(model[2].weight[:3], before[:3])
    assert not torch.equal(model[2].weight[3:], before[3:])


def test_replay_is_mixed_into_step_two_on_its_own_head():
    model = _mlp(out=6)
    before = model[2].weight.detach().clone()
    Xr, yr = _data(4, classes=3)
    hist = _run(model, head=slice(3, 6), weight_decay=0.0, replay=(Xr, yr, slice(0, 3)))
    assert [r["examples"] for r in hist] == [6, 6, 33, 33, 33]
    assert not torch.equal(model[2].weight[:3], before[:3])  # the replay head learned


def test_noise_only_in_step_two():
    base = _mlp()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    _run(a, epochs=(3, 0), noise=0.0)
    _run(b, epochs=(3, 0), noise=5.0)
    assert all(torch.equal(v, _state(b)[k]) for k, v in _state(a).items())
    c = copy.deepcopy(base)
    _run(c, epochs=(0, 1), noise=5.0)
    d = copy.deepcopy(base)
    _run(d, epochs=(0, 1), noise=0.0)
    assert any(not torch.equal(v, _state(d)[k]) for k, v in _state(c).items())


def test_augment_is_applied_in_step_two():
    seen = []

    def augment(x):
        seen.append(x.shape[0])
        return x.flip(1)

    _run(_mlp(), augment=augment)
    # (first, two examples: the up-front check runs step two's data as training will)
    assert seen[0] == 2 and sum(seen[1:]) == 3 * 29


def test_mode_is_restored():
    model = _mlp().eval()
    _run(model)
    assert not model.training
    model = _mlp().train()
    model[0].eval()  # each module comes back in its own mode
    _run(model)
    assert [m.training for m in model.modules()] == [True, False, True, True]


def test_errors():
    with pytest.raises(ValueError, match="basics"):
        two_step(_mlp(), None, _data(5), epochs=(1, 1), progress=False)
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        two_step(frozen, None, _data(5), epochs=(0, 1), progress=False)
    with pytest.raises(ValueError, match=r"epochs must be a pair \(step one, step two\)"):
        two_step(_mlp(), None, _data(5), epochs=(1,), progress=False)
    with pytest.raises(ValueError, match="examples"):
        two_step(_mlp(), None, (torch.randn(4, 7), torch.zeros(3, dtype=torch.long)),
                 epochs=(0, 1), progress=False)
    X = torch.randn(4, 7)
    with pytest.raises(TypeError,
                       match=r"full: y must hold integer class indices, got torch\.float32"):
        two_step(_mlp(), None, (X, torch.tensor([0.0, 1.0, 2.0, 0.7])), epochs=(0, 1),
                 progress=False)
    with pytest.raises(ValueError, match=r"basics: y must hold class indices >= 0, got -1"):
        two_step(_mlp(), (X, torch.tensor([0, -1, 1, 2])), _data(5), epochs=(1, 1),
                 progress=False)
    with pytest.raises(ValueError, match=r"epochs\[1\] > 0 needs full"):
        two_step(_mlp(), _data(5), None, epochs=(1, 1), progress=False)
    # the replay set is checked as the others are, before anything trains
    model = _mlp()
    before = _state(model)
    with pytest.raises(TypeError, match=r"replay: y must hold integer class indices"):
        two_step(model, None, _data(5), epochs=(0, 1), progress=False,
                 replay=(X, torch.tensor([0.0, 1.0, 2.0, 0.7]), None))
    with pytest.raises(ValueError, match=r"replay: X has 4 examples but y has 3"):
        two_step(model, None, _data(5), epochs=(0, 1), progress=False,
                 replay=(X, torch.tensor([0, 1, 2]), None))
    with pytest.raises(ValueError, match=r"replay must be \(X, y, head\)"):
        two_step(model, None, _data(5), epochs=(0, 1), progress=False, replay=(X, X))
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"epochs": 3}, ValueError, r"epochs must be a pair .*got 3"),
    ({"epochs": (0, 1.5)}, TypeError, r"epochs\[1\] must be an int, got float 1.5"),
    ({"epochs": (0, True)}, TypeError, r"epochs\[1\] must be an int, got bool True"),
    ({"epochs": (-1, 1)}, ValueError, r"epochs\[0\] must be >= 0, got -1"),
    ({"lr": (1e-3, float("nan"))}, ValueError, r"lr\[1\] must be a finite number >= 0"),
    ({"lr": 0.1}, ValueError, r"lr must be a pair"),
    ({"batch_size": 16.0}, TypeError, r"batch_size must be an int, got float 16.0"),
    ({"batch_size": 0}, ValueError, r"batch_size must be >= 1, got 0"),
    ({"noise": float("nan")}, ValueError, r"noise must be a finite standard deviation >= 0"),
    ({"noise": -0.5}, ValueError, r"noise must be a finite standard deviation >= 0"),
    ({"head": 1}, TypeError, r"head must be a slice of the model's outputs .* got int 1"),
    ({"callbacks": print}, TypeError, r"callbacks must be a list of callables.*\[fn\]"),
    ({"callbacks": [1]}, TypeError, r"callbacks\[0\] is not callable"),
    ({"weight_decay": -1.0}, ValueError, r"weight_decay must be a finite number >= 0"),
    ({"weight_decay": float("nan")}, ValueError, r"weight_decay must be a finite number"),
    ({"seed": 1.5}, ValueError, r"seed must be a whole number in \[0, 2\*\*63\), got 1.5"),
    ({"seed": "a"}, ValueError, r"seed must be a whole number .* got 'a'"),
    ({"seed": 2 ** 64}, ValueError, r"seed must be a whole number"),
    ({"eval_fn": 3}, TypeError, r"eval_fn must be a callable model -> dict, got int"),
    ({"full": torch.zeros(4, 7)}, TypeError, r"full must be an \(X, y\) pair, got a tensor"),
    ({"full": (torch.randn(4, 7), torch.zeros(4, 1, dtype=torch.long))}, ValueError,
     r"full: y must be a 1-d tensor of class indices, got shape \(4, 1\)"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_settings_of_the_wrong_kind_are_refused_before_training(kwargs, error, pattern):
    model = _mlp().eval()
    before = _state(model)
    args = dict(basics=None, full=_data(5), epochs=(0, 1), progress=False)
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        two_step(model, **args)
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())
    assert not model.training


@pytest.mark.parametrize("bad_full, pattern", [
    (lambda: (torch.randn(6, 7), torch.tensor([0, 1, 2, 3, 4, 5])),
     r"full: label 5 is past the 3 outputs of model\(X\)\[:, :\]"),
    (lambda: (torch.randn(6, 9), torch.zeros(6, dtype=torch.long)),
     r"full: the model fails on its first examples \(shape \(9,\)"),
    (lambda: (torch.randn(6, 7, dtype=torch.float64), torch.zeros(6, dtype=torch.long)),
     r"full: the model fails on its first examples .* dtype torch.float64"),
], ids=["label past the outputs", "width", "dtype"])
def test_data_that_does_not_fit_is_refused_before_step_one_trains(bad_full, pattern):
    """Step two's data was first seen after step one had trained: the error came with the
    weights changed.  Each set now runs once through the model (eval mode) first."""
    model = _mlp().eval()
    before = _state(model)
    with pytest.raises(ValueError, match=pattern):
        two_step(model, _data(5), bad_full(), epochs=(2, 1), progress=False)
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())
    assert not model.training  # its mode is put back after an error too
    with pytest.raises(ValueError, match=r"replay: label 4 is past the 2 outputs of "
                                         r"model\(X\)\[:, 1:3\]"):
        two_step(model, _data(5), _data(5), epochs=(1, 1), progress=False,
                 replay=(torch.randn(3, 7), torch.tensor([0, 1, 4]), slice(1, 3)))
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())


def test_numpy_data_is_taken():
    X, y = _data(8)
    history = two_step(_mlp(), None, (X.numpy(), y.numpy()), epochs=(0, 1), progress=False)
    assert len(history) == 1


def test_the_mode_is_put_back_when_a_callback_raises():
    model = _mlp().eval()

    def boom(record, m):
        raise RuntimeError("callback failed")
    with pytest.raises(RuntimeError, match="callback failed"):
        two_step(model, None, _data(5), epochs=(0, 1), progress=False, callbacks=[boom])
    assert not any(m.training for m in model.modules())


def test_an_empty_data_set_is_refused_where_it_would_train():
    empty = (torch.randn(0, 7), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"basics holds no examples, but epochs\[0\] = 2 .* "
                                         r"epochs=\(0, e\)"):
        two_step(_mlp(), empty, _data(5), epochs=(2, 1), progress=False)
    with pytest.raises(ValueError, match=r"full holds no examples, but epochs\[1\] = 1"):
        two_step(_mlp(), _data(5), empty, epochs=(1, 1), progress=False)
    # where nothing trains on it, an empty set is no error
    history = two_step(_mlp(), empty, _data(5), epochs=(0, 1), progress=False)
    assert len(history) == 1


def test_a_last_batch_of_one_joins_the_batch_before():
    """A BatchNorm model trains on 17 examples in batches of 8 (the last would be one)."""
    from expanse_fast.train.two_step import _batches
    assert _batches(17, 8) == [(0, 8), (8, 17)]
    assert _batches(18, 8) == [(0, 8), (8, 16), (16, 18)]
    assert _batches(1, 8) == [(0, 1)] and _batches(3, 1) == [(0, 1), (1, 2), (2, 3)]
    model = nn.Sequential(nn.Linear(7, 11), nn.BatchNorm1d(11), nn.ReLU(), nn.Linear(11, 3))
    hist = two_step(model, None, _data(17), epochs=(0, 2), batch_size=8, progress=False)
    assert len(hist) == 2 and all(r["examples"] == 17 for r in hist)


def test_the_up_front_check_runs_step_two_through_its_augment():
    """A crop that makes step two's inputs fit the model: its raw data do not."""
    crop = lambda xb: xb[:, :7]  # noqa: E731
    history = two_step(_mlp(), _data(6), _data(9, d=10), epochs=(1, 1), augment=crop,
                       progress=False)
    assert len(history) == 2


def test_the_up_front_check_takes_two_examples():
    """A model that squeezes its output trains (no batch is ever one example) and must not
    be refused by a check on one example."""
    squeeze = type("Squeeze", (nn.Module,), {"forward": lambda self, x: x.squeeze()})()
    model = nn.Sequential(nn.Linear(7, 3), squeeze)
    history = two_step(model, None, _data(9), epochs=(0, 1), batch_size=4, progress=False)
    assert len(history) == 1


def test_an_augment_that_works_in_place_leaves_the_callers_data():
    """The up-front check runs augment on the first examples: on a copy, as training does
    on its batches (an in-place augment changed the caller's first two examples)."""
    X, y = _data(10)
    Xn = X.numpy().copy()
    before = X.clone()
    two_step(_mlp(), None, (X, y), epochs=(0, 1), augment=lambda xb: xb.add_(1.0),
             progress=False)
    assert torch.equal(X, before)
    two_step(_mlp(), None, (Xn, y.numpy()), epochs=(0, 1), augment=lambda xb: xb.add_(1.0),
             progress=False)
    assert (Xn == before.numpy()).all()


def test_an_eval_fn_that_returns_no_dict_is_named():
    with pytest.raises(TypeError, match=r"eval_fn must return a dict of metrics .* got float "
                                        r"0.5: e.g. \{'val_acc': 0.5\}"):
        two_step(_mlp(), None, _data(9), epochs=(0, 1), eval_fn=lambda m: 0.5,
                 progress=False)
