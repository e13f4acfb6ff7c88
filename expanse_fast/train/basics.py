"""The "basics" of two-step training: per class, the most prototypical examples."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..layout import width as whole

METHODS = ("prototype", "medoid", "confidence")


@torch.no_grad()
def _batched(fn: Callable[[Tensor], Tensor], X: Tensor, batch_size: int) -> Tensor:
    parts = [fn(X[i:i + batch_size]) for i in range(0, len(X), batch_size)]
    if not isinstance(parts[0], Tensor):
        raise TypeError(f"it returned {type(parts[0]).__name__}, not one tensor of outputs")
    return torch.cat(parts)


def _first_non_finite(Z: Tensor) -> Optional[int]:
    """The first example (row of ``Z``) that holds a NaN or an infinity, or None."""
    if not Z.is_floating_point():
        return None
    bad = (~torch.isfinite(Z.reshape(len(Z), -1))).any(1).nonzero()
    return int(bad[0]) if len(bad) else None


def _medoid(Z: Tensor, chunk: int = 1024) -> Tensor:
    # The member with the smallest summed distance to the others; chunked so a large class
    # never builds its whole n x n distance matrix.
    sums = torch.cat([torch.cdist(Z[i:i + chunk], Z).sum(1) for i in range(0, len(Z), chunk)])
    return Z[int(torch.argmin(sums))]


@torch.no_grad()
def select_basics(X: Tensor, y: Tensor, per_class: int = 20, method: str = "prototype",
                  model: Optional[nn.Module] = None,
                  features: Optional[Callable[[Tensor], Tensor]] = None,
                  head: Optional[slice] = None, batch_size: int = 1024) -> Tensor:
    """Indices into ``X`` of the ``per_class`` most prototypical examples of every class
    (all of a class that has fewer), class by class, most prototypical first.

    method: "prototype" (nearest the class mean), "medoid" (nearest the class medoid),
        both in input space or in ``features(X)`` space when ``features`` is given;
        "confidence": highest probability of the true class under ``model`` (its outputs
        ``head``, a slice, if the labels refer to part of them).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    whole(per_class, "per_class", least=1)
    whole(batch_size, "batch_size", least=1)
    if not isinstance(X, Tensor):
        X = torch.as_tensor(X)  # (a NumPy array or a list)
    y = torch.as_tensor(y).to(X.device)  # scores, labels, indices on the data's device
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"y must be a 1-d tensor of integer class indices, got "
                         f"{y.dtype} of shape {tuple(y.shape)}")
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} examples but y has {len(y)}")
    if not len(X):
        return torch.zeros(0, dtype=torch.long, device=X.device)  # no class, no basics
    if method == "confidence":
        if model is None:
            raise ValueError('method="confidence" needs a model')
        if head is not None and not isinstance(head, slice):
            raise TypeError(f"head must be a slice of the model's outputs or None, got "
                            f"{type(head).__name__}")
        if not callable(model):
            raise TypeError(f'method="confidence" needs model to be callable (a module), got '
                            f"{type(model).__name__}")
        bad = _first_non_finite(X)
        if bad is not None:
            raise ValueError(f"select_basics: example {bad} holds a NaN or an infinity: "
                             "its confidence would rank it at random")
        modes = {}
        if isinstance(model, nn.Module):
            modes = {m: m.training for m in model.modules()}
            model.eval()
        try:
            logits = _batched(model, X, batch_size)
        except (RuntimeError, TypeError) as exc:  # (aten's dtype or shape errors, a tuple)
            raise ValueError(f'select_basics: method="confidence" could not run the model on '
                             f"X ({X.dtype}, shape {tuple(X.shape)}): {type(exc).__name__}: "
                             f"{exc}") from exc
        finally:
            for m, training in modes.items():
                m.training = training
        if head is not None:
            logits = logits[:, head]
        top = int(y.max())
        if top >= logits.shape[1] or int(y.min()) < 0:
            raise ValueError(f"label {top if top >= logits.shape[1] else int(y.min())} is not "
                             f"one of the {logits.shape[1]} outputs of model(X)"
                             f"{'[:, head]' if head is not None else ''}")
        # Negated so that "smaller is more prototypical" holds for every method.
        score = -logits.float().log_softmax(1).gather(1, y.long()[:, None]).squeeze(1)
    else:
        Z = _batched(features, X, batch_size) if features is not None else X
        Z = Z.reshape(len(Z), -1).double()  # float64: distance ties must not depend on order
        bad = _first_non_finite(Z)
        if bad is not None:
            raise ValueError(f"select_basics: example {bad} holds a NaN or an infinity"
                             f"{' (in features(X))' if features is not None else ''}: it would "
                             "make its whole class's distances NaN")
        score = torch.empty(len(Z), dtype=torch.float64, device=Z.device)
        for c in torch.unique(y):
            members = (y == c).nonzero().squeeze(1)
            Zc = Z[members]
            center = Zc.mean(0) if method == "prototype" else _medoid(Zc)
            score[members] = (Zc - center).norm(dim=1)
    chosen = []
    for c in torch.unique(y):
        members = (y == c).nonzero().squeeze(1)
        order = torch.sort(score[members], stable=True).indices[:per_class]
        chosen.append(members[order])
    return torch.cat(chosen).long()
