"""The CLI as scripts and people read it: bare `dmlp`, --json (one object on stdout), -q / -v, the purify
summary line, `dmlp env`, the bench's aligned table, and the plots and tables of the reports."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmlp_plugin.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "purify-digits.yaml")
FAST = ["--set", "features.source=raw", "--set", "checks.estimate_folds=0", "--set", "preprocessor.params={epochs: 10}",
        "--set", "noise.rate=0.8"]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "dmlp_plugin", *args], capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                               "OMP_NUM_THREADS": "1"})


def test_bare_dmlp_prints_help_and_exits_0():
    r = _run()
    assert r.returncode == 0 and r.stdout.startswith("usage: dmlp") and "export" in r.stdout and "env" in r.stdout
    assert r.stderr == ""


@pytest.fixture(scope="module")
def purified_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("surface") / "p"
    r = _run("purify", CONFIG, "--out", str(out), *FAST, "--json")
    assert r.returncode == 0, r.stderr
    return out, r


def test_purify_json_is_one_object_on_stdout_and_words_on_stderr(purified_json):
    out, r = purified_json
    obj = json.loads(r.stdout)  # the whole of stdout is one JSON object
    assert r.stdout.count("\n") == 1 and obj["ok"] and obj["command"] == "purify"
    s = obj["summary"]
    assert s["noise_kind"] == "symmetric" and s["noise_rate_requested"] == 0.8 and 0.6 < s["noise_rate_measured"] < 0.8
    assert s["trusted"] == 40 and s["seconds"] > 0 and obj["labels"] == str(out / "labels.npz")
    assert obj["metrics"] == json.loads((out / "metrics.json").read_text())
    assert "label accuracy: noisy" in r.stderr and "dmlp purify" in r.stderr  # the lines and the progress bar


def test_purify_summary_line_quiet_and_verbose(tmp_path, capsys):
    assert main(["purify", CONFIG, "--out", str(tmp_path / "a"), *FAST, "--no-progress"]) == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(rf"1437 samples, noise symmetric requested 0\.8, measured flip rate 0\.\d{{4}}; 40 trusted; "
                        rf"[\d.]+ s; wrote {re.escape(str(tmp_path / 'a' / 'labels.npz'))}, metrics.json, report.md",
                        last), last
    assert main(["purify", CONFIG, "--out", str(tmp_path / "b"), *FAST, "-q"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "dmlp purify" not in err  # no lines, no progress bar
    assert main(["purify", CONFIG, "--out", str(tmp_path / "c"), *FAST, "-v", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "seconds per stage: data " in out and re.search(r"label accuracy per class, untrusted samples "
                                                           r"\(before -> after\): 0 0\.\d{3}->\d\.\d{3}", out)
    assert main(["purify", CONFIG, "--out", str(tmp_path / "d"), "-q", "-v"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_json_error_is_still_one_object(tmp_path):
    r = _run("purify", CONFIG, "--out", str(tmp_path / "o"), "--set", "noise.rate=2", "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["ok"] is False
    assert r.stderr.startswith("error: noise.rate") or "noise.rate" in r.stderr
    r = _run("export", "x.npz", "--format", "nope", "--out", "o", "--json")  # refused by the parser itself
    assert r.returncode == 2 and "invalid choice" in json.loads(r.stdout)["error"]


def test_env_text_and_json():
    r = _run("env")
    assert r.returncode == 0, r.stderr
    for line in ("python: 3.", "torch: 2.", "timm: ", "accelerate: ", "faiss: ", "search backend ", "threads: torch ",
                 "data set digits: embedded", "devices: cpu"):
        assert line in r.stdout, (line, r.stdout)
    obj = json.loads(_run("env", "--json").stdout)
    assert obj["ok"] and obj["packages"]["faiss"]["backend"] in ("faiss-cpu", "faiss-gpu", "torch")
    assert obj["threads"]["usable_cpus"] >= 1 and obj["threads"]["torch_threads"] >= 1
    assert obj["datasets"]["digits"] and set(obj["datasets"]) == {"digits", "mnist5k", "fashion_mnist"}
    fm = Path("/usr/share/datasets/fashion-mnist")
    assert (obj["datasets"]["fashion_mnist"] is not None) == (fm / "train-labels-idx1-ubyte.gz").is_file()


def test_registry_list_json(capsys):
    assert main(["registry", "list", "preprocessors", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    names = [e["name"] for e in obj["components"]["preprocessors"]]
    assert "dmlp" in names and "knn_vote" in names
    assert main(["registry", "list", "noise", "-v"]) == 0
    assert "(dmlp_plugin.data.noise:symmetric_noise)" in capsys.readouterr().out


def test_bench_table_columns_line_up():
    from dmlp_plugin.bench_report import summarise, text_table

    recs = [{"noise_tag": tag, "method_label": m, "labels": arm, "seed": s, "test_accuracy": acc, "seconds": 1.0,
             "label_accuracy": 0.5} for tag in ("symmetric-80", "pairflip-45") for m in ("ce", "coteaching")
            for arm, acc in (("noisy", 0.512), ("purified", 0.9)) for s in (0, 1)]
    lines = text_table(summarise(recs))
    assert lines[0].split() == ["noise", "method", "labels", "test", "acc", "(%)", "delta"]
    ends = {len(line) - len(line.lstrip()) for line in lines}  # (no leading blanks)
    assert ends == {0}
    acc_end = {re.search(r"\d+\.\d\d ± \d+\.\d\d|test acc \(%\)", line).end() for line in lines}
    assert len(acc_end) == 1  # the test accuracy column ends at one place on every line
    assert lines[2].endswith("+38.80")


def test_purify_report_plots_and_per_class_table(purified_json):
    out, _ = purified_json
    report = (out / "report.md").read_text()
    assert "## Label accuracy per class, before and after" in report
    rows = re.findall(r"^\| (\d) \| (\d+) \| (0\.\d{4}) \| ([01]\.\d{4}) \| ([+-]\d+\.\d) \|$", report, re.M)
    assert [r[0] for r in rows] == [str(c) for c in range(10)]
    assert sum(int(r[1]) for r in rows) == 1437 - 40
    for name in ("per_class_accuracy.png", "transition_matrix.png", "confidence.png", "label_accuracy.png"):
        assert (out / name).stat().st_size > 10_000, name


def test_plots_have_titles_log_axis_and_readable_matrices(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dmlp_plugin import report

    saved = []
    real = report.save_figure
    report.save_figure = lambda fig, path: (saved.append(fig), real(fig, path))
    try:
        rng = np.random.default_rng(0)
        conf = rng.random(500)
        report.plot_confidence(conf, conf > 0.1, tmp_path / "c.png", "my title")
        truth = rng.integers(0, 10, 500)
        report.plot_transitions(truth, truth, truth, 10, tmp_path / "t.png")
        history = [{"epoch": e, "label_accuracy": 0.5 + e / 100} for e in range(1, 11)]
        metrics = {"label_accuracy_before": 0.3, "knn_vote": {"label_accuracy_after": 0.8, "k": 5, "views": "1"},
                   "trusted_only": {"label_accuracy_after": 0.8}, "dataset": "digits",
                   "noise": {"kind": "symmetric", "rate": 0.8}}
        report.plot_label_accuracy(history, metrics, tmp_path / "l.png")
    finally:
        report.save_figure = real
    conf_ax, = saved[0].axes
    assert conf_ax.get_yscale() == "log" and conf_ax.get_title() == "my title"
    left = saved[1].axes[0]
    assert len(left.texts) == 10 and left.texts[0].get_text() == "1"  # every diagonal cell carries its value
    assert left.get_xticklabels()[0].get_fontsize() >= 9
    lab_ax = saved[2].axes[0]
    assert "symmetric noise 80%" in lab_ax.get_title()
    styles = {}
    for line in lab_ax.get_lines():  # knn_vote's and trusted_only's lines at one accuracy: unlike markers
        if line.get_marker() not in (None, "None", "") and len(line.get_xdata()) > 1:
            styles.setdefault(float(line.get_ydata()[0]), set()).add((line.get_marker(), tuple(line.get_xdata())))
    assert len(styles[0.8]) == 2 and len({m for m, _ in styles[0.8]}) == 2 and len({x for _, x in styles[0.8]}) == 2
    plt.close("all")


def test_bench_report_axis_from_zero_no_zero_error_bars_and_transitions(tmp_path):
    from dmlp_plugin import bench_report, report
    from dmlp_plugin.artifacts import LabelsArtifact, save_labels

    saved = []
    real = report.save_figure
    bench_report.save_figure = lambda fig, path: (saved.append(fig), real(fig, path))
    try:
        recs = [{"noise_tag": "symmetric-80", "method_label": "ce", "labels": arm, "seed": 0, "test_accuracy": acc,
                 "seconds": 1.0, "label_accuracy": 0.5} for arm, acc in (("noisy", 0.7), ("purified", 0.75))]
        bench_report.plot_arms(bench_report.summarise(recs), tmp_path / "ab.png")
    finally:
        bench_report.save_figure = real
    ax = saved[0].axes[0]
    assert ax.get_ylim()[0] == 0 and not ax.containers[0].errorbar and "1 seed" in ax.get_title()
    # transition matrices of each noise setting's first cell, from its labels artifact
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 10, 200)
    art = LabelsArtifact(hard=truth, soft=np.eye(10, dtype=np.float32)[truth], confidence=np.ones(200, np.float32),
                         neighbour_agreement=np.ones(200, np.float32), noisy=rng.integers(0, 10, 200),
                         meta_indices=np.arange(10), meta_labels=truth[:10], fingerprint="f", true_labels=truth)
    save_labels(tmp_path / "purify" / "symmetric-80-s0" / "labels.npz", art)
    lines = bench_report.transition_section(tmp_path, {"symmetric-80-s0": {}, "symmetric-80-s1": {}, "x-s0": {}}, None)
    assert lines[0] == "## Noise transition matrices, before and after purification"
    assert "![transition matrices, symmetric-80-s0](transition_symmetric-80.png)" in lines
    assert (tmp_path / "transition_symmetric-80.png").is_file() and not (tmp_path / "transition_x.png").exists()


def test_bench_json_and_table(tmp_path, capsys):
    demo = str(ROOT / "configs" / "demo.yaml")
    fast = ["--no-progress", "--set", "features.source=raw", "--set", "checks.estimate_folds=0",
            "--set", "preprocessor.params={epochs: 10}", "--set", "seeds=[0]",
            "--set", "methods=[{name: ce, params: {epochs: 1}}]"]
    assert main(["bench", demo, "--out", str(tmp_path / "b"), *fast, "--json"]) == 0
    out, err = capsys.readouterr()
    obj = json.loads(out)
    assert obj["ok"] and obj["runs"] == 2 and [r["labels"] for r in obj["summary"]] == ["noisy", "purified"]
    assert err.splitlines()[0].split()[:3] == ["noise", "method", "labels"]  # the table went to stderr
    assert "## Noise transition matrices" in (tmp_path / "b" / "report.md").read_text()
