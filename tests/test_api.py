"""The array API (dmlp_plugin.purify_labels & co.): cheap to import, validated at the boundary with messages that
name the argument, and the same draws, views and artifacts as `dmlp purify`."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dmlp_plugin
from dmlp_plugin import UserError, list_components, load_labels, purify_labels, save_labels, select_trusted
from dmlp_plugin.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "purify-digits.yaml")


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    noisy = np.where(rng.random(len(y)) < 0.5, rng.integers(0, 10, len(y)), y)
    return x, y, noisy, select_trusted(y, 50, seed=0)


def test_import_is_cheap_and_exports_the_public_names():
    code = ("import sys, dmlp_plugin; assert 'torch' not in sys.modules; "
            "from dmlp_plugin import TrainData, RunResult, UserError, PurifyResult, purify_labels; "
            "import baselines.common, dmlp_plugin.errors, dmlp_plugin.api; "
            "assert TrainData is baselines.common.TrainData and RunResult is baselines.common.RunResult; "
            "assert UserError is dmlp_plugin.errors.UserError and purify_labels is dmlp_plugin.api.purify_labels")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert set(dmlp_plugin.__all__) <= set(dir(dmlp_plugin))
    with pytest.raises(AttributeError):
        dmlp_plugin.no_such_name  # noqa: B018


def _bad_inputs(x, y, noisy, t):
    nan = x.copy()
    nan[7, 3] = np.nan
    zero = x.copy()
    zero[11] = 0
    return [
        ((x[0], noisy, t, y[t]), r"^features has shape \(64,\); give a 2-d \(N, d\) array"),
        ((x[None], noisy, t, y[t]), r"features has shape \(1, 1797, 64\).*several views: pass a list"),
        ((x.astype(str), noisy, t, y[t]), r"features has dtype <U\d+; give numeric features"),
        ((nan, noisy, t, y[t]), r"features has NaN or Inf values in 1 row\(s\), the first row 7; clean or drop"),
        ((zero, noisy, t, y[t]), r"features has 1 all-zero rows \(first: row 11\)"),
        ((x[:-1], noisy, t, y[t]), r"noisy_labels has 1797 labels but features has 1796 rows"),
        ((x, noisy + 0.5, t, y[t]), r"noisy_labels\[0\] = 0\.5 is not a class index"),
        ((x, noisy - 1, t, y[t]), r"noisy_labels\[\d+\] = -1 is negative"),
        ((x, noisy.astype(str), t, y[t]), r"noisy_labels has dtype <U\d+; give integer class indices .*return_inverse"),
        ((x, noisy, np.r_[t, 1797], y[np.r_[t, 0]]), r"trusted_indices\[50\] = 1797 is outside 0\.\.1796"),
        ((x, noisy, np.r_[t, t[3]], y[np.r_[t, t[3]]]), rf"trusted_indices lists sample {t[3]} more than once"),
        ((x, noisy, t, y[t][:-1]), r"trusted_labels has 49 entries but trusted_indices has 50"),
        ((x, noisy, t > -1, y), r"trusted_indices is a boolean mask; give the indices, np\.flatnonzero"),
        ((x, noisy, t[y[t] != 4], y[t][y[t] != 4]), r"trusted_labels has no sample of class\(es\) \[4\]"),
        ((x, noisy, [], []), r"method 'dmlp' needs trusted samples"),
    ]


def test_bad_input_names_the_argument_and_the_fix(digits):
    x, y, noisy, t = digits
    for args, pattern in _bad_inputs(x, y, noisy, t):
        with pytest.raises(UserError, match=pattern):
            purify_labels(*args)
    for kwargs, pattern in [({"method": "dmpl"}, r"method: unknown preprocessor 'dmpl' \(did you mean 'dmlp'"),
                            ({"params": {"epochz": 3}}, r"^params: unknown key 'epochz' \(did you mean 'epochs'"),
                            ({"params": {"epochs": 3}}, r"^params: eac_period=5 > epochs=3"),
                            ({"second_view": "raw"}, r"second_view='raw' is not known; use random_relu or same"),
                            ({"second_view": x[:, :5][:-1]}, r"second_view has 1796 rows but noisy_labels has 1797"),
                            ({"num_classes": 9}, r"noisy_labels\[\d+\] = 9 is outside 0\.\.8 \(num_classes=9\)"),
                            ({"estimate_folds": 1}, r"estimate_folds=1: give 0 \(no estimate\) or a number of folds"),
                            ({"device": "tpu"}, r"device 'tpu' is not known")]:
        with pytest.raises(UserError, match=pattern):
            purify_labels(x, noisy, t, y[t], **kwargs)
    with pytest.raises(UserError, match=r"second_view is given but features is already a list of several views"):
        purify_labels([x, x], noisy, t, y[t], second_view="same")


def test_views_are_normalised_and_a_list_is_several_views(digits):
    x, y, noisy, t = digits
    opts = {"method": "knn_vote", "params": {"views": "all", "k": 10}, "estimate_folds": 0}
    pixels = purify_labels(x, noisy, t, y[t], second_view=x ** 2, **opts)
    listed = purify_labels([100 * x, x ** 2 / 7], noisy, t, y[t], **opts)  # scale does not matter: L2 rows
    np.testing.assert_array_equal(pixels.hard, listed.hard)
    assert pixels.info["views"]["dims"] == [64, 64] and np.mean(pixels.hard == y) > 0.9
    same = purify_labels(x, noisy, t, y[t], second_view="same", **opts)
    assert not np.array_equal(same.hard, pixels.hard)  # the second view is used


def test_select_trusted_draws_what_dmlp_purify_draws(tmp_path):
    from dmlp_plugin.config import load_config
    from dmlp_plugin.pipeline import load_data

    out = tmp_path / "p"
    args = ["--no-progress", "--set", "features.source=raw", "--set", "checks.estimate_folds=0", "--set",
            "checks.compare=[]", "--set", "preprocessor.name=identity", "--set", "seed=3",
            "--set", "trusted.size=0.05"]
    assert main(["purify", CONFIG, "--out", str(out), *args]) == 0
    cfg, _ = load_config(CONFIG)
    truth = load_data(cfg).train.labels
    art = load_labels(out / "labels.npz")
    np.testing.assert_array_equal(select_trusted(truth, 0.05, seed=3), art.meta_indices)
    np.testing.assert_array_equal(truth[art.meta_indices], art.meta_labels)
    with pytest.raises(UserError, match=r"^size=5 gives 5 samples, fewer than the 10 classes a balanced trusted set "
                                        r"needs; give at least 10 or set balanced=false"):
        select_trusted(truth, 5)
    with pytest.raises(UserError, match=r"source='knn_auto' picks samples by their features' neighbours"):
        select_trusted(truth, 20, source="knn_auto")
    picked = select_trusted(truth, 30, source="knn_auto", features=load_data(cfg).train.images.reshape(1437, -1) + 1)
    assert picked.size == 30 and np.all(np.diff(picked) > 0)


def test_result_saves_as_the_artifact_dmlp_purify_writes(digits, tmp_path):
    x, y, noisy, t = digits
    r = purify_labels(x, noisy, t, y[t], method="knn_vote", estimate_folds=5)
    e = r.estimated_accuracy
    assert 0 <= e["low"] <= e["estimate"] <= e["high"] <= 1 and e["estimate"] > 0.8
    np.testing.assert_array_equal(r.changed, r.hard != noisy)
    assert r.neighbour_agreement.shape == (1797,) and 0 <= r.neighbour_agreement.min()
    save_labels(tmp_path / "labels.npz", r, true_labels=y)
    art = load_labels(tmp_path / "labels.npz")
    np.testing.assert_array_equal(art.hard, r.hard)
    np.testing.assert_array_equal(art.meta_indices, t)
    np.testing.assert_array_equal(art.true_labels, y)
    assert art.provenance["method"] == "knn_vote"
    from dmlp_plugin.records import ImageSet  # the fingerprint of a labels-only data set of these noisy labels

    assert art.fingerprint == ImageSet("npy", None, noisy.astype(np.int64), 10).fingerprint()
    one = np.array([t[y[t] == c][0] for c in range(10)])  # one per class: < max(5, 2 x 10) trusted
    small = purify_labels(x, noisy, one, y[one], method="knn_vote")
    assert small.estimated_accuracy is None
    with pytest.raises(UserError, match="save_labels needs the PurifyResult of purify_labels"):
        save_labels(tmp_path / "x.npz", {"hard": r.hard})


def test_list_components_shows_the_registry():
    pre = list_components("preprocessors")
    assert {"dmlp", "dmlp_authors", "knn_vote", "cleanlab", "trusted_only", "auto", "identity"} <= set(pre)
    assert pre["dmlp"].startswith("Decoupled Meta Label Purifier")
    assert list_components("preprocessor") == pre
    every = list_components()
    assert set(every) == {"datasets", "noise", "preprocessors", "methods"} and "ce" in every["methods"]
    with pytest.raises(UserError, match=r"kind='gizmos' is not known; use one of datasets, noise"):
        list_components("gizmos")


def test_api_estimate_matches_the_cli_for_auto(tmp_path):
    """auto through the API: the choice and the estimate of the candidate it chose, as in metrics.json."""
    from dmlp_plugin.config import load_config
    from dmlp_plugin.pipeline import load_data, raw_pixel_features

    out = tmp_path / "a"
    preprocessor = "preprocessor={name: auto, params: {candidates: [knn_vote, trusted_only]}}"
    assert main(["purify", CONFIG, "--out", str(out), "--no-progress", "--set", "features.source=raw",
                 "--set", "features.second_view=same", "--set", "checks.compare=[]", "--set", preprocessor]) == 0
    m = json.loads((out / "metrics.json").read_text())
    art = load_labels(out / "labels.npz")
    cfg, _ = load_config(CONFIG)
    x = raw_pixel_features(load_data(cfg).train.images)
    r = purify_labels(x, art.noisy, art.meta_indices, art.meta_labels, method="auto", second_view="same",
                      params={"candidates": ["knn_vote", "trusted_only"]})
    np.testing.assert_array_equal(r.hard, art.hard)
    assert r.estimated_accuracy["chosen"] == m["auto"]["chosen"] == r.info["chosen"]
    assert r.estimated_accuracy["estimate"] == m["estimated_accuracy"]["auto"]["estimate"]
    assert re.match(r"(kept|chose) ", m["auto"]["reason"])
