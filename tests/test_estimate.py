"""The label-accuracy estimate without true labels (K-fold CV over the trusted subset), on known answers."""

import numpy as np
import pytest

from dmlp_plugin.errors import UserError
from dmlp_plugin.estimate import cv_accuracy, fold_count, stratified_folds, weighted_accuracy

C = 4


def _population(n=20000, seed=0):
    rng = np.random.default_rng(seed)
    prior = np.array([0.55, 0.25, 0.15, 0.05])  # imbalanced classes
    truth = rng.choice(C, n, p=prior)
    wrong_rate = np.array([0.05, 0.2, 0.4, 0.6])  # the corrector is worse on rare classes
    wrong = rng.random(n) < wrong_rate[truth]
    hard = np.where(wrong, (truth + 1 + rng.integers(0, C - 1, n)) % C, truth)
    return truth, hard, prior


def test_folds_are_stratified_and_cover_every_sample():
    labels = np.repeat(np.arange(5), [10, 7, 3, 1, 9])
    fold = stratified_folds(labels, 5, seed=0)
    assert set(fold.tolist()) == set(range(5)) and fold.shape == labels.shape
    for c in range(5):
        counts = np.bincount(fold[labels == c], minlength=5)
        assert counts.max() - counts.min() <= 1
    assert np.array_equal(fold, stratified_folds(labels, 5, seed=0))


def test_class_weighted_estimate_recovers_the_population_accuracy_of_a_balanced_trusted_subset():
    truth, hard, prior = _population()
    true_acc = float(np.mean(hard == truth))  # ~0.83, pulled by the big, easy class
    rng = np.random.default_rng(1)
    meta = np.concatenate([rng.choice(np.flatnonzero(truth == c), 100, replace=False) for c in range(C)])
    correct = hard[meta] == truth[meta]
    plain = weighted_accuracy(correct, truth[meta], C, None)
    weighted = weighted_accuracy(correct, truth[meta], C, prior)
    assert abs(plain["estimate"] - true_acc) > 0.1  # unweighted, a balanced subset misleads (~0.69)
    assert abs(weighted["estimate"] - true_acc) < 0.03
    assert weighted["low"] <= true_acc <= weighted["high"] and weighted["high"] - weighted["low"] < 0.1


def test_interval_covers_the_truth_about_as_often_as_it_says():
    truth, hard, prior = _population(seed=2)
    true_acc = float(np.mean(hard == truth))
    covered = 0
    for rep in range(200):
        rng = np.random.default_rng(100 + rep)
        meta = np.concatenate([rng.choice(np.flatnonzero(truth == c), 25, replace=False) for c in range(C)])
        r = weighted_accuracy(hard[meta] == truth[meta], truth[meta], C, prior)
        covered += r["low"] <= true_acc <= r["high"]
    assert 0.82 <= covered / 200 <= 0.97  # a 90% interval


def test_cv_runs_the_corrector_once_per_fold_with_the_held_out_fold_untrusted():
    truth, hard, prior = _population(n=3000, seed=3)
    meta = np.sort(np.random.default_rng(4).choice(3000, 200, replace=False))
    calls = []

    def corrector(idx, labels):
        calls.append(set(idx.tolist()))
        assert np.array_equal(labels, truth[idx])
        out = hard.copy()
        out[idx] = labels  # trusted rows keep their trusted labels, as every preprocessor does
        return out

    r = cv_accuracy(corrector, meta, truth[meta], C, folds=5, class_prior=prior)
    fold = stratified_folds(truth[meta], r["folds"], 0)
    k = r["folds"]
    assert k == fold_count(truth[meta], 5) and len(calls) == k + 2  # + the 2-fold runs of a small class
    assert "learning_curve" in r and min(np.bincount(truth[meta])) < 25
    assert [len(s) for s in calls[:k]] == [200 - int(np.sum(fold == f)) for f in range(k)]
    assert set.union(*[set(meta.tolist()) - s for s in calls[:k]]) == set(meta.tolist())  # each scored once
    assert r["scored"] == 200
    assert abs(r["estimate"] - np.mean(hard == truth)) < 0.08


def test_bad_fold_counts_are_clear_errors():
    with pytest.raises(UserError, match="estimate_folds=1 must be an integer >= 2"):
        cv_accuracy(lambda i, l: None, np.arange(10), np.zeros(10, int), 2, folds=1)
    with pytest.raises(UserError, match="needs at least 5 trusted samples, the subset has 3"):
        cv_accuracy(lambda i, l: None, np.arange(3), np.zeros(3, int), 2, folds=5)


def test_an_all_correct_subset_gets_an_interval_that_reaches_its_estimate():
    labels = np.repeat(np.arange(C), 10)
    r = weighted_accuracy(np.ones(labels.size, bool), labels, C, None)
    assert r["estimate"] == 1.0 and r["high"] == 1.0 and 0.85 < r["low"] < 1.0
    r = weighted_accuracy(np.zeros(labels.size, bool), labels, C, None)
    assert r["estimate"] == 0.0 and r["low"] == 0.0 and r["high"] < 0.15


def test_interval_covers_the_truth_with_four_samples_a_class():
    """digits' case: 40 trusted samples (4 of each of 10 classes), a corrector right on ~97% of the rows; summed
    per-class Jeffreys posteriors put the interval below the estimate here, the effective-size interval covers."""
    c, n = 10, 20000
    rng = np.random.default_rng(5)
    truth = rng.integers(0, c, n)
    wrong = rng.random(n) < np.linspace(0.0, 0.07, c)[truth]
    true_acc = 1.0 - float(wrong.mean())
    prior = np.bincount(truth, minlength=c) / n
    covered = 0
    for rep in range(300):
        r_rng = np.random.default_rng(200 + rep)
        meta = np.concatenate([r_rng.choice(np.flatnonzero(truth == k), 4, replace=False) for k in range(c)])
        r = weighted_accuracy(~wrong[meta], truth[meta], c, prior)
        covered += r["low"] <= true_acc <= r["high"]
    assert 0.85 <= covered / 300 <= 0.99


def test_fold_count_deals_every_class_evenly():
    assert fold_count(np.repeat(np.arange(10), 4), 5) == 4     # digits: 4 a class
    assert fold_count(np.repeat(np.arange(10), 12), 5) == 6    # mnist5k: 12 a class (4 and 6 tie; the larger)
    assert fold_count(np.repeat(np.arange(10), 100), 5) == 5   # Fashion-MNIST: 100 a class
    assert fold_count(np.repeat(np.arange(3), [99, 101, 250]), 5) == 5  # uneven but large: 1/80 shortfall


def test_cv_is_not_biased_against_the_held_out_class():
    """A corrector that errs on every class with fewer trusted samples than the others (count-sensitive, like a
    regularised classifier's intercept) is right everywhere with the whole balanced subset; its estimate must say
    so. At 5 folds over 4 a class each held-out sample's class would be the short one, estimate 0."""
    c = 10
    truth = np.repeat(np.arange(c), 50)
    meta = np.concatenate([np.flatnonzero(truth == k)[:4] for k in range(c)])

    def corrector(idx, labels):
        counts = np.bincount(labels, minlength=c)
        return np.where(counts[truth] < counts.max(), (truth + 1) % c, truth)

    r = cv_accuracy(corrector, meta, truth[meta], c, folds=5)
    assert r["folds"] == 4 and r["estimate"] == 1.0 and "5 asked" in r["method"]


def test_small_trusted_subset_interval_reaches_the_accuracy_with_every_trusted_label():
    """A corrector on a known learning curve, acc(n) = 1 - 60/n with n trusted labels (0.85 with all 400, 0.8125
    with the 320 of a 5-fold run): the estimate measures 0.81, and the 2-fold runs extend the interval to 0.85."""
    c, per = 20, 20
    truth = np.repeat(np.arange(c), 200)
    meta = np.concatenate([np.flatnonzero(truth == k)[:per] for k in range(c)])
    u = np.random.default_rng(7).random(truth.size)  # a fixed difficulty per row, evenly spread on the trusted
    u[meta] = np.random.default_rng(8).permutation((np.arange(meta.size) + 0.5) / meta.size)

    def corrector(idx, labels):
        acc = 1.0 - 60.0 / idx.size
        return np.where(u < acc, truth, (truth + 1) % c)

    r = cv_accuracy(corrector, meta, truth[meta], c, folds=5)
    lc = r["learning_curve"]
    assert r["folds"] == 5 and abs(r["estimate"] - 0.8125) < 0.01 and abs(lc["half"] - 0.7) < 0.01
    assert abs(lc["extrapolated"] - 0.85) < 0.01 and r["high"] >= 0.85 > r["estimate"]
    # a large subset (25 or more a class) keeps the plain interval: no extra runs
    big = np.concatenate([np.flatnonzero(truth == k)[:30] for k in range(c)])
    calls = []
    r = cv_accuracy(lambda i, l: calls.append(1) or corrector(i, l), big, truth[big], c, folds=5)
    assert "learning_curve" not in r and len(calls) == 5
