"""cleanlab's Datalab runs DMLP as the issue type `dmlp_label` (real cleanlab 2.9.0, digits, symmetric 80%)."""

import re

import numpy as np
import pytest

pytest.importorskip("datasets", reason="cleanlab's Datalab needs pip install 'dmlp_plugin[cleanlab]'")

import dmlp_plugin.integrations.datalab  # noqa: E402,F401 - registers dmlp_label
from cleanlab import Datalab  # noqa: E402

from dmlp_plugin import pipeline, purify_labels, select_trusted  # noqa: E402
from dmlp_plugin.config import NoiseConfig, PurifyConfig  # noqa: E402


@pytest.fixture(scope="module")
def digits80():
    cfg = PurifyConfig(noise=NoiseConfig(kind="symmetric", rate=0.8))
    data = pipeline.load_data(cfg)
    noisy, truth = pipeline.make_noisy(cfg, data)
    x = pipeline.raw_pixel_features(data.train.images)
    return x, noisy.labels, truth, select_trusted(truth, 0.03, seed=0)


def test_datalab_flags_exactly_the_labels_dmlp_changes(digits80):
    x, noisy, truth, trusted = digits80
    names = np.array([f"digit {c}" for c in range(10)])  # a label column of names: trusted labels given as names
    lab = Datalab(data={"label": names[noisy]}, label_name="label", verbosity=0)
    lab.find_issues(features=x, issue_types={"dmlp_label": {"trusted_indices": trusted,
                                                            "trusted_labels": names[truth[trusted]],
                                                            "second_view": "same", "estimate_folds": 3}})
    issues = lab.get_issues("dmlp_label")
    info = lab.get_info("dmlp_label")
    ref = purify_labels(x, noisy, trusted, truth[trusted], second_view="same", estimate_folds=3)
    flagged = issues["is_dmlp_label_issue"].to_numpy()
    np.testing.assert_array_equal(flagged, ref.hard != noisy)
    assert (noisy != truth).mean() > 0.65 and flagged.mean() > 0.6  # most labels are wrong; most are flagged
    suggested = np.asarray(info["suggested_label"])
    np.testing.assert_array_equal(suggested, names[ref.hard])
    assert (suggested == names[truth]).mean() > 0.85
    score = issues["dmlp_label_score"].to_numpy()
    np.testing.assert_allclose(score, ref.soft[np.arange(len(noisy)), noisy], rtol=1e-6)
    assert 0 <= score.min() and score.max() <= 1 and score[flagged].mean() < score[~flagged].mean()
    np.testing.assert_allclose(info["confidence"], ref.confidence, rtol=1e-6)
    assert info["num_label_issues"] == flagged.sum() and info["estimated_accuracy"] == ref.estimated_accuracy
    assert 0.7 < info["estimated_accuracy"]["estimate"] <= 1
    summary = lab.get_issue_summary("dmlp_label")
    assert summary["num_issues"].iloc[0] == flagged.sum()
    assert summary["score"].iloc[0] == pytest.approx(1 - flagged.mean())


def test_datalab_reports_a_bad_input_by_its_argument(digits80, capsys):
    x, noisy, truth, trusted = digits80
    lab = Datalab(data={"label": noisy}, label_name="label", verbosity=0)
    lab.find_issues(features=x, issue_types={"dmlp_label": {"trusted_indices": np.r_[trusted, 99999],
                                                            "trusted_labels": truth[np.r_[trusted, 0]]}})
    out = capsys.readouterr().out
    assert "Error in dmlp_label: trusted_indices[40] = 99999 is outside 0..1436" in out, out
    lab.find_issues(features=x, issue_types={"dmlp_label": {"trusted_indices": trusted,
                                                            "trusted_labels": truth[trusted] + 100}})
    out = capsys.readouterr().out
    assert re.search(r"Error in dmlp_label: trusted_labels holds 1\d\d, which is not a class of the label column "
                     r"\(0, 1, 2, 3, 4, 5, 6, 7, 8, 9\); give trusted labels as label-column values", out), out


def test_readme_datalab_snippet_runs():
    from tests.test_readme_api import _snippet

    rng = np.random.default_rng(1)
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = x[:500], y[:500]
    noisy = np.where(rng.random(len(y)) < 0.5, rng.integers(0, 10, len(y)), y)
    ns = {"x": x, "y": y, "noisy": noisy, "trusted": select_trusted(y, 50, seed=0)}
    exec(_snippet("### cleanlab Datalab"), ns)  # noqa: S102 - the README's code, as written
    flagged = ns["issues"]["is_dmlp_label_issue"].to_numpy()
    suggested = np.asarray(ns["info"]["suggested_label"])
    np.testing.assert_array_equal(flagged, suggested != noisy)
    assert (suggested == y).mean() > (noisy == y).mean() + 0.3 and ns["info"]["estimated_accuracy"]["estimate"] > 0.8
