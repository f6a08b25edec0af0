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


# ---------------------------------------------------------------------------------------------------------
# the knn_vote comparison: a wide k grid from one search per view set, on each view and on the views joined


def test_vote_at_every_k_from_one_search_equals_a_fresh_search_at_that_k():
    x, y = clustered_features(600, 16, 4, spread=1.5, seed=5)
    noisy = symmetric_noise(y, 0.5, 4, seed=6)
    ks = [1, 5, 10, 20, 50]
    sims, idx = knn.search(x, max(ks))
    votes = knn.vote_at(sims, idx, noisy, 4, ks)
    assert sorted(votes) == ks
    for k in ks:
        s_k, i_k = knn.search(x, k)
        np.testing.assert_array_equal(idx[:, :k], i_k)
        np.testing.assert_allclose(votes[k], knn.vote(s_k, i_k, noisy, 4), atol=1e-6)
    with pytest.raises(ValueError, match="must lie in"):
        knn.vote_at(sims, idx, noisy, 4, [51])


def test_sweep_matches_the_preprocessor_run_at_each_k_and_view_set():
    from dmlp_plugin.purifier.preprocessors import KnnVote
    from dmlp_plugin.records import PurifyInputs

    x, y = clustered_features(500, 16, 4, spread=1.5, seed=7)
    x2, _ = clustered_features(500, 8, 4, spread=1.0, seed=8)
    noisy = symmetric_noise(y, 0.5, 4, seed=9)
    meta = np.arange(0, 500, 25)
    inp = PurifyInputs(views=[x, x2], noisy=noisy, meta_idx=meta, meta_labels=y[meta], num_classes=4)
    swept = {w: (hard, s) for w, hard, s in KnnVote().sweep(inp, [5, 30], ["1", "2", "all"])}
    assert sorted(swept) == ["1", "2", "all"] and all(s >= 0 for _, s in swept.values())
    for which, (hard, _) in swept.items():
        for k in (5, 30):
            one = KnnVote(k=k, views=which).purify(inp)
            np.testing.assert_array_equal(hard[k], one.hard)
            np.testing.assert_array_equal(hard[k][meta], y[meta])  # trusted rows keep their trusted labels


def _ambiguous_views(n=2000, seed=0):
    # 4 classes = 2 bits; view 1 sees only the first bit, view 2 only the second: each view alone puts two
    # classes in one blob (a vote there is a coin flip between them), the views joined separate all four
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    centres = rng.normal(size=(2, 2, 16)) * 3

    def view(bit):
        v = centres[bit, (y >> bit) & 1] + rng.normal(size=(n, 16))
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    return [view(1), view(0)], y


def test_the_joined_views_are_searched_and_beat_each_view_alone():
    from dmlp_plugin.purifier.preprocessors import KnnVote
    from dmlp_plugin.records import PurifyInputs

    views, y = _ambiguous_views()
    noisy = symmetric_noise(y, 0.4, 4, seed=1)
    meta = np.arange(0, 2000, 50)
    inp = PurifyInputs(views=views, noisy=noisy, meta_idx=meta, meta_labels=y[meta], num_classes=4)
    acc = {w: float(np.mean(KnnVote(k=20, views=w).purify(inp).hard == y)) for w in ("1", "2", "all")}
    assert acc["all"] > 0.95 and max(acc["1"], acc["2"]) < 0.7, acc
    joined = knn.view_set(views, "all")
    np.testing.assert_allclose(np.linalg.norm(joined, axis=1), 1.0, atol=1e-5)
    assert joined.shape == (2000, 32)
    # the inner product of the joined rows is the mean of the views' cosines
    np.testing.assert_allclose(joined[:5] @ joined[5:10].T,
                               (views[0][:5] @ views[0][5:10].T + views[1][:5] @ views[1][5:10].T) / 2, atol=1e-5)


def test_the_comparison_picks_the_joined_views_and_reports_its_grid():
    from dmlp_plugin.config import ChecksConfig, PurifyConfig
    from dmlp_plugin.pipeline import Views, _compare

    views, y = _ambiguous_views(seed=2)
    noisy = symmetric_noise(y, 0.4, 4, seed=3)
    meta = np.arange(0, 2000, 50)
    rest = np.ones(2000, bool)
    rest[meta] = False
    cfg = PurifyConfig(checks=ChecksConfig(compare=["knn_vote"]))
    timings = {}
    out = _compare(cfg, Views(views, {}), noisy, meta, y[meta], 4, y, "cpu", rest, timings)["knn_vote"]
    assert out["views"] == "all" and out["view_sets"] == ["1", "2", "all"]
    assert out["ks"] == knn.k_grid(2000) and set(out["by_views_k"]["all"]) == {str(k) for k in out["ks"]}
    assert out["label_accuracy_after"] == out["by_views_k"]["all"][str(out["k"])]
    assert out["label_accuracy_after"] > max(max(out["by_views_k"][w].values()) for w in ("1", "2")) + 0.25
    assert "true labels" in out["note"] and set(out["search_seconds"]) == {"1", "2", "all"}
    assert timings["compare_knn_vote"] == out["seconds"] >= sum(out["search_seconds"].values())
    # one view given twice (features.second_view: same): searched once
    assert knn.distinct_view_sets([views[0], views[0]]) == ["1"]
    assert knn.distinct_view_sets([views[0], views[0].copy()]) == ["1"]


def test_k_grid_reaches_past_50_and_never_exceeds_n_minus_1():
    assert knn.k_grid(1437) == [5, 10, 20, 50, 100, 200]
    assert knn.k_grid(60000) == [5, 10, 20, 50, 100, 200, 245]  # sqrt(60,000) = 245
    assert knn.k_grid(160000)[-3:] == [200, 300, 400]
    assert knn.k_grid(10 ** 7)[-1] == 400  # capped
    assert knn.k_grid(30) == [5, 10, 20, 29]
    assert knn.k_grid(3) == [2] and knn.k_grid(2) == [1]
    for n in list(range(2, 260)) + [999, 5000, 50000]:
        grid = knn.k_grid(n)
        assert grid == sorted(set(grid)) and grid[0] >= 1 and grid[-1] <= n - 1
        if n >= 201:
            assert grid[-1] >= 200
    assert knn.k_grid(100, [5, 500, 20]) == [5, 20, 99]  # an explicit list: kept, cut at n - 1


@pytest.mark.parametrize("ks", [[0], [5, "x"], [2.5], [], [True], "all", 5])
def test_bad_vote_ks_are_user_errors_naming_the_value(ks):
    from dmlp_plugin.errors import UserError

    with pytest.raises(UserError, match=r"checks\.vote_ks=.*use auto or a list of positive integers"):
        knn.k_grid(100, ks)


def test_repeated_self_searches_are_served_from_memory_and_equal_a_fresh_search(monkeypatch):
    from dmlp_plugin.checks import knn

    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    knn._SEARCH_CACHE.clear()
    calls = []
    real = knn._search
    monkeypatch.setattr(knn, "_search", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    s40, i40 = knn.search(x, 40)
    s10, i10 = knn.search(x, 10)  # a prefix of the k = 40 lists: no second search
    assert calls == [40]
    monkeypatch.setenv("DMLP_KNN_CACHE", "0")
    f10, j10 = knn.search(x, 10)
    assert calls == [40, 10]
    np.testing.assert_array_equal(i10, j10)
    np.testing.assert_allclose(s10, f10)
    np.testing.assert_array_equal(i40[:, :10], i10)
    monkeypatch.delenv("DMLP_KNN_CACHE")
    knn.search(x[::-1].copy(), 10)  # another matrix: searched
    assert calls == [40, 10, 10]
    i10[:] = -1  # callers own their copy
    assert (knn.search(x, 10)[1] >= 0).all()
