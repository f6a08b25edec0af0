"""The label-accuracy estimate without true labels (K-fold CV over the trusted subset), on known answers."""

import numpy as np
import pytest

from dmlp_plugin.errors import UserError
from dmlp_plugin.estimate import cv_accuracy, stratified_folds, weighted_accuracy

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
        r = weighted_accuracy(hard[meta] == truth[meta], truth[meta], C, prior, seed=rep)
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
    assert len(calls) == 5 and all(len(s) == 160 for s in calls)
    assert set.union(*[set(meta.tolist()) - s for s in calls]) == set(meta.tolist())  # each scored once
    assert r["scored"] == 200 and r["folds"] == 5
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
