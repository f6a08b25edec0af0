"""`dmlp bench` as a user runs it: the A/B grid, a fair noisy arm, the files it writes, resuming, bad configs."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from dmlp_plugin import bench
from dmlp_plugin.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
# raw pixels (no SSL training), a short purifier and a 2-epoch CE: the whole path in seconds
FAST = ["--no-progress", "--set", "features.source=raw", "--set", "checks.estimate_folds=0",
        "--set", "preprocessor.params={epochs: 10}",
        "--set", "seeds=[0]", "--set", "methods=[{name: ce, params: {epochs: 2}}]"]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    code = main(["bench", DEMO, "--out", str(out), *FAST])
    assert code == 0
    return out


def test_bench_writes_results_report_and_plots(ran):
    files = {p.name for p in ran.iterdir()}
    assert {"results.json", "results.csv", "report.md", "ab_accuracy.png", "ab_deltas.png", "curves.png",
            "purification.json", "config.yaml"} <= files
    runs = json.loads((ran / "results.json").read_text())
    assert [(r["method"], r["labels"], r["seed"]) for r in runs] == [("ce", "noisy", 0), ("ce", "purified", 0)]
    for r in runs:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["seconds"] > 0
        assert r["test_accuracy"] == r["curve"][-1]["test_accuracy"]  # the last epoch, not the best
        assert r["trusted_size"] == 40  # 3% of 1,437 = 43, balanced: 4 per class
    noisy, purified = runs
    # purification made the training labels better, and the report says by how much
    assert purified["label_accuracy"] > noisy["label_accuracy"] + 0.3
    rows = list(csv.DictReader((ran / "results.csv").open()))
    assert len(rows) == 2 and {"method", "labels", "seed", "test_accuracy", "seconds"} <= set(rows[0])
    report = (ran / "report.md").read_text()
    assert re.search(r"\| symmetric-80 \| ce \| purified \| [\d.]+ \| [\d.]+ \| [+-][\d.]+ \|", report)
    assert "M = 40" in report and "LAST epoch" in report
    # the purification table: every comparison (cleanlab too), knn_vote's k and views, and their seconds
    assert "| knn_vote | knn k, views | trusted_only | cleanlab | purify s | comparisons s |" in report
    m = json.loads((ran / "purification.json").read_text())["symmetric-80-s0"]
    assert re.search(rf"\| symmetric-80-s0 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| {m['knn_vote']['k']}, "
                     rf"{m['knn_vote']['views']} \| [\d.]+ \| {100 * m['cleanlab']['label_accuracy_after']:.2f} \|", report)


def test_noisy_arm_spends_the_same_trusted_labels(ran):
    from dmlp_plugin.artifacts import load_labels

    art = load_labels(ran / "purify" / "symmetric-80-s0" / "labels.npz")
    noisy_arm = bench.arm_labels("noisy", art)
    np.testing.assert_array_equal(noisy_arm[art.meta_indices], art.meta_labels)
    rest = np.setdiff1d(np.arange(len(noisy_arm)), art.meta_indices)
    np.testing.assert_array_equal(noisy_arm[rest], art.noisy[rest])
    np.testing.assert_array_equal(bench.arm_labels("purified", art), art.hard)
    soft = bench.arm_labels("purified_soft", art)
    assert soft.shape == art.soft.shape and soft.dtype == np.float32


def test_rerun_skips_finished_runs(ran, monkeypatch, capsys):
    from baselines.ce import CE

    def fail(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(CE, "run", fail)
    before = json.loads((ran / "results.json").read_text())
    assert main(["bench", DEMO, "--out", str(ran), *FAST]) == 0
    after = json.loads((ran / "results.json").read_text())
    assert [r["test_accuracy"] for r in after] == [r["test_accuracy"] for r in before]
    assert "ce" in capsys.readouterr().out


def test_changed_settings_rerun_only_what_changed(ran, monkeypatch):
    from baselines.ce import CE

    calls = []
    real = CE.run

    def spy(self, data, **kw):
        calls.append(self.epochs)
        return real(self, data, **kw)

    monkeypatch.setattr(CE, "run", spy)
    args = [a if a != "methods=[{name: ce, params: {epochs: 2}}]" else "methods=[{name: ce, params: {epochs: 1}}]"
            for a in FAST]
    assert main(["bench", DEMO, "--out", str(ran), *args]) == 0
    assert calls == [1, 1]
    runs = json.loads((ran / "results.json").read_text())
    assert all(len(r["curve"]) == 1 for r in runs)


BAD = [
    (["--set", "methods=[{name: dividemixx}]"], r"unknown method 'dividemixx' \(did you mean 'dividemix'"),
    (["--set", "methods=[{name: ce, preset: huge}]"], r"methods\[0\] \(ce\).*unknown preset 'huge'"),
    (["--set", "methods=[{name: ce, params: {epoch: 3}}]"], r"methods\[0\] \(ce\).*no field\(s\) \['epoch'\]"),
    (["--set", "methods=[{name: ce, params: {lr: -1}}]"], r"methods\[0\] \(ce\).*lr=-1"),
    (["--set", "arms=[noisy, cleaned]"], r"unknown arm 'cleaned'"),
    (["--set", "seeds=[]"], r"seeds is empty"),
    (["--set", "noise=[{kind: symmetric, rate: 1.2}]"], r"noise\.rate=1\.2 is outside \[0, 1\)"),
    (["--set", "noise=[{kind: symmetric, rat: 0.2}]"], r"unknown key 'rat'.*did you mean 'rate'"),
    (["--set", "methods=[{name: ce}, {name: ce}]"], r"lists 'ce' twice"),
    (["--set", "dataset.params={test_fraction: 0}"], r"no test split"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[b[0][-1] for b in BAD])
def test_bad_bench_config_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code = main(["bench", DEMO, "--out", str(out), "--no-progress", "--set", "features.source=raw", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not out.exists()


def _purify_cli(out: Path, *extra):
    """`dmlp purify` as a user runs it before benchmarking: raw-pixel features, a short purifier."""
    code = main(["purify", str(ROOT / "configs" / "purify-digits.yaml"), "--out", str(out), "--no-progress",
                 "--set", "features.source=raw", "--set", "preprocessor.params={epochs: 10}",
                 "--set", "noise.rate=0.8", *extra])
    assert code == 0


def test_bench_trains_on_labels_purified_earlier(tmp_path, capsys):
    # purify once (here seed 0), benchmark later: the purified arm trains on exactly the artifact's labels, both
    # arms spend its trusted subset, and no features are made (the SSL settings of demo.yaml are never run)
    from dmlp_plugin.artifacts import load_labels

    _purify_cli(tmp_path / "p-symmetric-80-s0", "--set", "seed=0", "--set", "trusted.size=0.05")
    capsys.readouterr()
    art = load_labels(tmp_path / "p-symmetric-80-s0" / "labels.npz")
    out = tmp_path / "bench"
    args = ["bench", DEMO, "--out", str(out), "--no-progress", "--set", "seeds=[0]",
            "--set", "methods=[{name: ce, params: {epochs: 2}}]",
            "--set", f"features.cache_dir={tmp_path / 'cache'}",
            "--set", f"purified_labels={tmp_path}/p-{{noise}}-s{{seed}}/labels.npz"]
    assert main(args) == 2  # demo.yaml draws 3% trusted labels: not what the artifact was made with
    assert re.search(r"was made with trusted .* but the cell has", capsys.readouterr().err)
    args += ["--set", "trusted.size=0.05"]
    assert main(args) == 0
    assert not (tmp_path / "cache").exists() and not (out / "purify").exists()  # nothing made, nothing purified
    noisy, purified = json.loads((out / "results.json").read_text())
    assert purified["label_accuracy"] == pytest.approx(np.mean(art.hard == art.true_labels))
    arm = bench.arm_labels("noisy", art)
    assert noisy["label_accuracy"] == pytest.approx(np.mean(arm == art.true_labels))
    assert noisy["trusted_size"] == purified["trusted_size"] == art.meta_indices.size == 70  # 5%, not demo's 3%
    report = (out / "report.md").read_text()
    assert "purified labels: given" in report and "| symmetric-80 | ce | purified |" in report
    assert "preprocessor: `dmlp` {'epochs': 10}" in report  # what made the labels, from the artifact
    made = json.loads((tmp_path / "p-symmetric-80-s0" / "metrics.json").read_text())
    shown = json.loads((out / "purification.json").read_text())["symmetric-80-s0"]
    assert shown["knn_vote"] == made["knn_vote"] and shown["label_accuracy_after"] == made["label_accuracy_after"]
    # the same artifact for another seed: those are other noisy labels, refused before any training
    other = [*args[:3], str(tmp_path / "bench1"), args[4], "--set", "seeds=[1]", *args[7:],
             "--set", f"purified_labels={tmp_path}/p-symmetric-80-s0/labels.npz"]
    assert main(other) == 2
    err = capsys.readouterr().err
    assert re.search(r"\(noise symmetric-80, seed 1\) was made with seed 0 but the cell has 1", err), err
    assert not (tmp_path / "bench1").exists()
