"""How accurate are purified labels when no true labels exist? K-fold cross-validation over the trusted subset.

The trusted subset holds samples with both a given (noisy) label and a trusted one. Split it into K folds
(stratified by trusted label, seeded); for each fold, run the corrector with the other K-1 folds as the trusted
set, so the held-out fold's samples are treated like every untrusted sample (noisy label in, purified label
out), and score their purified labels against their trusted labels. Pooled over the folds every trusted sample
is scored once.

Class weights: a class-balanced trusted subset over-represents rare classes, so the per-class accuracies
acc_c are combined with the class shares pi_c of the untrusted rows, estimated from the corrector's own purified
labels on them (``class_prior``): estimate = sum_c pi_c acc_c. The 90% interval is Bayesian: acc_c ~
Beta(x_c + 1/2, n_c - x_c + 1/2) (Jeffreys prior; x_c of n_c held-out samples of class c correct), sampled and
combined with the same weights. Two known biases, stated with every estimate: each fold's corrector sees (K-1)/K
of the trusted labels, so the estimate leans pessimistic; trusted samples picked for being easy
(``trusted.source: knn_auto``) make it optimistic. None of the anchors (the authors' script, cleanlab, the
official LNL code) offers such an estimate.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from dmlp_plugin.errors import UserError


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Fold id (M,) in 0..folds-1 for each trusted sample: each class's samples dealt round-robin over the
    folds after a seeded shuffle, so every fold holds about 1/folds of each class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 11])
    fold = np.empty(labels.size, dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(members.size)]
        fold[members] = (np.arange(members.size) + offset) % folds
        offset += members.size  # the next class starts where this one stopped: folds stay even in size
    return fold


def class_weights(n_c: np.ndarray, class_prior: np.ndarray | None) -> np.ndarray:
    """The weights (C,) of per-class accuracies: ``class_prior`` renormalised over the classes with a scored
    sample (n_c > 0; a class with none cannot be estimated), or the scored samples' own shares when it is None
    (or puts no weight on a scored class)."""
    if class_prior is None:
        return n_c / max(n_c.sum(), 1.0)
    w = np.asarray(class_prior, dtype=np.float64).copy()
    w[n_c == 0] = 0.0
    return w / w.sum() if w.sum() > 0 else n_c / max(n_c.sum(), 1.0)


def weighted_point(correct: np.ndarray, labels: np.ndarray, num_classes: int,
                   class_prior: np.ndarray | None) -> float:
    """The point estimate of :func:`weighted_accuracy` alone (no interval): sum_c w_c x_c / n_c."""
    labels = np.asarray(labels, dtype=np.int64)
    n_c = np.bincount(labels, minlength=num_classes).astype(np.float64)
    x_c = np.bincount(labels, weights=np.asarray(correct, dtype=np.float64), minlength=num_classes)
    return float(np.sum(class_weights(n_c, class_prior) * np.divide(x_c, n_c, out=np.zeros_like(x_c), where=n_c > 0)))


def weighted_accuracy(correct: np.ndarray, labels: np.ndarray, num_classes: int, class_prior: np.ndarray | None,
                      level: float = 0.9, draws: int = 4000, seed: int = 0) -> dict:
    """Class-weighted accuracy of scored samples (``correct`` (M,) bool, ``labels`` their classes) with its
    Bayesian ``level`` interval (Jeffreys Beta per class, combined with the weights). class_prior: (C,) shares of
    the population to estimate for (None: the scored samples' own class shares)."""
    correct = np.asarray(correct, dtype=bool)
    labels = np.asarray(labels, dtype=np.int64)
    n_c = np.bincount(labels, minlength=num_classes).astype(np.float64)
    x_c = np.bincount(labels, weights=correct.astype(np.float64), minlength=num_classes)
    w = class_weights(n_c, class_prior)
    seen = n_c > 0
    acc_c = np.divide(x_c, n_c, out=np.zeros_like(x_c), where=seen)
    rng = np.random.default_rng([seed, 12])
    samples = np.zeros(draws)
    for c in np.flatnonzero(seen):
        samples += w[c] * rng.beta(x_c[c] + 0.5, n_c[c] - x_c[c] + 0.5, size=draws)
    lo, hi = np.quantile(samples, [(1 - level) / 2, 1 - (1 - level) / 2])
    est = float(np.sum(w * acc_c))
    # Jeffreys' interval misses an all-correct (or all-wrong) class's observed rate; as Brown, Cai and DasGupta
    # (2001) do for x = n (x = 0), the interval is extended to reach the point estimate
    lo, hi = min(float(lo), est), max(float(hi), est)
    return {"estimate": est, "low": lo, "high": hi, "level": level,
            "scored": int(n_c.sum()), "unweighted": float(correct.mean()) if correct.size else None,
            "classes_unscored": [int(c) for c in np.flatnonzero(~seen)]}


def cv_accuracy(correct_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], meta_idx: np.ndarray,
                meta_labels: np.ndarray, num_classes: int, folds: int = 5, seed: int = 0,
                class_prior: np.ndarray | None = None, level: float = 0.9) -> dict:
    """Estimated label accuracy of a corrector on the untrusted rows, without true labels (module docstring).

    correct_fn(trusted_idx, trusted_labels) -> (N,) purified hard labels, run with that trusted subset.
    meta_idx, meta_labels: the whole trusted subset. folds: K (2 <= K <= M). class_prior: (C,) class shares
    of the untrusted rows (e.g. the full run's purified labels on them). Returns the dict of
    :func:`weighted_accuracy` plus ``folds``, ``method`` and ``weights``."""
    meta_idx = np.asarray(meta_idx, dtype=np.int64)
    meta_labels = np.asarray(meta_labels, dtype=np.int64)
    m = meta_idx.size
    if not isinstance(folds, (int, np.integer)) or isinstance(folds, bool) or folds < 2:
        raise UserError(f"checks.estimate_folds={folds!r} must be an integer >= 2 (0 turns the estimate off)")
    if m < folds:
        raise UserError(f"checks.estimate_folds={folds} needs at least {folds} trusted samples, the subset has {m}; "
                        f"lower estimate_folds or give more trusted samples")
    fold = stratified_folds(meta_labels, folds, seed)
    correct = np.zeros(m, dtype=bool)
    for k in range(folds):
        held = fold == k
        hard = np.asarray(correct_fn(meta_idx[~held], meta_labels[~held]))
        correct[held] = hard[meta_idx[held]] == meta_labels[held]
    out = weighted_accuracy(correct, meta_labels, num_classes, class_prior, level=level, seed=seed)
    out.update({"folds": int(folds), "method": f"{folds}-fold cross-validation over the {m} trusted samples",
                "weights": "class shares of the untrusted rows' purified labels" if class_prior is not None
                else "the trusted samples' class shares"})
    return out
