"""The DMLP purifier recovers labels where the answer is known, and each of its pieces does its job."""

import dataclasses

import numpy as np
import pytest
import torch

from benchmarks.synthetic import clustered_features, symmetric_noise
from dmlp_plugin.purifier.dmlp import DMLPConfig, purify


@pytest.fixture(scope="module")
def clusters():
    x, y = clustered_features(4000, 64, 10, spread=1.2, seed=0, modes_per_class=2)
    noisy = symmetric_noise(y, 0.8, 10, seed=1)
    meta = np.random.default_rng(2).choice(len(y), 60, replace=False)
    return x, y, noisy, meta


def _acc(res, y, meta):
    rest = np.setdiff1d(np.arange(len(y)), meta)
    return float(np.mean(res.hard[rest] == y[rest]))


def test_recovers_labels_at_80_percent_noise(clusters):
    x, y, noisy, meta = clusters
    before = float(np.mean(noisy == y))
    assert before < 0.35
    res = purify([x], noisy, meta, y[meta], 10, DMLPConfig(epochs=20), truth=y, progress=False)
    assert _acc(res, y, meta) >= 0.95
    # outputs are well-formed: distributions, argmax, confidence; trusted rows keep trusted labels
    np.testing.assert_allclose(res.soft.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(res.hard, res.soft.argmax(1))
    np.testing.assert_allclose(res.confidence, res.soft.max(1))
    np.testing.assert_array_equal(res.hard[meta], y[meta])
    assert len(res.history) == 20 and "label_accuracy" in res.history[-1]


def test_cross_view_exchange_does_the_purifying(clusters):
    x, y, noisy, meta = clusters
    cfg = DMLPConfig(epochs=10, readout="labels")  # the paper's readout: the label matrices themselves
    full = _acc(purify([x], noisy, meta, y[meta], 10, cfg, progress=False), y, meta)
    no_exchange = _acc(purify([x], noisy, meta, y[meta], 10, dataclasses.replace(cfg, eac_period=0),
                              progress=False), y, meta)
    assert full > no_exchange + 0.2


def test_ipc_steps_lower_the_meta_loss_through_the_closed_form(clusters):
    # IPC treats the labels as parameters: each step must make the least-squares fit on the batch
    # labels predict the trusted labels better (the meta loss falls), and change only batch rows.
    from dmlp_plugin.purifier import dmlp as D

    x, y, noisy, meta = clusters
    xt = torch.from_numpy(x)
    cfg = DMLPConfig(ipc_lr=0.01)
    y0 = torch.nn.functional.one_hot(torch.from_numpy(noisy), 10).float()
    xm, ym = xt[meta], torch.from_numpy(y[meta])
    view = D._View(xt, xm, y0, cfg, torch.Generator().manual_seed(0))
    batch = torch.arange(0, 3000)
    losses = [D._ipc_step(view, 0, batch, 3000, ym, cfg, D.Dist()) for _ in range(25)]
    assert losses[-1] < 0.8 * losses[0]
    outside = torch.arange(3000, 4000)
    # rows outside the batch get no meta gradient: Adam's coupled weight decay only shrinks their
    # non-zero entries toward 0 (the authors' behaviour), so zeros stay zero and the argmax is kept
    moved = view.y.detach()[outside]
    assert torch.all(moved[y0[outside] == 0] == 0)
    assert torch.all((moved[y0[outside] == 1] > 0) & (moved[y0[outside] == 1] < 1))
    assert torch.equal(moved.argmax(1), y0[outside].argmax(1))


def test_deterministic_given_seed(clusters):
    x, y, noisy, meta = clusters
    cfg = DMLPConfig(epochs=4, eac_period=2)
    a = purify([x], noisy, meta, y[meta], 10, cfg, progress=False)
    b = purify([x], noisy, meta, y[meta], 10, cfg, progress=False)
    np.testing.assert_array_equal(a.hard, b.hard)
    np.testing.assert_array_equal(a.soft, b.soft)


def test_batches_smaller_than_the_data_still_purify(clusters):
    x, y, noisy, meta = clusters
    res = purify([x], noisy, meta, y[meta], 10, DMLPConfig(epochs=15, batch_size=1000), progress=False)
    assert _acc(res, y, meta) >= 0.9


def test_ipc_closed_form_matches_ridge_least_squares():
    # The IPC step differentiates through W = (X^T X + lam I)^-1 X^T Y: check the solve we use.
    from dmlp_plugin.purifier import dmlp as D

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    x = x / x.norm(dim=1, keepdim=True)
    y = torch.randn(200, 5, generator=g)
    cfg = DMLPConfig(ridge=1e-2)
    xm, ym = x[:10], torch.randint(0, 5, (10,), generator=g)
    view = D._View(x, xm, y, cfg, torch.Generator().manual_seed(0))
    idx = torch.arange(200)
    D._ipc_step(view, 0, idx, 200, ym, cfg, D.Dist())
    gram = x.T @ x
    lam = 1e-2 * torch.trace(gram) / 16
    expected = torch.linalg.solve(gram + lam * torch.eye(16), x.T @ y)
    got = torch.cholesky_solve(x.T @ y, view.chol[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the hand-written gradient dL/dY = X G^-1 dL/dW equals autograd through the solve
    yy = y.clone().requires_grad_(True)
    w = torch.linalg.solve(gram + lam * torch.eye(16), x.T @ yy)
    zm = xm @ w
    loss = (torch.nn.functional.cross_entropy(zm, ym) + torch.sum((zm - torch.nn.functional.one_hot(ym, 5)) ** 2)
            + D._kl_uniform(torch.softmax(x @ w, dim=1).mean(0)))
    loss.backward()
    torch.testing.assert_close(view.y.grad, yy.grad, rtol=1e-3, atol=1e-5)


def test_two_distinct_views_are_used():
    x, y = clustered_features(1500, 32, 5, spread=1.5, seed=3)
    noisy = symmetric_noise(y, 0.5, 5, seed=4)
    meta = np.arange(0, 1500, 50)
    from dmlp_plugin.pipeline import random_relu_view

    v2 = random_relu_view(x, 128, 0)
    res = purify([x, v2], noisy, meta, y[meta], 5, DMLPConfig(epochs=10), truth=y, progress=False)
    assert {"label_accuracy_view1", "label_accuracy_view2"} <= set(res.history[-1])
    assert _acc(res, y, meta) > 0.9


def test_settings_that_cannot_purify_are_refused():
    from dmlp_plugin.errors import UserError

    # the authors' script: an exchange period longer than the run, so EAC never feeds back (labels unchanged)
    with pytest.raises(UserError, match="would never fire"):
        DMLPConfig(epochs=4, eac_period=5)
    with pytest.raises(UserError, match="nothing would purify"):
        DMLPConfig(use_ipc=False, use_eac=False)
    with pytest.raises(UserError, match="ipc_lr"):
        DMLPConfig(ipc_lr=0.0)
    DMLPConfig(epochs=4, eac_period=0)  # no exchange on purpose is allowed


def test_temperature_fit_recovers_the_scale_of_calibrated_logits():
    from dmlp_plugin.purifier.dmlp import fit_temperature

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 5, generator=gen) * 3
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=gen).squeeze(1)  # calibrated at t = 1
    assert fit_temperature(logits * 4, labels) == pytest.approx(4, rel=0.15)
    assert fit_temperature(logits / 2, labels) == pytest.approx(0.5, rel=0.15)
    assert fit_temperature(logits, labels[:0]) == 1.0


def test_label_posterior_estimates_the_transition_and_weighs_the_given_label():
    # 3 classes, 30% of class 0's labels flipped to 1 (asymmetric noise); a classifier 80% sure of the true
    # class. EM must find T[0, 1] ~ 0.3 and a clean diagonal elsewhere; the posterior then corrects the
    # flips and, for a sample the classifier cannot decide (50/50 between 0 and 2), trusts a given label 2
    # (class 2 is never a flip target) but not a given label 1 over a 0 (1 is where 0's flips go).
    from dmlp_plugin.purifier.dmlp import label_posterior

    rng = np.random.default_rng(0)
    n = 3000
    truth = torch.from_numpy(rng.integers(0, 3, n))
    noisy = truth.clone()
    noisy[(truth == 0) & torch.from_numpy(rng.random(n) < 0.3)] = 1
    pred = torch.full((n, 3), 0.1)
    pred[torch.arange(n), truth] = 0.8
    undecided = torch.tensor([3000, 3001])
    pred = torch.cat([pred, torch.tensor([[0.5, 0.0, 0.5], [0.45, 0.1, 0.45]])])
    noisy = torch.cat([noisy, torch.tensor([2, 1])])
    meta = torch.arange(60)
    q, trans = label_posterior(pred, noisy, meta, truth[meta])
    assert trans[0, 1] == pytest.approx(0.3, abs=0.05) and trans[0, 0] == pytest.approx(0.7, abs=0.05)
    assert trans[1, 1] > 0.95 and trans[2, 2] > 0.95
    torch.testing.assert_close(q.sum(1), torch.ones(n + 2))
    assert torch.equal(q[meta].argmax(1), truth[meta])
    assert float((q[:n].argmax(1) == truth).float().mean()) == 1.0
    assert q[undecided].argmax(1).tolist() == [2, 0]


@pytest.mark.parametrize("key, value", [("eac_target", "swap"), ("readout", "mean"), ("transition_prior", -1.0)])
def test_bad_readout_settings_are_user_errors(key, value):
    from dmlp_plugin.errors import UserError

    with pytest.raises(UserError, match=key):
        DMLPConfig(**{key: value})


def test_killed_purification_resumes_to_the_uninterrupted_result(clusters, tmp_path):
    # a kill after epoch 3 (the checkpoint of epoch 3 is on disk): the same call resumes there and ends with
    # the labels, distributions and history of an uninterrupted run, bit for bit
    x, y, noisy, meta = clusters
    cfg = DMLPConfig(epochs=8, eac_period=2, batch_size=1500)
    straight = purify([x], noisy, meta, y[meta], 10, cfg, truth=y, progress=False)

    class Killed(Exception):
        pass

    def kill(epoch, rec):
        if epoch == 2:
            raise Killed

    ck = tmp_path / "p.pt"
    with pytest.raises(Killed):
        purify([x], noisy, meta, y[meta], 10, cfg, truth=y, progress=False, checkpoint=str(ck), on_epoch=kill)
    assert ck.is_file()
    seen = []
    resumed = purify([x], noisy, meta, y[meta], 10, cfg, truth=y, progress=False, checkpoint=str(ck),
                     on_epoch=lambda e, r: seen.append(e))
    assert seen == [3, 4, 5, 6, 7]  # epochs 0..2 were not redone
    assert resumed.soft.tobytes() == straight.soft.tobytes()
    np.testing.assert_array_equal(resumed.hard, straight.hard)
    assert [h["label_accuracy"] for h in resumed.history] == [h["label_accuracy"] for h in straight.history]
    # other inputs never resume from it; a damaged file is ignored with a warning
    other = purify([x], noisy, meta, y[meta], 10, dataclasses.replace(cfg, ipc_lr=0.02), progress=False,
                   checkpoint=str(ck), on_epoch=lambda e, r: seen.append(("other", e)))
    assert ("other", 0) in seen and other.hard.shape == straight.hard.shape
    ck.write_bytes(ck.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="unreadable"):
        purify([x], noisy, meta, y[meta], 10, cfg, progress=False, checkpoint=str(ck))


# ---------------------------------------------------------------------------------------------------------
# the cleanlab comparison / preprocessor


def _planted_flips(n=3000, seed=0):
    x, y = clustered_features(n, 32, 5, spread=0.8, seed=seed)
    rng = np.random.default_rng(seed + 1)
    noisy = y.copy()
    flip = rng.random(n) < 0.25
    noisy[flip] = (y[flip] + rng.integers(1, 5, flip.sum())) % 5  # 25% of the labels moved to another class
    meta = rng.choice(n, 50, replace=False)
    return x, y, noisy, meta


def test_cleanlab_relabel_fixes_planted_flips_and_keeps_trusted_labels():
    pytest.importorskip("cleanlab")
    from dmlp_plugin.purifier.preprocessors import Cleanlab
    from dmlp_plugin.records import PurifyInputs

    x, y, noisy, meta = _planted_flips()
    meta_labels = y[meta].copy()
    noisy[meta] = (y[meta] + 1) % 5  # the trusted rows' given labels are wrong: their trusted labels must win
    inp = PurifyInputs(views=[x, x], noisy=noisy, meta_idx=meta, meta_labels=meta_labels, num_classes=5, seed=0)
    res = Cleanlab().purify(inp)
    rest = np.setdiff1d(np.arange(len(y)), meta)
    before, after = np.mean(noisy[rest] == y[rest]), np.mean(res.hard[rest] == y[rest])
    assert before < 0.8 and after > 0.97, (before, after)
    np.testing.assert_array_equal(res.hard[meta], meta_labels)
    np.testing.assert_array_equal(res.hard, res.soft.argmax(1))
    assert np.all(res.confidence[meta] == 1.0) and np.all((res.confidence >= 0) & (res.confidence <= 1))
    info = res.info
    assert info["folds"] == 5 and info["views"] == "all" and 500 < info["flagged"] < 1500
    assert info["l2"] in [p["l2"] for p in info["l2_path"]]
    # seeded and deterministic
    again = Cleanlab().purify(inp)
    np.testing.assert_array_equal(again.hard, res.hard)


def test_out_of_fold_probabilities_never_see_their_own_row():
    # a row whose label is unlike every other row's in its neighbourhood: an in-sample fit could memorise it,
    # the out-of-fold model cannot, so its predicted class is its neighbours'
    pytest.importorskip("cleanlab")
    from dmlp_plugin.purifier.preprocessors import Cleanlab
    from dmlp_plugin.records import PurifyInputs

    x, y, _, meta = _planted_flips(1000, seed=3)
    noisy = y.copy()
    noisy[7] = (y[7] + 2) % 5
    inp = PurifyInputs(views=[x], noisy=noisy, meta_idx=meta[meta != 7], meta_labels=y[meta[meta != 7]],
                       num_classes=5)
    probs, l2, path = Cleanlab(l2=0.0001).pred_probs(inp)
    assert probs.shape == (1000, 5) and l2 == 0.0001 and len(path) == 1
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert probs[7].argmax() == y[7]


def test_cleanlab_not_installed_is_one_line_naming_the_pip_command(monkeypatch):
    import sys

    from dmlp_plugin.errors import MissingDependency, UserError
    from dmlp_plugin.pipeline import build_component

    monkeypatch.setitem(sys.modules, "cleanlab", None)  # `import cleanlab` now raises ImportError
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    with pytest.raises(UserError) as e:
        build_component("preprocessors", "cleanlab", {})
    assert isinstance(e.value, MissingDependency) and e.value.install == "pip install 'dmlp_plugin[cleanlab]'"
    assert "\n" not in str(e.value) and "pip install 'dmlp_plugin[cleanlab]'" in str(e.value)


@pytest.mark.parametrize("params, message", [
    ({"folds": 1}, r"folds=1 must be an integer >= 2"), ({"l2": -1}, r"l2=-1\.0 must be auto or a number >= 0"),
    ({"views": "3x"}, r"views='3x' is not known"),
    ({"filter_by": "magic"}, r"filter_by='magic' is not a cleanlab filter"),
])
def test_bad_cleanlab_settings_are_user_errors(params, message):
    pytest.importorskip("cleanlab")
    from dmlp_plugin.errors import UserError
    from dmlp_plugin.pipeline import build_component

    with pytest.raises(UserError, match=message):
        build_component("preprocessors", "cleanlab", params)


@pytest.mark.parametrize("params, message", [
    ({"k": 0}, r"k=0 must be a positive integer"), ({"views": "both"}, r"views='both' is not known"),
    ({"temperature": 0}, r"temperature=0\.0 must be > 0"),
])
def test_bad_knn_vote_settings_are_user_errors(params, message):
    from dmlp_plugin.errors import UserError
    from dmlp_plugin.pipeline import build_component

    with pytest.raises(UserError, match=message):
        build_component("preprocessors", "knn_vote", params)
    assert build_component("preprocessors", "knn_vote", {"views": 2}).views == "2"  # YAML `views: 2`
