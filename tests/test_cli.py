"""`dmlp purify` as a user runs it: files written, metrics present, bad input gives one clean line."""

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmlp_plugin.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "purify-digits.yaml")
FAST = ["--set", "features.source=raw", "--no-progress", "--set", "checks.estimate_folds=0"]  # raw pixels: no SSL


def _run(*args):
    return subprocess.run([sys.executable, "-m", "dmlp_plugin", *args], capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})


@pytest.fixture(scope="module")
def purified(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    # the one CLI run that also estimates the accuracy without true labels (2 folds)
    r = _run("purify", CONFIG, "--out", str(out), *FAST, "--set", "checks.estimate_folds=2",
             "--set", "noise.kind=symmetric", "--set", "noise.rate=0.8",
             "--set", "seed=0")
    assert r.returncode == 0, r.stderr
    return out, r


def test_purify_writes_the_artifact_metrics_and_report(purified):
    out, r = purified
    assert {"labels.npz", "metrics.json", "report.md", "label_accuracy.png", "transition_matrix.png"} <= {
        p.name for p in out.iterdir()}
    m = json.loads((out / "metrics.json").read_text())
    assert m["noise"]["kind"] == "symmetric" and m["noise"]["rate"] == 0.8 and m["seed"] == 0
    assert 0.2 < m["label_accuracy_before"] < 0.35
    assert m["label_accuracy_after"] > m["knn_vote"]["label_accuracy_after"]
    assert m["label_accuracy_after"] > m["label_accuracy_before"] + 0.4
    with np.load(out / "labels.npz", allow_pickle=False) as z:
        assert z["hard"].dtype.kind == "i" and z["hard"].shape == (m["num_samples"],)
        assert z["soft"].shape == (m["num_samples"], 10)
        for key in ("confidence", "neighbour_agreement", "noisy", "meta_indices"):
            assert key in z.files
    report = (out / "report.md").read_text()
    assert "| noisy (before) |" in report and "knn_vote" in report
    assert "label accuracy: noisy" in r.stdout
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning")
              and not line.startswith("warning: the load average")]  # a busy machine may add that one
    assert m["trusted_separability"]["at_chance"] is False and not warned
    # the accuracy estimated without true labels: dmlp and every comparison, an interval, its time counted
    est = m["estimated_accuracy"]
    assert set(est) == {"dmlp", "knn_vote", "trusted_only", "cleanlab"} and est["dmlp"]["folds"] == 2
    assert all(0 <= e["low"] <= e["estimate"] <= e["high"] <= 1 for e in est.values())
    assert est["knn_vote"]["setting"] == {"k": m["knn_vote"]["k"], "views": m["knn_vote"]["views"]}
    assert est["dmlp"]["estimate"] > est["cleanlab"]["estimate"] - 0.2 and m["seconds"]["estimate"] > 0
    assert "estimated without true labels (2-fold over the 40 trusted" in r.stdout
    assert "## Label accuracy estimated without true labels" in report


def test_comparisons_report_their_setting_and_seconds(purified):
    out, r = purified
    m = json.loads((out / "metrics.json").read_text())
    knn = m["knn_vote"]
    # raw pixels twice (features.source=raw, second_view raw): one distinct view, searched once
    assert knn["view_sets"] == ["1"] and knn["views"] == "1" and knn["ks"] == [5, 10, 20, 50, 100, 200]
    assert knn["label_accuracy_after"] == max(knn["by_views_k"]["1"].values()) == knn["by_views_k"]["1"][str(knn["k"])]
    assert "true labels" in knn["note"]
    cl = m["cleanlab"]
    assert cl["folds"] == 5 and cl["label_accuracy_after"] > m["label_accuracy_before"] + 0.2
    sec = m["seconds"]
    names = ("knn_vote", "trusted_only", "cleanlab")
    assert all(sec[f"compare_{n}"] == m[n]["seconds"] > 0 for n in names)
    assert sec["total"] >= sum(sec[f"compare_{n}"] for n in names) + sec["purify"]
    shown = rf"knn_vote {knn['label_accuracy_after']:.4f} \(k {knn['k']}, views 1, [\d.]+ s\)"
    assert re.search(shown, r.stdout), r.stdout
    assert re.search(r"cleanlab 0\.\d{4} \([\d.]+ s\).*; total [\d.]+ s", r.stdout), r.stdout
    report = (out / "report.md").read_text()
    assert "| labels | accuracy | setting | seconds |" in report
    row = rf"\| knn_vote \| {knn['label_accuracy_after']:.4f} \| k {knn['k']}, views 1; best of k 5\.\.200"
    assert re.search(row, report)
    assert re.search(r"\| cleanlab \| 0\.\d{4} \| 5-fold logistic regression", report)
    assert "| compare_cleanlab |" in report and "| views | k 5 | k 10 |" in report


def test_cleanlab_not_installed_as_a_comparison_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # `import cleanlab` raises ImportError
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    fast = [*FAST, "--set", "preprocessor.name=identity", "--set", "preprocessor.params={}",
            "--set", "checks.compare=[knn_vote, cleanlab]"]
    assert main(["purify", CONFIG, "--out", str(tmp_path / "o"), *fast]) == 0
    shown = capsys.readouterr().out
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["cleanlab"]["label_accuracy_after"] is None
    assert m["cleanlab"]["status"] == "not installed: pip install 'dmlp_plugin[cleanlab]'"
    assert "cleanlab not installed: pip install 'dmlp_plugin[cleanlab]'" in shown
    report = (tmp_path / "o" / "report.md").read_text()
    assert "| cleanlab | n/a | not installed: pip install 'dmlp_plugin[cleanlab]' |" in report
    # chosen as the preprocessor: refused before any work, one line naming the command
    code = main(["purify", CONFIG, "--out", str(tmp_path / "p"), *FAST, "--set", "preprocessor.name=cleanlab",
                 "--set", "preprocessor.params={}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: preprocessor 'cleanlab' needs the cleanlab package") and \
        "pip install 'dmlp_plugin[cleanlab]'" in err
    assert not (tmp_path / "p").exists()


def test_features_in_another_order_are_flagged(tmp_path, capsys):
    # a user's own features whose rows are not in the data set's training order: the run completes (nothing
    # can prove the order wrong) but says so, because the trusted samples' classes are not told apart
    from dmlp_plugin.config import load_config
    from dmlp_plugin.pipeline import load_data, raw_pixel_features

    cfg, _ = load_config(CONFIG)
    x = raw_pixel_features(load_data(cfg).train.images)
    np.save(tmp_path / "mine.npy", x)
    np.save(tmp_path / "shuffled.npy", x[np.random.default_rng(0).permutation(len(x))])
    for name, flagged in (("mine", False), ("shuffled", True)):
        code = main(["purify", CONFIG, "--out", str(tmp_path / name), "--no-progress", "--set", "features.source=npy",
                     "--set", f"features.path={tmp_path / (name + '.npy')}", "--set", "preprocessor.params={epochs: 5}"])
        err = capsys.readouterr().err
        assert code == 0, err
        sep = json.loads((tmp_path / name / "metrics.json").read_text())["trusted_separability"]
        assert sep["at_chance"] is flagged
        assert ("warning: the features do not tell the 40 trusted samples' classes apart" in err) is flagged
        assert ("training order" in err) is flagged


def test_dmlp_and_python_dash_m_are_the_same_program():
    exe = Path(sys.executable).with_name("dmlp")
    a = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    b = _run("--help")
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout and "purify" in a.stdout


# the catalogue of bad data and config inputs is tests/test_catalogue.py; these are the purifier's settings
BAD = [
    (["--set", "preprocessor.params={epochz: 3}"], r"preprocessor\.params: unknown key 'epochz'.*did you mean 'epochs'"),
    (["--set", "preprocessor.params={epochs: 3}"], r"eac_period=5 > epochs=3, so the cross-view exchange would never fire"),
    (["--set", "preprocessor.params={eac_mix: 0}"], r"preprocessor\.params\.eac_mix=0\.0 must be in \(0, 1\]"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[b[0][-1] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code = main(["purify", CONFIG, "--out", str(out), *FAST, *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    import re

    assert re.search(message, err), err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no staging folder left behind either


def test_malformed_yaml_and_missing_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("noise: {kind: symmetric\nrate: 0.5\n")
    assert main(["purify", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "is not valid YAML at line" in capsys.readouterr().err
    assert main(["purify", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["purify", CONFIG, "--out", str(blocker), *FAST]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_own_features_from_npy(tmp_path, capsys):
    # a user brings (N, d) features of the digits training split; NaN rows are refused with the row named
    from dmlp_plugin.data.datasets import load_digits

    n = len(load_digits().train)
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((n, 16)).astype(np.float32)
    np.save(tmp_path / "f.npy", feats)
    code = main(["purify", CONFIG, "--out", str(tmp_path / "o"), "--no-progress", "--set", "features.source=npy",
                 "--set", f"features.path={tmp_path / 'f.npy'}", "--set", "preprocessor.params={epochs: 5}"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "labels.npz").is_file()
    feats[7, 3] = np.nan
    np.save(tmp_path / "g.npy", feats)
    code = main(["purify", CONFIG, "--out", str(tmp_path / "p"), "--no-progress", "--set", "features.source=npy",
                 "--set", f"features.path={tmp_path / 'g.npy'}"])
    err = capsys.readouterr().err
    assert code == 2 and "NaN or Inf values (first in row 7)" in err
    np.save(tmp_path / "h.npy", feats[:10])
    code = main(["purify", CONFIG, "--out", str(tmp_path / "q"), "--no-progress", "--set", "features.source=npy",
                 "--set", f"features.path={tmp_path / 'h.npy'}"])
    assert code == 2 and "has 10 rows but the data set has" in capsys.readouterr().err


def test_second_view_from_raw_pixels(tmp_path):
    # view 2 = standardised pixels (unlike errors to a learned view 1); an unknown view kind is a config error
    from dmlp_plugin.config import load_config
    from dmlp_plugin.pipeline import load_data, make_views, raw_pixel_features, validate

    data = load_data(load_config(CONFIG, [])[0])
    n = len(data.train)
    np.save(tmp_path / "f.npy", np.random.default_rng(0).standard_normal((n, 16)).astype(np.float32))
    cfg, _ = load_config(CONFIG, ["features.source=npy", f"features.path={tmp_path / 'f.npy'}",
                                  "features.second_view=raw"])
    views = make_views(cfg, data, "cpu", validate(cfg), progress=False)
    v2 = views.arrays[1]
    assert v2.shape == (n, 64) and views.provenance["dims"] == [16, 64]
    np.testing.assert_allclose(np.linalg.norm(v2, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(v2, raw_pixel_features(data.train.images))
    # standardised per pixel before the row norm: a pixel's column is centred (constant pixels are 0)
    x = data.train.images.reshape(n, -1).astype(np.float64)
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    np.testing.assert_allclose(v2, z / np.linalg.norm(z, axis=1, keepdims=True), atol=1e-5)
    code = main(["purify", CONFIG, "--out", str(tmp_path / "o"), "--no-progress",
                 "--set", "features.second_view=pixels"])
    assert code == 2 and not (tmp_path / "o").exists()


def test_same_config_and_seed_give_bitwise_identical_labels(tmp_path):
    # two runs of the same command: identical hard and soft labels, bit for bit; the report names the seed,
    # the versions and the config hash
    args = ["--no-progress", "--set", "features.source=raw", "--set", "preprocessor.params={epochs: 10}",
            "--set", "seed=3"]
    assert main(["purify", CONFIG, "--out", str(tmp_path / "a"), *args]) == 0
    assert main(["purify", CONFIG, "--out", str(tmp_path / "b"), *args]) == 0
    a, b = np.load(tmp_path / "a" / "labels.npz"), np.load(tmp_path / "b" / "labels.npz")
    for key in ("hard", "soft", "confidence", "meta_indices", "noisy"):
        assert a[key].tobytes() == b[key].tobytes(), key
    report = (tmp_path / "a" / "report.md").read_text()
    assert "seed 3" in report and "config hash `" in report and "torch " in report
    assert not list(Path(".dmlp_cache").glob("purify-*.pt"))  # the purifier's checkpoint goes once DIR is written
