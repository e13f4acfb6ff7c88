"""select_basics against brute-force float64 references on fresh random data."""
import numpy as np
import pytest
import torch
from torch import nn

from expanse_fast.train import select_basics

SIZES = (1, 7, 13)  # a class smaller than per_class, odd sizes


def _data(dim=5):
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(SIZES)])
    y = y[torch.randperm(len(y))]  # classes interleaved, not in blocks
    X = torch.randn(len(y), dim) + 3 * y[:, None].float()
    return X, y


def _reference(score, y, per_class):
    out = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        out += list(members[np.argsort(score[members], kind="stable")[:per_class]])
    return out


def _distances(Z, y, center_of):
    score = np.empty(len(Z))
    for c in np.unique(y):
        m = y == c
        score[m] = np.linalg.norm(Z[m] - center_of(Z[m]), axis=1)
    return score


def _mean(Zc):
    return Zc.mean(0)


def _medoid(Zc):
    d = np.linalg.norm(Zc[:, None] - Zc[None], axis=2).sum(1)
    return Zc[np.argmin(d)]


@pytest.mark.parametrize("method,center", [("prototype", _mean), ("medoid", _medoid)])
@pytest.mark.parametrize("per_class", [1, 5])
def test_nearest_the_center(method, center, per_class):
    X, y = _data()
    got = select_basics(X, y, per_class=per_class, method=method)
    Z, yn = X.double().numpy(), y.numpy()
    want = _reference(_distances(Z, yn, center), yn, per_class)
    assert got.dtype == torch.long
    assert got.tolist() == want
    assert len(got) == sum(min(n, per_class) for n in SIZES)


def test_in_feature_space():
    X, y = _data(dim=6)
    W = torch.randn(6, 3)
    got = select_basics(X, y, per_class=4, features=lambda x: torch.relu(x @ W))
    Z = torch.relu(X.double() @ W.double()).numpy()
    want = _reference(_distances(Z, y.numpy(), _mean), y.numpy(), 4)
    assert got.tolist() == want


def test_images_are_flattened():
    X, y = _data(dim=12)
    got = select_basics(X.reshape(-1, 1, 3, 4), y, per_class=3)
    assert got.tolist() == select_basics(X, y, per_class=3).tolist()


def test_confidence_uses_the_head_and_restores_mode():
    X, y = _data(dim=4)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5))  # dropout: must run in eval mode
    model.train()
    head = slice(2, 5)
    got = select_basics(X, y, per_class=3, method="confidence", model=model, head=head)
    assert model.training
    lin = model[0]
    logits = (X.double() @ lin.weight.double().T + lin.bias.double())[:, head]
    p = torch.softmax(logits, 1).gather(1, y[:, None]).squeeze(1).detach().numpy()
    assert got.tolist() == _reference(-p, y.numpy(), 3)


def test_confidence_restores_each_modules_own_mode():
    X, y = _data(dim=4)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5))
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a model in training
    select_basics(X, y, per_class=3, method="confidence", model=model)
    assert [m.training for m in model] == [True, False, True] and model.training


@pytest.mark.parametrize("model, error, pattern", [
    (lambda: _TupleModel(), ValueError, r"could not run the model .* returned tuple"),
    (lambda: nn.Linear(4, 6).double(), ValueError,
     r"could not run the model on X \(torch.float32.*dtype"),
    (lambda: 3, TypeError, r"needs model to be callable \(a module\), got int"),
])
def test_confidence_names_a_model_it_cannot_run(model, error, pattern):
    X, y = _data(dim=4)
    with pytest.raises(error, match=pattern):
        select_basics(X, y, per_class=3, method="confidence", model=model())


def test_confidence_refuses_a_non_finite_example_and_takes_a_function():
    X, y = _data(dim=4)
    lin = nn.Linear(4, 6)
    assert torch.equal(select_basics(X, y, per_class=3, method="confidence", model=lin),
                       select_basics(X, y, per_class=3, method="confidence",
                                     model=lambda x: lin(x)))
    X = X.clone()
    X[5, 0] = float("nan")
    with pytest.raises(ValueError, match="example 5 holds a NaN or an infinity"):
        select_basics(X, y, per_class=3, method="confidence", model=lin)


class _TupleModel(nn.Module):
    def forward(self, x):
        return x, x


def test_errors():
    X, y = _data()
    with pytest.raises(ValueError, match="method"):
        select_basics(X, y, method="random")
    with pytest.raises(ValueError, match="needs a model"):
        select_basics(X, y, method="confidence")
    with pytest.raises(ValueError, match="per_class"):
        select_basics(X, y, per_class=0)
    with pytest.raises(ValueError, match="examples"):
        select_basics(X, y[:-1])


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["prototype", "medoid"])
def test_select_basics_on_cuda_matches_cpu(method):
    """Scores and indices live on the data's device (the score buffer was a CPU tensor)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from expanse_fast.train import select_basics
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(60, 5, generator=g), torch.randint(0, 4, (60,), generator=g)
    on_cpu = select_basics(X, y, per_class=3, method=method)
    on_gpu = select_basics(X.cuda(), y.cuda(), per_class=3, method=method)
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), on_cpu)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_example_is_named(bad):
    X, y = torch.randn(10, 3), torch.arange(10) % 2
    X[7, 1] = bad
    with pytest.raises(ValueError, match="example 7 holds a NaN or an infinity"):
        select_basics(X, y, per_class=2)


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"y": torch.nn.functional.one_hot(torch.arange(12) % 3)}, ValueError,
     r"y must be a 1-d tensor of integer class indices, got torch.int64 of shape \(12, 3\)"),
    ({"y": (torch.arange(12) % 3).float()}, ValueError, r"integer class indices, got "
                                                        r"torch.float32"),
    ({"per_class": 2.5}, TypeError, r"per_class must be an int, got float 2.5"),
    ({"per_class": True}, TypeError, r"per_class must be an int, got bool True"),
    ({"per_class": 0}, ValueError, r"per_class must be >= 1, got 0"),
    ({"method": "confidence", "model": torch.nn.Linear(5, 2)}, ValueError,
     r"label 2 is not one of the 2 outputs of model\(X\)"),
    ({"method": "confidence", "model": torch.nn.Linear(5, 3), "head": slice(5, 8)},
     ValueError, r"label \d is not one of the 0 outputs of model\(X\)\[:, head\]"),
], ids=["one-hot", "float labels", "fractional count", "bool count", "zero count",
        "label past the outputs", "head past the outputs"])
def test_arguments_of_the_wrong_kind_are_named(kwargs, error, pattern):
    args = dict(X=torch.randn(12, 5), y=torch.arange(12) % 3)
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        select_basics(**args)


def test_arrays_and_empty_data_are_taken():
    X, y = torch.randn(12, 5), torch.arange(12) % 3
    assert torch.equal(select_basics(X.numpy(), y.numpy(), per_class=2),
                       select_basics(X, y, per_class=2))
    assert select_basics(X.tolist(), y.tolist(), per_class=2).shape == (6,)
    empty = select_basics(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,) and empty.dtype == torch.long
