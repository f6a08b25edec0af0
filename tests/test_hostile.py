"""Hostile input and faults (issue 13): names that cannot leave --out, output folders replaced as a whole
(fault injection between the renames), SIGTERM, YAML 1.2 and its limits, the umask, checkpoint locks and
the feature-cache key."""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
CONFIG = str(ROOT / "configs" / "purify-digits.yaml")
DEMO = str(ROOT / "configs" / "demo.yaml")
FAST = ["--no-progress", "--set", "features.source=raw", "--set", "preprocessor.params={epochs: 5}",
        "--set", "checks.estimate_folds=0", "--set", "checks.compare=[]"]


def _one_line(capsys, pattern):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------
# names that reach the file system


@pytest.mark.parametrize("label", ["x/../../../victim", "../victim", "a/b", ".hidden", "a..b", "x" * 101])
def test_a_method_label_cannot_reach_outside_out(label, tmp_path, capsys, monkeypatch):
    from dmlp_plugin.cli import main

    monkeypatch.chdir(tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    (tmp_path / "work").mkdir()
    before = _tree(tmp_path)
    code = main(["bench", DEMO, "--out", "work/out", "--no-progress", "--set", "seeds=[0]",
                 "--set", f"methods=[{{name: ce, label: {json.dumps(label)}, params: {{epochs: 1}}}}]"])
    assert code == 2
    _one_line(capsys, r"methods\[0\]\.label=.* cannot name a folder: use letters, digits")
    assert _tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["victim", "work"]
    assert not (tmp_path / "work" / "out").exists()


def test_noise_tags_from_file_names_are_made_folder_safe():
    from dmlp_plugin.bench import noise_tag
    from dmlp_plugin.config import NoiseConfig, check_name

    for file, key in (("../../etc/x..y.npy", None), ("my labels.npy", None), ("l.npz", "../../a/b")):
        tag = noise_tag(NoiseConfig(kind="human", file=file, key=key))
        assert check_name(tag, "tag", "") == tag and "/" not in tag and ".." not in tag, tag
    assert noise_tag(NoiseConfig(kind="human", file="CIFAR-10_human.pt", key="aggre_label")) == "human-aggre_label"


def test_deletes_and_writes_stay_inside_the_root(tmp_path):
    from dmlp_plugin.atomic import inside, remove_tree
    from dmlp_plugin.errors import UserError

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    root = tmp_path / "out"
    (root / "runs").mkdir(parents=True)
    (root / "runs" / "link").symlink_to(outside)  # a link planted inside the output folder
    for bad in (root / "runs" / "link", root / "runs" / ".." / ".." / "outside", root):
        with pytest.raises(UserError, match="outside .*dmlp writes and deletes only inside its output folder"):
            remove_tree(bad, root)
    assert (outside / "keep.txt").read_text() == "mine"
    (root / "runs" / "r1" / "checkpoint").mkdir(parents=True)
    remove_tree(root / "runs" / "r1", root)
    assert not (root / "runs" / "r1").exists() and inside(root, root / "runs" / "x") == root / "runs" / "x"


# ---------------------------------------------------------------------------------------------------------
# the output folder replaced as a whole


def _folder(path: Path, tag: str, names=("labels.npz", "metrics.json", "report.md")) -> None:
    path.mkdir()
    for n in names:
        (path / n).write_text(f"{tag} {n}")


def _one_run(folder: Path) -> set:
    """The tags of the runs whose files the folder holds."""
    return {p.read_text().split()[0] for p in folder.iterdir()}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_replace_folder_swaps_whole_folders(exchange, tmp_path, monkeypatch):
    from dmlp_plugin import atomic

    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    dest = tmp_path / "out"
    _folder(dest, "old", ("labels.npz", "metrics.json", "extra_plot.png"))
    staged = atomic.staging_folder(dest)
    (staged / "labels.npz").write_text("new labels.npz")
    atomic.replace_folder(staged, dest)
    assert {p.name for p in dest.iterdir()} == {"labels.npz"} and _one_run(dest) == {"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old folder left


def test_interrupted_move_never_mixes_two_runs(tmp_path, monkeypatch):
    """Fault injection: every rename after the first raises (a kill between the two renames of the fallback,
    or a failure of the restore): the folder holds one run's files or is absent, and the next run puts the old
    one back before anything else."""
    from dmlp_plugin import atomic

    dest = tmp_path / "out"
    _folder(dest, "old")
    staged = atomic.staging_folder(dest)
    (staged / "labels.npz").write_text("new labels.npz")
    (staged / "metrics.json").write_text("new metrics.json")
    real_rename, calls = os.rename, []

    def flaky(a, b):
        calls.append((a, b))
        if len(calls) > 1:
            raise OSError(errno.EIO, "injected fault")
        real_rename(a, b)

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    monkeypatch.setattr(atomic.os, "rename", flaky)
    with pytest.raises(OSError, match="injected"):
        atomic.replace_folder(staged, dest)
    monkeypatch.setattr(atomic.os, "rename", real_rename)
    assert not dest.exists() or len(_one_run(dest)) == 1
    atomic.clean_stale(dest)  # what the next run does first
    assert _one_run(dest) == {"old"} and {p.name for p in dest.iterdir()} == {"labels.npz", "metrics.json",
                                                                               "report.md"}


def test_failed_exchange_or_second_rename_leaves_the_old_folder(tmp_path, monkeypatch):
    from dmlp_plugin import atomic

    dest = tmp_path / "out"
    _folder(dest, "old")

    def broken(a, b):
        raise OSError(errno.ENOSPC, "No space left on device")

    for patch in ("_exchange", "rename"):
        staged = atomic.staging_folder(dest)
        (staged / "labels.npz").write_text("new labels.npz")
        real_rename, calls = os.rename, []

        def second_fails(a, b):
            calls.append(a)
            if len(calls) == 2:
                raise OSError(errno.EIO, "injected fault")
            real_rename(a, b)

        with monkeypatch.context() as m:
            if patch == "_exchange":
                m.setattr(atomic, "_exchange", broken)
            else:
                m.setattr(atomic, "_exchange", lambda a, b: False)
                m.setattr(atomic.os, "rename", second_fails)
            with pytest.raises(OSError):
                atomic.replace_folder(staged, dest)
        assert _one_run(dest) == {"old"} and len(list(dest.iterdir())) == 3
        atomic.remove_tree(staged, tmp_path)


def test_purify_rerun_after_a_kill_mid_move_restores_then_replaces(tmp_path, capsys, monkeypatch):
    """A real `dmlp purify` into a folder of an earlier run, its move interrupted (fault injection): exit 2,
    one line; the folder is the earlier run's, whole; a kill -9's leftovers (a staging folder of a dead
    process) are cleaned by the next run, which then replaces the folder whole."""
    from dmlp_plugin import atomic
    from dmlp_plugin.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["purify", CONFIG, "--out", str(out), *FAST]) == 0
    first = _tree(out)
    real_exchange = atomic._exchange
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: (_ for _ in ()).throw(OSError(errno.EIO, "injected")))
    assert main(["purify", CONFIG, "--out", str(out), *FAST, "--set", "seed=1"]) == 2
    _one_line(capsys, r"--out '.*out' could not be written \(.*\); the previous contents of .* are intact and no "
                      r"temporary file was left")
    assert _tree(out) == first and sorted(p.name for p in tmp_path.iterdir()) == [".dmlp_cache", "out"]
    monkeypatch.setattr(atomic, "_exchange", real_exchange)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out.partial-{dead.pid}-abc123"
    _folder(stale, "killed")
    monkeypatch.chdir(tmp_path)
    assert main(["purify", CONFIG, "--out", "out", *FAST, "--set", "seed=1"]) == 0
    assert not stale.exists() and _tree(out).keys() == first.keys() and _tree(out) != first
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_purify_refuses_an_out_holding_other_files(tmp_path, capsys, monkeypatch):
    from dmlp_plugin.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    assert main(["purify", CONFIG, "--out", str(out), *FAST]) == 2
    _one_line(capsys, r"holds 'thesis\.tex', which dmlp purify did not write, and the folder is replaced as a whole")
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


# ---------------------------------------------------------------------------------------------------------
# SIGTERM


def test_sigterm_ends_like_ctrl_c(tmp_path, capsys, monkeypatch):
    from dmlp_plugin import pipeline
    from dmlp_plugin.cli import main

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        raise AssertionError("SIGTERM was not turned into an interrupt")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "purify_labels", terminated)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    assert main(["purify", CONFIG, "--out", str(out), *FAST]) == 143
    assert capsys.readouterr().err == "error: interrupted; rerun the same command to resume\n"
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is main()'s only
    assert not out.exists() and not list(tmp_path.rglob("*.lock"))  # the checkpoint's lock went with it


# ---------------------------------------------------------------------------------------------------------
# YAML


def test_yaml_numbers_are_yaml_1_2_and_duplicates_are_refused(tmp_path):
    from dmlp_plugin.config import PurifyConfig, load_config, read_yaml
    from dmlp_plugin.errors import UserError

    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 010\nnoise: {rate: 5e-1}\ntrusted: {size: 0x28}\n")
    c, _ = load_config(cfg, ["checks.k=012"], schema=PurifyConfig)
    assert (c.seed, c.noise.rate, c.trusted.size, c.checks.k) == (10, 0.5, 40.0, 12)
    assert read_yaml(_write(tmp_path, "t: 1:30\nu: 1_000\n")) == {"t": "1:30", "u": "1_000"}
    with pytest.raises(UserError, match=r"not valid YAML at line 3, column 1: duplicate key 'seed' \(first at line 1\)"):
        read_yaml(_write(tmp_path, "seed: 0\nnoise: {rate: 0.5}\nseed: 1\n"))
    with pytest.raises(UserError, match=r"--set methods: duplicate key 'name'"):
        load_config(cfg, ["methods=[{name: ce, name: elr}]"], schema=PurifyConfig)
    assert read_yaml(_write(tmp_path, "a: &x {k: 1}\nb: {<<: *x, j: 2}\n")) == {"a": {"k": 1}, "b": {"k": 1, "j": 2}}


def _write(folder: Path, text: str) -> Path:
    p = folder / f"y{abs(hash(text))}.yaml"
    p.write_text(text)
    return p


def test_yaml_limits_refuse_bombs_size_and_depth_quickly(tmp_path):
    from dmlp_plugin.config import read_yaml
    from dmlp_plugin.errors import UserError

    bomb = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(9))
    t = time.perf_counter()
    with pytest.raises(UserError, match=r"more than 100000 values once its aliases \(\*name\) are expanded"):
        read_yaml(_write(tmp_path, bomb))
    with pytest.raises(UserError, match=r"nesting deeper than 64 levels"):
        read_yaml(_write(tmp_path, "a: " + "[" * 100_000 + "]" * 100_000 + "\n"))
    big = tmp_path / "big.yaml"
    big.write_text("k: [" + ", ".join(["1"] * 600_000) + "]\n")
    with pytest.raises(UserError, match=r"is 1\.\d MiB, more than a config's limit of 1 MiB"):
        read_yaml(big)
    assert time.perf_counter() - t < 20


# ---------------------------------------------------------------------------------------------------------
# the umask


def test_files_and_folders_get_the_users_umask(tmp_path, monkeypatch):
    from dmlp_plugin import atomic

    old = os.umask(0o022)
    try:
        atomic.write_json(tmp_path / "a.json", {"x": 1})
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        dest = tmp_path / "out"
        staged = atomic.staging_folder(dest)
        atomic.replace_folder(staged, dest)
        assert dest.stat().st_mode & 0o777 == 0o755
        os.umask(0o077)
        atomic.write_text(tmp_path / "b.txt", "x")
        assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
        dest.chmod(0o750)  # a replaced folder keeps the permissions it had
        atomic.replace_folder(atomic.staging_folder(dest), dest)
        assert dest.stat().st_mode & 0o777 == 0o750
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------------------------------------
# checkpoint ownership and the feature-cache key


def test_a_lock_held_by_a_live_run_refuses_and_a_dead_ones_is_taken_over(tmp_path):
    from dmlp_plugin.atomic import exclusive
    from dmlp_plugin.errors import UserError

    lock = tmp_path / "ck.lock"
    with exclusive(lock, "the checkpoint ck.pt"):
        assert lock.read_text().split() == [str(os.getpid()), socket.gethostname()]
    assert not lock.exists()
    live = subprocess.Popen(["sleep", "30"])
    try:
        lock.write_text(f"{live.pid} {socket.gethostname()}\n")
        with pytest.raises(UserError, match=rf"another dmlp run \(pid {live.pid} on .*\) is working on the "
                                            r"checkpoint ck\.pt"):
            with exclusive(lock, "the checkpoint ck.pt"):
                pass
    finally:
        live.kill()
        live.wait()
    for left_by in (live.pid, os.getpid()):  # a dead run's lock, and one this process never released
        lock.write_text(f"{left_by} {socket.gethostname()}\n")
        with exclusive(lock, "the checkpoint ck.pt"):
            assert lock.read_text().split()[0] == str(os.getpid())
        assert not lock.exists()


def test_second_purify_on_the_same_checkpoint_is_refused(tmp_path, capsys, monkeypatch):
    from dmlp_plugin import pipeline
    from dmlp_plugin.cli import main
    from dmlp_plugin.config import load_config

    monkeypatch.chdir(tmp_path)
    args = FAST[1:]
    cfg, raw = load_config(CONFIG, [a for a in args if a != "--set"])
    stem = f"purify-{pipeline.config_hash(raw)}-{pipeline.load_data(cfg).train.fingerprint()[:12]}"
    (tmp_path / ".dmlp_cache").mkdir()
    (tmp_path / ".dmlp_cache" / f"{stem}.lock").write_text(f"1 {socket.gethostname()}\n")  # pid 1: alive
    assert main(["purify", CONFIG, "--out", "out", *FAST]) == 2
    _one_line(capsys, r"another dmlp run \(pid 1 on .*\) is working on the purifier checkpoint")
    assert not (tmp_path / "out").exists()


def test_feature_cache_key_has_the_thread_count_and_old_files_still_serve(tmp_path):
    import torch

    from dmlp_plugin.atomic import write_npz
    from dmlp_plugin.features.cache import cache_key, get_features
    from dmlp_plugin.features.ssl import SimCLRConfig
    from dmlp_plugin.records import ImageSet

    images = np.random.default_rng(0).integers(0, 255, (12, 8, 8, 1)).astype(np.uint8)
    data = ImageSet("tiny", images, np.arange(12) % 2, 2)
    cfg = SimCLRConfig()
    keys = {cache_key(data, cfg, t) for t in (None, 1, 2)}
    assert len(keys) == 3
    legacy = cache_key(data, cfg)  # the key before the thread count was in it
    feats = np.eye(12, 4, dtype=np.float32) + 1
    write_npz(tmp_path / f"features-{legacy}.npz", plain=feats, hflip=feats, provenance=np.array('{"key": "old"}'))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        bank = get_features(data, cfg, tmp_path, device="cpu", progress=False)
    assert bank.path.endswith(f"features-{legacy}.npz") and np.array_equal(bank.views["plain"], feats)
    assert any(f"delete it to make them again with {torch.get_num_threads()} threads" in str(x.message) for x in w)


def test_second_bench_in_the_same_out_is_refused(tmp_path, capsys, monkeypatch):
    from dmlp_plugin.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".dmlp-bench.lock").write_text(f"1 {socket.gethostname()}\n")  # pid 1: alive
    code = main(["bench", DEMO, "--out", "out", "--no-progress", "--set", "seeds=[0]", "--set", "features.source=raw",
                 "--set", "methods=[{name: ce, params: {epochs: 1}}]"])
    assert code == 2
    _one_line(capsys, r"another dmlp run \(pid 1 on .*\) is working on the benchmark in 'out'")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".dmlp-bench.lock"]  # nothing written, lock kept
