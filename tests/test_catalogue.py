"""The catalogue of bad inputs, through the command line as a user meets them: each gives exit code 2, one
line ``error: ...`` naming the bad value and what would be right, no traceback, and nothing in the output
folder. (More cases, at the module level, in test_cli.py, test_data.py, test_artifacts.py, test_registry.py.)

``python tests/test_catalogue.py`` prints the catalogue as a Markdown table (input, message, exit code)."""

import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
CONFIG = str(ROOT / "configs" / "purify-digits.yaml")
FAST = ["--no-progress", "--set", "features.source=raw", "--set", "preprocessor.params={epochs: 5}",
        "--set", "checks.estimate_folds=0"]
N = 1437  # digits training split


def _csv(folder, name, rows):
    (folder / name).write_text("index,label\n" + "".join(f"{i},{c}\n" for i, c in rows))


def _files(folder: Path) -> None:
    """Every bad input file the cases name, written into ``folder`` (the working directory of the run)."""
    np.save(folder / "f_nan.npy", np.where(np.arange(N * 4).reshape(N, 4) == 13, np.nan, 1.0).astype(np.float32))
    np.save(folder / "f_inf.npy", np.full((N, 4), np.inf, dtype=np.float32))
    np.save(folder / "f_str.npy", np.array(["a"] * N))
    np.save(folder / "f_1d.npy", np.ones(N, dtype=np.float32))
    np.save(folder / "f_short.npy", np.ones((100, 4), dtype=np.float32))
    (folder / "f_trunc.npy").write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (1437, 4")
    _csv(folder, "t_missing.csv", [(i, i % 9) for i in range(40)])
    _csv(folder, "t_range.csv", [(i, 12 if i == 5 else i % 10) for i in range(40)])
    _csv(folder, "t_neg.csv", [(i, -1 if i == 5 else i % 10) for i in range(40)])
    _csv(folder, "t_float.csv", [(i, 1.5 if i == 5 else i % 10) for i in range(40)])
    _csv(folder, "t_index.csv", [(i if i < 39 else 99999, i % 10) for i in range(40)])
    _csv(folder, "t_dup.csv", [(i % 39, i % 10) for i in range(40)])
    np.save(folder / "h_short.npy", np.arange(10) % 10)
    np.save(folder / "h_range.npy", np.full(N, 17))
    np.save(folder / "h_neg.npy", np.full(N, -1))
    np.save(folder / "h_float.npy", np.full(N, 1.5))
    cifar = folder / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"):
        (cifar / name).write_bytes(b"\x80\x04\x95")  # truncated pickles
    (folder / "bad.yaml").write_text("noise: {kind: symmetric\nrate: 0.5\n")
    (folder / "blocker").write_text("a file where a folder would have to be made")
    _hostile_files(folder)


def _hostile_files(folder: Path) -> None:
    """Issue 13's files: YAML bombs, degenerate features and trusted files, a one-class data set, a bad link."""
    base = Path(CONFIG).read_text()
    (folder / "dup.yaml").write_text(base + "\nseed: 3\n")
    (folder / "bomb.yaml").write_text(base + "\nlaughs:\n  a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"  {chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(9)))
    (folder / "deep.yaml").write_text("noise: " + "[" * 100_000 + "]" * 100_000 + "\n")
    (folder / "huge.yaml").write_text(base + "\nnoise_pairs: {" + ", ".join(f"k{i}: {i}" for i in range(120_000)) + "}\n")
    np.save(folder / "f_zero.npy", np.zeros((N, 4), dtype=np.float32))
    np.savez(folder / "f_npz.npz", features=np.ones((N, 4), dtype=np.float32))
    (folder / "f_npz.npz").rename(folder / "f_npz.npy")
    (folder / "f_empty.npy").write_bytes(b"")
    (folder / "t_empty.npy").write_bytes(b"")
    np.save(folder / "t_none.npy", np.zeros(0, dtype=np.int64))
    rng = np.random.default_rng(0)
    np.save(folder / "one_x.npy", rng.integers(0, 255, (200, 8, 8, 1)).astype(np.uint8))
    np.save(folder / "one_y.npy", np.full(200, 3))
    (folder / "dangling").symlink_to(folder / "nowhere")


# (what the user did, extra arguments after `dmlp purify CONFIG --out OUT`, regex the message must match)
CASES = [
    ("malformed YAML", ["@bad.yaml"], r"bad\.yaml.*is not valid YAML at line"),
    ("unknown config key", ["--set", "noise.rat=0.5"], r"unknown key 'rat' under 'noise' \(did you mean 'rate'"),
    ("--set without =", ["--set", "noise.rate"], r"expected KEY=VALUE"),
    ("unknown dataset", ["--set", "dataset.name=cifar11"], r"unknown dataset 'cifar11' \(did you mean 'cifar10'"),
    ("unknown noise model", ["--set", "noise.kind=symetric"], r"did you mean 'symmetric'"),
    ("unknown preprocessor", ["--set", "preprocessor.name=dmpl"], r"unknown preprocessor 'dmpl' \(did you mean 'dmlp'"),
    ("wrong type", ["--set", "seed=abc"], r"seed: expected an integer, got 'abc'"),
    ("noise rate >= 1", ["--set", "noise.rate=1.5"], r"noise\.rate=1\.5 is outside \[0, 1\)"),
    ("noise rate < 0", ["--set", "noise.rate=-0.1"], r"noise\.rate=-0\.1 is outside \[0, 1\)"),
    ("trusted size > data", ["--set", "trusted.size=100000"], r"trusted\.size=100000(\.0)? asks for 100000 samples but the training set has 1437"),
    ("trusted set missing a class", ["--set", "trusted.source=index_file", "--set", "trusted.file=t_missing.csv"],
     r"t_missing\.csv' has no sample of class\(es\) \[9\]; give at least one trusted sample per class"),
    ("trusted label out of range", ["--set", "trusted.source=index_file", "--set", "trusted.file=t_range.csv"],
     r"t_range\.csv' has label 12 outside 0\.\.9"),
    ("trusted label negative", ["--set", "trusted.source=index_file", "--set", "trusted.file=t_neg.csv"],
     r"t_neg\.csv' has label -1 outside 0\.\.9"),
    ("trusted label float", ["--set", "trusted.source=index_file", "--set", "trusted.file=t_float.csv"],
     r"t_float\.csv' has a non-integer label 1\.5"),
    ("trusted index out of range", ["--set", "trusted.source=index_file", "--set", "trusted.file=t_index.csv"],
     r"t_index\.csv' has index 99999 outside 0\.\.1436"),
    ("trusted index twice", ["--set", "trusted.source=index_file", "--set", "trusted.file=t_dup.csv"],
     r"t_dup\.csv' lists an index twice"),
    ("noisy labels wrong length", ["--set", "noise.kind=human", "--set", "noise.file=h_short.npy"],
     r"h_short\.npy' hold 10 labels but the training split has 1437"),
    ("noisy labels out of range", ["--set", "noise.kind=human", "--set", "noise.file=h_range.npy"],
     r"h_range\.npy' span 17\.\.17, outside 0\.\.9"),
    ("noisy labels negative", ["--set", "noise.kind=human", "--set", "noise.file=h_neg.npy"],
     r"h_neg\.npy' span -1\.\.-1, outside 0\.\.9"),
    ("noisy labels float", ["--set", "noise.kind=human", "--set", "noise.file=h_float.npy"],
     r"h_float\.npy' have dtype float64; expected integer class indices"),
    ("features with NaN", ["--set", "features.source=npy", "--set", "features.path=f_nan.npy"],
     r"f_nan\.npy' has NaN or Inf values \(first in row 3\)"),
    ("features with Inf", ["--set", "features.source=npy", "--set", "features.path=f_inf.npy"],
     r"f_inf\.npy' has NaN or Inf values \(first in row 0\)"),
    ("features wrong dtype", ["--set", "features.source=npy", "--set", "features.path=f_str.npy"],
     r"f_str\.npy' has dtype <U1; give float features"),
    ("features wrong shape", ["--set", "features.source=npy", "--set", "features.path=f_1d.npy"],
     r"f_1d\.npy' has shape \(1437,\); give a 2-d \(N, d\) array"),
    ("fewer features than labels", ["--set", "features.source=npy", "--set", "features.path=f_short.npy"],
     r"f_short\.npy' has 100 rows but the data set has 1437 training samples"),
    ("features file truncated", ["--set", "features.source=npy", "--set", "features.path=f_trunc.npy"],
     r"f_trunc\.npy' could not be read"),
    ("CIFAR folder missing", ["--set", "dataset.name=cifar10", "--set", "dataset.params={root: nowhere}"],
     r"CIFAR-10 not found under 'nowhere'"),
    ("CIFAR files truncated", ["--set", "dataset.name=cifar10", "--set", "dataset.params={root: cifar}"],
     r"CIFAR-10 file .*cifar-10-batches-py/[\w.]+' is truncated or corrupt.*download CIFAR-10 again"),
    ("output folder not writable", ["!blocker/out"], r"--out 'blocker/out': cannot write into 'blocker'"),
    ("knn k grid not positive", ["--set", "checks.vote_ks=[5, 0]"],
     r"checks\.vote_ks=\[5, 0\]: 0 is not a positive integer; use auto or a list of positive integers"),
    ("knn k grid misspelt", ["--set", "checks.vote_ks=atuo"], r"checks\.vote_ks='atuo': 'atuo' is not a positive integer; use auto"),
    ("knn k grid a number", ["--set", "checks.vote_ks=5"], r"checks\.vote_ks: expected a string or a list, got 5"),
    ("knn view set unknown", ["--set", "checks.vote_views=[1, both]"],
     r"checks\.vote_views=\[1, 'both'\]: 'both' is not a view set; use auto or a list of 1, 2 and all"),
    ("knn_vote views unknown", ["--set", "preprocessor.name=knn_vote", "--set", "preprocessor.params={views: 3x}"],
     r"preprocessor\.params\.views='3x' is not known; use 1 or 2 \(one feature view\) or all"),
    # issue 13: hostile input
    ("duplicate YAML key", ["@dup.yaml"], r"dup\.yaml' is not valid YAML at line \d+, column 1: duplicate key 'seed' "
                                          r"\(first at line \d+\); give each key once"),
    ("YAML alias bomb", ["@bomb.yaml"], r"more than 100000 values once its aliases \(\*name\) are expanded"),
    ("YAML nested 100,000 deep", ["@deep.yaml"], r"deep\.yaml' is not valid YAML at line 1.*nesting deeper than 64"),
    ("config file over 1 MiB", ["@huge.yaml"], r"huge\.yaml' is 1\.\d MiB, more than a config's limit of 1 MiB"),
    ("base-60 number (YAML 1.1)", ["--set", "seed=1:30"], r"seed: expected an integer, got '1:30'"),
    ("negative seed", ["--set", "seed=-1"], r"seed=-1 is outside 0\.\.4294967295"),
    ("seed 2**70", ["--set", f"seed={2**70}"], rf"seed={2**70} is outside 0\.\.4294967295"),
    ("trusted.k 0", ["--set", "trusted.k=0"], r"trusted\.k=0 must be at least 1"),
    ("trusted.k > N", ["--set", "trusted.source=knn_auto", "--set", "trusted.k=5000"],
     r"trusted\.k=5000 asks for as many neighbours as the 1437 training samples or more"),
    ("trusted.size nan", ["--set", "trusted.size=.nan"], r"trusted\.size=nan is not a number of samples"),
    ("trusted.size inf", ["--set", "trusted.size=.inf"], r"trusted\.size=inf is not a number of samples"),
    ("trusted.size = N", ["--set", "trusted.size=1437", "--set", "trusted.balanced=false"],
     r"trusted\.size=1437(\.0)? asks for 1437 samples but the training set has 1437, leaving none to purify"),
    ("empty k grid", ["--set", "checks.vote_ks=[]"], r"checks\.vote_ks=\[\] (tries no k|: give at least one k)"),
    ("second view width 0", ["--set", "features.second_view_dim=0"], r"second_view_dim=0 is outside 1\.\.65536"),
    ("second view width negative", ["--set", "features.second_view_dim=-5"], r"second_view_dim=-5 is outside"),
    ("second view width 10**12", ["--set", "features.second_view_dim=1000000000000"],
     r"second_view_dim=1000000000000 is outside 1\.\.65536"),
    ("purifier epochs 10**12", ["--set", "preprocessor.params={epochs: 1000000000000}"],
     r"preprocessor\.params\.epochs=1000000000000 is more than the 10000 epochs allowed \(.* 31,710 years\)"),
    ("SimCLR epochs 10**9", ["--set", "features.ssl={epochs: 1000000000}"], r"features\.ssl\.epochs=1000000000 is more"),
    ("all-zero features", ["--set", "features.source=npy", "--set", "features.path=f_zero.npy"],
     r"f_zero\.npy' has 1437 all-zero rows"),
    ("an .npz given as features", ["--set", "features.source=npy", "--set", "features.path=f_npz.npy"],
     r"f_npz\.npy' is an \.npz archive \(arrays features\), not one array"),
    ("empty features file", ["--set", "features.source=npy", "--set", "features.path=f_empty.npy"],
     r"f_empty\.npy' could not be read without pickle \(EOFError"),
    ("empty trusted .npy file", ["--set", "trusted.source=index_file", "--set", "trusted.file=t_empty.npy"],
     r"t_empty\.npy' could not be read \(EOFError"),
    ("trusted .npy of no index", ["--set", "trusted.source=index_file", "--set", "trusted.file=t_none.npy"],
     r"t_none\.npy' lists no sample"),
    ("one-class data set", ["--set", "dataset={name: npy, params: {images: one_x.npy, labels: one_y.npy}}"],
     r"dataset 'npy' has one class only \(every training label is 3\)"),
    ("--out a dangling link", ["!dangling"], r"--out 'dangling' is a symbolic link to '.*nowhere', which does not exist"),
    ("--out name too long", ["!" + "x" * 300], r"is 300 bytes long, more than the 255 a file system allows"),
    ("cache folder a regular file", ["--set", "features.cache_dir=blocker"],
     r"features\.cache_dir='blocker' is a file, not a folder"),
]


# labels artifacts handed to `dmlp bench` (purified_labels): args after `dmlp bench demo.yaml --out OUT`
BENCH = ["--no-progress", "--set", "seeds=[0]", "--set", "methods=[{name: ce, params: {epochs: 1}}]"]
BENCH_CASES = [
    ("labels.npz missing", ["purified_labels=nowhere/labels.npz"], r"labels artifact 'nowhere/labels\.npz' not found"),
    ("labels.npz truncated", ["purified_labels=l_trunc.npz"], r"'l_trunc\.npz' is corrupt or truncated"),
    ("labels.npz not an artifact", ["purified_labels=l_garbage.npz"], r"'l_garbage\.npz' is corrupt or truncated"),
    ("labels of another data set", ["purified_labels=other/labels.npz"],
     r"'other/labels\.npz' belongs to another data set or sample order"),
    ("labels made with another seed", ["purified_labels=good/labels.npz", "seeds=[1]"],
     r"'good/labels\.npz' \(noise symmetric-80, seed 1\) was made with seed 0 but the cell has 1"),
    ("labels made with another trusted setting", ["purified_labels=good/labels.npz", "trusted.size=0.05"],
     r"'good/labels\.npz' .* was made with trusted \{.*\"size\": 0\.03.*\} but the cell has \{.*\"size\": 0\.05"),
    ("labels of another noise file", ["purified_labels=human/labels.npz", "noise=[{kind: human, file: h_other.npy}]"],
     r"'human/labels\.npz' .* was purified from other noisy labels than the cell draws \(\d+ of 1437 differ\)"),
    ("one labels file, several cells", ["purified_labels=good/labels.npz", "seeds=[0, 1]"],
     r"purified_labels='good/labels\.npz' names one file for 2 \(noise, seed\) cells; put \{noise\}"),
    ("labels purified on other features", ["purified_labels=f-s{seed}/labels.npz", "seeds=[0, 1]"],
     r"'f-s1/labels\.npz' \(noise symmetric-80, seed 1\) was purified on other features than .*f-s0"),
    ("unknown placeholder", ["purified_labels=p-{sed}/labels.npz"], r"has the placeholder \{sed\}; only"),
    ("format code in the pattern", ["purified_labels=p-{noise:d}/labels.npz"],
     r"purified_labels='p-\{noise:d\}/labels\.npz' cannot be filled in .*use plain \{noise\}"),
]


def _artifacts(folder: Path) -> None:
    """Labels artifacts as `dmlp purify` writes them (good: digits, sym 80%, seed 0; other: another split of
    digits; human: from a human-noise file), and two damaged ones, in ``folder``."""
    from dmlp_plugin.cli import main

    rng = np.random.default_rng(0)
    np.save(folder / "h_mine.npy", rng.integers(0, 10, N))
    np.save(folder / "h_other.npy", rng.integers(0, 10, N))
    for name, extra in (("good", []), ("other", ["--set", "dataset.params={seed: 1}"]),
                        ("human", ["--set", "noise.kind=human", "--set", f"noise.file={folder / 'h_mine.npy'}"]),
                        ("f-s1", ["--set", "seed=1", "--set", "features.second_view=random_relu"])):
        code = main(["purify", CONFIG, "--out", str(folder / name), *FAST, "--set", "noise.rate=0.8", *extra])
        assert code == 0
    shutil.copytree(folder / "good", folder / "f-s0")
    data = (folder / "good" / "labels.npz").read_bytes()
    (folder / "l_trunc.npz").write_bytes(data[: len(data) // 2])
    (folder / "l_garbage.npz").write_bytes(b"these are not labels\n" * 50)


def _bench(case_args):
    from dmlp_plugin.cli import main

    sets = [x for a in case_args for x in ("--set", a)]
    return main(["bench", str(ROOT / "configs" / "demo.yaml"), "--out", "out", *BENCH, *sets])


def _run(case_args, folder: Path, capsys, monkeypatch):
    from dmlp_plugin.cli import main

    monkeypatch.chdir(folder)
    config, out = CONFIG, "out"
    extra = []
    for a in case_args:
        if a.startswith("@"):
            config = a[1:]
        elif a.startswith("!"):
            out = a[1:]
        else:
            extra.append(a)
    code = main(["purify", config, "--out", out, *FAST, *extra])
    return code, capsys.readouterr().err, folder / out


def _assert_refused(code: int, err: str, message: str) -> None:
    """Exit code 2 and one line `error: ...` matching ``message``, no traceback."""
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert re.search(message, err), err


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalogue")
    _files(folder)
    return folder


@pytest.mark.parametrize("what, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(what, args, message, bad_files, capsys, monkeypatch):
    before = sorted(p.name for p in bad_files.iterdir())
    code, err, out = _run(args, bad_files, capsys, monkeypatch)
    _assert_refused(code, err, message)
    assert not os.path.exists(out)  # (False too for a name too long to look up)
    assert sorted(p.name for p in bad_files.iterdir()) == before  # no staging folder left behind


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("artifacts")
    _artifacts(folder)
    return folder


@pytest.mark.parametrize("what, args, message", BENCH_CASES, ids=[c[0] for c in BENCH_CASES])
def test_bad_labels_artifact_for_bench_is_refused_before_training(what, args, message, artifacts, capsys,
                                                                  monkeypatch):
    monkeypatch.chdir(artifacts)
    before = sorted(p.name for p in artifacts.iterdir())
    code = _bench(args)
    err = capsys.readouterr().err
    _assert_refused(code, err, message)
    assert sorted(p.name for p in artifacts.iterdir()) == before  # no output folder, no staging folder


def test_unknown_method_in_a_bench_config(tmp_path, capsys):
    from dmlp_plugin.cli import main

    cfg = tmp_path / "b.yaml"
    cfg.write_text((ROOT / "configs" / "demo.yaml").read_text().replace("{name: elr}", "{name: elrr}"))
    assert main(["bench", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"unknown method 'elrr' \(did you mean 'elr'", err) and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def _purify_with_plugin(tmp_path, capsys, monkeypatch, dist: str, source: str, name: str, then=None):
    """`dmlp purify` with preprocessor ``name`` from a fake installed distribution ``dist`` whose module is
    ``source``: (exit code, stderr); ``then()`` runs before the registry is reset."""
    from dmlp_plugin.cli import main
    from dmlp_plugin.registry import load_registry
    from tests.test_registry import _fake_distribution

    _fake_distribution(tmp_path, dist, source, f"[dmlp_plugin.preprocessors]\n{name} = {dist}:Thing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    load_registry.cache_clear()
    try:
        code = main(["purify", CONFIG, "--out", str(tmp_path / "o"), *FAST, "--set", f"preprocessor.name={name}"])
        err = capsys.readouterr().err
        assert not (tmp_path / "o").exists()
        if then is not None:
            then()
        return code, err
    finally:
        load_registry.cache_clear()


def test_broken_plugin_fails_alone_naming_its_distribution(tmp_path, capsys, monkeypatch):
    from dmlp_plugin.cli import main

    def everything_else_works():
        assert main(["purify", CONFIG, "--out", str(tmp_path / "ok"), *FAST]) == 0

    code, err = _purify_with_plugin(tmp_path, capsys, monkeypatch, "brokenplug", "raise ImportError('needs libfoo')\n",
                                    "broken", then=everything_else_works)
    assert code == 2 and err.count("\n") == 1
    assert re.search(r"broken from entry point of brokenplug 0\.1 failed to load.*needs libfoo", err), err


def test_plugin_calling_sys_exit_at_import_is_an_error(tmp_path, capsys, monkeypatch):
    code, err = _purify_with_plugin(tmp_path, capsys, monkeypatch, "exitplug", "import sys\nsys.exit(0)\n", "quitter")
    _assert_refused(code, err, r"quitter from entry point of exitplug 0\.1 failed to load .*called sys\.exit\(0\)")


# `dmlp bench` settings refused before anything is written (args after `dmlp bench demo.yaml --out OUT`)
BENCH_VALUE_CASES = [
    ("negative seed", ["seeds=[-1]"], r"seeds\[0\]=-1 is outside 0\.\.4294967295"),
    ("method label with ..", ["methods=[{name: ce, label: 'x/../../../victim', params: {epochs: 1}}]"],
     r"methods\[0\]\.label='x/\.\./\.\./\.\./victim' cannot name a folder"),
    ("method epochs 10**12", ["methods=[{name: ce, params: {epochs: 1000000000000}}]"],
     r"methods\[0\]\.params\.epochs=1000000000000 is more than the 10000 epochs allowed"),
]


@pytest.mark.parametrize("what, args, message", BENCH_VALUE_CASES, ids=[c[0] for c in BENCH_VALUE_CASES])
def test_bad_bench_settings_are_refused_before_config_yaml_is_written(what, args, message, tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _bench(args)
    _assert_refused(code, capsys.readouterr().err, message)
    assert list(tmp_path.iterdir()) == []  # no out/config.yaml, nothing beside it


def test_bom_on_a_headerless_trusted_csv_keeps_the_first_row(tmp_path, monkeypatch):
    import json

    from dmlp_plugin.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.csv").write_text("".join(f"{i},{i % 10}\n" for i in range(40)), encoding="utf-8-sig")
    assert main(["purify", CONFIG, "--out", "o", *FAST, "--set", "trusted.source=index_file",
                 "--set", "trusted.file=t.csv"]) == 0
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["trusted"]["size"] == 40


@pytest.mark.parametrize("scale", [1e200, 1e-300])
def test_features_of_extreme_scale_are_rescaled_not_refused(scale, tmp_path, monkeypatch):
    from dmlp_plugin.pipeline import _load_feature_file

    x = np.random.default_rng(0).random((50, 4)) + 0.1
    np.save(tmp_path / "f.npy", x * scale)
    got = _load_feature_file(str(tmp_path / "f.npy"), 50, "features.path")
    assert got.dtype == np.float32 and np.all(np.isfinite(got))
    assert np.allclose(got, x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-6)


def test_output_faults_read_only_parent_and_full_disk(tmp_path, capsys, monkeypatch):
    """--out under a parent that cannot be written: refused before the run. The disk full during the final
    write: one line saying the previous output is intact, which it is, and no temporary file is left."""
    import errno
    import os

    from dmlp_plugin import artifacts
    from dmlp_plugin.cli import main

    monkeypatch.chdir(tmp_path)
    parent = tmp_path / "ro"
    (parent / "out").mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **k: Path(p).resolve() != parent and real_access(p, m, **k))
    _assert_refused(main(["purify", CONFIG, "--out", "ro/out", *FAST]), capsys.readouterr().err,
                    r"its replacement is built beside it, in '.*ro', which cannot be written")
    monkeypatch.setattr(os, "access", real_access)
    assert main(["purify", CONFIG, "--out", "o", *FAST]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts, "write_npz", full)
    _assert_refused(main(["purify", CONFIG, "--out", "o", *FAST, "--set", "seed=1"]), capsys.readouterr().err,
                    r"--out 'o' could not be written \(the disk is full\); the previous contents of 'o' are intact "
                    r"and no temporary file was left; free some space and rerun")
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dmlp_cache", "o", "ro"]


def test_damaged_or_code_carrying_checkpoint_is_refused(tmp_path):
    # accelerate 1.15 loads registered objects with weights_only=False; we read every file safely first
    import os

    import torch

    from baselines.ce import CE
    from baselines.common import TrainData
    from dmlp_plugin.data.datasets import load_digits
    from dmlp_plugin.errors import UserError

    d = load_digits()
    data = TrainData(d.train.images[:120], d.train.labels[:120], d.test.images[:40], d.test.labels[:40], 10)
    cfg = CE.from_preset("small", epochs=1, batch_size=32)
    cfg.run(data, device="cpu", progress=False, checkpoint_dir=tmp_path / "ck")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"epoch": Payload()}, tmp_path / "ck" / "state" / "custom_checkpoint_0.pkl")
    with pytest.raises(UserError, match=r"checkpoint .* is damaged or not ours \(custom_checkpoint_0\.pkl"):
        cfg.run(data, device="cpu", progress=False, checkpoint_dir=tmp_path / "ck")
    assert not (tmp_path / "pwned").exists()
    model = tmp_path / "ck" / "state" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    (tmp_path / "ck" / "state" / "custom_checkpoint_0.pkl").unlink()
    with pytest.raises(UserError, match=r"damaged or not ours \(model\.safetensors"):
        cfg.run(data, device="cpu", progress=False, checkpoint_dir=tmp_path / "ck")


if __name__ == "__main__":  # the catalogue as a table
    import tempfile
    from contextlib import redirect_stderr
    from io import StringIO

    from dmlp_plugin.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _files(folder)
        os_cwd = Path.cwd()
        os.chdir(folder)
        print("| input | message | exit code |\n|---|---|---|")
        for what, args, _ in CASES:
            config = next((a[1:] for a in args if a.startswith("@")), CONFIG)
            out = next((a[1:] for a in args if a.startswith("!")), "out")
            extra = [a for a in args if not a.startswith(("@", "!"))]
            buf = StringIO()
            with redirect_stderr(buf):
                code = main(["purify", config, "--out", out, *FAST, *extra])
            msg = buf.getvalue().strip().replace("|", "\\|").replace(str(folder) + "/", "")
            print(f"| {what} | `{msg}` | {code} |")
        _artifacts(folder)
        for what, args, _ in BENCH_CASES:
            buf = StringIO()
            with redirect_stderr(buf):
                code = _bench(args)
            msg = buf.getvalue().strip().replace("|", "\\|").replace(str(folder) + "/", "")
            print(f"| `dmlp bench`: {what} | `{msg}` | {code} |")
        os.chdir(os_cwd)
