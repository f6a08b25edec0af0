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


def fold_count(labels: np.ndarray, folds: int, tolerance: float = 0.05) -> int:
    """The number of folds to split a trusted subset into: ``folds``, unless that many folds cannot deal a small
    class's samples evenly; then the count in 2..folds+1 that deals every class most evenly (nearest to
    ``folds``, then the larger; at most one run more than asked).

    Why: a held-out sample's class is short of that sample in its fold's training set, and when a class's count
    is not a multiple of K, other classes are not short at the same time (4 a class over 5 folds: 3 of the
    held-out class beside 4 of others). A corrector that leans on class counts then errs against exactly the
    samples scored: trusted_only (a logistic regression) on digits' 40 trusted samples scored 0.60 at 5 folds,
    0.80 at 4 folds (each training set 3 of every class), truth 0.886. ``tolerance``: the largest shortfall
    (1 / the held-out class's training count) accepted as even: a class of 25 or more samples is."""
    labels = np.asarray(labels, dtype=np.int64)
    n_c = np.bincount(labels)
    n_c = n_c[n_c > 0].astype(np.float64)
    if n_c.size == 0:
        return folds

    def shortfall(k):  # the largest relative deficit of a held-out sample's class in its training set
        uneven = np.mod(n_c, k) != 0
        return float(np.max(np.where(uneven, 1.0 / np.maximum(n_c - np.ceil(n_c / k), 1.0), 0.0)))

    if shortfall(folds) <= tolerance:
        return folds
    ks = [k for k in range(2, folds + 2) if k <= labels.size]
    return min(ks, key=lambda k: (round(shortfall(k), 9), abs(k - folds), -k)) if ks else folds


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
                      level: float = 0.9) -> dict:
    """Class-weighted accuracy of scored samples (``correct`` (M,) bool, ``labels`` their classes) with its
    ``level`` interval. class_prior: (C,) shares of the population to estimate for (None: the scored samples' own
    class shares).

    The interval is Jeffreys' (Beta(x + 1/2, n - x + 1/2) quantiles) at the effective sample size of the weighted
    estimate (Korn and Graubard, 1998): n* = p(1 - p) / V, V = sum_c w_c^2 p'_c (1 - p'_c) / n_c, with each
    class's rate shrunk by one pseudo-sample towards the overall estimate p (p'_c = (x_c + p) / (n_c + 1)) so that
    a class scored all right or all wrong on a handful of samples still carries variance; n* = sum_c n_c when p
    is 0 or 1 (Kish's effective size then). Why not per-class Beta posteriors summed: with 4 samples a class, a
    Jeffreys prior pulls each class's 4/4 towards 0.9, and ten such pulls put the whole interval below the point
    estimate (digits, 40 trusted samples: 12 of 32 intervals missed the truth)."""
    correct = np.asarray(correct, dtype=bool)
    labels = np.asarray(labels, dtype=np.int64)
    n_c = np.bincount(labels, minlength=num_classes).astype(np.float64)
    x_c = np.bincount(labels, weights=correct.astype(np.float64), minlength=num_classes)
    w = class_weights(n_c, class_prior)
    seen = n_c > 0
    est = float(np.sum(w * np.divide(x_c, n_c, out=np.zeros_like(x_c), where=seen)))
    n_star = effective_size(est, x_c, n_c, w)
    lo, hi = jeffreys_interval(est, n_star, level)
    return {"estimate": est, "low": lo, "high": hi, "level": level, "effective_size": round(n_star, 1),
            "scored": int(n_c.sum()), "unweighted": float(correct.mean()) if correct.size else None,
            "classes_unscored": [int(c) for c in np.flatnonzero(~seen)]}


def effective_size(est: float, x_c: np.ndarray, n_c: np.ndarray, w: np.ndarray) -> float:
    """n* of :func:`weighted_accuracy`: the number of independent samples whose plain accuracy would be as
    uncertain as the class-weighted estimate ``est`` from x_c right of n_c per class, weighted by w."""
    seen = n_c > 0
    kish = float(1.0 / np.sum(w[seen] ** 2 / n_c[seen])) if seen.any() else 0.0
    if not 0.0 < est < 1.0:
        return kish
    shrunk = (x_c[seen] + est) / (n_c[seen] + 1.0)
    var = float(np.sum(w[seen] ** 2 * shrunk * (1.0 - shrunk) / n_c[seen]))
    return est * (1.0 - est) / var if var > 0 else kish


def jeffreys_interval(est: float, n: float, level: float) -> tuple[float, float]:
    """Jeffreys' ``level`` interval for a rate ``est`` seen on ``n`` (effective) samples; the end at 0 or 1 when
    the estimate is there (Brown, Cai and DasGupta, 2001)."""
    from scipy.stats import beta  # noqa: PLC0415 - scipy comes with scikit-learn

    if n <= 0:
        return 0.0, 1.0
    a, b = est * n + 0.5, (1.0 - est) * n + 0.5
    tail = (1.0 - level) / 2
    lo = 0.0 if est <= 0.0 else float(beta.ppf(tail, a, b))
    hi = 1.0 if est >= 1.0 else float(beta.ppf(1.0 - tail, a, b))
    return min(lo, est), max(hi, est)


SMALL_CLASS = 25  # fewer trusted samples than this in some class: the learning-curve extension is measured


def held_out_correct(correct_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], meta_idx: np.ndarray,
                     meta_labels: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """(M,) bool: each trusted sample's purified label (from the run that trusts every other fold) is its
    trusted label. fold: (M,) fold ids 0..K-1."""
    correct = np.zeros(meta_idx.size, dtype=bool)
    for k in range(int(fold.max()) + 1):
        held = fold == k
        if held.any():
            hard = np.asarray(correct_fn(meta_idx[~held], meta_labels[~held]))
            correct[held] = hard[meta_idx[held]] == meta_labels[held]
    return correct


def learning_curve_gain(acc_k: float, acc_half: float, m: int, folds: int) -> float:
    """How much more accurate the corrector is with all m trusted samples than with (K-1)/K of them, from its
    accuracies with (K-1)/K (acc_k) and 1/2 (acc_half) of them, on the curve acc(n) = a - b / n (the inverse
    learning curve of a classifier's error): acc_k + gain = a. 0 when the curve does not rise."""
    n1, n2 = m * (folds - 1) / folds, m / 2
    if folds <= 2 or acc_k <= acc_half:
        return 0.0
    return float((acc_k - acc_half) * (1 / n1 - 1 / m) / (1 / n2 - 1 / n1))


def cv_accuracy(correct_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], meta_idx: np.ndarray,
                meta_labels: np.ndarray, num_classes: int, folds: int = 5, seed: int = 0,
                class_prior: np.ndarray | None = None, level: float = 0.9, details: dict | None = None) -> dict:
    """Estimated label accuracy of a corrector on the untrusted rows, without true labels (module docstring).

    correct_fn(trusted_idx, trusted_labels) -> (N,) purified hard labels, run with that trusted subset.
    meta_idx, meta_labels: the whole trusted subset. folds: K (2 <= K <= M; :func:`fold_count` may deal the
    classes more evenly with one fold fewer or more). class_prior: (C,) class shares of the untrusted rows (e.g.
    the full run's purified labels on them). details: a dict that receives ``correct``, the (M,) held-out
    correctness of the K-fold runs. Returns the dict of :func:`weighted_accuracy` plus ``folds``, ``method``,
    ``weights`` and, when some class has fewer than SMALL_CLASS trusted samples, ``learning_curve``: the
    estimate is of a corrector that saw (K-1)/K of the trusted labels, pessimistic on a steep learning curve
    (digits, 4 a class: trusted_only 0.80 estimated vs 0.886 true); two more runs (a 2-fold split) measure the
    curve, and the interval's upper end is raised to cover the accuracy extrapolated to all of them
    (:func:`learning_curve_gain`). The point estimate stays the measured one."""
    meta_idx = np.asarray(meta_idx, dtype=np.int64)
    meta_labels = np.asarray(meta_labels, dtype=np.int64)
    m = meta_idx.size
    if not isinstance(folds, (int, np.integer)) or isinstance(folds, bool) or folds < 2:
        raise UserError(f"checks.estimate_folds={folds!r} must be an integer >= 2 (0 turns the estimate off)")
    if m < folds:
        raise UserError(f"checks.estimate_folds={folds} needs at least {folds} trusted samples, the subset has {m}; "
                        f"lower estimate_folds or give more trusted samples")
    asked, folds = folds, fold_count(meta_labels, folds)
    correct = held_out_correct(correct_fn, meta_idx, meta_labels, stratified_folds(meta_labels, folds, seed))
    if details is not None:
        details["correct"] = correct
    out = weighted_accuracy(correct, meta_labels, num_classes, class_prior, level=level)
    counts = np.bincount(meta_labels)
    if folds > 2 and counts[counts > 0].min() < SMALL_CLASS:
        half = held_out_correct(correct_fn, meta_idx, meta_labels, stratified_folds(meta_labels, 2, seed))
        acc_half = weighted_point(half, meta_labels, num_classes, class_prior)
        gain = learning_curve_gain(out["estimate"], acc_half, m, folds)
        reach = jeffreys_interval(min(1.0, out["estimate"] + gain), out["effective_size"], level)[1]
        out["high"] = max(out["high"], reach)
        out["learning_curve"] = {"half": acc_half, "gain": gain, "extrapolated": min(1.0, out["estimate"] + gain),
                                 "note": "2-fold runs measure the curve; the interval's upper end covers the "
                                         "accuracy extrapolated to every trusted label"}
    why = "" if folds == asked else f" ({asked} asked; {folds} deal every class's samples evenly: fold_count)"
    out.update({"folds": int(folds), "method": f"{folds}-fold cross-validation over the {m} trusted samples{why}",
                "weights": "class shares of the untrusted rows' purified labels" if class_prior is not None
                else "the trusted samples' class shares"})
    return out
