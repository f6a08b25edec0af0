"""Features a user brings without images: `dataset.name: npy` with labels only (issue: features without images)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmlp_plugin.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "purify-digits.yaml")


def _run(*args):
    return subprocess.run([sys.executable, "-m", "dmlp_plugin", *args], capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                               "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def tabular(tmp_path_factory):
    """scikit-learn's wine table, standardised: 178 rows, 13 features, 3 classes; no images."""
    from sklearn.datasets import load_wine

    d = tmp_path_factory.mktemp("wine")
    x, y = load_wine(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    np.save(d / "x.npy", x.astype(np.float32))
    np.save(d / "y.npy", y.astype(np.int64))
    return d


def _sets(d, *extra):
    base = ["dataset.name=npy", f"dataset.params={{labels: {d / 'y.npy'}}}", "features.source=npy",
            f"features.path={d / 'x.npy'}", "features.second_view=random_relu", "trusted.size=12",
            "noise.rate=0.4", "checks.compare=[knn_vote, trusted_only]", "preprocessor.params={epochs: 10}", *extra]
    return sum((["--set", s] for s in base), [])


def test_labels_only_npy_data_set_purifies_your_features(tabular, tmp_path):
    r = _run("purify", CONFIG, "--out", str(tmp_path / "out"), "--no-progress", *_sets(tabular))
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["num_samples"] == 178 and m["num_classes"] == 3 and m["trusted"]["size"] == 12
    assert m["label_accuracy_after"] > m["label_accuracy_before"]


def test_a_pixel_view_without_images_is_a_config_error(tabular, tmp_path):
    r = _run("purify", CONFIG, "--out", str(tmp_path / "out"), "--no-progress",
             *_sets(tabular, "features.second_view=raw"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "features.second_view=raw needs images" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_ssl_features_without_images_is_a_config_error(tabular, tmp_path):
    r = _run("purify", CONFIG, "--out", str(tmp_path / "out"), "--no-progress", *_sets(tabular, "features.source=ssl"))
    assert r.returncode == 2 and "features.source=ssl needs images" in r.stderr and "Traceback" not in r.stderr


def test_all_zero_features_are_a_one_line_error(tabular, tmp_path):
    np.save(tmp_path / "zero.npy", np.zeros((178, 13), np.float32))
    r = _run("purify", CONFIG, "--out", str(tmp_path / "out"), "--no-progress",
             *_sets(tabular, f"features.path={tmp_path / 'zero.npy'}"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert "has 178 all-zero rows (first: row 0)" in r.stderr


def test_constant_feature_columns_get_a_named_cause():
    import torch

    from dmlp_plugin.purifier.dmlp import _factorise

    gram = torch.full((4, 4), float("nan"))
    with pytest.raises(UserError, match="zero or not finite"):
        _factorise(gram, 1e-3)
    # a rank-deficient Gram (a duplicated column) still factorises: the ridge makes it definite
    x = torch.randn(50, 3, dtype=torch.float64)
    x = torch.cat([x, x[:, :1]], dim=1)
    assert torch.isfinite(_factorise(x.T @ x, 1e-3)).all()


def test_fewer_than_two_trusted_samples_per_class_warns_with_the_count(tabular, tmp_path):
    r = _run("purify", CONFIG, "--out", str(tmp_path / "out"), "--no-progress", *_sets(tabular, "trusted.size=3"))
    assert r.returncode == 0, r.stderr
    assert "fewer than 2 samples of class(es) [0, 1, 2] (1 at least; 3 trusted in all)" in r.stderr


def test_bench_refuses_a_labels_only_data_set(tabular, tmp_path):
    from dmlp_plugin.bench import bench_run
    from dmlp_plugin.config import BenchConfig, load_config

    cfg, raw = load_config(str(ROOT / "configs" / "demo.yaml"), ["dataset.name=npy",
                           f"dataset.params={{labels: {tabular / 'y.npy'}}}", "features.source=npy",
                           f"features.path={tabular / 'x.npy'}"], schema=BenchConfig)
    with pytest.raises(UserError, match="has no images .*methods train on images"):
        bench_run(cfg, tmp_path / "b", raw, progress=False)
    assert not (tmp_path / "b").exists()
