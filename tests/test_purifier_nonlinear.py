"""The neighbour readout: where the classes are not linearly separable (concentric rings, XOR clusters) the
purifier's linear correctors fail and the neighbourhood prior, chosen by likelihood without true labels,
fixes it; where the classes are linearly separable it does not hurt; its settings are validated; its neighbour
search does not depend on how the rows are split over processes."""

import dataclasses

import numpy as np
import pytest

from benchmarks.synthetic import clustered_features, symmetric_noise
from dmlp_plugin.errors import UserError
from dmlp_plugin.purifier.dmlp import DMLPConfig, _neighbour_graph, purify


def lifted(kind: str, n: int = 2000, d: int = 32, seed: int = 0):
    """2-d classes that no linear function separates, lifted to d dims: ``rings`` (3 concentric rings) or
    ``xor`` (4 blobs, opposite quadrants share a class). The plane point p becomes [p, 2] (so L2 normalisation
    keeps the geometry: a gnomonic map), embedded by a random orthonormal basis, plus a little noise in all d
    dims, rows L2-normalised."""
    rng = np.random.default_rng(seed)
    if kind == "rings":
        y = rng.integers(0, 3, n)
        r = 1.0 + y + rng.normal(0, 0.12, n)
        a = rng.uniform(0, 2 * np.pi, n)
        p = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    else:
        q = rng.integers(0, 4, n)
        p = np.array([[1, 1], [-1, -1], [1, -1], [-1, 1]])[q] + rng.normal(0, 0.3, (n, 2))
        y = (q >= 2).astype(np.int64)
    z = np.concatenate([p, np.full((n, 1), 2.0)], 1)
    basis = np.linalg.qr(rng.standard_normal((d, 3)))[0]
    x = z @ basis.T + rng.normal(0, 0.05, (n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), y.astype(np.int64)


def _problem(x, y, rate=0.4, per_class=20, seed=1):
    c = int(y.max()) + 1
    noisy = symmetric_noise(y, rate, c, seed=seed)
    rng = np.random.default_rng(seed + 1)
    meta = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == k), per_class, replace=False) for k in range(c)]))
    return noisy, meta, c


def _acc(res, y, meta):
    rest = np.setdiff1d(np.arange(len(y)), meta)
    return float(np.mean(res.hard[rest] == y[rest]))


@pytest.mark.parametrize("kind", ["rings", "xor"])
def test_neighbour_readout_fixes_classes_no_linear_head_separates(kind):
    x, y = lifted(kind)
    noisy, meta, c = _problem(x, y)
    cfg = DMLPConfig(epochs=20)
    linear = purify([x], noisy, meta, y[meta], c, dataclasses.replace(cfg, neighbour_ks=(0,)), progress=False)
    default = purify([x], noisy, meta, y[meta], c, cfg, truth=y, progress=False)
    rest = np.setdiff1d(np.arange(len(y)), meta)
    assert _acc(linear, y, meta) < np.mean(noisy[rest] == y[rest])  # linear correctors: worse than the given labels
    assert _acc(default, y, meta) >= 0.97 and _acc(default, y, meta) > _acc(linear, y, meta) + 0.25
    info = default.info
    assert info["neighbour_k"] > 0  # chosen without true labels: by the likelihood of the given/trusted labels
    assert set(info["log_likelihood"]) >= {"heads k=0 power=1", f"{info['neighbour_vote']} k={info['neighbour_k']} "
                                           f"power={info['neighbour_power']:g}"}
    last = default.history[-1]  # the last epoch logs the final readout and the heads' one
    assert last["neighbour_k"] == info["neighbour_k"]
    assert last["label_accuracy"] == pytest.approx(_acc(default, y, meta))
    assert last["label_accuracy_heads"] < last["label_accuracy"]
    np.testing.assert_array_equal(default.hard[meta], y[meta])
    np.testing.assert_allclose(default.soft.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(default.hard, default.soft.argmax(1))


def test_neighbour_readout_does_not_hurt_linearly_separable_clusters():
    x, y = clustered_features(2000, 32, 5, spread=1.0, seed=0, modes_per_class=1)
    noisy, meta, c = _problem(x, y, rate=0.6, per_class=8)
    for views in ([x], [x, x[:, ::-1].copy()]):
        linear = purify(views, noisy, meta, y[meta], c, DMLPConfig(epochs=20, neighbour_ks=(0,)), progress=False)
        default = purify(views, noisy, meta, y[meta], c, DMLPConfig(epochs=20), progress=False)
        assert _acc(linear, y, meta) >= 0.98
        assert _acc(default, y, meta) >= _acc(linear, y, meta) - 0.003


def test_neighbour_readout_off_is_the_heads_readout():
    x, y = lifted("xor", n=800)
    noisy, meta, c = _problem(x, y, per_class=10)
    off = purify([x], noisy, meta, y[meta], c, DMLPConfig(epochs=6, eac_period=3, neighbour_ks=(0,)), progress=False)
    assert off.info == {}
    # only the heads candidate: the neighbour machinery runs and returns the same labels
    only = purify([x], noisy, meta, y[meta], c, DMLPConfig(epochs=6, eac_period=3, neighbour_votes=("labels",),
                                                           neighbour_ks=(0, 5)), progress=False)
    assert only.info["neighbour_vote"] in ("heads", "labels")
    if only.info["neighbour_vote"] == "heads":
        np.testing.assert_array_equal(only.hard, off.hard)
    # the paper's readout (the label matrices) has no neighbour step
    labels = purify([x], noisy, meta, y[meta], c, DMLPConfig(epochs=6, eac_period=3, readout="labels"), progress=False)
    assert labels.info == {}


def test_neighbour_lists_do_not_depend_on_the_split_or_the_search_blocks():
    x, _ = clustered_features(900, 16, 3, spread=1.0, seed=3)
    x2 = x[:, ::-1].copy()
    meta = np.array([3, 100, 450, 899])
    for view in ("1", "all"):
        cfg = DMLPConfig(neighbour_ks=(0, 7), neighbour_view=view)
        whole = _neighbour_graph([x, x2], cfg, 0, 900, meta, "cpu", chunk=65536)
        parts = [_neighbour_graph([x, x2], cfg, lo, hi, meta, "cpu", chunk=256) for lo, hi in ((0, 450), (450, 900))]
        np.testing.assert_array_equal(whole.idx.numpy(), np.concatenate([p.idx.numpy() for p in parts]))
        np.testing.assert_allclose(whole.w.numpy(), np.concatenate([p.w.numpy() for p in parts]), atol=1e-6)
        for p in parts:
            np.testing.assert_array_equal(p.midx.numpy(), whole.midx.numpy())
        assert whole.idx.shape == (900, 7) and not (whole.idx.numpy() == np.arange(900)[:, None]).any()
        np.testing.assert_array_equal(whole.midx.numpy(), whole.idx.numpy()[meta])
    # brute force: the lists are the exact nearest neighbours
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :7]
    g = _neighbour_graph([x, x2], DMLPConfig(neighbour_ks=(7,), neighbour_view="1"), 0, 900, meta, "cpu")
    agree = np.mean([len(set(a) & set(b)) / 7 for a, b in zip(top, g.idx.numpy())])
    assert agree > 0.999
    # more neighbours asked than rows: every other row
    tiny = _neighbour_graph([x[:5], x2[:5]], DMLPConfig(), 0, 5, np.array([0]), "cpu")
    assert tiny.idx.shape == (5, 4)


def test_wide_views_are_searched_on_their_principal_directions():
    from dmlp_plugin.purifier.dmlp import search_projections

    rng = np.random.default_rng(0)
    x, _ = clustered_features(600, 8, 3, spread=1.0, seed=4)  # 8-dim: never projected at dims 8
    # a 40-dim view of rank 6 (plus nothing): its projection on 6 directions loses nothing
    low = (rng.normal(size=(600, 6)) @ rng.normal(size=(6, 40))).astype(np.float32)
    low /= np.linalg.norm(low, axis=1, keepdims=True)
    proj = search_projections([x, low], "all", 8)
    assert proj[0] is None and proj[1].shape == (40, 8)
    assert search_projections([x, low], "1", 8) == [None, None]
    assert search_projections([x, low], "all", 0) == [None, None]
    meta = np.array([0, 5, 599])
    full = _neighbour_graph([x, low], DMLPConfig(neighbour_ks=(9,), neighbour_dims=0), 0, 600, meta, "cpu")
    cut = _neighbour_graph([x, low], DMLPConfig(neighbour_ks=(9,), neighbour_dims=8), 0, 600, meta, "cpu")
    np.testing.assert_array_equal(full.idx.numpy(), cut.idx.numpy())
    # a full-rank wide view: the projection is a real cut (lists change) but keeps most neighbours
    wide = rng.normal(size=(600, 40)).astype(np.float32) + 3 * np.repeat(rng.normal(size=(3, 40)), 200, 0)
    wide /= np.linalg.norm(wide, axis=1, keepdims=True)
    a = _neighbour_graph([wide], DMLPConfig(neighbour_ks=(9,), neighbour_dims=0, num_views=1), 0, 600, meta, "cpu")
    b = _neighbour_graph([wide], DMLPConfig(neighbour_ks=(9,), neighbour_dims=4, num_views=1), 0, 600, meta, "cpu")
    same = np.mean([len(set(p) & set(q)) / 9 for p, q in zip(a.idx.numpy(), b.idx.numpy())])
    assert 0.05 < same < 0.999
    # split-independent with a projection, like without
    cfg = DMLPConfig(neighbour_ks=(5,), neighbour_dims=8)
    whole = _neighbour_graph([x, low], cfg, 0, 600, meta, "cpu")
    parts = [_neighbour_graph([x, low], cfg, lo, hi, meta, "cpu", chunk=128) for lo, hi in ((0, 300), (300, 600))]
    np.testing.assert_array_equal(whole.idx.numpy(), np.concatenate([p.idx.numpy() for p in parts]))


@pytest.mark.parametrize("key, value, fix", [
    ("neighbour_ks", (), "non-empty list of neighbour counts"),
    ("neighbour_ks", (0, -3), "neighbour counts >= 0"),
    ("neighbour_ks", (True,), "neighbour counts >= 0"),
    ("neighbour_ks", (2.5,), "neighbour counts >= 0"),
    ("neighbour_powers", (), "sharpening powers > 0"),
    ("neighbour_powers", (1.0, 0.0), "sharpening powers > 0"),
    ("neighbour_powers", (float("inf"),), "sharpening powers > 0"),
    ("neighbour_votes", ("labels", "knn"), "posterior"),
    ("neighbour_votes", (), "posterior"),
    ("neighbour_votes", ("labels", "labels"), "without repeats"),
    ("neighbour_temperature", 0.0, "> 0"),
    ("neighbour_temperature", float("nan"), "> 0"),
    ("neighbour_view", "3", "a view 1..2 or all"),
    ("neighbour_view", 0, "a view 1..2 or all"),
    ("neighbour_view", "both", "a view 1..2 or all"),
    ("neighbour_dims", -1, "integer >= 0"),
    ("neighbour_dims", 2.5, "integer >= 0"),
    ("neighbour_dims", True, "integer >= 0"),
])
def test_bad_neighbour_settings_are_one_line_user_errors(key, value, fix):
    with pytest.raises(UserError) as e:
        DMLPConfig(**{key: value})
    msg = str(e.value)
    assert f"preprocessor.params.{key}=" in msg and fix in msg and "\n" not in msg


def test_neighbour_settings_from_a_config():
    from dmlp_plugin.pipeline import build_component

    pre = build_component("preprocessors", "dmlp", {"neighbour_ks": [0, 20], "neighbour_powers": [1, 2],
                                                    "neighbour_votes": ["labels"], "neighbour_view": 2})
    assert (pre.neighbour_ks, pre.neighbour_powers, pre.neighbour_votes, pre.neighbour_view) == \
        ((0, 20), (1.0, 2.0), ("labels",), "2")
    assert DMLPConfig().neighbour_ks == (0, 10, 30, 100, 300) and DMLPConfig().neighbour_view == "all"
    assert DMLPConfig().neighbour_dims == 64
    with pytest.raises(UserError, match=r"preprocessor\.params\.neighbour_ks"):
        build_component("preprocessors", "dmlp", {"neighbour_ks": [0, -1]})
    with pytest.raises(UserError, match="neighbour_ks"):
        build_component("preprocessors", "dmlp", {"neighbour_ks": "ten"})


def test_a_candidate_right_on_clearly_more_trusted_rows_replaces_the_likelihood_choice():
    import torch

    from dmlp_plugin.purifier.dmlp import clearly_better

    def hits(right, m):
        h = torch.zeros(m, dtype=torch.bool)
        h[right] = True
        return h

    base = hits(list(range(800)), 1000)  # right on 800 of 1,000 trusted rows
    # +30 net of 40 disagreements: 30 > 2 sqrt(40) = 12.6, a clear win
    better = hits(list(range(5, 800)) + list(range(800, 835)), 1000)
    assert clearly_better({"chosen": base, "b": better}, "chosen") == "b"
    # +6 net of 20 disagreements (6 < 2 sqrt(20) = 8.9): noise, the choice stays
    noise = hits(list(range(7, 800)) + list(range(800, 813)), 1000)
    assert clearly_better({"chosen": base, "n": noise}, "chosen") is None
    # a few dozen trusted rows: 3 more right and none worse is not enough (3 < 2 sqrt(3))
    small = hits(list(range(30)), 40)
    assert clearly_better({"chosen": small, "s": hits(list(range(33)), 40)}, "chosen") is None
    # of two clear winners the one right on more rows; the choice itself never "beats" itself
    best = hits(list(range(870)), 1000)
    assert clearly_better({"chosen": base, "b": better, "best": best}, "chosen") == "best"
    assert clearly_better({"chosen": base}, "chosen") is None
