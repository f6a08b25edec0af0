"""`dmlp export`: labels.npz in the formats of DivideMix, ELR, cleanlab and CSV, and DivideMix's JSON noise
file read back by `noise.file`."""

import csv
import json

import numpy as np
import pytest

from dmlp_plugin.artifacts import LabelsArtifact, save_labels
from dmlp_plugin.cli import main
from dmlp_plugin.data.noise import apply_noise
from dmlp_plugin.errors import UserError
from dmlp_plugin.export import dividemix_name, export_labels, given_labels

N, C = 300, 10


def _artifact(path, kind="symmetric", rate=0.8, one_hot=False, dataset="digits", n=N):
    rng = np.random.default_rng(0)
    truth = rng.integers(0, C, n)
    noisy = apply_noise(truth, C, kind="symmetric", rate=0.8, seed=0).labels
    soft = rng.dirichlet(np.ones(C), n).astype(np.float32)
    soft[np.arange(n), truth] += 3.0
    soft /= soft.sum(1, keepdims=True)
    if one_hot:
        soft = np.eye(C, dtype=np.float32)[noisy]
    meta = np.arange(0, n, 10)
    art = LabelsArtifact(hard=soft.argmax(1).astype(np.int64), soft=soft, confidence=soft.max(1),
                         neighbour_agreement=np.ones(n, np.float32), noisy=noisy, meta_indices=meta,
                         meta_labels=truth[meta], fingerprint="f" * 16, true_labels=truth,
                         provenance={"config": {"dataset": {"name": dataset}, "noise": {"kind": kind, "rate": rate}}})
    save_labels(path, art)
    return art


@pytest.fixture
def art_path(tmp_path):
    path = tmp_path / "labels.npz"
    return path, _artifact(path)


def test_dividemix_file_has_divide_mix_name_and_reads_back_as_noise_file(tmp_path, art_path):
    path, art = art_path
    rec = export_labels(path, "dividemix", tmp_path / "cifar-10-batches-py")
    out = tmp_path / "cifar-10-batches-py" / "0.8_sym.json"
    assert rec["files"] == [str(out)] and rec["labels"] == "purified"
    data = json.loads(out.read_text())
    assert isinstance(data, list) and all(type(v) is int for v in data) and data == art.hard.tolist()
    assert any("50,000 CIFAR" in w for w in rec["warnings"])  # digits, not CIFAR: said, still written
    assert "--r 0.8 --noise_mode sym" in rec["note"]
    # the round trip: noise.file takes DivideMix's JSON list and gives the same labels
    back = apply_noise(art.true_labels, C, kind="human", file=str(out))
    np.testing.assert_array_equal(back.labels, art.hard)
    assert back.details["file"] == str(out) and back.flip_rate == pytest.approx(np.mean(art.hard != art.true_labels))
    # the noisy arm's labels: the given ones with the trusted labels put in
    export_labels(path, "dividemix", tmp_path / "noisy", labels="noisy")
    noisy = json.loads((tmp_path / "noisy" / "0.8_sym.json").read_text())
    assert noisy == given_labels(art).tolist() and noisy != art.noisy.tolist()


def test_dividemix_names_follow_its_format_string(tmp_path):
    assert dividemix_name(0.8, "sym") == "0.8_sym.json" and dividemix_name(0.4, "asym") == "0.4_asym.json"
    path = tmp_path / "a.npz"
    _artifact(path, kind="asymmetric", rate=0.4)
    assert export_labels(path, "dividemix", tmp_path / "o")["files"] == [str(tmp_path / "o" / "0.4_asym.json")]
    _artifact(path, kind="pairflip", rate=0.45)
    with pytest.raises(UserError, match="which has no DivideMix name; give --mode and --rate"):
        export_labels(path, "dividemix", tmp_path / "o")
    rec = export_labels(path, "dividemix", tmp_path / "o", rate=0.45, mode="pair")
    assert rec["files"] == [str(tmp_path / "o" / ("%.1f_pair.json" % 0.45))]
    rec = export_labels(path, "dividemix", tmp_path / "mine.json", rate=0.2, mode="sym")  # a file: kept, but warned
    assert rec["files"] == [str(tmp_path / "mine.json")] and any("rename mine.json to 0.2_sym.json" in w
                                                                 for w in rec["warnings"])
    for bad, match in (({"mode": "../x"}, "not a file-name part"), ({"rate": 1.5}, "outside")):
        with pytest.raises(UserError, match=match):
            export_labels(path, "dividemix", tmp_path / "o", **{"rate": 0.5, "mode": "sym", **bad})


def test_cifar_sized_artifact_exports_without_warnings(tmp_path):
    path = tmp_path / "c.npz"
    art = _artifact(path, dataset="cifar10", n=50000)
    rec = export_labels(path, "dividemix", tmp_path / "d")
    assert rec["warnings"] == [] and len(json.loads(open(rec["files"][0]).read())) == 50000
    assert art.hard.size == 50000


def test_elr_cleanlab_and_csv(tmp_path, art_path):
    path, art = art_path
    rec = export_labels(path, "elr", tmp_path / "elr")
    y = np.load(tmp_path / "elr" / "labels.npy", allow_pickle=False)
    assert y.dtype == np.int64 and np.array_equal(y, art.hard) and "indexs" in rec["note"]
    rec = export_labels(path, "cleanlab", tmp_path / "cl")
    labels, probs = (np.load(tmp_path / "cl" / f, allow_pickle=False) for f in ("labels.npy", "pred_probs.npy"))
    assert rec["labels"] == "noisy" and np.array_equal(labels, given_labels(art))
    assert probs.dtype == np.float32 and probs.shape == (N, C)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, art.soft, atol=1e-6)
    export_labels(path, "csv", tmp_path / "l.csv")
    rows = list(csv.reader(open(tmp_path / "l.csv")))
    assert rows[0] == ["index", "label", "confidence"] and len(rows) == N + 1
    assert [int(r[1]) for r in rows[1:]] == art.hard.tolist() and [int(r[0]) for r in rows[1:]] == list(range(N))
    np.testing.assert_allclose([float(r[2]) for r in rows[1:]], art.confidence, atol=1e-6)
    export_labels(path, "csv", tmp_path / "n.csv", labels="noisy")  # confidence: the soft mass on the given label
    rows = list(csv.reader(open(tmp_path / "n.csv")))[1:]
    g = given_labels(art)
    np.testing.assert_allclose([float(r[2]) for r in rows], art.soft[np.arange(N), g], atol=1e-6)


def test_cleanlab_finds_issues_on_the_export(tmp_path, art_path):
    filt = pytest.importorskip("cleanlab.filter")
    path, art = art_path
    export_labels(path, "cleanlab", tmp_path / "cl")
    labels, probs = (np.load(tmp_path / "cl" / f) for f in ("labels.npy", "pred_probs.npy"))
    issues = filt.find_label_issues(labels, probs)
    wrong = labels != art.true_labels
    assert issues.sum() > 0 and np.mean(wrong[issues]) > 0.9  # what it flags are the wrong given labels


def test_cleanlab_refuses_one_hot_soft_labels(tmp_path):
    path = tmp_path / "id.npz"
    _artifact(path, one_hot=True)
    with pytest.raises(UserError, match="one-hot soft labels only"):
        export_labels(path, "cleanlab", tmp_path / "cl")
    assert not (tmp_path / "cl").exists()


@pytest.mark.parametrize("args, message", [
    (["--format", "parquet", "--out", "x"], "invalid choice: 'parquet'"),
    (["--format", "csv", "--out", "x.json"], "format csv writes a .csv file"),
    (["--format", "cleanlab", "--out", "x.npy"], "give a folder"),
    (["--format", "elr", "--out", "x", "--rate", "0.5"], "format elr does not use them"),
])
def test_bad_export_arguments_are_one_line_exit_2(tmp_path, art_path, capsys, monkeypatch, args, message):
    path, _ = art_path
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_missing_or_foreign_artifact_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope.npz"), "--format", "csv", "--out", str(tmp_path / "o")]) == 2
    assert "not found; run `dmlp purify" in capsys.readouterr().err
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    assert main(["export", str(tmp_path / "other.npz"), "--format", "csv", "--out", str(tmp_path / "o"), "--json"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["ok"] is False and "lacks hard" in err


def test_export_cli_json(tmp_path, art_path, capsys):
    path, art = art_path
    assert main(["export", str(path), "--format", "dividemix", "--out", str(tmp_path / "dm"), "--json"]) == 0
    out, err = capsys.readouterr()
    rec = json.loads(out)
    assert rec["ok"] and rec["files"] == [str(tmp_path / "dm" / "0.8_sym.json")] and rec["num_samples"] == N
    assert "wrote" in err and "warning: DivideMix's dataloader_cifar.py" in err


# ---- noise.file: DivideMix's JSON list ------------------------------------------------------------------


@pytest.mark.parametrize("text, match", [
    ("[1, 2,", "not valid JSON"), ('{"labels": [1]}', "holds a JSON dict"), ("[]", "holds a JSON list"),
    ("[1, 2.5]" + ", 0" * (N - 2) + "]", "not valid JSON"), ("[1, 2.5" + ", 0" * (N - 2) + "]", "item 1 is 2.5"),
    ("[true" + ", 0" * (N - 1) + "]", "item 0 is True"), ("[1, 2, 3]", f"hold 3 labels but the training split has {N}"),
    ("[10" + ", 0" * (N - 1) + "]", "outside 0..9"),
])
def test_bad_json_noise_files_are_user_errors(tmp_path, text, match):
    path = tmp_path / "0.8_sym.json"
    path.write_text(text)
    with pytest.raises(UserError, match=match):
        apply_noise(np.zeros(N, np.int64), C, kind="human", file=str(path))


def test_json_noise_file_takes_no_key(tmp_path):
    path = tmp_path / "0.8_sym.json"
    path.write_text(json.dumps([0] * N))
    with pytest.raises(UserError, match="is a .json holding one array; remove the key"):
        apply_noise(np.zeros(N, np.int64), C, kind="human", file=str(path), key="labels")
