"""faiss neighbour checks: search, agreement, weighted vote, automatic trusted-set selection."""

import numpy as np
import pytest

from benchmarks.synthetic import clustered_features, symmetric_noise
from dmlp_plugin.checks import knn


def test_faiss_and_torch_backends_agree():
    x, _ = clustered_features(500, 16, 4, seed=0)
    s1, i1 = knn.search(x, 5, backend="faiss-cpu")
    s2, i2 = knn.search(x, 5, backend="torch")
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    assert np.mean(i1 == i2) > 0.99  # ties may order differently
    assert not np.any(i1 == np.arange(500)[:, None])  # a sample is not its own neighbour


def test_search_with_queries_returns_nearest_rows():
    x = np.eye(4, dtype=np.float32)
    q = np.array([[0.9, 0.1, 0, 0]], dtype=np.float32)
    _, idx = knn.search(x, 2, queries=q, backend="torch")
    assert idx[0, 0] == 0


def test_vote_recovers_majority_and_agreement_flags_noise():
    x, y = clustered_features(2000, 32, 5, spread=1.0, seed=1)
    noisy = symmetric_noise(y, 0.4, 5, seed=2)
    sims, idx = knn.search(x, 20)
    voted = knn.vote(sims, idx, noisy, 5).argmax(1)
    assert np.mean(voted == y) > 0.95 > np.mean(noisy == y)
    agree = knn.neighbour_agreement(idx, noisy)
    assert agree[noisy == y].mean() > agree[noisy != y].mean() + 0.3


def test_select_meta_is_balanced_and_cleaner_than_the_noisy_labels():
    x, y = clustered_features(3000, 32, 6, spread=1.5, seed=3)
    noisy = symmetric_noise(y, 0.6, 6, seed=4)
    chosen = knn.select_meta(x, noisy, 6, 60, k=10)
    assert len(chosen) == 60
    assert np.all(np.bincount(noisy[chosen], minlength=6) == 10)
    assert np.mean(noisy[chosen] == y[chosen]) > 0.9 > np.mean(noisy == y)


def test_backend_name_is_known():
    assert knn.backend_name() in {"faiss-gpu", "faiss-cpu", "torch"}


def test_trusted_separability_flags_features_in_another_order():
    # 10 well-separated classes: the trusted samples' 1-NN among themselves is right; the same features with
    # their rows shuffled (a user's features in another order than the data set's) score at chance
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 32)) * 3
    y = np.repeat(np.arange(10), 100)
    x = (centres[y] + rng.normal(size=(1000, 32))).astype(np.float32)
    meta = np.concatenate([np.where(y == c)[0][:4] for c in range(10)])
    good = knn.trusted_separability(x, meta, y[meta])
    assert good["accuracy"] == 1.0 and not good["at_chance"] and good["trusted"] == 40
    assert good["chance"] == pytest.approx(3 / 39)
    bad = knn.trusted_separability(x[rng.permutation(1000)], meta, y[meta])
    assert bad["at_chance"] and bad["accuracy"] < 0.25
    assert knn.trusted_separability(x, meta[::4], y[meta[::4]]) is None  # one per class: nothing to measure
