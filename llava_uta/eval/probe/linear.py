"""Linear probes on cached features: logistic regression for small sets, MAE's BatchNorm + linear SGD for large ones.

Both standardise every feature with statistics of the training features only, the BatchNorm-without-affine that
MAE puts before its linear head (features of a frozen tower differ in scale by orders of magnitude across layers and
towers, which the probe should not be judged on):

  logreg  scikit-learn's multinomial LogisticRegression (L-BFGS, L2 penalty 1/C) on the standardised features. Exact
          and deterministic on up to tens of thousands of samples, and it has no learning rate or epochs to tune; the
          protocol CLIP's linear-probe evaluation uses. Several C values: each is fitted on 80 % of the training
          features, the best on the other 20 % is refitted on all of them.
  sgd     MAE's linear probe: BatchNorm1d(affine=False) + Linear (weights trunc-normal std 0.01), SGD momentum 0.9,
          no weight decay, lr = base_lr * batch / 256 with a linear warm-up (1/9 of the epochs, as 10 of MAE's 90)
          and a cosine decay. Scales to ImageNet-sized feature sets, where L-BFGS over all samples is too slow.
  auto    logreg up to AUTO_LOGREG_MAX training samples, sgd above.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

METHODS = ("auto", "logreg", "sgd")
AUTO_LOGREG_MAX = 20000


@dataclass
class ProbeResult:
    """Held-out accuracy of one linear probe and how it was fitted."""

    method: str
    top1: float
    top5: float
    n_train: int
    n_test: int
    num_classes: int
    C: float | None = None  # logreg: the inverse L2 strength used
    converged: bool = True  # logreg: L-BFGS reached its tolerance within max_iter
    val_top1: dict[str, float] | None = None  # logreg with several C: held-out top-1 of each

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def topk_hits(scores: Tensor, labels: Tensor, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores (k capped at the class count)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1).double().mean().item()


def majority_chance(train_labels: Sequence[int] | Tensor, test_labels: Sequence[int] | Tensor) -> float:
    """Accuracy on the test labels of always answering the most frequent training class (the image-blind floor)."""
    train = torch.as_tensor(train_labels)
    test = torch.as_tensor(test_labels)
    if not len(train) or not len(test):
        raise ValueError("majority_chance needs non-empty train and test labels")
    return (test == torch.bincount(train).argmax()).double().mean().item()


def _check(x: Tensor, y: Tensor, what: str) -> None:
    if x.dim() != 2 or y.dim() != 1 or len(x) != len(y):
        raise ValueError(f"{what}: features must be (N, D) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if not len(x):
        raise ValueError(f"{what}: no samples")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: features contain NaN or inf")


def _logreg(x: np.ndarray, y: np.ndarray, C: float, max_iter: int, seed: int):
    """A standardise + multinomial logistic regression pipeline, fitted; and whether L-BFGS converged."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    return model, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def _logreg_scores(model, x: np.ndarray, num_classes: int) -> Tensor:
    """Class probabilities (N, num_classes); classes absent from training get -1 so they never rank first."""
    proba = model.predict_proba(x)
    scores = torch.full((len(x), num_classes), -1.0, dtype=torch.float64)
    scores[:, torch.as_tensor(model.classes_)] = torch.as_tensor(proba)
    return scores


def fit_logreg(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int,
               Cs: Sequence[float] = (1.0,), max_iter: int = 1000, seed: int = 0) -> ProbeResult:
    """Logistic regression on standardised features; C picked on a 20 % split of train when several are given."""
    x, y = train_x.double().numpy(), train_y.numpy()
    val_top1 = None
    C = float(Cs[0])
    if len(Cs) > 1:
        perm = np.random.default_rng(seed).permutation(len(x))
        n_val = max(1, len(x) // 5)
        val, fit = perm[:n_val], perm[n_val:]
        val_top1 = {}
        for c in Cs:
            model, _ = _logreg(x[fit], y[fit], float(c), max_iter, seed)
            val_top1[str(c)] = topk_hits(_logreg_scores(model, x[val], num_classes), torch.as_tensor(y[val]), 1)
        C = float(max(Cs, key=lambda c: val_top1[str(c)]))  # the first of equals: list C from strong to weak
    model, converged = _logreg(x, y, C, max_iter, seed)
    scores = _logreg_scores(model, test_x.double().numpy(), num_classes)
    return ProbeResult("logreg", topk_hits(scores, test_y, 1), topk_hits(scores, test_y, 5), len(x), len(test_x),
                       num_classes, C=C, converged=converged, val_top1=val_top1)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The lr factor at `step`: linear warm-up over `warmup` steps, then a cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def fit_sgd(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int, epochs: int = 90,
            batch_size: int = 1024, base_lr: float = 0.1, seed: int = 0) -> ProbeResult:
    """MAE's linear probe (BatchNorm without affine + Linear, SGD, warm-up + cosine) on cached features."""
    generator = torch.Generator().manual_seed(seed)
    dim = train_x.shape[1]
    head = nn.Linear(dim, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.nn.init.trunc_normal_(torch.empty_like(head.weight), std=0.01, generator=generator))
        head.bias.zero_()
    probe = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), head)
    batch_size = min(batch_size, len(train_x))
    lr = base_lr * batch_size / 256
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, epochs // 9) * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
    x, y = train_x.float(), train_y.long()
    probe.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples for batch statistics
                continue
            loss = nn.functional.cross_entropy(probe(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    probe.eval()
    with torch.no_grad():
        scores = probe(test_x.float())
    return ProbeResult("sgd", topk_hits(scores, test_y, 1), topk_hits(scores, test_y, 5), len(x), len(test_x),
                       num_classes)


def fit_linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int,
                     method: str = "auto", Cs: Sequence[float] = (1.0,), max_iter: int = 1000, epochs: int = 90,
                     batch_size: int = 1024, base_lr: float = 0.1, seed: int = 0) -> ProbeResult:
    """Fit a linear probe on (train_x, train_y) and score top-1 / top-5 on (test_x, test_y); see the module doc."""
    train_y, test_y = torch.as_tensor(train_y).long(), torch.as_tensor(test_y).long()
    _check(train_x, train_y, "train")
    _check(test_x, test_y, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train features have {train_x.shape[1]} dims, test features {test_x.shape[1]}")
    if max(int(train_y.max()), int(test_y.max())) >= num_classes or min(int(train_y.min()), int(test_y.min())) < 0:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    if method not in METHODS:
        raise ValueError(f"unknown probe method {method!r}; expected one of {METHODS}")
    if method == "auto":
        method = "logreg" if len(train_x) <= AUTO_LOGREG_MAX else "sgd"
    if method == "logreg":
        if len(torch.unique(train_y)) < 2:
            raise ValueError("logistic regression needs at least two classes in the training labels")
        return fit_logreg(train_x, train_y, test_x, test_y, num_classes, Cs, max_iter, seed)
    return fit_sgd(train_x, train_y, test_x, test_y, num_classes, epochs, batch_size, base_lr, seed)
